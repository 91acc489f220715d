"""List scheduling: the engine every policy uses to turn an order and a device choice into a schedule.

`ListScheduler.run` takes launch units in priority order among those whose predecessors are placed, and
puts each on its assigned device or on the device where it finishes first, at the earliest time

* its inputs are ready (predecessor's end, plus the transfer time when it ran on another device),
* the device is free (inside an idle gap with ``insertion``, else after the device's last launch), and
* its segments fit in the device's memory (capacity in resident segments; see `placement`), and a batched or
  multi-stream launch's workspace fits in what the device has left for it (`MemoryPlan.workspace`).

A widened unit (``Unit.split``, a task across ``ways`` devices) goes on a set of devices at once: an assigned
set, else the best of the set its split predecessor used (its KV shards are in place) and the devices that
can start it soonest; it starts when its inputs have reached every device (`CostModel.move_seconds`) and
all of them are free.

Priorities (higher first):

* `upward_rank` — HEFT's critical-path rank (mean duration to the end of the DAG);
* `chain_first` — the rank with every planning-chain task above every other task;
* `lookahead` — segment-major order where the chain runs ``k`` segments ahead of the populate work.

Also here: `dispatch`, a time-driven dispatcher for devices of different speeds, and `exact`, a branch and
bound over all orders and device choices for small DAGs.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from .costs import CostModel, Holding
from .dag import Edge, TaskDAG
from .placement import _EPS, HOST, Device, Placement, Schedule, Unit, _max_overlap
from .split import Split

# What `ListScheduler.run` accepts per unit as its device: one device, a widened unit's devices, or None.
Assign = int | tuple[int, ...] | None


@dataclass
class _Run:
    """One run's bookkeeping: busy spans per device and on the host, resident hulls, where tasks ended."""

    n_dev: int
    n_tasks: int
    busy: list[list[tuple[float, float]]] = field(default_factory=list)
    host: list[tuple[float, float]] = field(default_factory=list)
    hull: list[dict[int, list[float]]] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    where: list[int] = field(default_factory=list)
    hold: list[int | None] = field(default_factory=list)  # widened tasks only: `ListScheduler.hid`
    out: list[Placement] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.busy = [[] for _ in range(self.n_dev)]
        self.hull = [{} for _ in range(self.n_dev)]
        self.end = [0.0] * self.n_tasks
        self.where = [HOST] * self.n_tasks
        self.hold = [None] * self.n_tasks

    def occupy(self, d: int, start: float, finish: float, segs: Sequence[int]) -> None:
        bisect.insort(self.busy[d], (start, finish))
        for s in segs:
            h = self.hull[d].get(s)
            self.hull[d][s] = [start, finish] if h is None else [min(h[0], start), max(h[1], finish)]


class _Gaps:
    """The free gaps of one device from a ready time on: ``fit(dur)`` is `ListScheduler._slot` with insertion
    and no memory limit, for any duration, without rescanning the busy spans."""

    __slots__ = ("ready", "gaps")

    def __init__(self, spans: list[tuple[float, float]], ready: float, lo: float | None = None):
        self.ready = ready
        lo = ready if lo is None else min(lo, ready)
        j = bisect.bisect_right(spans, (lo, float("inf")))
        t = spans[j - 1][1] if j > 0 and spans[j - 1][1] > lo + _EPS else lo
        gaps = []
        for a, b in spans[j:]:
            if a > t:
                gaps.append((t, a))
            t = max(t, b)
        gaps.append((t, float("inf")))
        self.gaps = gaps

    def fit(self, dur: float, after: float | None = None) -> float:
        """Earliest start >= `after` (default: the ready time) of a free gap of `dur`."""
        after = self.ready if after is None else after
        for a, b in self.gaps:
            s = a if a > after else after
            if b >= s + dur - _EPS:
                return s
        raise AssertionError("the last gap is unbounded")


def _common_gap(gaps: Sequence[_Gaps], ready: float, dur: float) -> float:
    """Earliest start >= ready at which every device's `_Gaps` has room for `dur`."""
    t = ready
    while True:
        moved = False
        for g in gaps:
            s = g.fit(dur, t)
            if s > t + _EPS:
                t, moved = s, True
        if not moved:
            return t


class ListScheduler:
    """Builds schedules of one DAG on one set of devices (durations and transfer delays computed once).

    Args:
        capacity: segments each device can hold at once (None: not limited).
        workspace: bytes each device has for one launch's workspace (`MemoryPlan.workspace`; None: not
            limited): a batched or multi-stream launch whose `CostModel.launch_workspace` exceeds it cannot
            go there.
    """

    def __init__(
        self,
        dag: TaskDAG,
        costs: CostModel,
        devices: Sequence[Device],
        capacity: Sequence[int | None],
        workspace: Sequence[int | None] | None = None,
    ):
        self.dag, self.costs, self.devices = dag, costs, tuple(devices)
        self.capacity = tuple(capacity)
        self.n_dev = len(self.devices)
        self.workspace = tuple(workspace) if workspace is not None else (None,) * self.n_dev
        self.memory_limited = [c is not None and c < dag.num_segments for c in self.capacity]
        self.delay = {(e.src, e.dst): costs.transfer_seconds(e) for e in dag.edges}
        self.base = [costs.cost(t) for t in dag.tasks]
        self._unit_cost: dict[Unit, float] = {}
        self._moves: dict[tuple, float] = {}
        self._splits: dict[tuple, float] = {}
        self._hids: dict[Holding, int] = {}
        self._holdings: list[Holding] = []
        self._single = [self.hid(((d,), None)) for d in range(self.n_dev)]  # device d alone

    def unit_cost(self, unit: Unit) -> float:
        """Seconds of one launch on speed-1 devices."""
        if unit.mode == "single" and unit.split is None:
            return self.base[unit.tasks[0]]
        if unit not in self._unit_cost:
            tasks = [self.dag.tasks[i] for i in unit.tasks]
            if unit.split is not None:
                value = self.split_cost(unit.tasks[0], unit.split)
            elif unit.mode == "batch":
                value = self.costs.cost(tasks[0], len(tasks))
            else:
                value = self.costs.streams_cost(tasks)
            self._unit_cost[unit] = value
        return self._unit_cost[unit]

    def _streams_ends(self, unit: Unit) -> list[float]:
        key = ("ends", unit.tasks)
        if key not in self._splits:
            self._splits[key] = self.costs.streams_ends([self.dag.tasks[i] for i in unit.tasks])
        return self._splits[key]

    def split_cost(self, i: int, split: Split) -> float:
        """`CostModel.split_cost` of task `i`, memoised."""
        key = (i, split.heads, split.branches, split.kv)
        value = self._splits.get(key)
        if value is None:
            value = self._splits[key] = self.costs.split_cost(self.dag.tasks[i], split)
        return value

    def fits_workspace(self, unit: Unit, d: int) -> bool:
        """Whether a packed launch's workspace fits on device `d` (single launches always do: `preflight`
        reserved the largest one), and, for streams, whether `d` has streams at all (`Device.has_streams`)."""
        if unit.mode == "streams" and not self.devices[d].has_streams:
            return False
        room = self.workspace[d]
        if room is None or unit.mode == "single":
            return True
        return self.costs.launch_workspace([self.dag.tasks[i] for i in unit.tasks], unit.mode) <= room

    def hid(self, holding: Holding) -> int:
        """A small int naming `holding` (the memo key of `move`)."""
        h = self._hids.get(holding)
        if h is None:
            h = self._hids[holding] = len(self._holdings)
            self._holdings.append(holding)
        return h

    def move(self, e: Edge, src: int, dst: int) -> float:
        """`CostModel.move_seconds` between holdings named by `hid`, memoised by what it depends on."""
        key = (e.kind, len(e.frames), src, dst)
        value = self._moves.get(key)
        if value is None:
            value = self._moves[key] = self.costs.move_seconds(e, self._holdings[src], self._holdings[dst])
        return value

    def run(
        self,
        units: Sequence[Unit],
        priority: Sequence[float],
        assign: Sequence[Assign] | None = None,
        *,
        insertion: bool = True,
        policy: str = "",
        molds: Sequence[Sequence[Split] | None] | None = None,
        penalty: float | Sequence[float] = 0.0,
    ) -> Schedule | None:
        """A schedule, or None when the units' dependencies form a cycle (an invalid packing) or memory leaves
        no device for a unit under this order.

        Args:
            units: launches covering every task exactly once.
            priority: one number per unit (higher goes first among ready units).
            assign: per unit a device (a tuple of devices for a widened unit), or None where the scheduler
                picks (earliest finish).
            insertion: allow a unit into an idle gap before the device's last launch.
            molds: per unit None, or the splits a single unsplit unit may also take (moldable): it goes at
                the width that finishes first, each extra device-second of work counted `penalty` times (one
                number, or one per unit).
        """
        users, waiting = self._unit_graph(units)
        heap = [(-priority[u], u) for u in range(len(units)) if waiting[u] == 0]
        heapq.heapify(heap)
        st = _Run(self.n_dev, len(self.dag.tasks))
        placed = 0
        while heap:
            _, u = heapq.heappop(heap)
            unit = units[u]
            a = assign[u] if assign is not None else None
            if self.dag.tasks[unit.tasks[0]].on_host:
                self._place_host(st, u, unit)
            elif unit.split is not None:
                if not self._place_split(st, u, unit, a if isinstance(a, tuple) else None, insertion):
                    return None
            elif molds is not None and molds[u] and a is None:
                pen = penalty if isinstance(penalty, (int, float)) else penalty[u]
                if not self._place_molded(st, u, unit, molds[u], insertion, pen):
                    return None
            elif not self._place_single(st, u, unit, a if isinstance(a, int) else None, insertion):
                return None
            placed += 1
            for b in users[u]:
                waiting[b] -= 1
                if waiting[b] == 0:
                    heapq.heappush(heap, (-priority[b], b))
        if placed != len(units):
            return None
        st.out.sort(key=lambda p: (p.start, p.device, p.task.index))
        return Schedule(self.dag, self.devices, tuple(st.out), policy, self.capacity)

    def _unit_graph(self, units: Sequence[Unit]) -> tuple[list[set[int]], list[int]]:
        unit_of = [0] * len(self.dag.tasks)
        for u, unit in enumerate(units):
            for i in unit.tasks:
                unit_of[i] = u
        users: list[set[int]] = [set() for _ in units]
        waiting = [0] * len(units)
        for e in self.dag.edges:
            a, b = unit_of[e.src], unit_of[e.dst]
            if a != b and b not in users[a]:
                users[a].add(b)
                waiting[b] += 1
        return users, waiting

    def _place_host(self, st: _Run, u: int, unit: Unit) -> None:
        cost = self.unit_cost(unit)
        ready = max((st.end[e.src] for i in unit.tasks for e in self.dag.preds[i]), default=0.0)
        start = self._slot(st.host, ready, cost, True)
        bisect.insort(st.host, (start, start + cost))
        for i in unit.tasks:
            st.end[i], st.where[i] = start + cost, HOST
            st.out.append(Placement(self.dag.tasks[i], HOST, 0, u, start, start + cost))

    def _segs(self, unit: Unit) -> Sequence[int]:
        """The segments whose KV pages `unit` holds (stage tasks)."""
        tasks = self.dag.tasks
        if len(unit.tasks) == 1:
            t = tasks[unit.tasks[0]]
            return (t.segment,) if t.is_stage else ()
        return sorted({tasks[i].segment for i in unit.tasks if tasks[i].is_stage})

    def _ready(self, st: _Run, tasks: Sequence[int], d: int) -> float:
        """When the inputs of `tasks` are on device `d` (alone)."""
        ready = 0.0
        for i in tasks:
            for e in self.dag.preds[i]:
                r = st.end[e.src]
                h = st.hold[e.src]
                if h is not None:
                    r += self.move(e, h, self._single[d])
                elif st.where[e.src] != d and st.where[e.src] != HOST:
                    r += self.delay[e.src, i]
                if r > ready:
                    ready = r
        return ready

    def _place_single(self, st: _Run, u: int, unit: Unit, pinned: int | None, insertion: bool) -> bool:
        found = self._best_single(st, unit, pinned, insertion)
        if found is None:
            return False
        self._commit_single(st, u, unit, found)
        return True

    def _best_single(self, st: _Run, unit: Unit, pinned: int | None, insertion: bool, ready_at=None):
        """(finish, device, start) of the earliest-finishing device for `unit`, or None (`ready_at`: when its
        inputs are on each device, if known)."""
        cost = self.unit_cost(unit)
        options: Sequence[int] = (pinned,) if pinned is not None else range(self.n_dev)
        segs = self._segs(unit)
        best = None
        for d in options:
            if not self.fits_workspace(unit, d):
                continue
            dur = cost / self.devices[d].speed
            ready = self._ready(st, unit.tasks, d) if ready_at is None else ready_at[d]
            if isinstance(ready, _Gaps):
                start = ready.fit(dur)
            else:
                start = self._slot(st.busy[d], ready, dur, insertion, d, st.hull[d], segs)
            if start is not None and (best is None or start + dur < best[0] - _EPS):
                best = (start + dur, d, start)
        return best

    def _commit_single(self, st: _Run, u: int, unit: Unit, found) -> None:
        finish, d, start = found
        dag = self.dag
        st.occupy(d, start, finish, self._segs(unit))
        speed = self.devices[d].speed
        ends = self._streams_ends(unit) if unit.mode == "streams" else None
        for k, i in enumerate(unit.tasks):
            # on streams each member ends when its share of the device has done its work
            t_end = min(finish, start + ends[k] / speed) if ends is not None else finish
            st.end[i], st.where[i] = t_end, d
            st.out.append(Placement(dag.tasks[i], d, k if unit.mode == "streams" else 0, u, start, t_end))

    def _place_molded(self, st: _Run, u: int, unit: Unit, molds, insertion: bool, penalty: float) -> bool:
        i = unit.tasks[0]
        base = self.base[i]
        ready_at = [self._ready(st, unit.tasks, d) for d in range(self.n_dev)]
        if insertion:  # the free gaps of each device after its inputs could be there, shared by every width
            lo = max((st.end[e.src] for e in self.dag.preds[i]), default=0.0)
            ready_at = [_Gaps(st.busy[d], r, lo) if not self.memory_limited[d] else r for d, r in enumerate(ready_at)]
        best = None
        for split in (None, *molds):
            if split is None:
                found = self._best_single(st, unit, None, insertion, ready_at)
                if found is not None:
                    best = (found[0], found, None)
                continue
            if split.ways > self.n_dev:
                continue
            wide = Unit(unit.tasks, split=split)
            found = self._best_split(st, wide, None, insertion, ready_at)
            if found is not None:
                score = found[0] + penalty * (split.ways * self.split_cost(i, split) - base)
                if best is None or score < best[0] - _EPS:
                    best = (score, found, wide)
        if best is None:
            return False
        if best[2] is None:
            self._commit_single(st, u, unit, best[1])
        else:
            self._commit_split(st, u, best[2], best[1])
        return True

    def _place_split(self, st: _Run, u: int, unit: Unit, pinned: tuple[int, ...] | None, insertion: bool) -> bool:
        found = self._best_split(st, unit, pinned, insertion)
        if found is None:
            return False
        self._commit_split(st, u, unit, found)
        return True

    def _commit_split(self, st: _Run, u: int, unit: Unit, found) -> None:
        finish, devs, start = found
        i, split = unit.tasks[0], unit.split
        for d in devs:
            st.occupy(d, start, finish, (self.dag.tasks[i].segment,))
        st.end[i], st.where[i], st.hold[i] = finish, devs[0], self.hid((devs, split))
        st.out.append(Placement(self.dag.tasks[i], devs[0], 0, u, start, finish, devs, split))

    def _best_split(self, st: _Run, unit: Unit, pinned: tuple[int, ...] | None, insertion: bool, ready_at=None):
        """(finish, devices, start) of the earliest-finishing device set for widened `unit`, or None."""
        i, split = unit.tasks[0], unit.split
        if split.ways > self.n_dev:
            return None
        cost = self.split_cost(i, split)
        segs = (self.dag.tasks[i].segment,)
        best = None
        if pinned is not None and len(pinned) != split.ways:
            pinned = None
        sets = (pinned,) if pinned is not None else self._device_sets(st, i, split.ways, cost, insertion, ready_at)
        for devs in sets:
            dur = cost / min(self.devices[d].speed for d in devs)
            ready = 0.0
            dst = self.hid((devs, split))
            for e in self.dag.preds[i]:
                if st.where[e.src] != HOST:
                    src = st.hold[e.src]
                    src = self._single[st.where[e.src]] if src is None else src
                    ready = max(ready, st.end[e.src] + self.move(e, src, dst))
                else:
                    ready = max(ready, st.end[e.src])
            if ready_at is not None and all(isinstance(ready_at[d], _Gaps) for d in devs):
                start = _common_gap([ready_at[d] for d in devs], ready, dur)
            else:
                start = self._common_slot(st, devs, ready, dur, insertion, segs)
            if start is not None and (best is None or start + dur < best[0] - _EPS):
                best = (start + dur, devs, start)
        return best

    def _device_sets(self, st: _Run, i: int, k: int, cost: float, insertion: bool, ready_at=None):
        """Device sets to try for widened task `i`: its widened predecessors' sets of the same width (their KV
        shards stay in place), and the `k` devices that could finish it soonest alone, the one its inputs
        reach first as home."""
        sets: list[tuple[int, ...]] = []
        for e in self.dag.preds[i]:
            h = st.hold[e.src]
            if h is not None and len(self._holdings[h][0]) == k and self._holdings[h][0] not in sets:
                sets.append(self._holdings[h][0])
        segs = (self.dag.tasks[i].segment,)
        soon = []
        for d in range(self.n_dev):
            dur = cost / self.devices[d].speed
            ready = self._ready(st, (i,), d) if ready_at is None else ready_at[d]
            if isinstance(ready, _Gaps):
                s, ready = ready.fit(dur), ready.ready
            else:
                s = self._slot(st.busy[d], ready, dur, insertion, d, st.hull[d], segs)
            if s is not None:
                soon.append((s + dur, ready, d))
        if len(soon) >= k:
            chosen = sorted(soon)[:k]
            home = min(chosen, key=lambda x: (x[1], x[0], x[2]))[2]
            devs = (home, *sorted(d for _, _, d in chosen if d != home))
            if devs not in sets:
                sets.append(devs)
        return sets

    def _common_slot(self, st: _Run, devs, ready: float, dur: float, insertion: bool, segs) -> float | None:
        """Earliest start >= ready at which every device of `devs` is free for `dur` (and has room)."""
        t = ready
        for _ in range(64 * len(devs)):
            moved = False
            for d in devs:
                s = self._slot(st.busy[d], t, dur, insertion, d, st.hull[d], segs)
                if s is None:
                    return None
                if s > t + _EPS:
                    t, moved = s, True
            if not moved:
                return t
        return None

    def _slot(self, spans, ready, dur, insertion, d=None, hull=None, segs=()) -> float | None:
        """Earliest start >= ready with a free gap of `dur` and room in memory on device `d` (None: no room)."""
        limited = d is not None and self.memory_limited[d] and segs
        last_end = spans[-1][1] if spans else 0.0
        if not insertion:
            cands = [max(ready, last_end)]
        elif not limited and ready >= last_end:
            return ready
        else:
            # spans do not overlap, so their ends are sorted too: the ends after `ready` are a suffix
            j = bisect.bisect_right(spans, (ready, float("inf")))
            j = j - 1 if j > 0 and spans[j - 1][1] > ready else j
            cands = [ready] + [b for _, b in spans[j:] if b > ready]
        if limited:
            cands = sorted(set(cands + [h[1] for h in hull.values() if h[1] > ready]))
        for t in cands:
            if insertion:
                j = bisect.bisect_right(spans, (t, float("inf")))
                if j > 0 and spans[j - 1][1] > t + _EPS:
                    continue
                if j < len(spans) and spans[j][0] < t + dur - _EPS:
                    continue
            elif t < last_end - _EPS:
                continue
            if limited and not self._fits(hull, segs, t, t + dur, self.capacity[d]):
                continue
            return t
        if not limited:
            return max(ready, last_end)
        # after everything else has ended; still fails when the segment's own earlier hull spans others
        t = max(ready, last_end, *(h[1] for h in hull.values()))
        return t if self._fits(hull, segs, t, t + dur, self.capacity[d]) else None

    @staticmethod
    def _fits(hull: dict[int, list[float]], segs: Sequence[int], start: float, finish: float, cap: int) -> bool:
        spans = [(lo, hi) for s, (lo, hi) in hull.items() if s not in segs]
        for s in segs:
            h = hull.get(s)
            spans.append((start, finish) if h is None else (min(h[0], start), max(h[1], finish)))
        return _max_overlap(spans) <= cap


# --- priorities ---------------------------------------------------------------------------------------------------


def upward_rank(
    dag: TaskDAG,
    costs: CostModel,
    devices: Sequence[Device],
    *,
    through_writes: bool = True,
    durations: Sequence[float] | None = None,
) -> list[float]:
    """HEFT's rank: mean duration plus the longest (mean duration + mean transfer) path to an exit task.

    With ``through_writes=False`` the in-order writer edges are left out, so a decode's rank reflects its own
    segment rather than every write that follows it. `durations` (speed-1 seconds per task) replace the
    cost model's, e.g. for widened tasks.
    """
    mean_inv = sum(1 / d.speed for d in devices) / len(devices)
    share = (len(devices) - 1) / len(devices)
    rank = [0.0] * len(dag.tasks)
    for t in reversed(dag.tasks):
        dur = (costs.cost(t) if durations is None else durations[t.index]) * (1 if t.on_host else mean_inv)
        tail = 0.0
        for e in dag.succs[t.index]:
            if e.kind == "order" and not through_writes:
                continue
            tail = max(tail, share * costs.transfer_seconds(e) + rank[e.dst])
        rank[t.index] = dur + tail
    return rank


def chain_first(dag: TaskDAG, rank: Sequence[float]) -> list[float]:
    """`rank`, with every planning-chain task above every other task (planning first)."""
    top = max(rank, default=0.0) + 1.0
    return [rank[t.index] + (top if t.chain else 0.0) for t in dag.tasks]


def lookahead(dag: TaskDAG, k: int) -> list[float]:
    """Segment-major priority: the chain tasks of segment s rank with the other tasks of segment s - k."""
    n = len(dag.tasks)
    key = [
        (t.segment if t.chain else t.segment + k + 0.5, t.stage if t.stage is not None else n, t.index)
        for t in dag.tasks
    ]
    order = sorted(range(n), key=key.__getitem__)
    prio = [0.0] * n
    for r, i in enumerate(order):
        prio[i] = float(n - r)
    return prio


def index_order(dag: TaskDAG) -> list[float]:
    """The construction order (segment by segment, stages in layout order)."""
    n = len(dag.tasks)
    return [float(n - i) for i in range(n)]


# --- event-driven dispatch ------------------------------------------------------------------------------------------


def dispatch(ls: ListScheduler, urgency: Sequence[float], target: float, label: str = "") -> Schedule | None:
    """Time-driven dispatching for devices of different speeds (single-task units, none widened).

    Whenever a device is free, it takes a ready task: a fastest-class device the most urgent one; a slower
    device the *least* urgent task that it still finishes before the task's latest finish for a makespan of
    `target` (its slack absorbs the slowness), else the most urgent one if no fast device could finish it
    sooner, else it waits. Planning-chain tasks only go to slower devices when that is faster. The result
    is a non-delay schedule that keeps slow devices busy with the work that can wait.

    Returns None when memory (capacity in resident segments) blocks every choice.
    """
    return _Dispatcher(ls, urgency, target).run(label)


class _Dispatcher:
    """The state of one `dispatch`."""

    def __init__(self, ls: ListScheduler, urgency: Sequence[float], target: float):
        dag, devices = ls.dag, ls.devices
        n = len(dag.tasks)
        self.ls, self.dag, self.urgency, self.n = ls, dag, urgency, n
        self.speeds = [d.speed for d in devices]
        self.top = max(self.speeds)
        self.n_dev = len(devices)
        self.fast = [k for k in range(self.n_dev) if self.speeds[k] == self.top]
        base = ls.base
        fastest_dur = [base[i] if dag.tasks[i].on_host else base[i] / self.top for i in range(n)]
        tail = [0.0] * n
        for t in reversed(dag.tasks):
            tail[t.index] = max((fastest_dur[e.dst] + tail[e.dst] for e in dag.succs[t.index]), default=0.0)
        self.latest_finish = [target - tail[i] for i in range(n)]
        self.on_host = [t.on_host for t in dag.tasks]
        self.chain = [t.chain for t in dag.tasks]
        self.free = [0.0] * self.n_dev
        self.host_free = 0.0
        self.end = [0.0] * n
        self.where = [HOST] * n
        self.waiting = [len(dag.preds[i]) for i in range(n)]
        self.ready = {i for i in range(n) if self.waiting[i] == 0 and not self.on_host[i]}
        self.host_ready = [i for i in range(n) if self.waiting[i] == 0 and self.on_host[i]]
        self.hull: list[dict[int, list[float]]] = [{} for _ in devices]
        self.ends: list[float] = []  # finish times of placed device tasks, sorted
        self.out: list[Placement] = []
        self.rv: list[list[float] | None] = [None] * n  # per ready task: when its inputs are on each device
        for i in list(self.ready) + self.host_ready:
            self._inputs_ready(i)

    def _inputs_ready(self, i: int) -> None:
        vals = [0.0] * self.n_dev
        host_r = 0.0
        for e in self.dag.preds[i]:
            x, w, dl = self.end[e.src], self.where[e.src], self.ls.delay[e.src, i]
            host_r = max(host_r, x)
            for k in range(self.n_dev):
                y = x if (w == k or w == HOST) else x + dl
                if y > vals[k]:
                    vals[k] = y
        vals.append(host_r)  # index -1: the host
        self.rv[i] = vals

    def _place(self, i: int, d: int, start: float, stop: float) -> None:
        self.end[i], self.where[i] = stop, d
        self.out.append(Placement(self.dag.tasks[i], d, 0, i, start, stop))
        for e in self.dag.succs[i]:
            self.waiting[e.dst] -= 1
            if self.waiting[e.dst] == 0:
                self._inputs_ready(e.dst)
                (self.host_ready.append if self.on_host[e.dst] else self.ready.add)(e.dst)

    def _fits(self, i: int, d: int, start: float, stop: float) -> bool:
        t = self.dag.tasks[i]
        return not t.is_stage or self.ls._fits(self.hull[d], (t.segment,), start, stop, self.ls.capacity[d])

    def _pick(self, d: int, now: float) -> int | None:
        """The task free device `d` takes at `now`, or None (it waits)."""
        base, speed, limit, rv = self.ls.base, self.speeds[d], now + _EPS, self.rv
        if self.ls.memory_limited[d]:
            avail = [i for i in self.ready if rv[i][d] <= limit and self._fits(i, d, now, now + base[i] / speed)]
        else:
            avail = [i for i in self.ready if rv[i][d] <= limit]
        if not avail:
            return None
        if speed == self.top:
            return max(avail, key=lambda i: (self.urgency[i], -i))
        ok = [i for i in avail if not self.chain[i] and now + base[i] / speed <= self.latest_finish[i] + _EPS]
        if ok:
            return min(ok, key=lambda i: (self.urgency[i], i))
        cand = max(avail, key=lambda i: (self.urgency[i], -i))
        soonest = min(max(self.free[k], rv[cand][k]) + base[cand] / self.speeds[k] for k in self.fast)
        return cand if now + base[cand] / speed <= soonest + _EPS else None

    def _next_event(self, d: int, now: float) -> float | None:
        """The next time anything could change for idle device `d`."""
        limit = now + _EPS
        nxt = min((x for x in (self.rv[i][d] for i in self.ready) if x > limit), default=None)
        j = bisect.bisect_right(self.ends, limit)
        if j < len(self.ends) and (nxt is None or self.ends[j] < nxt):
            nxt = self.ends[j]
        for k in range(self.n_dev):
            if limit < self.free[k] and (nxt is None or self.free[k] < nxt):
                nxt = self.free[k]
        return nxt

    def run(self, label: str) -> Schedule | None:
        ls, n = self.ls, self.n
        # (free time, retry, -speed, device): a device that found nothing looks again once the others free at
        # the same time have placed their tasks (retry = 1), and only then sleeps until the next event
        queue = [(0.0, 0, -self.speeds[k], k) for k in range(self.n_dev)]
        heapq.heapify(queue)
        for _ in range(50 * n * (self.n_dev + 1)):
            while self.host_ready:
                self.host_ready.sort()
                i = self.host_ready.pop(0)
                start = max(self.rv[i][HOST], self.host_free)
                self.host_free = start + ls.base[i]
                self._place(i, HOST, start, self.host_free)
            if len(self.out) == n:
                break
            now, retry, neg_speed, d = heapq.heappop(queue)
            pick = self._pick(d, now)
            if pick is None and not retry:
                heapq.heappush(queue, (now, 1, neg_speed, d))
                continue
            if pick is None:  # wait for the next event that can change the picture
                nxt = self._next_event(d, now)
                if nxt is None:
                    return None
                self.free[d] = nxt
                heapq.heappush(queue, (nxt, 0, neg_speed, d))
                continue
            stop = now + ls.base[pick] / self.speeds[d]
            if self.dag.tasks[pick].is_stage:
                seg = self.dag.tasks[pick].segment
                h = self.hull[d].get(seg)
                self.hull[d][seg] = [now, stop] if h is None else [min(h[0], now), max(h[1], stop)]
            self.free[d] = stop
            heapq.heappush(queue, (stop, 0, neg_speed, d))
            self.ready.discard(pick)
            bisect.insort(self.ends, stop)
            self._place(pick, d, now, stop)
        if len(self.out) < n:
            return None
        self.out.sort(key=lambda p: (p.start, p.device, p.task.index))
        return Schedule(self.dag, ls.devices, tuple(self.out), label, ls.capacity)


# --- exact search for small DAGs -------------------------------------------------------------------------------------


def exact(ls: ListScheduler, upper: float, node_limit: int = 50_000, label: str = "exact") -> Schedule | None:
    """Branch and bound over every order and device choice of the serial list scheduler (with insertion):
    the optimal makespan is among the schedules it generates. Prunes with the fastest-speed tail of each
    task and treats empty devices of equal speed as interchangeable. Returns a schedule shorter than
    `upper`, the best found within `node_limit` nodes, or None when it finds none."""
    dag, devices = ls.dag, ls.devices
    n, n_dev = len(dag.tasks), len(devices)
    top = max(d.speed for d in devices)
    dur_fast = [ls.base[i] if dag.tasks[i].on_host else ls.base[i] / top for i in range(n)]
    tail = [0.0] * n
    for t in reversed(dag.tasks):
        tail[t.index] = max((dur_fast[e.dst] + tail[e.dst] for e in dag.succs[t.index]), default=0.0)
    busy: list[list[tuple[float, float]]] = [[] for _ in range(n_dev)]
    host: list[tuple[float, float]] = []
    hull: list[dict[int, list[float]]] = [{} for _ in range(n_dev)]
    start = [0.0] * n
    end = [0.0] * n
    where: list[int | None] = [None] * n
    waiting = [len(dag.preds[i]) for i in range(n)]
    best: dict = {"makespan": upper, "plan": None}
    nodes = 0
    order = sorted(range(n), key=lambda i: -(dur_fast[i] + tail[i]))  # critical tasks first: good early bounds

    def rec(done: int, cur_max: float) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > node_limit:
            return
        if done == n:
            if cur_max < best["makespan"] - 1e-12:
                best["makespan"] = cur_max
                best["plan"] = [(where[i], start[i], end[i]) for i in range(n)]
            return
        for i in order:
            if where[i] is not None or waiting[i]:
                continue
            t = dag.tasks[i]
            seen_empty: set[float] = set()
            for d in (HOST,) if t.on_host else range(n_dev):
                if d != HOST and not busy[d]:
                    if devices[d].speed in seen_empty:
                        continue
                    seen_empty.add(devices[d].speed)
                ready = 0.0
                for e in dag.preds[i]:
                    x = end[e.src] + (ls.delay[e.src, i] if where[e.src] not in (d, HOST) and d != HOST else 0.0)
                    ready = max(ready, x)
                dur = ls.base[i] / (1.0 if d == HOST else devices[d].speed)
                segs = (t.segment,) if t.is_stage else ()
                s = ls._slot(host if d == HOST else busy[d], ready, dur, True, None if d == HOST else d,
                             None if d == HOST else hull[d], segs)  # fmt: skip
                if s is None or s + dur + tail[i] >= best["makespan"] - 1e-12:
                    continue
                spans = host if d == HOST else busy[d]
                bisect.insort(spans, (s, s + dur))
                old_hull = None
                if segs:
                    old_hull = hull[d].get(t.segment)
                    lo, hi = (s, s + dur) if old_hull is None else (min(old_hull[0], s), max(old_hull[1], s + dur))
                    hull[d][t.segment] = [lo, hi]
                where[i], start[i], end[i] = d, s, s + dur
                for e in dag.succs[i]:
                    waiting[e.dst] -= 1
                rec(done + 1, max(cur_max, s + dur))
                for e in dag.succs[i]:
                    waiting[e.dst] += 1
                where[i] = None
                spans.remove((s, s + dur))
                if segs:
                    if old_hull is None:
                        del hull[d][t.segment]
                    else:
                        hull[d][t.segment] = old_hull

    rec(0, 0.0)
    if best["plan"] is None:
        return None
    out = [Placement(dag.tasks[i], d, 0, i, s, e) for i, (d, s, e) in enumerate(best["plan"])]
    out.sort(key=lambda p: (p.start, p.device, p.task.index))
    return Schedule(dag, devices, tuple(out), label, ls.capacity)
