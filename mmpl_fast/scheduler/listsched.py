"""List scheduling: the engine every policy uses to turn an order and a device choice into a schedule.

`ListScheduler.run` takes launch units in priority order among those whose predecessors are placed, and
puts each on its assigned device or on the device where it finishes first, at the earliest time

* its inputs are ready (predecessor's end, plus the transfer time when it ran on another device),
* the device is free (inside an idle gap with ``insertion``, else after the device's last launch), and
* its segments fit in the device's memory (capacity in resident segments; see `placement`).

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

from .costs import CostModel
from .dag import TaskDAG
from .placement import _EPS, HOST, Device, Placement, Schedule, Unit, _max_overlap


class ListScheduler:
    """Builds schedules of one DAG on one set of devices (durations and transfer delays computed once)."""

    def __init__(self, dag: TaskDAG, costs: CostModel, devices: Sequence[Device], capacity: Sequence[int | None]):
        self.dag, self.costs, self.devices = dag, costs, tuple(devices)
        self.capacity = tuple(capacity)
        self.n_dev = len(self.devices)
        self.memory_limited = [c is not None and c < dag.num_segments for c in self.capacity]
        self.delay = {(e.src, e.dst): costs.transfer_seconds(e) for e in dag.edges}
        self.base = [costs.cost(t) for t in dag.tasks]
        self._unit_cost: dict[Unit, float] = {}

    def unit_cost(self, unit: Unit) -> float:
        """Seconds of one launch on a speed-1 device."""
        if unit.mode == "single":
            return self.base[unit.tasks[0]]
        if unit not in self._unit_cost:
            tasks = [self.dag.tasks[i] for i in unit.tasks]
            if unit.mode == "batch":
                value = self.costs.cost(tasks[0], len(tasks))
            else:  # streams share the device's compute; they only hide each other's launch overheads
                total = sum(self.base[i] for i in unit.tasks)
                hidden = sum(self.costs.launch_overhead(t) for t in tasks)
                hidden -= max(self.costs.launch_overhead(t) for t in tasks)
                value = max(total - hidden, max(self.base[i] for i in unit.tasks))
            self._unit_cost[unit] = value
        return self._unit_cost[unit]

    def run(
        self,
        units: Sequence[Unit],
        priority: Sequence[float],
        assign: Sequence[int | None] | None = None,
        *,
        insertion: bool = True,
        policy: str = "",
    ) -> Schedule | None:
        """A schedule, or None when the units' dependencies form a cycle (an invalid packing) or memory leaves
        no device for a unit under this order.

        Args:
            units: launches covering every task exactly once.
            priority: one number per unit (higher goes first among ready units).
            assign: a device per unit, or None where the scheduler picks (earliest finish).
            insertion: allow a unit into an idle gap before the device's last launch.
        """
        dag = self.dag
        unit_of = [0] * len(dag.tasks)
        for u, unit in enumerate(units):
            for i in unit.tasks:
                unit_of[i] = u
        users: list[set[int]] = [set() for _ in units]
        waiting = [0] * len(units)
        for e in dag.edges:
            a, b = unit_of[e.src], unit_of[e.dst]
            if a != b and b not in users[a]:
                users[a].add(b)
                waiting[b] += 1
        heap = [(-priority[u], u) for u in range(len(units)) if waiting[u] == 0]
        heapq.heapify(heap)

        busy: list[list[tuple[float, float]]] = [[] for _ in range(self.n_dev)]
        host: list[tuple[float, float]] = []
        hull: list[dict[int, list[float]]] = [{} for _ in range(self.n_dev)]
        end = [0.0] * len(dag.tasks)
        where = [HOST] * len(dag.tasks)
        out: list[Placement] = []
        placed = 0
        while heap:
            _, u = heapq.heappop(heap)
            unit = units[u]
            cost = self.unit_cost(unit)
            if dag.tasks[unit.tasks[0]].on_host:
                ready = max((end[e.src] for i in unit.tasks for e in dag.preds[i]), default=0.0)
                start = self._slot(host, ready, cost, True)
                chosen, finish = HOST, start + cost
                bisect.insort(host, (start, finish))
            else:
                if assign is not None and assign[u] is not None:
                    options: Sequence[int] = (assign[u],)
                else:
                    options = range(self.n_dev)
                segs = sorted({dag.tasks[i].segment for i in unit.tasks if dag.tasks[i].is_stage})
                best = None
                for d in options:
                    ready = 0.0
                    for i in unit.tasks:
                        for e in dag.preds[i]:
                            r = end[e.src]
                            if where[e.src] != d and where[e.src] != HOST:
                                r += self.delay[e.src, i]
                            if r > ready:
                                ready = r
                    dur = cost / self.devices[d].speed
                    start = self._slot(busy[d], ready, dur, insertion, d, hull[d], segs)
                    if start is not None and (best is None or start + dur < best[0] - _EPS):
                        best = (start + dur, d, start)
                if best is None:
                    return None
                finish, chosen, start = best
                bisect.insort(busy[chosen], (start, finish))
                for s in segs:
                    h = hull[chosen].get(s)
                    hull[chosen][s] = [start, finish] if h is None else [min(h[0], start), max(h[1], finish)]
            speed = 1.0 if chosen == HOST else self.devices[chosen].speed
            for k, i in enumerate(unit.tasks):
                # on streams each member ends when its own work is done (at the latest with the launch)
                t_end = min(finish, start + self.base[i] / speed) if unit.mode == "streams" else finish
                end[i], where[i] = t_end, chosen
                out.append(Placement(dag.tasks[i], chosen, k if unit.mode == "streams" else 0, u, start, t_end))
            placed += 1
            for b in users[u]:
                waiting[b] -= 1
                if waiting[b] == 0:
                    heapq.heappush(heap, (-priority[b], b))
        if placed != len(units):
            return None
        out.sort(key=lambda p: (p.start, p.device, p.task.index))
        return Schedule(dag, self.devices, tuple(out), policy, self.capacity)

    def _slot(self, spans, ready, dur, insertion, d=None, hull=None, segs=()) -> float | None:
        """Earliest start >= ready with a free gap of `dur` and room in memory on device `d` (None: no room)."""
        limited = d is not None and self.memory_limited[d] and segs
        last_end = spans[-1][1] if spans else 0.0
        if not insertion:
            cands = [max(ready, last_end)]
        else:
            cands = [ready] + [b for _, b in spans if b > ready]
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
    dag: TaskDAG, costs: CostModel, devices: Sequence[Device], *, through_writes: bool = True
) -> list[float]:
    """HEFT's rank: mean duration plus the longest (mean duration + mean transfer) path to an exit task.

    With ``through_writes=False`` the in-order writer edges are left out, so a decode's rank reflects its own
    segment rather than every write that follows it.
    """
    mean_inv = sum(1 / d.speed for d in devices) / len(devices)
    share = (len(devices) - 1) / len(devices)
    rank = [0.0] * len(dag.tasks)
    for t in reversed(dag.tasks):
        dur = costs.cost(t) * (1 if t.on_host else mean_inv)
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
    """Time-driven dispatching for devices of different speeds (single-task units).

    Whenever a device is free, it takes a ready task: a fastest-class device the most urgent one; a slower
    device the *least* urgent task that it still finishes before the task's latest finish for a makespan of
    `target` (its slack absorbs the slowness), else the most urgent one if no fast device could finish it
    sooner, else it waits. Planning-chain tasks only go to slower devices when that is faster. The result
    is a non-delay schedule that keeps slow devices busy with the work that can wait.

    Returns None when memory (capacity in resident segments) blocks every choice.
    """
    dag, devices, n = ls.dag, ls.devices, len(ls.dag.tasks)
    top = max(d.speed for d in devices)
    base = ls.base
    fastest_dur = [base[i] if dag.tasks[i].on_host else base[i] / top for i in range(n)]
    tail = [0.0] * n
    for t in reversed(dag.tasks):
        tail[t.index] = max((fastest_dur[e.dst] + tail[e.dst] for e in dag.succs[t.index]), default=0.0)
    latest_finish = [target - tail[i] for i in range(n)]
    on_host = [t.on_host for t in dag.tasks]
    chain = [t.chain for t in dag.tasks]
    n_dev = len(devices)
    fast = [k for k in range(n_dev) if devices[k].speed == top]
    free = [0.0] * n_dev
    host_free = 0.0
    end = [0.0] * n
    where = [HOST] * n
    waiting = [len(dag.preds[i]) for i in range(n)]
    ready = {i for i in range(n) if waiting[i] == 0 and not on_host[i]}
    host_ready = [i for i in range(n) if waiting[i] == 0 and on_host[i]]
    hull: list[dict[int, list[float]]] = [{} for _ in devices]
    ends: list[float] = []  # finish times of placed device tasks, sorted
    out: list[Placement] = []

    rv: list[list[float] | None] = [None] * n  # per ready task: when its inputs are on each device

    def inputs_ready(i: int) -> None:
        vals = [0.0] * n_dev
        host_r = 0.0
        for e in dag.preds[i]:
            x, w, dl = end[e.src], where[e.src], ls.delay[e.src, i]
            if x > host_r:
                host_r = x
            for k in range(n_dev):
                y = x if (w == k or w == HOST) else x + dl
                if y > vals[k]:
                    vals[k] = y
        vals.append(host_r)  # index -1: the host
        rv[i] = vals

    def place(i: int, d: int, start: float, stop: float) -> None:
        end[i], where[i] = stop, d
        out.append(Placement(dag.tasks[i], d, 0, i, start, stop))
        for e in dag.succs[i]:
            waiting[e.dst] -= 1
            if waiting[e.dst] == 0:
                inputs_ready(e.dst)
                if on_host[e.dst]:
                    host_ready.append(e.dst)
                else:
                    ready.add(e.dst)

    def ready_at(i: int, d: int) -> float:
        return rv[i][d]

    def fits(i: int, d: int, start: float, stop: float) -> bool:
        t = dag.tasks[i]
        if not t.is_stage:
            return True
        return ls._fits(hull[d], (t.segment,), start, stop, ls.capacity[d])

    for i in list(ready) + host_ready:
        inputs_ready(i)
    speeds = [dev.speed for dev in devices]
    # (free time, retry, -speed, device): a device that found nothing looks again once the others free at the
    # same time have placed their tasks (retry = 1), and only then sleeps until the next event
    queue = [(0.0, 0, -speeds[k], k) for k in range(n_dev)]
    heapq.heapify(queue)
    guard = 0
    while len(out) < n:
        guard += 1
        if guard > 50 * n * (n_dev + 1):
            return None
        while host_ready:
            host_ready.sort()
            i = host_ready.pop(0)
            start = max(ready_at(i, HOST), host_free)
            host_free = start + base[i]
            place(i, HOST, start, host_free)
        if len(out) == n:
            break
        now, retry, _, d = heapq.heappop(queue)
        speed = speeds[d]
        limit = now + _EPS
        if ls.memory_limited[d]:
            avail = [i for i in ready if rv[i][d] <= limit and fits(i, d, now, now + base[i] / speed)]
        else:
            avail = [i for i in ready if rv[i][d] <= limit]
        pick = None
        if avail:
            if speed == top:
                pick = max(avail, key=lambda i: (urgency[i], -i))
            else:
                ok = [i for i in avail if not chain[i] and now + base[i] / speed <= latest_finish[i] + _EPS]
                if ok:
                    pick = min(ok, key=lambda i: (urgency[i], i))
                else:
                    cand = max(avail, key=lambda i: (urgency[i], -i))
                    soonest = min(max(free[k], ready_at(cand, k)) + base[cand] / speeds[k] for k in fast)
                    if now + base[cand] / speed <= soonest + _EPS:
                        pick = cand
        if pick is None and not retry:
            heapq.heappush(queue, (now, 1, -speed, d))
            continue
        if pick is None:  # wait for the next event that can change the picture
            nxt = min((x for x in (rv[i][d] for i in ready) if x > limit), default=None)
            j = bisect.bisect_right(ends, limit)
            if j < len(ends) and (nxt is None or ends[j] < nxt):
                nxt = ends[j]
            for k in range(n_dev):
                if limit < free[k] and (nxt is None or free[k] < nxt):
                    nxt = free[k]
            if nxt is None:
                return None
            free[d] = nxt
            heapq.heappush(queue, (nxt, 0, -speed, d))
            continue
        stop = now + base[pick] / speed
        if dag.tasks[pick].is_stage:
            seg = dag.tasks[pick].segment
            h = hull[d].get(seg)
            hull[d][seg] = [now, stop] if h is None else [min(h[0], now), max(h[1], stop)]
        free[d] = stop
        heapq.heappush(queue, (stop, 0, -speed, d))
        ready.discard(pick)
        bisect.insort(ends, stop)
        place(pick, d, now, stop)
    out.sort(key=lambda p: (p.start, p.device, p.task.index))
    return Schedule(dag, devices, tuple(out), label, ls.capacity)


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
