"""Several processes and devices: one process against two gloo ranks on the CPU, and on CUDA (when there)
streams vs batching vs sequential populating on one GPU and the multi-GPU speedup for 12 segments.

Run: ``pytest benchmarks/bench_multiprocess.py --benchmark-only``.

CPU: the same tiny video (6 segments, 64x64, random tiny components) from one process (one worker per idle
core, one intra-op thread each: `mmpl_fast.cpu`), and from two gloo ranks launched by torchrun (one thread
each), scheduled by the adaptive policy and by round-robin (the MMPL authors' scheme). The frames must match
one process's bit for bit. Both use the same cores, so the ratio measures the cost of the hand-offs between
processes against those between threads, not a speedup; run it on a multi-GPU machine for that.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cuda_required, record

from mmpl_fast.chain import ChainPlan
from mmpl_fast.layouts import mmpl

WORKER = Path(__file__).with_name("dist_worker.py")
SEGMENTS = 6
GROUP = f"tiny video, {SEGMENTS} segments at 64x64, CPU processes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, out: Path, policy: str) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MMPL_FAST_DIST_TIMEOUT": "300"}
    args = [str(WORKER), str(out), str(SEGMENTS), policy]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", *args]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {**json.loads(out.read_text()), "process_seconds": time.perf_counter() - t0, "threads": threads}


@pytest.mark.parametrize("case", ["1 process", "2 gloo ranks, adaptive", "2 gloo ranks, round-robin"])
def test_cpu_processes(benchmark, case, tmp_path):
    nproc = 1 if case == "1 process" else 2
    policy = "round-robin" if "round-robin" in case else "adaptive"
    result = {}

    def run():
        result.update(_launch(nproc, tmp_path / "out.json", policy))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)  # the whole launch, processes included
    benchmark.extra_info.update(generation_seconds=result["seconds"])  # the worker's own timing, after warm-up
    assert result["frames"] == ChainPlan(mmpl()).video_frames(SEGMENTS)
    reference = _REFERENCE.setdefault("checksum", result["checksum"])
    assert result["checksum"] == reference  # the same frames whatever the process count or policy
    record(GROUP, case, result["seconds"], baseline="1 process", ranks=nproc, intra_op_threads=1,
           frames=result["frames"], frames_per_s=result["frames"] / result["seconds"])  # fmt: skip


_REFERENCE: dict = {}


# --------------------------------------------------------------------------------------------------- CUDA
def _cuda_pipe(device: str):
    from mmpl_fast.config import PRESETS
    from mmpl_fast.pipeline import Pipeline
    from mmpl_fast.tiny import tiny_components

    c = tiny_components(0, PRESETS["wan2.1-t2v-1.3b"].replace(text_dim=64, text_len=16))
    return Pipeline(c["transformer"].to(device, torch.bfloat16), c["vae"].to(device), c["text_encoder"].to(device),
                    c["tokenizer"], kind="self_forcing", default_size=(480, 832))  # fmt: skip


@pytest.fixture(scope="module")
def cuda_pipe():
    return _cuda_pipe("cuda:0")


def _timed_on_cuda(pipe, **kw):
    """A zero-argument run of `pipe` that returns its wall time with the GPU synchronised on both ends."""

    def run():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe("a red circle", **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


@cuda_required()
@pytest.mark.parametrize("packing", ["sequential", "batched"])
def test_cuda_one_gpu_packing(benchmark, cuda_pipe, packing):
    """Populating 4 segments of Wan-1.3B geometry (random weights) one at a time or batched, one GPU."""
    kw = dict(num_frames=ChainPlan(mmpl()).video_frames(4), seed=0, progress=False, profile=False,
              batch_segments=1 if packing == "sequential" else 4, output_type="latent")  # fmt: skip
    cuda_pipe("a red circle", **{**kw, "num_frames": 81})  # warm-up, untimed
    seconds = benchmark.pedantic(_timed_on_cuda(cuda_pipe, **kw), rounds=1, iterations=1, warmup_rounds=0)
    record("Wan-1.3B geometry, 4 segments, one GPU", packing, seconds, baseline="sequential", device="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA devices")
@pytest.mark.parametrize("gpus", ["1 GPU", "every GPU"])
def test_cuda_multi_gpu_speedup(benchmark, cuda_pipe, gpus):
    """12 segments of Wan-1.3B geometry (random weights) on 1 GPU and on every GPU of this process."""
    n = torch.cuda.device_count()
    devices = None if gpus == "1 GPU" else [f"cuda:{i}" for i in range(n)]
    kw = dict(num_frames=ChainPlan(mmpl()).video_frames(12), seed=0, progress=False, profile=False,
              output_type="latent", devices=devices)  # fmt: skip
    cuda_pipe("a red circle", **{**kw, "num_frames": 81})  # warm-up (and the replicas), untimed
    seconds = benchmark.pedantic(_timed_on_cuda(cuda_pipe, **kw), rounds=1, iterations=1, warmup_rounds=0)
    name = "1 GPU" if devices is None else f"{n} GPUs"
    record("Wan-1.3B geometry, 12 segments, GPUs of one process", name, seconds, baseline="1 GPU", device="cuda")
