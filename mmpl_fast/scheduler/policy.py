"""Policies: where and when each task of a video runs.

* ``"round-robin"`` — the MMPL authors' scheme: segment s's whole pipeline on device s mod D, each device
  running its segments one after the other; the next segment's start waits for the previous plan, which is
  handed over between devices.
* ``"cp-first"`` — plain critical-path-first list scheduling (HEFT's upward rank, earliest finish, no
  insertion into gaps): the textbook policy. It lets populate work delay the planning chain.
* ``"adaptive"`` — the best simulated makespan among candidate schedules, improved:

  1. list schedules (insertion into idle gaps, earliest finish) with several priorities: critical-path
     rank; the planning chain first (with and without the writer's order in the rank); the chain three
     segments ahead of the populate work and pinned to the fastest device; plus round-robin itself — so
     adaptive is never slower than round-robin;
  2. event-driven dispatches (`listsched.dispatch`) for a few urgency orders and target makespans: a free
     fast device takes the most urgent ready task, a slower one the least urgent task whose slack absorbs
     its slowness, so slow devices stay busy with work that can wait (early decodes, whole tails of early
     segments) and never hold up the chain;
  3. forward-backward improvement of the three best (schedule backwards from the end with the
     last-finishing tasks first, then forwards with the tasks that had to start earliest first);
  4. local search on the path that sets the makespan: move a task to another device, let a blocked task go
     before the one blocking it, pack two populate tasks of the same stage into one batched launch when the
     batched cost is lower (and memory allows);
  5. for DAGs of at most `EXACT_MAX_TASKS` tasks (about two segments), an exhaustive branch and bound
     (`listsched.exact`), so small videos get an optimal schedule.

Every step stops as soon as a schedule meets the lower bound (`placement.lower_bound`).

Tasks are never preempted. A candidate that does not fit in memory is dropped (round-robin holds one
segment per device at a time, so it fits whenever the pre-flight check passes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .costs import CostModel
from .dag import Edge, TaskDAG
from .listsched import ListScheduler, chain_first, dispatch, exact, index_order, lookahead, upward_rank
from .placement import HOST, Device, Placement, Schedule, Unit, lower_bound, pack_key

POLICIES = ("adaptive", "round-robin", "cp-first")
EXACT_MAX_TASKS = 14  # DAGs this small (about two segments) are also searched exhaustively


def _check_args(dag: TaskDAG, devices: Sequence[Device], capacity) -> list[int | None]:
    if not isinstance(dag, TaskDAG):
        raise TypeError(f"dag must be a TaskDAG (see build_dag), got {type(dag).__name__}")
    if not devices or not all(isinstance(d, Device) for d in devices):
        raise ValueError("devices: at least one Device is required")
    if capacity is None:
        return [None] * len(devices)
    capacity = list(capacity)
    if len(capacity) != len(devices):
        raise ValueError(f"capacity: expected {len(devices)} values (one per device), got {len(capacity)}")
    for c in capacity:
        if c is not None and (not isinstance(c, int) or c < 1):
            raise ValueError(f"capacity: each entry must be None or an int >= 1 (run preflight first), got {c!r}")
    return capacity


def _singles(dag: TaskDAG) -> list[Unit]:
    return [Unit((t.index,)) for t in dag.tasks]


def _round_robin_assign(dag: TaskDAG, n_dev: int) -> list[int | None]:
    return [None if t.on_host else t.segment % n_dev for t in dag.tasks]


def round_robin(
    dag: TaskDAG, costs: CostModel, devices: Sequence[Device], capacity: Sequence[int | None] | None = None
) -> Schedule:
    """The authors' scheme: segment s's tasks on device s mod D, one segment after the other per device."""
    cap = _check_args(dag, devices, capacity)
    ls = ListScheduler(dag, costs, devices, cap)
    sched = ls.run(_singles(dag), index_order(dag), _round_robin_assign(dag, len(devices)), insertion=False,
                   policy="round-robin")  # fmt: skip
    if sched is None:  # pragma: no cover - one segment at a time per device fits any capacity >= 1
        raise ValueError("round-robin: a device cannot hold one segment (run preflight first)")
    return sched


def cp_first(
    dag: TaskDAG, costs: CostModel, devices: Sequence[Device], capacity: Sequence[int | None] | None = None
) -> Schedule:
    """Plain critical-path-first list scheduling: upward rank, earliest finish, no insertion into gaps."""
    cap = _check_args(dag, devices, capacity)
    ls = ListScheduler(dag, costs, devices, cap)
    sched = ls.run(_singles(dag), upward_rank(dag, costs, devices), insertion=False, policy="cp-first")
    if sched is None:
        raise ValueError("cp-first: no placement fits the devices' memory in this order; use adaptive")
    return sched


# --- adaptive -----------------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    units: list[Unit]
    priority: list[float]
    assign: list[int | None]
    insertion: bool
    label: str
    schedule: Schedule | None = field(default=None, repr=False)

    @property
    def score(self) -> tuple[float, float]:
        """Makespan first, then the sum of finish times (prefers compact schedules among equals)."""
        s = self.schedule
        if s is None:
            return (float("inf"), 0.0)
        return (round(s.makespan, 9), sum(p.end for p in s.placements))


def _evaluate(ls: ListScheduler, c: _Candidate) -> _Candidate:
    c.schedule = ls.run(c.units, c.priority, c.assign, insertion=c.insertion, policy=c.label)
    return c


def _assignment(c: _Candidate) -> list[int | None]:
    dev_of = {p.task.index: p.device for p in c.schedule.placements}
    return [None if dev_of[u.tasks[0]] == HOST else dev_of[u.tasks[0]] for u in c.units]


def _candidates(dag: TaskDAG, costs: CostModel, devices: Sequence[Device]) -> list[_Candidate]:
    """List-scheduling candidates: round-robin, critical-path rank, planning chain first (with the writer's
    order in the rank or without), and the chain three segments ahead of the populate work, pinned."""
    singles = _singles(dag)
    free: list[int | None] = [None] * len(singles)
    fastest_speed = max(d.speed for d in devices)
    fastest = next(i for i, d in enumerate(devices) if d.speed == fastest_speed)
    pinned = [fastest if t.chain else None for t in dag.tasks]
    rank = upward_rank(dag, costs, devices)
    local = upward_rank(dag, costs, devices, through_writes=False)
    return [
        _Candidate(singles, index_order(dag), _round_robin_assign(dag, len(devices)), False, "round-robin"),
        _Candidate(singles, rank, free, True, "critical-path rank"),
        _Candidate(singles, chain_first(dag, rank), free, True, "chain first"),
        _Candidate(singles, chain_first(dag, local), free, True, "chain first, local rank"),
        _Candidate(singles, lookahead(dag, 3), pinned, True, "chain 3 ahead, pinned"),
    ]


def _dispatch_candidates(ls: ListScheduler, costs: CostModel, bound: float) -> list[_Candidate]:
    """Event-driven dispatches for a few urgency orders (and, for devices of different speeds, target
    makespans); each becomes a candidate with its devices fixed and its start order as priority."""
    dag, devices = ls.dag, ls.devices
    top = max(d.speed for d in devices)
    dur = [costs.cost(t) if t.on_host else costs.cost(t) / top for t in dag.tasks]
    tail = [0.0] * len(dag.tasks)
    for t in reversed(dag.tasks):
        tail[t.index] = max((dur[e.dst] + tail[e.dst] for e in dag.succs[t.index]), default=0.0)
    orders = {
        "latest start": [tail[i] + dur[i] for i in range(len(dag.tasks))],
        "chain first": chain_first(dag, upward_rank(dag, costs, devices)),
        **{f"chain {k} ahead": lookahead(dag, k) for k in (1, 2, 3)},
    }
    out = []
    singles = _singles(dag)
    slacks = (1.0, 1.05, 1.1, 1.2) if len({d.speed for d in devices}) > 1 else (1.0,)  # equal speeds: no slack
    for name, urgency in orders.items():
        for slack in slacks:
            sched = dispatch(ls, urgency, bound * slack)
            if sched is None:
                continue
            starts = {p.task.index: p.start for p in sched.placements}
            by_task = sorted(sched.placements, key=lambda p: p.task.index)
            assign = [None if p.device == HOST else p.device for p in by_task]
            prio = [-starts[i] for i in range(len(dag.tasks))]  # re-decoding in start order gives it back or better
            out.append(_Candidate(singles, prio, assign, True, f"dispatch, {name}, target x{slack:g}", sched))
    return out


def _reverse(dag: TaskDAG) -> TaskDAG:
    edges = tuple(Edge(e.dst, e.src, e.kind, e.frames) for e in dag.edges)
    return TaskDAG(dag.layout, dag.num_segments, dag.chain_mode, dag.tasks, edges, dag.handoff, dag.kept, dag._index)


def _forward_backward(c: _Candidate, ls: ListScheduler, back: ListScheduler, rounds: int = 4) -> _Candidate:
    """Schedule backwards with the last-finishing units first, then forwards with the units that had to start
    earliest first (devices kept); repeat while it helps."""
    best = cur = c
    for _ in range(rounds):
        assign = _assignment(cur)
        ends = {p.task.index: p.end for p in cur.schedule.placements}
        rev = back.run(cur.units, [max(ends[i] for i in u.tasks) for u in cur.units], assign, policy=cur.label)
        if rev is None:
            break
        rends = {p.task.index: p.end for p in rev.placements}
        nxt = _evaluate(ls, _Candidate(cur.units, [max(rends[i] for i in u.tasks) for u in cur.units], assign,
                                       True, cur.label))  # fmt: skip
        if nxt.schedule is None or not nxt.score < best.score:
            break
        best = cur = nxt
    return best


def _critical_units(sched: Schedule, ls: ListScheduler, unit_of: list[int]) -> list[tuple[int, int | None]]:
    """Units on the path that sets the makespan, each with the unit that blocked it on its device (or None)."""
    dag = sched.dag
    by = {p.task.index: p for p in sched.placements}
    lanes = sched.by_device()
    path: list[tuple[int, int | None]] = []
    cur: Placement | None = max(sched.placements, key=lambda p: p.end)
    seen: set[int] = set()
    while cur is not None and cur.task.index not in seen:
        seen.add(cur.task.index)
        nxt, blocker = None, None
        for e in dag.preds[cur.task.index]:
            src = by[e.src]
            moved = HOST not in (src.device, cur.device) and src.device != cur.device
            if abs(src.end + (ls.delay[e.src, e.dst] if moved else 0.0) - cur.start) < 1e-6:
                nxt = src
                break
        if nxt is None:
            for p in lanes.get(cur.device, []):
                if p.batch != cur.batch and abs(p.end - cur.start) < 1e-6:
                    blocker, nxt = unit_of[p.task.index], p
                    break
        path.append((unit_of[cur.task.index], blocker))
        cur = nxt
    return path


def _try_pack(best: _Candidate, u: int, ls: ListScheduler, assign: list[int | None], rng: random.Random):
    """Merge populate unit `u` with another populate unit of the same stage on the same device (one batch)."""
    dag, units = ls.dag, best.units
    t0 = dag.tasks[units[u].tasks[0]]
    if t0.kind != "populate":
        return None
    key = pack_key(t0)
    segs = {dag.tasks[i].segment for i in units[u].tasks}
    start_u = best.schedule.placement(units[u].tasks[0]).start
    options = []
    for v, other in enumerate(units):
        t1 = dag.tasks[other.tasks[0]]
        if v == u or assign[v] != assign[u] or t1.kind != "populate" or pack_key(t1) != key:
            continue
        if segs & {dag.tasks[i].segment for i in other.tasks}:
            continue
        options.append((abs(best.schedule.placement(other.tasks[0]).start - start_u), v))
    if not options:
        return None
    options.sort()
    v = options[min(len(options) - 1, rng.randrange(2))][1]
    merged = Unit(tuple(sorted(units[u].tasks + units[v].tasks)), "batch")
    if ls.unit_cost(merged) >= ls.unit_cost(units[u]) + ls.unit_cost(units[v]):
        return None
    keep = [k for k in range(len(units)) if k not in (u, v)]
    return (
        [units[k] for k in keep] + [merged],
        [best.priority[k] for k in keep] + [max(best.priority[u], best.priority[v])],
        [assign[k] for k in keep] + [assign[u]],
    )


def _improve(cand: _Candidate, ls: ListScheduler, budget: int, seed: int) -> _Candidate:
    """Local search on the critical path; a move is kept when (makespan, sum of finish times) improves."""
    rng = random.Random(seed)
    dag, n_dev = ls.dag, ls.n_dev
    best = cand
    assign = _assignment(best)
    evals = stale = 0
    while evals < budget and stale < max(16, budget // 2):
        units = best.units
        unit_of = [0] * len(dag.tasks)
        for u, unit in enumerate(units):
            for i in unit.tasks:
                unit_of[i] = u
        path = _critical_units(best.schedule, ls, unit_of)
        movable = [(u, b) for u, b in path if not dag.tasks[units[u].tasks[0]].on_host]
        if not movable:
            break
        u, blocker = rng.choice(movable)
        move = rng.random()
        new_units, new_prio, new_assign = units, list(best.priority), list(assign)
        if blocker is not None and move < 0.35:
            new_prio[u] = new_prio[blocker] + 1e-6  # let the blocked unit go first
        elif move < 0.8 and n_dev > 1:
            new_assign[u] = rng.choice([d for d in range(n_dev) if d != assign[u]])
            if rng.random() < 0.5:
                new_prio[u] += 1e-3 + rng.random() * (max(new_prio) - new_prio[u])
        else:
            packed = _try_pack(best, u, ls, assign, rng)
            if packed is None:
                stale += 1
                continue
            new_units, new_prio, new_assign = packed
        evals += 1
        trial = _evaluate(ls, _Candidate(new_units, new_prio, new_assign, True, best.label))
        if trial.schedule is not None and trial.score < best.score:
            best, assign, stale = trial, _assignment(trial), 0
        else:
            stale += 1
    return best


def adaptive(
    dag: TaskDAG,
    costs: CostModel,
    devices: Sequence[Device],
    capacity: Sequence[int | None] | None = None,
    *,
    budget: int | None = None,
    seed: int = 0,
) -> Schedule:
    """The adaptive policy (see the module docstring).

    Args:
        capacity: segments each device can hold at once (None: unlimited); see `preflight`.
        budget: schedule evaluations for the local search (default 5 per segment); 0 keeps the best
            candidate after forward-backward improvement.
        seed: seeds the local search; the result is deterministic for a given seed.
    """
    cap = _check_args(dag, devices, capacity)
    if budget is None:
        budget = 5 * dag.num_segments
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}")
    ls = ListScheduler(dag, costs, devices, cap)
    back = ListScheduler(_reverse(dag), costs, devices, cap)
    bounds = lower_bound(dag, costs, devices)
    cands = [_evaluate(ls, c) for c in _candidates(dag, costs, devices)]
    cands = sorted((c for c in cands if c.schedule is not None), key=lambda c: c.score)
    best = cands[0]

    def done() -> bool:  # nothing can beat a schedule that meets the lower bound
        return best.schedule.makespan <= bounds.refined * (1 + 1e-9)

    if not done():
        cands = sorted(cands + _dispatch_candidates(ls, costs, bounds.value), key=lambda c: c.score)
        best = cands[0]

    seen: set[str] = set()
    for c in cands[:3]:
        if done() or c.label in seen:
            continue
        seen.add(c.label)
        improved = _forward_backward(c, ls, back)
        if improved.score < best.score:
            best = improved
    if not done() and budget > 0:
        improved = _improve(best, ls, budget, seed)
        if improved.score < best.score:
            best = improved
    if not done() and len(dag.tasks) <= EXACT_MAX_TASKS:
        found = exact(ls, best.schedule.makespan - 1e-9)
        if found is not None:
            best = _Candidate(_singles(dag), [0.0] * len(dag.tasks), [None] * len(dag.tasks), True, "exact", found)
    sched = best.schedule
    return Schedule(dag, sched.devices, sched.placements, f"adaptive ({best.label})", sched.capacity)


def schedule(
    dag: TaskDAG,
    costs: CostModel,
    devices: Sequence[Device],
    policy: str = "adaptive",
    capacity: Sequence[int | None] | None = None,
    **kwargs,
) -> Schedule:
    """Place `dag` on `devices` with `policy` (one of `POLICIES`); `capacity`: segments each device can hold."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "round-robin":
        return round_robin(dag, costs, devices, capacity)
    if policy == "cp-first":
        return cp_first(dag, costs, devices, capacity)
    return adaptive(dag, costs, devices, capacity, **kwargs)
