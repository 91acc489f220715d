"""Improving list schedules: candidates, forward-backward passes, local search on the critical path, packing.

A `Candidate` is what `ListScheduler.run` needs (launch units, priorities, device choices) plus the schedule it
gives. The adaptive policy (`policy`) builds candidates and improves the best ones here:

* `forward_backward` — schedule backwards with the last-finishing units first, then forwards with the units
  that had to start earliest first (devices kept); repeat while it helps;
* `improve` — local search on the path that sets the makespan: move a unit to another device, let a blocked
  unit go before the one blocking it, pack two stage tasks of one device into one launch (`try_pack`), and,
  when widths are allowed, change how many devices a stage task runs on (`Unit.split`);
* `pack_pass` — merge tasks that one device runs back to back into one launch when that is shorter: one
  batched call for the same stage of several segments when its workspace fits, else several CUDA streams
  (different stages cannot share a batched call; a batch whose stacked workspace does not fit may still
  run as streams).

Every step keeps a change only when (makespan, sum of finish times) improves.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .dag import Edge, TaskDAG
from .listsched import Assign, ListScheduler
from .placement import HOST, Placement, Schedule, Unit, pack_key
from .split import Split


@dataclass
class Candidate:
    """Units, priorities and device choices for `ListScheduler.run`, and the schedule they give."""

    units: list[Unit]
    priority: list[float]
    assign: list[Assign]
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


def evaluate(ls: ListScheduler, c: Candidate) -> Candidate:
    c.schedule = ls.run(c.units, c.priority, c.assign, insertion=c.insertion, policy=c.label)
    return c


def assignment(c: Candidate) -> list[Assign]:
    """The devices `c`'s schedule used, per unit (a widened unit's device tuple)."""
    by = c.schedule._by_task
    out: list[Assign] = []
    for u in c.units:
        p = by[u.tasks[0]]
        out.append(None if p.device == HOST else (p.devices if p.split is not None else p.device))
    return out


def fixed(schedule: Schedule, priority: Sequence[float], label: str) -> Candidate:
    """A candidate that reproduces `schedule` (one unit per launch, its devices and widths fixed)."""
    groups = schedule.launches()
    units, prio, assign = [], [], []
    for g in groups:
        p0 = g[0]
        mode = "single" if len(g) == 1 else ("streams" if len({p.stream for p in g}) > 1 else "batch")
        units.append(Unit(tuple(sorted(p.task.index for p in g)), mode, p0.split))
        prio.append(max(priority[p.task.index] for p in g))
        assign.append(None if p0.device == HOST else (p0.devices if p0.split is not None else p0.device))
    return Candidate(units, prio, assign, True, label)


def reverse(dag: TaskDAG) -> TaskDAG:
    edges = tuple(Edge(e.dst, e.src, e.kind, e.frames) for e in dag.edges)
    return TaskDAG(dag.layout, dag.num_segments, dag.chain_mode, dag.tasks, edges, dag.handoff, dag.kept, dag._index)


def forward_backward(c: Candidate, ls: ListScheduler, back: ListScheduler, rounds: int = 4) -> Candidate:
    """Schedule backwards with the last-finishing units first, then forwards with the units that had to start
    earliest first (devices kept); repeat while it helps."""
    best = cur = c
    for _ in range(rounds):
        assign = assignment(cur)
        ends = {p.task.index: p.end for p in cur.schedule.placements}
        rev = back.run(cur.units, [max(ends[i] for i in u.tasks) for u in cur.units], assign, policy=cur.label)
        if rev is None:
            break
        rends = {p.task.index: p.end for p in rev.placements}
        nxt = evaluate(ls, Candidate(cur.units, [max(rends[i] for i in u.tasks) for u in cur.units], assign,
                                     True, cur.label))  # fmt: skip
        if nxt.schedule is None or not nxt.score < best.score:
            break
        best = cur = nxt
    return best


def _critical_units(sched: Schedule, ls: ListScheduler, unit_of: list[int]) -> list[tuple[int, int | None]]:
    """Units on the path that sets the makespan, each with the unit that blocked it on its device (or None)."""
    dag = sched.dag
    by = sched._by_task
    lanes = sched.by_device()
    path: list[tuple[int, int | None]] = []
    cur: Placement | None = max(sched.placements, key=lambda p: p.end)
    seen: set[int] = set()
    while cur is not None and cur.task.index not in seen:
        seen.add(cur.task.index)
        nxt, blocker = None, None
        for e in dag.preds[cur.task.index]:
            src = by[e.src]
            if abs(src.end + sched.edge_delay(e, ls.costs) - cur.start) < 1e-6:
                nxt = src
                break
        if nxt is None:
            for d in cur.all_devices:
                for p in lanes.get(d, []):
                    if p.batch != cur.batch and abs(p.end - cur.start) < 1e-6:
                        blocker, nxt = unit_of[p.task.index], p
                        break
                if nxt is not None:
                    break
        path.append((unit_of[cur.task.index], blocker))
        cur = nxt
    return path


def try_pack(
    best: Candidate,
    u: int,
    ls: ListScheduler,
    assign: list[Assign],
    rng: random.Random | None = None,
    *,
    partner: int | None = None,
    streams: bool = True,
):
    """Merge stage unit `u` with another unsplit stage unit of other segments on the same device into one launch:
    a batch when they share a stage shape and the batch's workspace fits, else (with `streams`) CUDA streams.
    None when it does not pay (the launch would not be shorter than the two apart) or nothing fits.
    `partner`: that unit, else the one starting nearest (or, with `rng`, sometimes the second nearest). Without
    `streams` only populate tasks of one stage shape are considered (batches only)."""
    dag, units = ls.dag, best.units
    t0 = dag.tasks[units[u].tasks[0]]
    if not t0.is_stage or units[u].split is not None or not isinstance(assign[u], int):
        return None
    if not streams and t0.kind != "populate":
        return None
    segs = {dag.tasks[i].segment for i in units[u].tasks}
    start_u = best.schedule.placement(units[u].tasks[0]).start
    options = []
    for v, other in enumerate(units):
        t1 = dag.tasks[other.tasks[0]]
        if v == u or assign[v] != assign[u] or not t1.is_stage or other.split is not None:
            continue
        if not streams and (t1.kind != "populate" or pack_key(t1) != pack_key(t0)):
            continue
        if (partner is not None and v != partner) or segs & {dag.tasks[i].segment for i in other.tasks}:
            continue
        options.append((abs(best.schedule.placement(other.tasks[0]).start - start_u), v))
    if not options:
        return None
    options.sort()
    v = options[min(len(options) - 1, rng.randrange(2))][1] if rng is not None else options[0][1]
    tasks = tuple(sorted(units[u].tasks + units[v].tasks))
    modes = {units[u].mode, units[v].mode}
    same = len({pack_key(dag.tasks[i]) for i in tasks}) == 1 and modes <= {"single", "batch"}
    merged = None
    for mode in ("batch",) * same + ("streams",) * (streams and modes <= {"single", "streams"}):
        unit = Unit(tasks, mode)
        if ls.fits_workspace(unit, assign[u]):
            merged = unit
            break
    if merged is None or ls.unit_cost(merged) >= ls.unit_cost(units[u]) + ls.unit_cost(units[v]):
        return None
    keep = [k for k in range(len(units)) if k not in (u, v)]
    return (
        [units[k] for k in keep] + [merged],
        [best.priority[k] for k in keep] + [max(best.priority[u], best.priority[v])],
        [assign[k] for k in keep] + [assign[u]],
    )


def _remold(unit: Unit, widths: Sequence[Split | None], rng: random.Random) -> Unit | None:
    """`unit` at another width (None: on one device), or None when it has no other."""
    others = [sp for sp in widths if sp != unit.split]
    return Unit(unit.tasks, "single", rng.choice(others)) if others and unit.mode == "single" else None


def improve(cand: Candidate, ls: ListScheduler, budget: int, seed: int, widths=None) -> Candidate:
    """Local search on the critical path; a move is kept when (makespan, sum of finish times) improves.

    `widths`: per task, the splits it may take (None first: unsplit); without it no width changes."""
    rng = random.Random(seed)
    dag, n_dev = ls.dag, ls.n_dev
    best = cand
    assign = assignment(best)
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
        elif widths is not None and move < 0.55 and (wide := _remold(units[u], widths[units[u].tasks[0]], rng)):
            new_units = list(units)
            new_units[u], new_assign[u] = wide, None
        elif move < 0.8 and n_dev > 1:
            if isinstance(assign[u], int):
                new_assign[u] = rng.choice([d for d in range(n_dev) if d != assign[u]])
            else:
                new_assign[u] = None  # a widened unit: let the scheduler pick its devices again
            if rng.random() < 0.5:
                new_prio[u] += 1e-3 + rng.random() * (max(new_prio) - new_prio[u])
        else:
            packed = try_pack(best, u, ls, assign, rng, streams=False)
            if packed is None:
                stale += 1
                continue
            new_units, new_prio, new_assign = packed
        evals += 1
        trial = evaluate(ls, Candidate(new_units, new_prio, new_assign, True, best.label))
        if trial.schedule is not None and trial.score < best.score:
            best, assign, stale = trial, assignment(trial), 0
        else:
            stale += 1
    return best


def pack_pass(cand: Candidate, ls: ListScheduler, limit: int = 16) -> Candidate:
    """Merge stage tasks that one device runs one after the other, whose inputs were all there when the first
    began (so merging delays neither) and one of which lies on the path that sets the makespan (elsewhere a
    merge cannot shorten it), into one launch: batched or on streams (`try_pack`); keep each merge that
    shortens the schedule. At most `limit` merges are tried."""
    best = cand
    tried = 0
    while tried < limit:
        merged = None
        for ua, ub in _pack_pairs(best, ls):
            packed = try_pack(best, ua, ls, assignment(best), partner=ub)
            if packed is None:
                continue
            tried += 1
            trial = evaluate(ls, Candidate(*packed, True, best.label))
            if trial.schedule is not None and trial.score < best.score:
                merged = trial
                break
            if tried >= limit:
                break
        if merged is None:
            break
        best = merged
    return best


def _pack_pairs(cand: Candidate, ls: ListScheduler) -> list[tuple[int, int]]:
    """(unit, next unit on its device) pairs `pack_pass` may merge, in device and start order."""
    s, units, dag = cand.schedule, cand.units, ls.dag
    unit_of = [0] * len(dag.tasks)
    for u, unit in enumerate(units):
        for i in unit.tasks:
            unit_of[i] = u
    critical = {u for u, _ in _critical_units(s, ls, unit_of)}
    out = []
    for d, lane in sorted(s.by_device().items()):
        if d == HOST:
            continue
        lane = sorted({p.batch: p for p in lane}.values(), key=lambda p: p.start)
        for a, b in zip(lane, lane[1:]):
            ua, ub = unit_of[a.task.index], unit_of[b.task.index]
            if units[ua].split is not None or units[ub].split is not None or not (critical & {ua, ub}):
                continue
            if not a.task.is_stage or not b.task.is_stage:
                continue
            ready = max((s.placement(e.src).end + s.edge_delay(e, ls.costs) for i in units[ub].tasks
                         for e in dag.preds[i]), default=0.0)  # fmt: skip
            if ready <= a.start + 1e-9:
                out.append((ua, ub))
    return out
