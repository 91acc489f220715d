"""What a schedule is: devices, placements (task, device, stream, batch, start, end), and lower bounds.

A schedule is a list of `Placement`s that an executor can run as is: placements that share a ``batch`` id
are one launch (on one device; several of them means one batched engine call over several segments),
different ``stream`` ids inside one launch run concurrently on separate CUDA streams, and host placements
(``device == HOST``) run on the CPU (the video writer). Times are seconds from the start of the run.

Memory model: a segment holds its KV pages on a device from the start of its first stage task there to the
end of its last one (a conservative hull); at no time may more segments be resident on a device than its
capacity (`MemoryPlan.capacity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .costs import CostModel
from .dag import Task, TaskDAG

HOST = -1
PACK_MODES = ("single", "batch", "streams")
_EPS = 1e-9


@dataclass(frozen=True)
class Device:
    """A place to run tasks.

    Attributes:
        name: a label (``"cuda:0"``, ``"sim:3"``).
        speed: relative speed (a task of cost c takes c / speed).
        memory_bytes: memory the run may use on it (free memory); None: not limited.
    """

    name: str
    speed: float = 1.0
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.speed, (int, float)) or isinstance(self.speed, bool) or not self.speed > 0:
            raise ValueError(f"Device.speed must be a positive number, got {self.speed!r}")
        if self.memory_bytes is not None and (not isinstance(self.memory_bytes, int) or self.memory_bytes < 0):
            raise ValueError(f"Device.memory_bytes must be a non-negative int or None, got {self.memory_bytes!r}")


def simulated_devices(
    count: int, speeds: Sequence[float] | None = None, memory_bytes: int | None = None
) -> list[Device]:
    """`count` devices named ``sim:i`` with the given relative speeds (default all 1)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    speeds = [1.0] * count if speeds is None else list(speeds)
    if len(speeds) != count:
        raise ValueError(f"speeds: expected {count} values (one per device), got {len(speeds)}")
    return [Device(f"sim:{i}", float(v), memory_bytes) for i, v in enumerate(speeds)]


@dataclass(frozen=True)
class Placement:
    """One task placed: where, on which stream, in which launch, and when (seconds from the run's start)."""

    task: Task
    device: int
    stream: int
    batch: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Unit:
    """A launch: one task (``"single"``), tasks of the same stage of several segments batched into one engine
    call (``"batch"``), or tasks running concurrently on separate CUDA streams of one device (``"streams"``)."""

    tasks: tuple[int, ...]
    mode: str = "single"

    def __post_init__(self) -> None:
        if self.mode not in PACK_MODES:
            raise ValueError(f"Unit.mode must be one of {', '.join(PACK_MODES)}, got {self.mode!r}")
        if not self.tasks or (self.mode == "single") != (len(self.tasks) == 1):
            raise ValueError(f"Unit: mode {self.mode!r} does not fit {len(self.tasks)} tasks")


@dataclass
class Schedule:
    """A placement of every task of `dag` (sorted by start time)."""

    dag: TaskDAG
    devices: tuple[Device, ...]
    placements: tuple[Placement, ...]
    policy: str
    capacity: tuple[int | None, ...] = ()

    @property
    def makespan(self) -> float:
        return max((p.end for p in self.placements), default=0.0)

    def placement(self, task: Task | int) -> Placement:
        idx = task if isinstance(task, int) else task.index
        return self._by_task[idx]

    @property
    def _by_task(self) -> dict[int, Placement]:
        cached = self.__dict__.get("_by_task_cache")
        if cached is None:
            cached = self.__dict__["_by_task_cache"] = {p.task.index: p for p in self.placements}
        return cached

    def device_name(self, device: int) -> str:
        return "host" if device == HOST else self.devices[device].name

    def by_device(self) -> dict[int, list[Placement]]:
        out: dict[int, list[Placement]] = {}
        for p in self.placements:
            out.setdefault(p.device, []).append(p)
        return out

    def launches(self) -> list[list[Placement]]:
        """Placements grouped by launch (batch id), in start order: what an executor issues."""
        groups: dict[int, list[Placement]] = {}
        for p in self.placements:
            groups.setdefault(p.batch, []).append(p)
        return sorted(groups.values(), key=lambda g: (g[0].start, g[0].device))

    def busy(self) -> list[float]:
        """Busy seconds of each device (launches, not tasks: a batch counts once)."""
        out = [0.0] * len(self.devices)
        for group in self.launches():
            if group[0].device != HOST:
                out[group[0].device] += max(p.end for p in group) - min(p.start for p in group)
        return out

    def resident(self) -> list[list[tuple[int, float, float]]]:
        """Per device, the (segment, first start, last end) hulls of its stage tasks: KV pages held there."""
        hull: dict[tuple[int, int], list[float]] = {}
        for p in self.placements:
            if p.device == HOST or not p.task.is_stage:
                continue
            h = hull.setdefault((p.device, p.task.segment), [p.start, p.end])
            h[0], h[1] = min(h[0], p.start), max(h[1], p.end)
        out: list[list[tuple[int, float, float]]] = [[] for _ in self.devices]
        for (d, s), (lo, hi) in sorted(hull.items()):
            out[d].append((s, lo, hi))
        return out

    def peak_resident(self) -> list[int]:
        """Largest number of segments resident at once on each device."""
        return [_max_overlap([(lo, hi) for _, lo, hi in r]) for r in self.resident()]

    def check(self, costs: CostModel | None = None) -> None:
        """Raise ValueError if a task is missing or placed twice, a dependency (plus its transfer, when `costs`
        is given) is violated, two launches overlap on one device stream or the host, or memory is exceeded."""
        problems: list[str] = []
        seen = [p.task.index for p in self.placements]
        if sorted(seen) != list(range(len(self.dag.tasks))):
            problems.append("every task must be placed exactly once")
        by = self._by_task
        for p in self.placements:
            if p.end < p.start - _EPS:
                problems.append(f"{p.task.name} ends before it starts")
            if (p.device == HOST) != p.task.on_host:
                problems.append(f"{p.task.name} is on the wrong kind of resource ({self.device_name(p.device)})")
            for e in self.dag.preds[p.task.index]:
                src = by.get(e.src)
                if src is None:
                    continue
                delay = 0.0
                if costs is not None and HOST not in (src.device, p.device) and src.device != p.device:
                    delay = costs.transfer_seconds(e)
                if p.start < src.end + delay - 1e-6:
                    problems.append(f"{p.task.name} starts at {p.start:.4f} before {src.task.name} ends (+transfer)")
        lanes: dict[tuple[int, int], list[tuple[float, float, int]]] = {}
        for group in self.launches():
            p0 = group[0]
            if len({(p.device, p.start) for p in group}) != 1:
                problems.append(f"launch {p0.batch} mixes devices or start times")
            if p0.device == HOST:
                for p in group:
                    lanes.setdefault((HOST, 0), []).append((p.start, p.end, p.batch))
            else:
                lanes.setdefault((p0.device, 0), []).append((p0.start, max(p.end for p in group), p0.batch))
        for (d, _), spans in lanes.items():
            spans.sort()
            for a, b in zip(spans, spans[1:]):
                if b[0] < a[1] - 1e-6:
                    problems.append(f"launches {a[2]} and {b[2]} overlap on {self.device_name(d)}")
        if self.capacity:
            for d, peak in enumerate(self.peak_resident()):
                cap = self.capacity[d]
                if cap is not None and peak > cap:
                    problems.append(f"{self.devices[d].name}: {peak} segments resident at once, capacity {cap}")
        if problems:
            raise ValueError(f"invalid schedule ({self.policy}): " + "; ".join(problems[:8]))

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "makespan": self.makespan,
            "devices": [{"name": d.name, "speed": d.speed, "memory_bytes": d.memory_bytes} for d in self.devices],
            "placements": [
                {
                    "task": p.task.name,
                    "segment": p.task.segment,
                    "kind": p.task.kind,
                    "stage": p.task.stage,
                    "device": self.device_name(p.device),
                    "stream": p.stream,
                    "batch": p.batch,
                    "start": round(p.start, 6),
                    "end": round(p.end, 6),
                }  # fmt: skip
                for p in self.placements
            ],
        }


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(lo, 1) for lo, hi in spans if hi > lo] + [(hi, -1) for lo, hi in spans if hi > lo])
    cur = best = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


# --- bounds -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """Lower bounds on any schedule's makespan.

    Attributes:
        critical_path: the longest path with every device task on the fastest device, no transfers.
        work: device work (at its cheapest packing) divided by the sum of device speeds.
        host: the serial host lane's total work.
        tail: the shortest path that must follow any device task (e.g. the last write): the last device
            task ends no earlier than `work`, so ``work + tail`` is a bound too (`refined`).
    """

    critical_path: float
    work: float
    host: float
    tail: float = 0.0

    @property
    def value(self) -> float:
        """max(critical path, work / devices, host work): the bound the efficiency figures use."""
        return max(self.critical_path, self.work, self.host)

    @property
    def refined(self) -> float:
        """`value`, with the unavoidable tail after the last device task added to the work bound."""
        return max(self.value, self.work + self.tail)


def lower_bound(dag: TaskDAG, costs: CostModel, devices: Sequence[Device]) -> Bounds:
    """Speed-weighted lower bounds: critical path at the fastest speed, total work over the sum of speeds."""
    if not devices:
        raise ValueError("devices: at least one device is required")
    fastest = max(d.speed for d in devices)
    cp, _ = dag.longest_path(lambda t: costs.cost(t) if t.on_host else costs.cost(t) / fastest)
    groups: dict[str, list[Task]] = {}
    for t in dag.tasks:
        if not t.on_host:
            groups.setdefault(pack_key(t), []).append(t)
    work = 0.0
    for tasks in groups.values():
        t = tasks[0]
        per = costs.cost(t)
        if t.kind == "populate":  # packing can amortise per-launch costs; take its best case
            per = min(per, costs.cost(t, len(tasks)) / len(tasks), per - costs.launch_overhead(t))
        work += per * len(tasks)
    host = sum(costs.cost(t) for t in dag.tasks if t.on_host)
    after = [0.0] * len(dag.tasks)
    for t in reversed(dag.tasks):
        after[t.index] = max(
            (after[e.dst] + (costs.cost(dag.tasks[e.dst]) / (1 if dag.tasks[e.dst].on_host else fastest))
             for e in dag.succs[t.index]), default=0.0,
        )  # fmt: skip
    tail = min((after[t.index] for t in dag.tasks if not t.on_host), default=0.0)
    return Bounds(cp, work / sum(d.speed for d in devices), host, tail)


def pack_key(t: Task) -> str:
    """Tasks with the same key can share one batched launch (same stage shape, different segments)."""
    return f"{t.kind}:{t.stage}:{len(t.frames)}:{len(t.reads)}:{len(t.given)}"
