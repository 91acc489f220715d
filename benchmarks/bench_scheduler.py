"""Scheduler overhead on the CPU: seconds per task to place a video's DAG, per policy.

Run: ``python -m pytest benchmarks/bench_scheduler.py -q -s``. Each case times the whole placement (DAG and
costs built once outside the timer) and reports the median per call and per task, with round-robin of the
same case as the baseline. Also reports the simulated makespan, so a faster policy that schedules worse shows.
"""

from __future__ import annotations

import pytest
from conftest import record, time_it

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
