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
     (`listsched.exact`), so small videos get an optimal schedule;
  6. packing (`search.pack_pass`): stage tasks one device runs back to back, one of them on the path that
     sets the makespan, merged into one launch when that is shorter — one batched call for the same stage
     of several segments when its workspace fits, else CUDA streams (stages that cannot share a batched
     call, or a batch whose stacked workspace does not fit: `CostModel.streams_cost`, `launch_workspace`);
  7. with ``split="auto"`` only, widening (`widen`): stage tasks across several devices (`split.Split`),
     kept only when strictly shorter than the schedule of steps 1-6.

Steps 2-5 stop as soon as a schedule meets the lower bound (`placement.lower_bound`).

Tasks are never preempted. A candidate that does not fit in memory is dropped (round-robin holds one
segment per device at a time, so it fits whenever the pre-flight check passes).
"""

from __future__ import annotations

from collections.abc import Sequence

from .costs import CostModel
from .dag import TaskDAG
from .listsched import ListScheduler, chain_first, dispatch, exact, index_order, lookahead, upward_rank
from .placement import HOST, Device, Schedule, Unit, lower_bound
from .search import Candidate, evaluate, forward_backward, improve, pack_pass, reverse

POLICIES = ("adaptive", "round-robin", "cp-first")
SPLIT_MODES = ("off", "auto")
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


def _candidates(dag: TaskDAG, costs: CostModel, devices: Sequence[Device]) -> list[Candidate]:
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
        Candidate(singles, index_order(dag), _round_robin_assign(dag, len(devices)), False, "round-robin"),
        Candidate(singles, rank, free, True, "critical-path rank"),
        Candidate(singles, chain_first(dag, rank), free, True, "chain first"),
        Candidate(singles, chain_first(dag, local), free, True, "chain first, local rank"),
        Candidate(singles, lookahead(dag, 3), pinned, True, "chain 3 ahead, pinned"),
    ]


def _dispatch_candidates(ls: ListScheduler, costs: CostModel, bound: float) -> list[Candidate]:
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
            out.append(Candidate(singles, prio, assign, True, f"dispatch, {name}, target x{slack:g}", sched))
    return out


def _check_workspace(workspace, n: int) -> list[int | None] | None:
    if workspace is None:
        return None
    workspace = list(workspace)
    if len(workspace) != n or any(w is not None and (not isinstance(w, int) or w < 0) for w in workspace):
        raise ValueError(f"workspace: expected {n} values, each None or an int >= 0 bytes, got {workspace!r}")
    return workspace


def _unsplit(ls: ListScheduler, back: ListScheduler, bounds, budget: int, seed: int) -> Candidate:
    """Steps 1-5 of the module docstring: the best schedule with every task on one device."""
    dag, costs, devices = ls.dag, ls.costs, ls.devices
    cands = [evaluate(ls, c) for c in _candidates(dag, costs, devices)]
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
        improved = forward_backward(c, ls, back)
        if improved.score < best.score:
            best = improved
    if not done() and budget > 0:
        improved = improve(best, ls, budget, seed)
        if improved.score < best.score:
            best = improved
    if not done() and len(dag.tasks) <= EXACT_MAX_TASKS:
        found = exact(ls, best.schedule.makespan - 1e-9)
        if found is not None:
            n = len(dag.tasks)
            best = Candidate(_singles(dag), [0.0] * n, [None] * n, True, "exact", found)
    return best


def adaptive(
    dag: TaskDAG,
    costs: CostModel,
    devices: Sequence[Device],
    capacity: Sequence[int | None] | None = None,
    *,
    budget: int | None = None,
    seed: int = 0,
    split: str = "off",
    workspace: Sequence[int | None] | None = None,
) -> Schedule:
    """The adaptive policy (see the module docstring).

    Args:
        capacity: segments each device can hold at once (None: unlimited); see `preflight`.
        budget: schedule evaluations for the local search (default 5 per segment); 0 keeps the best
            candidate after forward-backward improvement.
        seed: seeds the local search; the result is deterministic for a given seed.
        split: ``"auto"`` lets stage tasks run across several devices (`widen`) when that shortens the
            schedule; ``"off"`` (the default, what executors without split support run) never does. With
            ``"auto"`` the result is never longer than with ``"off"``: the unsplit schedule is a candidate.
        workspace: bytes per device for one launch's workspace (`MemoryPlan.workspace`; None: not limited).
    """
    cap = _check_args(dag, devices, capacity)
    if budget is None:
        budget = 5 * dag.num_segments
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}")
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_MODES)}, got {split!r}")
    ws = _check_workspace(workspace, len(devices))
    ls = ListScheduler(dag, costs, devices, cap, ws)
    back = ListScheduler(reverse(dag), costs, devices, cap, ws)
    best = _unsplit(ls, back, lower_bound(dag, costs, devices), budget, seed)
    best = pack_pass(best, ls)
    if split == "auto" and len(devices) > 1:
        from .widen import widen

        wide = widen(ls, back, best, budget, seed)
        if wide.score < best.score:
            best = wide
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
    """Place `dag` on `devices` with `policy` (one of `POLICIES`); `capacity`: segments each device can hold.
    Keyword arguments go to the policy (`adaptive`: ``budget``, ``seed``, ``split``, ``workspace``)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "round-robin":
        return round_robin(dag, costs, devices, capacity)
    if policy == "cp-first":
        return cp_first(dag, costs, devices, capacity)
    return adaptive(dag, costs, devices, capacity, **kwargs)
