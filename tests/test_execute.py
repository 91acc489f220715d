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
from mmpl_fast.scheduler.execute import DistributedTransport, Executor, TensorSpec

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


# --- the message order, and the torch.distributed transport under NCCL's semantics (ranks as threads) -------------
class Ranks:
    """`crosses` / `local` of a multi-process run seen from one rank (device i = rank i, the host on rank 0)."""

    def __init__(self, rank: int):
        self.rank = rank

    @staticmethod
    def rank_of(device):
        return 0 if device == HOST else device

    def local(self, device):
        return self.rank_of(device) == self.rank

    def crosses(self, src, dst):
        return self.rank_of(src) != self.rank_of(dst)


def _positions(sched):
    """task -> (device, place of its launch in the device's order); the host's placements count one by one."""
    ex = Executor(sched, RecordingWork(sched.dag))
    pos = {}
    for d in range(len(sched.devices)):
        for k, launch in enumerate(ex._launches(d)):
            pos.update({p.task.index: (d, k) for p in launch})
    for k, p in enumerate(p for p in sched.placements if p.device == HOST):
        pos[p.task.index] = (HOST, k)
    return pos


def _edge_key(dag, edge) -> int:
    return next(k for k, e in enumerate(dag.edges) if e is edge)


@pytest.mark.parametrize("devices, policy", [(2, "adaptive"), (3, "adaptive"), (3, "round-robin"), (4, "cp-first")])
def test_message_order_never_needs_a_message_after_one_the_receiver_still_has_to_send(devices, policy):
    dag = build_dag("mmpl", 5)
    sched = schedule(dag, COSTS, simulated_devices(devices), policy, [4] * devices)
    work = RecordingWork(dag)
    msgs = Executor(sched, work, Ranks(0)).messages()
    pos = _positions(sched)
    crossing = [
        e for e in dag.edges if work.payload(e) and Ranks.rank_of(pos[e.src][0]) != Ranks.rank_of(pos[e.dst][0])
    ]
    assert sorted(m.key for m in msgs) == sorted(_edge_key(dag, e) for e in crossing)  # each crossing edge once
    for i, early in enumerate(msgs):
        (src_dev, src_launch) = pos[early.edge.src]
        for late in msgs[i + 1 :]:  # a device never needs `late` in a launch before (or in) the one that sends `early`
            dst_dev, dst_launch = pos[late.edge.dst]
            assert not (dst_dev == src_dev and dst_launch <= src_launch), (early.edge, late.edge)


class FakeNccl:
    """torch.distributed's point-to-point calls with NCCL's semantics, for ranks that are threads of one process.

    Tags are ignored: the k-th send from a to b is the k-th receive b posts from a (shapes must agree). Each rank's
    operations with one peer complete in issue order (one stream per pair), and a pair of matched operations
    completes only when both are first in line on their sides, so crossing sends deadlock as on GPUs (a wait
    then raises after `timeout` seconds).
    """

    def __init__(self, timeout: float = 20.0):
        self.cond = threading.Condition()
        self.timeout = timeout
        self.sends: dict[tuple[int, int], list] = {}  # (src, dst) -> operations in issue order
        self.recvs: dict[tuple[int, int], list] = {}
        self.lines: dict[tuple[int, int], list] = {}  # (rank, peer) -> that rank's operations with peer, in order
        self.errors: list[str] = []

    class Op:
        def __init__(self, fake, tensor):
            self.fake, self.tensor, self.done = fake, tensor, False

        def is_completed(self):
            with self.fake.cond:
                return self.done

        def wait(self):
            with self.fake.cond:
                if not self.fake.cond.wait_for(lambda: self.done, self.fake.timeout):
                    raise RuntimeError("point-to-point wait timed out (NCCL would hang here)")

    def _issue(self, rank, peer, tensor, table, key):
        with self.cond:
            op = self.Op(self, tensor)
            table.setdefault(key, []).append(op)
            self.lines.setdefault((rank, peer), []).append(op)
            self._progress()
            return op

    def _first_pending(self, line):
        return next((op for op in line if not op.done), None)

    def _progress(self):
        moved = True
        while moved:
            moved = False
            for (src, dst), sends in self.sends.items():
                for k, send in enumerate(sends):
                    recvs = self.recvs.get((src, dst), [])
                    if send.done or k >= len(recvs):
                        continue
                    recv = recvs[k]
                    heads = (self._first_pending(self.lines[src, dst]), self._first_pending(self.lines[dst, src]))
                    if heads == (send, recv):
                        if send.tensor.shape != recv.tensor.shape or send.tensor.dtype != recv.tensor.dtype:
                            self.errors.append(f"{src}->{dst} message {k}: {tuple(send.tensor.shape)} into "
                                               f"{tuple(recv.tensor.shape)}")  # fmt: skip
                        else:
                            recv.tensor.copy_(send.tensor)
                        send.done = recv.done = moved = True
        self.cond.notify_all()

    def rank(self, r: int):
        fake = self

        class View:
            get_rank = staticmethod(lambda: r)
            get_backend = staticmethod(lambda: "gloo")

            @staticmethod
            def isend(tensor, dst, tag=0):
                return fake._issue(r, dst, tensor, fake.sends, (r, dst))

            @staticmethod
            def irecv(tensor, src, tag=0):
                return fake._issue(r, src, tensor, fake.recvs, (src, r))

            @staticmethod
            def send(tensor, dst, tag=0):
                View.isend(tensor, dst).wait()

            @staticmethod
            def recv(tensor, src, tag=0):
                View.irecv(tensor, src).wait()

        return View


def test_fake_nccl_deadlocks_on_crossing_sends():
    fake = FakeNccl(timeout=0.5)
    a, b = fake.rank(0), fake.rank(1)
    a.isend(torch.ones(3), 1), b.isend(torch.ones(3), 0)  # both send first ...
    got = a.irecv(torch.zeros(3), 1)
    b.irecv(torch.zeros(3), 0)
    with pytest.raises(RuntimeError, match="timed out"):  # ... and neither send can complete
        got.wait()


class KeyedWork(RecordingWork):
    """Every edge carries a tensor of its own shape filled with its edge number; receivers check both."""

    def payload(self, edge):
        return [TensorSpec((1 + edge.src % 3, 2)), TensorSpec((3,))] if edge.kind in ("stage", "chain", "decode",
                                                                                         "write") else []  # fmt: skip

    def export(self, edge, device):
        key = float(_edge_key(self.dag, edge))
        return [torch.full(s.shape, key) for s in self.payload(edge)]

    def accept(self, edge, device, tensors):
        key = float(_edge_key(self.dag, edge))
        assert all(bool((t == key).all()) for t in tensors), f"{edge} got another edge's data"
        super().accept(edge, device, tensors)


@pytest.mark.parametrize("devices, policy", [(2, "adaptive"), (3, "adaptive"), (3, "round-robin"), (4, "cp-first")])
def test_distributed_transport_is_correct_under_nccl_semantics(devices, policy):
    dag = build_dag("mmpl", 5)
    sched = schedule(dag, COSTS, simulated_devices(devices), policy, [4] * devices)
    fake, work, errors = FakeNccl(), KeyedWork(dag), []
    writes = []

    def rank(r):
        try:
            ex = Executor(sched, work, DistributedTransport(comm=fake.rank(r)))
            for p in ex.run():
                got = ex.host_inputs(p)  # the writer's data from other ranks
                assert all(float(t.flatten()[0]) == _edge_key(dag, e) for e in dag.preds[p.task.index]
                           if e.src in got for t in got[e.src])  # fmt: skip
                work.done.add(p.task.index)
                writes.append(p.task.segment)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"rank {r}: {e!r}")

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.errors == [], fake.errors  # messages paired with the wrong buffers
    assert errors == [], errors
    assert writes == list(range(5))
    assert len(work.ran) == sum(1 for t in dag.tasks if not t.on_host)
    assert any(fake.sends.get((b, a)) for a, b in fake.sends)  # data went both ways between two ranks


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


def test_two_devices_in_one_process_decode_the_same_frames(pipe):
    # Decoding on two workers at once: each needs its own VAE module (a Wan VAE keeps its causal frame cache on
    # the module). Sharing one lost or garbled frames of whichever segment two threads decoded together.
    n = ChainPlan(mmpl()).video_frames(2)
    call = dict(prompt="a red circle", height=32, width=32, num_frames=n, seed=3, output_type="pt", progress=False)
    one = pipe(**call).frames
    assert one.shape[1] == n
    for devices in (["cpu:0", "cpu:1"], ["cpu", "cpu"]):
        out = pipe(**call, devices=devices, policy="adaptive")
        assert {p.device for p in out.info["measured"].placements if p.task.kind == "decode"} == {0, 1}
        assert out.frames.shape == one.shape and torch.equal(out.frames, one)


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
