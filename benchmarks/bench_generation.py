"""End to end on CPU with the tiny config: AR vs MMPL, same frames.

Reports wall time, frames/s, total transformer forwards, and the forwards on the critical path — the
longest chain of dependent forwards (a segment's stages in order; segment s+1's start after segment s's
handoff stage). Multi-device parallelism can at best divide the wall time down to that chain.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import record

from mmpl_fast.chain import ChainPlan
from mmpl_fast.engine import StageEngine
from mmpl_fast.layouts import get_layout
from mmpl_fast.pipeline import Pipeline

SEGMENTS = 3
SIZE = dict(height=32, width=32)


def critical_path(calls: dict[tuple[int, int], int], plan: ChainPlan, segments: int) -> int:
    """Longest path (in forwards) through the stage DAG of a chained video."""
    finish: dict[tuple[int, int], int] = {}
    handoff_stage = plan.chain_stages()[-1]
    for s in range(segments):
        for k in range(plan.layout.num_stages):
            ready = finish.get((s, k - 1), 0)
            if k == 0 and s > 0:
                ready = max(ready, finish[(s - 1, handoff_stage)])
            finish[(s, k)] = ready + calls.get((s, k), 0)
    return max(finish.values())


@pytest.mark.parametrize("mode", ["ar", "mmpl"])
def test_end_to_end_tiny(benchmark, mode, monkeypatch):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = Pipeline.tiny(seed=0)
    plan = ChainPlan(get_layout(mode))
    frames = plan.video_frames(SEGMENTS)
    calls: dict[tuple[int, int], int] = {}
    orig = StageEngine.run_stage

    def counting(self, jobs, stage, callback=None):
        before = self.model_calls
        orig(self, jobs, stage, callback)
        for j in jobs:  # a batched call serves every segment of the batch at once
            calls[(j.index, stage)] = self.model_calls - before

    monkeypatch.setattr(StageEngine, "run_stage", counting)

    result = {"seconds": []}

    def run():
        calls.clear()
        t0 = time.perf_counter()
        result["out"] = pipe(prompt="a red circle", num_frames=frames, seed=0, mode=mode, progress=False,
                             profile=False, **SIZE)  # fmt: skip
        result["seconds"].append(time.perf_counter() - t0)

    pipe(prompt="a red circle", num_frames=81, seed=0, mode=mode, progress=False, profile=False, **SIZE)  # warm-up
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    times = sorted(result["seconds"])
    seconds, out = times[len(times) // 2], result["out"]  # the median (one round with --benchmark-disable)
    work = sum(calls.values())  # forwards per segment, a batched call counted once per segment it serves
    path = critical_path(calls, plan, SEGMENTS)
    benchmark.extra_info.update(frames=frames, segment_forwards=work, batched_calls=out.info["model_calls"],
                                critical_path_forwards=path)  # fmt: skip
    record(
        f"end-to-end tiny, {SEGMENTS} segments, {frames} frames at 32x32",
        mode,
        seconds,
        baseline="ar",
        frames_per_s=frames / seconds,
        segment_forwards=work,
        batched_calls=out.info["model_calls"],
        critical_path_forwards=path,
    )
    assert out.frames.shape[1] == frames
