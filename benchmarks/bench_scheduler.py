"""Scheduler overhead on the CPU: seconds per task to place a video's DAG, per policy.

Run: ``python -m pytest benchmarks/bench_scheduler.py -q -s``. Each case times the whole placement (DAG and
costs built once outside the timer) and reports the median per call and per task, with round-robin of the
same case as the baseline. Also reports the simulated makespan, so a faster policy that schedules worse shows.
The split cases time ``split="auto"`` (stage tasks across devices) and check issue 14's simulated targets.
"""

from __future__ import annotations

import pytest
from conftest import median_seconds, record, time_it

from mmpl_fast.scheduler import CostModel, build_dag, lower_bound, schedule, simulated_devices

CASES = [(12, [1, 1, 1, 1]), (12, [1, 1, 1, 0.5]), (12, [1, 1]), (24, [1] * 8), (24, [1] * 7 + [0.5])]


@pytest.mark.parametrize("segments,speeds", CASES, ids=[f"{s}seg-{len(v)}dev-{min(v):g}" for s, v in CASES])
def test_scheduler_overhead_per_task(benchmark, segments, speeds):
    dag = build_dag("mmpl", segments)
    costs = CostModel()
    devices = simulated_devices(len(speeds), speeds)
    bound = lower_bound(dag, costs, devices).value
    group = f"scheduler overhead, {segments} segments on {len(speeds)} devices (speeds {','.join(map(str, speeds))})"
    for policy in ("round-robin", "cp-first", "adaptive"):
        result = {}

        def place(policy=policy, result=result):
            result["schedule"] = schedule(dag, costs, devices, policy)

        seconds = time_it(place, warmup=1, repeat=3)
        makespan = result["schedule"].makespan
        record(
            group, policy, seconds, baseline="round-robin", tasks=len(dag.tasks),
            us_per_task=1e6 * seconds / len(dag.tasks), makespan_s=makespan, efficiency=bound / makespan,
        )  # fmt: skip
        assert seconds / len(dag.tasks) < 0.05  # well below a task's own runtime (~0.1-1.4 s on an H100)
    # pytest-benchmark's own timing (with --benchmark-only, a test without it would be skipped): adaptive
    benchmark.pedantic(lambda: schedule(dag, costs, devices, "adaptive"), rounds=3, iterations=1, warmup_rounds=0)


# Issue 14's simulated targets (Wan2.1-1.3B, 480x832, 4 steps, H100 estimate): speedup over one device with
# stage tasks split across devices (`split="auto"`), never below the unsplit plan.
TARGETS = [(12, 8, 5.0), (24, 8, 6.0), (12, 4, 3.5)]


@pytest.mark.parametrize("segments,devices,target", TARGETS, ids=[f"{s}seg-{d}dev" for s, d, _ in TARGETS])
def test_split_targets_and_planning_time(benchmark, segments, devices, target):
    dag = build_dag("mmpl", segments)
    costs = CostModel()
    devs = simulated_devices(devices)
    one = schedule(dag, costs, simulated_devices(1)).makespan
    off = schedule(dag, costs, devs)
    result = {}

    def place():
        result["schedule"] = schedule(dag, costs, devs, split="auto")

    benchmark.pedantic(place, rounds=1, iterations=1, warmup_rounds=0)
    wide = result["schedule"]
    wide.check(costs)
    record(
        f"split across devices, {segments} segments on {devices} devices", "adaptive, split auto",
        median_seconds(benchmark), speedup=one / wide.makespan, unsplit_speedup=one / off.makespan,
        makespan_s=wide.makespan, chain_s=wide.chain_end(), chain_unsplit_s=off.chain_end(),
        first_segment_s=wide.segment_done(0), first_segment_unsplit_s=off.segment_done(0),
    )  # fmt: skip
    assert wide.makespan <= off.makespan + 1e-9
    assert one / wide.makespan >= target
