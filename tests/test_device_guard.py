"""Every Triton launch runs under its tensors' device, whatever the calling thread's current device.

Triton launches on ``torch.cuda.current_device()``; `_launch.launch` enters `_launch.device_guard` for the
tensors' device. Here, without a GPU, every launcher is called on fake ``cuda:1`` tensors (FakeTensorMode:
shapes, dtypes and devices, no memory) with sm_90's launch table (`target_arch`) and launches recorded, not
run; a recording stand-in for the guard shows which device each launch was guarded for. Host-to-GPU copies
(page tables, index tensors) must pin their memory under the target GPU's guard too: pinning creates a CUDA
context on the current device.
"""

from __future__ import annotations

import contextlib
import pathlib
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mmpl_fast.kernels import PageTable, RopeTable, _launch
from mmpl_fast.kernels.denoise import cfg_combine_triton, denoise_update_triton, euler_step_triton
from mmpl_fast.kernels.norm_modulate import gated_residual_triton, norm_modulate_triton
from mmpl_fast.kernels.rope_write import rope_write_triton
from mmpl_fast.kernels.stage_attention import _long_tensor, stage_attention_triton

DEV = torch.device("cuda:1")


@pytest.fixture
def guards(monkeypatch) -> list[torch.device]:
    """Replace the guard by a recorder of the devices it is entered for."""
    entered: list[torch.device] = []

    @contextlib.contextmanager
    def recording_guard(device):
        entered.append(torch.device(device))
        _INSIDE.append(torch.device(device))
        try:
            yield
        finally:
            _INSIDE.pop()

    monkeypatch.setattr(_launch, "device_guard", recording_guard)
    return entered


_INSIDE: list[torch.device] = []  # the guards currently entered, innermost last


@pytest.fixture
def pinned(guards, monkeypatch) -> list[torch.device | None]:
    """Replace pinning (it needs a GPU) by a recorder of the innermost guard's device when it happened."""
    depths: list[torch.device | None] = []

    def fake_pin(self):
        depths.append(_INSIDE[-1] if _INSIDE else None)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    return depths


def _launch_paths(dtype: torch.dtype) -> dict:
    """Every launcher, and each of its launch variants, on fake cuda:1 tensors."""

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=DEV)

    x, mod = t(1, 2, 5, 16), t(1, 2, 6, 16, dt=torch.float32)
    q5 = t(1, 2, 6, 2, 16)
    pool = t(4, 6, 2, 16)
    rope = RopeTable(t(8, 8, dt=torch.float32), t(8, 8, dt=torch.float32), 4, 2)
    pages, pos = t(1, 2, dt=torch.long), t(2, dt=torch.int32)
    table = PageTable.build([[0, 1], [2]], [8, 4], device=DEV)
    sig = t(1, 2, dt=torch.float32)
    return {
        "stage_attention": lambda: stage_attention_triton(t(12, 2, 16), pool, pool, table),
        "rope_write": lambda: rope_write_triton(q5, q5, q5, pool, pool, pages, pos, rope, 3),
        "norm_modulate": lambda: norm_modulate_triton(x, mod.select(2, 0), mod.select(2, 1)),
        "gated_residual": lambda: gated_residual_triton(x, x, mod.select(2, 2)),
        "denoise_update": lambda: denoise_update_triton(x, x, 0.5, 0.25, x, x, 3.0),
        "denoise_update per-frame sigmas": lambda: denoise_update_triton(x, x, sig, sig, x),
        "euler_step": lambda: euler_step_triton(x, x, sig, 0.25, x, 2.0),
        "cfg_combine": lambda: cfg_combine_triton(x, x, 2.0),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_every_launch_is_guarded_for_its_tensors_device(guards, pinned, dtype):
    with FakeTensorMode(allow_non_fake_inputs=True), _launch.target_arch(90):
        paths = _launch_paths(dtype)
        for name, call in paths.items():
            guards.clear()
            with _launch.recording() as launches:
                call()
            assert len(launches) == 1, name
            assert launches[0].device == DEV, name
            assert guards == [DEV], f"{name}: guard entered for {guards}, expected [{DEV}]"


def test_guard_is_entered_around_the_launch_itself(guards):
    """Outside `recording`, the kernel is launched inside the guard (checked with a stand-in kernel)."""
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append((len(guards), grid, kwargs["num_warps"], kwargs["BLOCK"]))

            return run

    cfg = _launch.Config.of(4, 1, BLOCK=128)
    _launch.launch(Kernel(), lambda meta: (3 * meta["BLOCK"],), (), device=DEV, configs=(cfg,))
    assert guards == [DEV] and seen == [(1, (384,), 4, 128)]


def test_host_to_gpu_copies_pin_under_the_target_guard(guards, pinned):
    """PageTable.build/.to and the torch backend's index tensors (`_long_tensor`) reach cuda:1 through memory
    pinned under cuda:1's guard, never under the current device's."""
    host = PageTable.build([[0, 1], [2]], [8, 4])
    with FakeTensorMode(allow_non_fake_inputs=True):
        table = host.to(DEV)
        built = PageTable.build([[1], [0, 2]], 4, device=DEV)
        assert table.pages.device == DEV and built.q_offsets.device == DEV
        assert table.to(DEV) is table  # already there: no copy
        n = len(guards)
        idx = _long_tensor([[0, 1], [2, 3]], DEV)  # the torch backend's page and row indices
        assert idx.device == DEV and idx.dtype == torch.long
    assert len(guards) == n + 1 == 7  # 3 tensors per table, 1 index tensor
    assert all(g == DEV for g in guards)
    assert pinned == [DEV] * 7  # each copy pinned inside cuda:1's guard


def test_kernels_launch_only_through_the_helper():
    """No op file launches a kernel itself (``kernel[grid](...)``): every launch goes through `_launch.launch`."""
    root = pathlib.Path(_launch.__file__).parent
    for path in sorted(root.glob("*.py")):
        if path.name == "_launch.py":
            continue
        assert not re.search(r"_kernel\[", path.read_text()), f"{path.name} launches a kernel outside _launch.launch"


def test_the_guard_is_torch_cuda_device_for_cuda_tensors_only():
    guard = _launch.device_guard(DEV)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # constructing it touches no GPU
    assert not isinstance(_launch.device_guard(torch.device("cpu")), torch.cuda.device)
    assert not isinstance(_launch.device_guard(torch.device("meta")), torch.cuda.device)


def test_autotune_is_opt_in_and_offers_only_the_proven_configs(guards, pinned, monkeypatch):
    """With MMPL_FAST_AUTOTUNE=1 on a GPU, stage attention's launch goes to a triton.autotune over exactly its
    table row, inside the guard (a stand-in autotuner records what it is given)."""
    import importlib

    sa_mod = importlib.import_module("mmpl_fast.kernels.stage_attention")
    made = []

    class StandIn:
        def __init__(self, kernel, configs, key):
            made.append((kernel, configs, key))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: made.append((len(_INSIDE), grid({"BLOCK_M": 128}), sorted(kwargs)))

    monkeypatch.setattr(_launch, "_autotuner", StandIn)
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "1")
    with FakeTensorMode(allow_non_fake_inputs=True), _launch.target_arch(80):
        table = PageTable.build([[0, 1]], 200, device=DEV)
        q, pool = torch.empty(200, 2, 128, device=DEV, dtype=torch.bfloat16), torch.empty(2, 8, 2, 128, device=DEV)
        stage_attention_triton(q, pool.bfloat16(), pool.bfloat16(), table)
    (kernel, configs, key), (depth, grid, kwargs) = made
    assert kernel is sa_mod._stage_attention_kernel and configs == sa_mod.CONFIGS[(80, "bf16", 128)]
    assert len(configs) > 1 and key == ("tokens_per_page", "head_dim")
    assert depth == 1 and grid == (2, 1, 2) and kwargs == ["BLOCK_D", "EVEN_D", "IEEE"]
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "0")
    assert not _launch.autotune_enabled()
