"""Executing schedules for real: the executor's ordering, failures and measurements (with a recording `Work`),
and the pipeline on several devices of one process, with its timeline and profile updates (CPU)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from mmpl_fast.chain import ChainPlan
from mmpl_fast.layouts import mmpl
from mmpl_fast.pipeline import Pipeline
from mmpl_fast.scheduler import HOST, CostModel, ProfileCache, build_dag, plot_timeline, schedule, simulated_devices
from mmpl_fast.scheduler.execute import Executor, TensorSpec

COSTS = CostModel()


class RecordingWork:
    """Runs nothing; records when each task ran, checks its inputs were there, and moves a tensor per edge."""

    def __init__(self, dag, fail: str | None = None, delay: float = 0.0):
        self.dag, self.fail, self.delay = dag, fail, delay
        self.ran: list[tuple[str, int, float]] = []
        self.done: set[int] = set()
        self.received: dict[int, list] = {}
        self.lock = threading.Lock()

    def run(self, launch):
        for p in launch:
            missing = [self.dag.tasks[e.src].name for e in self.dag.preds[p.task.index] if e.src not in self.done]
            assert not missing, f"{p.task.name} ran before {missing}"
            if p.task.name == self.fail:
                raise KeyError(f"injected failure in {p.task.name}")
        time.sleep(self.delay)
        with self.lock:
            for p in launch:
                self.ran.append((p.task.name, p.device, time.perf_counter()))
                self.done.add(p.task.index)

    def finish(self, launch):
        pass

    def payload(self, edge):
        return [TensorSpec((2,))] if edge.kind in ("stage", "chain", "decode") else []

    def export(self, edge, device):
        return [torch.tensor([float(edge.src), float(device)])]

    def accept(self, edge, device, tensors):
        with self.lock:
            self.received.setdefault(edge.dst, []).append((edge.src, tensors[0].tolist()))


def _sched(segments: int, devices: int, **kw):
    dag = build_dag("mmpl", segments)
    return dag, schedule(dag, COSTS, simulated_devices(devices), "adaptive", [4] * devices, **kw)


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_executor_respects_dependencies_and_yields_writes_in_order(devices):
    dag, sched = _sched(4, devices)
    work = RecordingWork(dag, delay=0.002)
    ex = Executor(sched, work)
    writes = []
    for p in ex.run():
        assert p.device == HOST
        work.done.add(p.task.index)  # the caller's host work
        writes.append(p.task.segment)
    assert writes == [0, 1, 2, 3]
    assert len(work.ran) == sum(1 for t in dag.tasks if not t.on_host)
    for name, device, _ in work.ran:  # every task ran where the schedule put it
        assert sched.placement(dag.tasks[[t.name for t in dag.tasks].index(name)]).device == device
    crossing = [e for e in dag.edges if e.kind in ("stage", "chain", "decode")
                and sched.placement(e.src).device != sched.placement(e.dst).device]  # fmt: skip
    got = {(src, dst) for dst, items in work.received.items() for src, _ in items}
    assert got == {(e.src, e.dst) for e in crossing}  # exactly the crossing edges moved data
    if devices > 1:
        assert crossing  # the scheduler does spread a segment's work
    measured = ex.measured()
    measured.check()  # the run as measured is a valid schedule too
    assert measured.makespan > 0 and "measured" in measured.policy


def test_executor_failure_on_one_device_reaches_the_caller_and_stops_the_rest():
    dag, sched = _sched(4, 2)
    victim = next(p.task.name for p in sched.placements if p.device == 1 and p.task.is_stage)
    work = RecordingWork(dag, fail=victim, delay=0.002)
    with pytest.raises(KeyError, match=f"injected failure in {victim}"):
        for p in Executor(sched, work).run():
            work.done.add(p.task.index)
    ran = {name for name, _, _ in work.ran}
    assert victim not in ran and "s3.write" not in ran


def test_executor_inline_failure_keeps_the_error_type():
    dag, sched = _sched(2, 1)
    work = RecordingWork(dag, fail="s1.plan")
    with pytest.raises(KeyError, match="s1.plan"):
        for p in Executor(sched, work).run():
            work.done.add(p.task.index)


def test_stopping_the_caller_early_stops_the_workers():
    dag, sched = _sched(4, 2)
    work = RecordingWork(dag, delay=0.01)
    run = Executor(sched, work).run()
    next(run)
    run.close()  # the consumer went away (e.g. an exception in its loop)
    assert sum(1 for t in dag.tasks if not t.on_host) > len(work.ran)


# --- the pipeline -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.tiny(seed=0)


def _latents(pipe, **kw):
    return pipe(prompt="a red circle", height=32, width=32, output_type="latent", progress=False, **kw).frames


def test_two_devices_in_one_process_give_the_same_video(pipe):
    n = ChainPlan(mmpl()).video_frames(3)
    one = _latents(pipe, num_frames=n, seed=3)
    info: dict = {}
    out = pipe(prompt="a red circle", height=32, width=32, num_frames=n, seed=3, output_type="latent",
               progress=False, devices=["cpu", "cpu"], policy="adaptive")  # fmt: skip
    two, info = out.frames, out.info
    assert torch.equal(one, two)  # KV pages and latents moved between the devices exactly
    used = {p.device for p in info["measured"].placements if p.device != HOST}
    assert used == {0, 1}
    rr = _latents(pipe, num_frames=n, seed=3, devices=["cpu", "cpu"], policy="round-robin")
    assert torch.equal(one, rr)


def test_pipeline_reports_the_schedule_and_measured_timeline(pipe, tmp_path):
    out = pipe(prompt="a red circle", height=32, width=32, num_frames=ChainPlan(mmpl()).video_frames(2), seed=1,
               progress=False)  # fmt: skip
    planned, measured = out.info["schedule"], out.info["measured"]
    assert {p.task.name for p in planned.placements} == {p.task.name for p in measured.placements}
    measured.check()
    png = plot_timeline(measured, tmp_path / "run.png")
    assert png.stat().st_size > 1000


def test_a_run_updates_the_cached_profile(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MMPL_FAST_CACHE_DIR", str(tmp_path))
    pipe(prompt="a red circle", height=32, width=32, num_frames=81, seed=1, progress=False)
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["key"]["config"].startswith("dim128-heads4-layers2")
    entries = data["entries"]
    assert any("|plan" in k for k in entries) and all(v > 0 for v in entries.values())
    # a second run schedules with those costs (and its own measurements move them)
    pipe(prompt="a red circle", height=32, width=32, num_frames=81, seed=1, progress=False)
    again = json.loads(files[0].read_text())
    assert max(again["counts"].values()) == 2
    assert ProfileCache(tmp_path / "profiles").load(data["key"]["device"], pipe.transformer.config,
                                                    "float32").entries  # fmt: skip


def test_bad_devices_and_policy_are_rejected(pipe):
    with pytest.raises(ValueError, match="policy 'fifo'"):
        _latents(pipe, num_frames=81, policy="fifo")
    with pytest.raises(TypeError, match="devices must be a non-empty list"):
        _latents(pipe, num_frames=81, devices="cpu")
    with pytest.raises(ValueError, match="is not a device"):
        _latents(pipe, num_frames=81, devices=["gpu7"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            _latents(pipe, num_frames=81, devices=["cuda:0"])
