"""No host syncs inside a denoising step, and no needless per-call work (the text K/V batch).

The model, the KV pools and the prompts' K/V live on the ``meta`` device, standing in for a GPU: anything
that reads a value of such a tensor on the host, or copies to or from it without ``non_blocking``, would make
the host wait for the GPU. A recording wrapper counts, on tensors off the CPU:

* reads: ``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__`` / ``__float__`` / ``__int__`` / ``__index__``,
  printing (``__repr__`` / ``__format__``), ``nonzero``, ``torch.nonzero`` / ``equal`` / ``allclose``;
* blocking copies between host and device: ``Tensor.to`` / ``copy_``, ``torch.tensor`` / ``as_tensor``;
* ``torch.cuda.synchronize`` and ``torch.linalg.solve`` (which checks its result on the host).

The ops take their Triton path (forced; the kernels themselves are replaced by no-ops), so what is checked is
the host code a GPU run executes. A step runs from the start of a denoising model call to the end of the
sampler's update (keyed noise for the next step included).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import traceback

import pytest
import torch

import mmpl_fast.kernels
from mmpl_fast import sampling
from mmpl_fast.engine import SegmentJob, StageEngine
from mmpl_fast.kernels import _dispatch, use_backend
from mmpl_fast.kv_pool import CrossAttentionCache, KVPool
from mmpl_fast.layouts import get_layout
from mmpl_fast.model import CausalWanModel

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__repr__", "__format__",
         "nonzero")  # fmt: skip


def _on_device(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type != "cpu"


class SyncRecorder:
    """Wraps the syncing calls; records (call, where) for those made while `window` is open."""

    def __init__(self, monkeypatch):
        self.window = False
        self.events: list[tuple[str, str]] = []
        self.steps = 0
        tensor = torch.Tensor
        for name in READS:
            self._wrap(monkeypatch, tensor, name, lambda t, *a, **k: _on_device(t))
        for name in ("nonzero", "equal", "allclose"):
            self._wrap(monkeypatch, torch, name, lambda *a, **k: any(_on_device(x) for x in a))
        self._wrap(monkeypatch, tensor, "to", self._blocking_to)
        self._wrap(monkeypatch, tensor, "copy_", self._blocking_copy)
        for name in ("tensor", "as_tensor"):
            self._wrap(monkeypatch, torch, name, self._to_device)
        self._wrap(monkeypatch, torch.linalg, "solve", lambda *a, **k: any(_on_device(x) for x in a))
        self._wrap(monkeypatch, torch.cuda, "synchronize", lambda *a, **k: True)

    @staticmethod
    def _blocking_to(t, *args, **kwargs) -> bool:
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None and args and isinstance(args[0], torch.Tensor):
            device = args[0].device
        return device is not None and device.type != t.device.type and not non_blocking

    @staticmethod
    def _to_device(*args, device=None, **kwargs) -> bool:
        return device is not None and torch.device(device).type != "cpu"

    @staticmethod
    def _blocking_copy(dst, src, non_blocking=False) -> bool:
        return dst.device.type != src.device.type and not non_blocking

    def _wrap(self, monkeypatch, owner, name: str, syncs) -> None:
        orig = getattr(owner, name)

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if self.window and syncs(*args, **kwargs):
                where = "".join(traceback.format_stack(limit=5)[:-1])
                self.events.append((f"{getattr(owner, '__name__', owner)}.{name}", where))
            return orig(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture
def launches(monkeypatch):
    """Forces the Triton backend with every Triton kernel replaced by a no-op; returns the launches made."""
    made: list[str] = []

    class NoKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: made.append(self.name)

    import triton

    for info in pkgutil.iter_modules(mmpl_fast.kernels.__path__):
        mod = importlib.import_module(f"mmpl_fast.kernels.{info.name}")
        for name, value in list(vars(mod).items()):
            if isinstance(value, triton.runtime.jit.KernelInterface):
                monkeypatch.setattr(mod, name, NoKernel(name))
    monkeypatch.setattr(_dispatch, "interpreting", lambda: True)  # Triton "can run" on these tensors
    with use_backend("triton"):
        yield made


def _engine(kind: str, guidance: float, batch: int = 2):
    model = CausalWanModel("tiny").to("meta")
    cfg, lay = model.config, get_layout("mmpl")
    branches = ["cond", "uncond"] if guidance > 1 else ["cond"]
    pools = {b: KVPool(cfg, batch * lay.num_frames, 1, device="meta") for b in branches}
    cross = CrossAttentionCache()
    for key in ("a", "b", ""):
        cross.get(model, key, torch.zeros(1, cfg.text_len, cfg.text_dim, device="meta"))
    smp = sampling.make_sampler(kind, 3 if kind == "unipc" else 2)  # UniPC: its second-order steps too
    eng = StageEngine(model, lay, smp, pools, cross, seed=0, guidance=guidance)
    shape = (lay.num_frames, cfg.in_channels, 2, 2)
    jobs = [SegmentJob(i, "ab"[i % 2], torch.zeros(shape, device="meta")) for i in range(batch)]
    return eng, jobs


def _record_steps(monkeypatch, recorder: SyncRecorder) -> None:
    """Open the window at a denoising model call (t > 0), close it when the sampler's update returns."""
    call, step = StageEngine._call, sampling.SamplerRun.step

    def _call(self, views, cross, x, t, branch):
        if t != sampling.CACHE_TIMESTEP:
            recorder.window = True
        return call(self, views, cross, x, t, branch)

    def _step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        recorder.window = False
        recorder.steps += 1
        return out

    monkeypatch.setattr(StageEngine, "_call", _call)
    monkeypatch.setattr(sampling.SamplerRun, "step", _step)


@pytest.mark.parametrize("kind, guidance", [("few-step", 1.0), ("few-step", 3.0), ("euler", 3.0), ("unipc", 3.0)])
def test_a_denoising_step_makes_no_host_sync(monkeypatch, launches, kind, guidance):
    eng, jobs = _engine(kind, guidance)
    recorder = SyncRecorder(monkeypatch)
    _record_steps(monkeypatch, recorder)
    for stage in range(eng.layout.num_stages):
        eng.run_stage(jobs, stage)
    assert recorder.steps == eng.sampler.num_steps * eng.layout.num_stages  # every step ran ...
    assert launches  # ... on the Triton path
    found = [(name, where) for name, where in recorder.events]
    if kind == "unipc":
        # Known, outside this package: diffusers' UniPC corrector solves a 2x2 system with torch.linalg.solve,
        # which checks its result on the host (once per step from the third step of a stage).
        found = [(n, w) for n, w in found if not (n.endswith("linalg.solve") and "scheduling_unipc" in w)]
    assert not found, "host syncs inside a denoising step:\n" + "\n".join(f"{n}\n{w}" for n, w in found)


def test_the_text_batch_is_built_once_per_stage_and_branch(monkeypatch, launches):
    eng, jobs = _engine("few-step", 3.0)
    built = []
    batch = CrossAttentionCache.batch
    monkeypatch.setattr(CrossAttentionCache, "batch", lambda self, keys: built.append(tuple(keys)) or batch(self, keys))
    for stage in range(eng.layout.num_stages):
        built.clear()
        calls = eng.model_calls
        eng.run_stage(jobs, stage)
        assert eng.model_calls - calls > 2  # several model calls per branch ...
        assert sorted(built) == [("", ""), ("a", "b")]  # ... one text batch per branch
