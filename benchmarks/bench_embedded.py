"""The main job: a 20-second video (5 segments) from a prompt with the embedded model, on this machine.

Run: ``pytest benchmarks/bench_embedded.py --benchmark-only``. Times the whole `Pipeline.__call__` (text
encoding, every stage of every segment with the embedded model's default sampling, VAE decode, stitching)
after loading the pipeline, which is timed separately; writing an mp4 is not included (the CLI adds about a
second). Target on the 2-core CPU: <= 60 s. Baseline row: the same video in mode ``ar``.
"""

from __future__ import annotations

import time

import pytest
from conftest import record

from mmpl_fast import embedded
from mmpl_fast.pipeline import FPS

SECONDS = 20
PROMPT = "a large red circle bouncing and a small blue square moving right on a black background"


def _need_weights():
    if not embedded.available():
        pytest.skip("no embedded model in mmpl_fast/assets/embedded (train it with the README's command)")


@pytest.fixture(scope="module")
def pipe():
    _need_weights()
    return embedded.load_pipeline("cpu")


def test_load_pipeline(benchmark):
    _need_weights()
    result = {}

    def run():
        t0 = time.perf_counter()
        result["pipe"] = embedded.load_pipeline("cpu")
        return time.perf_counter() - t0

    seconds = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert result["pipe"].kind == "world"
    record("main job: 20 s video, embedded model, CPU", "load pipeline", seconds)


@pytest.mark.parametrize("mode", ["ar", "mmpl"])
def test_twenty_second_video(benchmark, pipe, mode):
    frames = SECONDS * FPS + 1
    result = {}

    def run():
        t0 = time.perf_counter()
        result["out"] = pipe(prompt=PROMPT, num_frames=frames, mode=mode, seed=0, progress=False, profile=False)
        result["seconds"] = time.perf_counter() - t0

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    out, seconds = result["out"], result["seconds"]
    assert out.frames.shape[1] == frames and out.info["num_segments"] == 5
    record(
        "main job: 20 s video, embedded model, CPU", mode, seconds, baseline="ar", frames=frames,
        segments=out.info["num_segments"], frames_per_s=frames / seconds, steps=out.info["steps"],
        guidance=out.info["guidance"], model_calls=out.info["model_calls"], target_s=60.0,
    )  # fmt: skip
