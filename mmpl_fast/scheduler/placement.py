"""What a schedule is: devices, placements (task, device, stream, batch, start, end), and lower bounds.

A schedule is a list of `Placement`s that an executor can run as is: placements that share a ``batch`` id
are one launch (on one device; several of them means one batched engine call over several segments),
different ``stream`` ids inside one launch run concurrently on separate CUDA streams, and host placements
(``device == HOST``) run on the CPU (the video writer). Times are seconds from the start of the run.

A *widened* placement (``split`` not None) is one task run across several devices at once: ``devices`` lists
them (``device``, its home, first), ``split`` says how (`split.Split`: head-parallel and/or guidance-branch
parallel, and where the KV pages it writes end up). It is one launch of its own; every device of it is busy
from ``start`` to ``end``. A schedule without widened placements is exactly what it was before they existed
(``devices == (device,)``, ``split is None``, same `to_dict`), so executors that do not know splits run it
unchanged; `Schedule.has_splits` says whether an executor must (see `split` for the contract).

Memory model: a segment holds its KV pages on a device from the start of its first stage task there to the
end of its last one (a conservative hull; a widened task makes its segment resident on all its devices); at
no time may more segments be resident on a device than its capacity (`MemoryPlan.capacity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .costs import CostModel
from .dag import Edge, Task, TaskDAG
from .split import Split

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
        streams: whether launches on separate streams overlap there (CUDA streams); None: from the name,
            no for a ``"cpu"`` device (the executor runs stream groups one after the other there), yes
            otherwise.
    """

    name: str
    speed: float = 1.0
    memory_bytes: int | None = None
    streams: bool | None = None

    @property
    def has_streams(self) -> bool:
        return self.streams if self.streams is not None else not self.name.lower().startswith("cpu")

    def __post_init__(self) -> None:
        if not isinstance(self.speed, (int, float)) or isinstance(self.speed, bool) or not self.speed > 0:
            raise ValueError(f"Device.speed must be a positive number, got {self.speed!r}")
        if self.memory_bytes is not None and (not isinstance(self.memory_bytes, int) or self.memory_bytes < 0):
            raise ValueError(f"Device.memory_bytes must be a non-negative int or None, got {self.memory_bytes!r}")
        if self.streams is not None and not isinstance(self.streams, bool):
            raise ValueError(f"Device.streams must be True, False or None, got {self.streams!r}")


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
    """One task placed: where, on which stream, in which launch, and when (seconds from the run's start).

    Attributes:
        device: the device index (`HOST` for the writer); for a widened task its home device.
        devices: a widened task's devices, home first (``()`` for a task on one device).
        split: how a widened task is divided (`split.Split`), None otherwise.
    """

    task: Task
    device: int
    stream: int
    batch: int
    start: float
    end: float
    devices: tuple[int, ...] = ()
    split: Split | None = None

    def __post_init__(self) -> None:
        if (self.split is None) != (not self.devices):
            raise ValueError(f"Placement of {self.task.name}: devices and split go together")
        if self.split is not None:
            if len(set(self.devices)) != len(self.devices) or len(self.devices) != self.split.ways:
                raise ValueError(f"Placement of {self.task.name}: {self.split.ways} distinct devices expected, "
                                 f"got {self.devices}")  # fmt: skip
            if self.devices[0] != self.device:
                raise ValueError(f"Placement of {self.task.name}: devices[0] must be the home device {self.device}")

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def all_devices(self) -> tuple[int, ...]:
        """Every device the placement occupies (one, or a widened task's)."""
        return self.devices or (self.device,)

    @property
    def holding(self) -> tuple[tuple[int, ...], Split | None]:
        """Where the task's outputs live (`CostModel.move_seconds`)."""
        return self.all_devices, self.split


@dataclass(frozen=True)
class Unit:
    """A launch: one task (``"single"``), tasks of the same stage of several segments batched into one engine
    call (``"batch"``), or tasks running concurrently on separate CUDA streams of one device (``"streams"``).
    A single task may be widened across ``split.ways`` devices (`split`)."""

    tasks: tuple[int, ...]
    mode: str = "single"
    split: Split | None = None

    def __post_init__(self) -> None:
        if self.mode not in PACK_MODES:
            raise ValueError(f"Unit.mode must be one of {', '.join(PACK_MODES)}, got {self.mode!r}")
        if not self.tasks or (self.mode == "single") != (len(self.tasks) == 1):
            raise ValueError(f"Unit: mode {self.mode!r} does not fit {len(self.tasks)} tasks")
        if self.split is not None and self.mode != "single":
            raise ValueError("Unit: only a single task can be widened across devices")


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

    @property
    def has_splits(self) -> bool:
        """Whether some task is widened across several devices (an executor must know `split` to run it)."""
        return any(p.split is not None for p in self.placements)

    def device_name(self, device: int) -> str:
        return "host" if device == HOST else self.devices[device].name

    def by_device(self) -> dict[int, list[Placement]]:
        """Placements per device; a widened placement is listed under each of its devices."""
        out: dict[int, list[Placement]] = {}
        for p in self.placements:
            for d in p.all_devices:
                out.setdefault(d, []).append(p)
        return out

    def launches(self) -> list[list[Placement]]:
        """Placements grouped by launch (batch id), in start order: what an executor issues. A widened task is
        one launch; its home device (``device``) lists it, `launches_on` lists it for each of its devices."""
        groups: dict[int, list[Placement]] = {}
        for p in self.placements:
            groups.setdefault(p.batch, []).append(p)
        return sorted(groups.values(), key=lambda g: (g[0].start, g[0].device))

    def launches_on(self, device: int) -> list[list[Placement]]:
        """The launches `device` takes part in (as the only device, or as one of a widened task's), in start
        order (ties by task index)."""
        groups = [g for g in self.launches() if device in g[0].all_devices]
        return sorted(groups, key=lambda g: (g[0].start, min(p.task.index for p in g)))

    def busy(self) -> list[float]:
        """Busy seconds of each device (launches, not tasks: a batch counts once; a widened task on each of its
        devices)."""
        out = [0.0] * len(self.devices)
        for group in self.launches():
            if group[0].device != HOST:
                for d in group[0].all_devices:
                    out[d] += max(p.end for p in group) - min(p.start for p in group)
        return out

    def resident(self) -> list[list[tuple[int, float, float]]]:
        """Per device, the (segment, first start, last end) hulls of its stage tasks: KV pages held there."""
        hull: dict[tuple[int, int], list[float]] = {}
        for p in self.placements:
            if p.device == HOST or not p.task.is_stage:
                continue
            for d in p.all_devices:
                h = hull.setdefault((d, p.task.segment), [p.start, p.end])
                h[0], h[1] = min(h[0], p.start), max(h[1], p.end)
        out: list[list[tuple[int, float, float]]] = [[] for _ in self.devices]
        for (d, s), (lo, hi) in sorted(hull.items()):
            out[d].append((s, lo, hi))
        return out

    def peak_resident(self) -> list[int]:
        """Largest number of segments resident at once on each device."""
        return [_max_overlap([(lo, hi) for _, lo, hi in r]) for r in self.resident()]

    def segment_done(self, segment: int) -> float:
        """When `segment`'s frames are final: the end of its last task (the write, else the decode, else its
        last stage). ``segment_done(0)`` is the time to the first segment, what a streaming viewer waits."""
        return max(p.end for p in self.placements if p.task.segment == segment)

    def chain_end(self) -> float:
        """When the planning chain is done: the end of the last chain task (0 without a chain)."""
        return max((p.end for p in self.placements if p.task.chain), default=0.0)

    def edge_delay(self, edge: Edge, costs: CostModel) -> float:
        """Transfer seconds between the placements of the edge's endpoints (0 on one device or via the host)."""
        src, dst = self._by_task[edge.src], self._by_task[edge.dst]
        if HOST in (src.device, dst.device):
            return 0.0
        if src.split is None and dst.split is None:
            return 0.0 if src.device == dst.device else costs.transfer_seconds(edge)
        return costs.move_seconds(edge, src.holding, dst.holding)

    def check(self, costs: CostModel | None = None) -> None:
        """Raise ValueError if a task is missing or placed twice, a dependency (plus its transfer, when `costs`
        is given) is violated, two launches overlap on one device stream or the host, a widened task is not
        a stage task (or does not fit the workload), or memory is exceeded."""
        problems = self._check_tasks(costs) + self._check_lanes()
        if self.capacity:
            for d, peak in enumerate(self.peak_resident()):
                cap = self.capacity[d]
                if cap is not None and peak > cap:
                    problems.append(f"{self.devices[d].name}: {peak} segments resident at once, capacity {cap}")
        if problems:
            raise ValueError(f"invalid schedule ({self.policy}): " + "; ".join(problems[:8]))

    def _check_tasks(self, costs: CostModel | None) -> list[str]:
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
            if p.split is not None:
                try:
                    if costs is None and not p.task.is_stage:
                        raise ValueError(f"split: {p.task.name} is not a stage task")
                    if costs is not None:
                        costs.check_split(p.task, p.split)
                except ValueError as e:
                    problems.append(str(e))
            for e in self.dag.preds[p.task.index]:
                src = by.get(e.src)
                if src is None:
                    continue
                delay = self.edge_delay(e, costs) if costs is not None else 0.0
                if p.start < src.end + delay - 1e-6:
                    problems.append(f"{p.task.name} starts at {p.start:.4f} before {src.task.name} ends (+transfer)")
        return problems

    def _check_lanes(self) -> list[str]:
        problems: list[str] = []
        lanes: dict[int, list[tuple[float, float, int]]] = {}
        for group in self.launches():
            p0 = group[0]
            if len({(p.device, p.start) for p in group}) != 1:
                problems.append(f"launch {p0.batch} mixes devices or start times")
            if len(group) > 1 and any(p.split is not None for p in group):
                problems.append(f"launch {p0.batch}: a widened task is a launch of its own")
            if p0.device == HOST:
                for p in group:
                    lanes.setdefault(HOST, []).append((p.start, p.end, p.batch))
            else:
                for d in p0.all_devices:
                    lanes.setdefault(d, []).append((p0.start, max(p.end for p in group), p0.batch))
        for d, spans in lanes.items():
            spans.sort()
            for a, b in zip(spans, spans[1:]):
                if b[0] < a[1] - 1e-6:
                    problems.append(f"launches {a[2]} and {b[2]} overlap on {self.device_name(d)}")
        return problems

    def to_dict(self) -> dict:
        """JSON-ready; a widened placement also has ``devices`` (names, home first) and ``split``."""
        out = []
        for p in self.placements:
            row = {
                "task": p.task.name, "segment": p.task.segment, "kind": p.task.kind, "stage": p.task.stage,
                "device": self.device_name(p.device), "stream": p.stream, "batch": p.batch,
                "start": round(p.start, 6), "end": round(p.end, 6),
            }  # fmt: skip
            if p.split is not None:
                row["devices"] = [self.device_name(d) for d in p.devices]
                row["split"] = p.split.to_dict()
            out.append(row)
        return {
            "policy": self.policy,
            "makespan": self.makespan,
            "devices": [{"name": d.name, "speed": d.speed, "memory_bytes": d.memory_bytes} for d in self.devices],
            "placements": out,
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


def lower_bound(dag: TaskDAG, costs: CostModel, devices: Sequence[Device], *, widen: bool = False) -> Bounds:
    """Speed-weighted lower bounds: critical path at the fastest speed, total work over the sum of speeds.

    With ``widen=True`` the bounds hold for schedules that may split stage tasks across devices: each task on
    the critical path at its fastest width (`CostModel.split_options`), its work at its cheapest width
    (devices x seconds)."""
    if not devices:
        raise ValueError("devices: at least one device is required")
    fastest = max(d.speed for d in devices)
    shortest = {t.index: costs.cost(t) for t in dag.tasks}
    if widen:
        for t in dag.tasks:
            for sp in costs.split_options(t, len(devices)):
                shortest[t.index] = min(shortest[t.index], costs.split_cost(t, sp))
    cp, _ = dag.longest_path(lambda t: shortest[t.index] if t.on_host else shortest[t.index] / fastest)
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
        if widen:
            per = min([per] + [sp.ways * costs.split_cost(t, sp) for sp in costs.split_options(t, len(devices))])
        work += per * len(tasks)
    host = sum(costs.cost(t) for t in dag.tasks if t.on_host)
    after = [0.0] * len(dag.tasks)
    for t in reversed(dag.tasks):
        after[t.index] = max(
            (after[e.dst] + (shortest[e.dst] / (1 if dag.tasks[e.dst].on_host else fastest))
             for e in dag.succs[t.index]), default=0.0,
        )  # fmt: skip
    tail = min((after[t.index] for t in dag.tasks if not t.on_host), default=0.0)
    return Bounds(cp, work / sum(d.speed for d in devices), host, tail)


def pack_key(t: Task) -> str:
    """Tasks with the same key can share one batched launch (same stage shape, different segments)."""
    return f"{t.kind}:{t.stage}:{len(t.frames)}:{len(t.reads)}:{len(t.given)}"
