"""The adaptive policy's widening step: which stage tasks run across several devices, and how wide.

From about four devices on, the planning chain (re-encode, plan, re-encode, plan, ...) sets the makespan and
more devices stand idle (issue: 3.1x on 4 or 8 devices for 12 segments). Widening a chain task across k
devices (`split.Split`) shortens the chain by about (k - 1) / k of its model compute, at the price of the
all-to-alls and of the k devices it holds. The widening step builds list schedules where

* every plan runs on ``k`` devices (``k`` from `WIDTHS` up to the device count; the first segment's plan,
  which everything waits for, on all of them), and the populate tasks are *moldable*: each goes at the
  width that lets it finish first (`ListScheduler.run`'s ``molds``), so populate work fills the devices the
  chain leaves free, narrow where whole devices are free, wide where only a short gap is;
* or every stage task is moldable, each extra device-second of work counted a few times (a greedy that
  widens only where the gain pays for the work; less so on the planning chain),

under a few priorities (the chain one or two segments ahead of the populate work; planning chain first;
critical-path rank), then (search budget permitting) improves the best with forward-backward passes,
restarts with slightly perturbed priorities, and a local search that may also change any stage task's width.
The caller (`policy.adaptive`) keeps the unsplit schedule unless a widened one is strictly shorter, so
``split="auto"`` never does worse than ``split="off"``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .listsched import ListScheduler, chain_first, lookahead, upward_rank
from .placement import Unit
from .search import Candidate, fixed, forward_backward, improve
from .split import Split

WIDTHS = (2, 3, 4, 8)  # plan widths tried (those up to the device count, and the device count itself)
MOLD_WIDTHS = (2, 3, 4, 6, 8)  # widths a moldable task may take (and the device count): fewer list-scheduling
# trials per task; 5 and 7 ways pad 12 heads as much as 6 and 8 do


def _plan_width(costs, task, k: int) -> Split | None:
    options = costs.split_options(task, k)
    return options[k - 2] if k >= 2 and len(options) >= k - 1 else None


def _structure(
    ls: ListScheduler,
    k: int,
    prio: str,
    moldable: Sequence[str],
    penalty: float,
    chain_penalty: float | None = None,
    noise: tuple[random.Random, float] | None = None,
) -> Candidate | None:
    """One widened list schedule: plans at width `k` (the first at the device count) unless plans are in
    `moldable`, the `moldable` kinds at the width that finishes first, extra work counted `penalty` times
    (`chain_penalty` for planning-chain tasks); `noise` (rng, size) perturbs the priorities."""
    dag, costs, devices = ls.dag, ls.costs, ls.devices
    n_dev = ls.n_dev
    units, durations, molds = [], [], []
    for t in dag.tasks:
        split = None
        if t.kind == "plan" and "plan" not in moldable:
            split = _plan_width(costs, t, n_dev if t.segment == 0 else k)
        units.append(Unit((t.index,), split=split))
        durations.append(costs.split_cost(t, split) if split is not None else costs.cost(t))
        options = costs.split_options(t, n_dev) if t.kind in moldable and split is None else []
        molds.append([sp for sp in options if sp.ways in MOLD_WIDTHS or sp.ways == n_dev] or None)
    rank = upward_rank(dag, costs, devices, durations=durations)
    if prio == "rank":
        priority = rank
    else:
        priority = chain_first(dag, rank) if prio == "chain first" else lookahead(dag, int(prio.split()[1]))
    if noise is not None:
        rng, size = noise
        priority = [p * (1 + size * rng.uniform(-1, 1)) for p in priority]
    pc = penalty if chain_penalty is None else chain_penalty
    label = (
        f"widened: plans x{k}, {prio}" if "plan" not in moldable else f"widened: moldable x{pc:g}/{penalty:g}, {prio}"
    )
    if noise is not None:
        label += ", perturbed"
    penalties = [pc if t.chain else penalty for t in dag.tasks]
    sched = ls.run(units, priority, None, insertion=True, policy=label, molds=molds, penalty=penalties)
    if sched is None:
        return None
    cand = fixed(sched, priority, label)
    cand.schedule = sched
    return cand


ALL_STAGES = ("start", "reencode", "plan", "populate")
# Every stage task moldable: (priority, chain penalty, other penalty). Chain tasks gain more from width (they
# set the pace), so their extra work weighs less.
MOLDABLE = (("chain first", 0.0, 0.0), ("chain first", 0.5, 5.0), ("rank", 0.5, 5.0), ("chain 1 ahead", 2.0, 2.0))


def candidates(ls: ListScheduler, quick: bool = False) -> list[Candidate]:
    """The widened list schedules described in the module docstring (those that fit in memory); `quick`: three
    of them (plans on up to four devices, and two of the moldable ones)."""
    n_dev = ls.n_dev
    out = []
    if quick:
        out.append(_structure(ls, min(4, n_dev), "chain 1 ahead", ("populate",), 0.0))
        for prio, pc, po in MOLDABLE[1:4:2]:
            out.append(_structure(ls, n_dev, prio, ALL_STAGES, po, pc))
        return [c for c in out if c is not None]
    widths = sorted({k for k in WIDTHS if k <= n_dev} | {n_dev})
    for prio in ("chain 1 ahead", "chain 2 ahead"):
        for k in widths:
            out.append(_structure(ls, k, prio, ("populate",), 0.0))
    for prio, pc, po in MOLDABLE:
        out.append(_structure(ls, n_dev, prio, ALL_STAGES, po, pc))
    return [c for c in out if c is not None]


def _restarts(ls: ListScheduler, best: Candidate, count: int, seed: int) -> Candidate:
    """`count` moldable list schedules with priorities perturbed by a few percent (seeded), the best kept."""
    rng = random.Random(seed)
    for i in range(count):
        prio, pc, po = MOLDABLE[i % len(MOLDABLE)]
        c = _structure(ls, ls.n_dev, prio, ALL_STAGES, po, pc, (rng, rng.choice((0.02, 0.05, 0.1))))
        if c is not None and c.score < best.score:
            best = c
    return best


def widen(ls: ListScheduler, back: ListScheduler, base: Candidate, budget: int, seed: int) -> Candidate:
    """The best widened schedule found (or `base` when none is shorter); see the module docstring. `budget`
    splits between perturbed restarts (a quarter) and the local search; with 0, only the `quick` candidates."""
    dag, costs = ls.dag, ls.costs
    cands = sorted(candidates(ls, quick=budget == 0), key=lambda c: c.score)
    if not cands:
        return base
    best = min(cands[0], base, key=lambda c: c.score)
    if budget == 0:
        return best
    for c in cands[:2]:
        improved = forward_backward(c, ls, back)
        if improved.score < best.score:
            best = improved
    best = _restarts(ls, best, budget // 4, seed)
    if best is not base:
        widths = [[None, *costs.split_options(t, ls.n_dev)] for t in dag.tasks]
        improved = improve(best, ls, budget - budget // 4, seed, widths)
        if improved.score < best.score:
            best = improved
    return best
