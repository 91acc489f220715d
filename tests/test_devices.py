"""Device correctness without a GPU: what runs under which CUDA device, proven with recording stand-ins.

* The executor: every worker thread enters its device's context before its first launch and keeps it; the
  inline path enters it around each launch and gives the caller's thread back its own between launches.
* The pipeline's work: each device's launches run under that device's ``torch.cuda.device`` (a fake here), the
  threads of a multi-stream launch too; on a simulated ``cuda:1`` nothing asks for device 0 or the current one.
* The package (outside kernels/) never relies on the current CUDA device without saying why (source audit).
* torchrun: the rank's GPU is made current before NCCL binds to it; collectives use it.
* Training never reaches the Triton ops (they have no autograd), even when the dispatcher sees CUDA tensors.

What only a GPU run proves: that Triton and NCCL really launch on the device made current here.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import pkgutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mmpl_fast.kernels
from mmpl_fast import _generation, distributed
from mmpl_fast.chain import ChainPlan
from mmpl_fast.engine import StageEngine
from mmpl_fast.kv_pool import KVPool
from mmpl_fast.layouts import custom, mmpl
from mmpl_fast.model import CausalWanModel
from mmpl_fast.pipeline import Pipeline
from mmpl_fast.scheduler import HOST, CostModel, build_dag, schedule, simulated_devices
from mmpl_fast.scheduler.execute import Executor, TensorSpec
from mmpl_fast.world import train

PACKAGE = Path(mmpl_fast.kernels.__file__).resolve().parents[1] / "mmpl_fast"

# A 6-frame MMPL-like layout (start, plan 2 + 5, populate 3 4): a fast training step.
MINI = custom("mini", 6, [((0, 1), (), "start"), ((2, 5), (0, 1), "plan"), ((3, 4), (0, 1, 2, 5), "populate")],
              handoff={"terminal": (4, 5)}, start_frames=2)  # fmt: skip


class TritonReached(AssertionError):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """Every tensor claims to be on CUDA (so ``auto`` dispatch picks Triton), and every Triton launcher of
    `mmpl_fast.kernels` raises `TritonReached` instead of running. Returns the names of launchers reached."""
    reached: list[str] = []
    for info in pkgutil.iter_modules(mmpl_fast.kernels.__path__):
        mod = importlib.import_module(f"mmpl_fast.kernels.{info.name}")
        for name, fn in list(vars(mod).items()):
            if name.endswith("_triton") and callable(fn) and getattr(fn, "__module__", None) == mod.__name__:

                def stub(*args, _name=name, **kwargs):
                    reached.append(_name)
                    raise TritonReached(f"{_name} was called")

                monkeypatch.setattr(mod, name, stub)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    return reached


def test_training_takes_the_torch_path_when_tensors_are_on_cuda(fake_cuda):
    model = CausalWanModel("tiny").train()
    cfg = model.config
    n = MINI.num_frames
    x0, noise = torch.randn(2, n, cfg.in_channels, 2, 2), torch.randn(2, n, cfg.in_channels, 2, 2)
    timesteps, sigmas = train.sample_timesteps(MINI, 2, torch.Generator().manual_seed(0))
    # Control: an inference call of the same model on "CUDA" tensors dispatches to Triton.
    with pytest.raises(TritonReached), torch.no_grad():
        pool = KVPool.for_model(model, 1, cfg.tokens_per_frame(2, 2))
        cross = model.embed_context(torch.zeros(1, cfg.text_len, cfg.text_dim))
        model(x0[:1, :1], torch.zeros(1, 1), cross, pool.view([0], [[0]]))
    assert fake_cuda, "the fake did not make dispatch pick Triton"
    fake_cuda.clear()
    # Training (what `Trainer.loss` calls) sees the same decision but runs the torch references, with gradients.
    cross = model.embed_context(torch.randn(2, cfg.text_len, cfg.text_dim))
    train.teacher_forcing_loss(model, MINI, x0, noise, timesteps, sigmas, cross).backward()
    assert fake_cuda == []
    q = model.blocks[0].self_attn.q.weight
    assert q.grad is not None and q.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- current device
class FakeCuda:
    """Per-thread current CUDA device (None: never set, so CUDA would use device 0), and who entered what."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.entered: list[tuple[str, int]] = []

    @property
    def current(self) -> int | None:
        return getattr(self._local, "device", None)

    @contextlib.contextmanager
    def device(self, index: int):
        prev, self._local.device = self.current, index
        self.entered.append((threading.current_thread().name, index))
        try:
            yield
        finally:
            self._local.device = prev


class DeviceWork:
    """Executor work on simulated devices ``cuda:d+1``; checks every call runs under its own device."""

    def __init__(self, fake: FakeCuda):
        self.fake, self.wrong, self.calls = fake, [], 0

    def device_context(self, device: int):
        return self.fake.device(device + 1)

    def _check(self, device: int, what: str) -> None:
        self.calls += 1
        if self.fake.current != device + 1:
            self.wrong.append((what, device, self.fake.current, threading.current_thread().name))

    def run(self, launch):
        self._check(launch[0].device, "run")

    def finish(self, launch):
        self._check(launch[0].device, "finish")

    def payload(self, edge):
        return [TensorSpec((1,))] if edge.kind in ("stage", "chain", "decode") else []

    def export(self, edge, device):
        self._check(device, "export")
        return [torch.zeros(1)]

    def accept(self, edge, device, tensors):
        self._check(device, "accept")


@pytest.mark.parametrize("devices", [1, 3])
def test_every_executor_thread_runs_under_its_own_device(devices):
    dag = build_dag("mmpl", 4)
    sched = schedule(dag, CostModel(), simulated_devices(devices), "adaptive", [4] * devices)
    fake = FakeCuda()
    work = DeviceWork(fake)
    for p in Executor(sched, work).run():
        assert p.device == HOST and fake.current is None  # the caller's thread keeps its own device
    assert work.calls and work.wrong == []
    by_thread: dict[str, list[int]] = {}
    for thread, index in fake.entered:
        by_thread.setdefault(thread, []).append(index)
    if devices == 1:  # inline: the caller's thread, around each launch
        assert list(by_thread) == [threading.current_thread().name]
        launches = [g for g in sched.launches() if g[0].device == 0]
        assert by_thread[threading.current_thread().name] == [1] * len(launches)
    else:  # one worker thread per device: its own device, entered once before its first launch
        assert by_thread == {f"mmpl-device-{d}": [d + 1] for d in range(devices)}


def test_the_pipeline_runs_each_device_under_its_device(monkeypatch):
    """Two devices of one process (``cpu:0``, ``cpu:1`` stand in for ``cuda:0``, ``cuda:1``)."""
    fake = FakeCuda()
    monkeypatch.setattr(_generation, "on_device", lambda dev: fake.device(dev.index))
    ran: list[tuple[str, int | None]] = []
    run_stage = StageEngine.run_stage

    def record(*args, **kwargs):
        ran.append((threading.current_thread().name, fake.current))
        return run_stage(*args, **kwargs)

    monkeypatch.setattr(StageEngine, "run_stage", record)
    pipe = Pipeline.tiny(seed=0)
    n = ChainPlan(mmpl()).video_frames(2)
    pipe(prompt="a red circle", height=32, width=32, num_frames=n, output_type="latent", progress=False, seed=1,
         devices=["cpu:0", "cpu:1"])  # fmt: skip
    threads = {name for name, _ in ran}
    assert threads == {"mmpl-device-0", "mmpl-device-1"}  # both devices worked
    assert all(current == int(name.rsplit("-", 1)[1]) for name, current in ran), ran


class FakeStream:
    made: list = []

    def __init__(self, device=None):
        FakeStream.made.append(device)

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


def test_a_multi_stream_launch_runs_its_threads_under_the_device(monkeypatch):
    """`_Generation.run` with two CUDA streams on a simulated ``cuda:1``: each stream's thread sets the device;
    nothing asks for the current device or device 0."""
    fake, asked = FakeCuda(), []
    FakeStream.made = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: fake.device(torch.device(dev).index))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device) or FakeStream(device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: asked.append("current_device") or 0)
    gen = object.__new__(_generation._Generation)
    gen.states = {0: SimpleNamespace(device=torch.device("cuda", 1))}
    groups = []
    gen._run_group = lambda st, g: groups.append((g[0].stream, fake.current))
    launch = [SimpleNamespace(device=0, stream=s) for s in (0, 1)]
    with gen.device_context(0):
        gen.run(launch)
    assert sorted(groups) == [(0, 1), (1, 1)]  # both streams ran, each thread under cuda:1
    assert all(torch.device(d) == torch.device("cuda", 1) for d in asked + FakeStream.made), (asked, FakeStream.made)


def test_free_memory_reads_the_device_asked_for(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (7, 9))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked for the current device"))
    assert _generation._free_memory(torch.device("cuda", 1)) == 7  # no NVML here: CUDA's own reading
    assert asked == [torch.device("cuda", 1)]


def test_torchrun_binds_the_local_gpu_before_nccl(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw.get("device_id"))))  # fmt: skip
    assert distributed.init_from_env("cuda")
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", torch.device("cuda", 1))]
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    assert distributed.comm_device() == torch.device("cuda", 1)  # collectives' buffers on the rank's GPU


# ----------------------------------------------------------------------------------------------- source audit
# torch.cuda calls that act on the current device unless given one; and those that only make sense with a reason.
TAKES_DEVICE = {"synchronize", "mem_get_info", "current_stream", "default_stream", "Stream", "max_memory_allocated",
                "memory_allocated", "memory_reserved", "reset_peak_memory_stats", "get_device_name",
                "get_device_properties"}  # fmt: skip
NEEDS_REASON = {"current_device", "set_device"}
MARK = "# current device:"  # a line using the current device on purpose says why after this


def _implicit_device_uses(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        call = calls.get(id(node))
        given = call is not None and (call.args or any(k.arg == "device" for k in call.keywords))
        cuda_attr = ast.unparse(node.value) == "torch.cuda"
        bad = (cuda_attr and node.attr in NEEDS_REASON) or (cuda_attr and node.attr in TAKES_DEVICE and not given)
        bad |= node.attr in ("cuda", "pin_memory") and call is not None and not given and not cuda_attr
        if bad and MARK not in lines[node.lineno - 1]:
            out.append((node.lineno, f"{path}:{node.lineno}: {ast.unparse(node)}"))
    return [text for _, text in sorted(out)]


def test_the_package_uses_the_current_cuda_device_only_where_it_says_why(tmp_path):
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if "kernels" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 20
    found = [use for p in files for use in _implicit_device_uses(p)]
    assert found == [], "implicit current-device uses (pass the device, or mark the line):\n" + "\n".join(found)
    probe = tmp_path / "probe.py"  # the audit finds what it looks for
    probe.write_text("import torch\ntorch.cuda.synchronize()\nx.pin_memory()\ny = torch.cuda.synchronize\n"
                     "torch.cuda.synchronize(d)\nz = x.cuda(1)\n")  # fmt: skip
    assert [u.split(": ")[1] for u in _implicit_device_uses(probe)] == [
        "torch.cuda.synchronize", "x.pin_memory", "torch.cuda.synchronize"]  # fmt: skip
