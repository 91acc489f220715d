"""CPU cores as devices: one intra-op thread per worker, parallelism from segments; the frames do not depend
on the thread count, the worker count or the machine's load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mmpl_fast import Pipeline
from mmpl_fast.chain import ChainPlan
from mmpl_fast.cpu import WORKERS_ENV, cpu_workers, idle_cores, usable_cores
from mmpl_fast.layouts import mmpl
from mmpl_fast.scheduler import HOST

CALL = dict(prompt="a red circle", height=32, width=32, seed=7, output_type="pt", progress=False)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.tiny(seed=0)


@pytest.fixture(scope="module")
def reference(pipe):
    """Two segments, one worker, the caller at one thread."""
    n = ChainPlan(mmpl()).video_frames(2)
    os.environ[WORKERS_ENV] = "1"
    try:
        out = pipe(num_frames=n, **CALL)
    finally:
        del os.environ[WORKERS_ENV]
    return n, out.frames


class _Busy:
    """One spinning process per core in `cores`, each pinned to its core (a busy machine)."""

    def __init__(self, cores):
        self.cores = cores

    def __enter__(self):
        spin = "import os, sys; os.sched_setaffinity(0, {%d}); print(flush=True); sys.stdout.close()\nwhile True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", spin % c], stdout=subprocess.PIPE) for c in self.cores]
        for p in self.procs:
            p.stdout.readline()  # pinned and about to spin
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def _used_devices(out) -> set[int]:
    return {p.device for p in out.info["measured"].placements if p.device != HOST}


@pytest.mark.parametrize("threads,workers", [(2, "2"), (1, "2"), (2, "1")])
def test_frames_do_not_depend_on_threads_or_workers(pipe, reference, threads, workers, monkeypatch):
    n, frames = reference
    monkeypatch.setenv(WORKERS_ENV, workers)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = pipe(num_frames=n, **CALL)
        assert torch.get_num_threads() == threads  # the caller's setting comes back
    finally:
        torch.set_num_threads(before)
    assert _used_devices(out) == set(range(int(workers)))
    assert out.frames.shape == frames.shape and torch.equal(out.frames, frames)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_busy_cores_are_not_used_and_do_not_change_the_frames(pipe, reference, monkeypatch):
    n, frames = reference
    mine = os.sched_getaffinity(0)
    cores = sorted(mine)[:2]
    os.sched_setaffinity(0, set(cores))  # this test's own view: two cores, then both taken
    try:
        assert usable_cores() == cores
        with _Busy(cores):
            assert idle_cores(0.3) == 0
            assert cpu_workers() == 1
            out = pipe(num_frames=n, **CALL)
    finally:
        os.sched_setaffinity(0, mine)
    assert _used_devices(out) == {0}
    assert torch.equal(out.frames, frames)


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert cpu_workers() == 3 and cpu_workers(limit=2) == 2
    for bad in ("0", "two"):
        monkeypatch.setenv(WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=WORKERS_ENV):
            cpu_workers()
