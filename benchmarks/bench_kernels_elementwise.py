"""Memory-bound kernels: rope_write, norm_modulate, gated_residual, denoise_update, euler_step, cfg_combine.

Run: ``pytest benchmarks/bench_kernels_elementwise.py --benchmark-only``.

The fair baseline is the ``torch.compile``d torch reference (as torchao reports its kernels), not eager code.
On a CPU the torch reference (the CPU backend) is compared with its compiled version at Wan-1.3B sizes
for one block of 3 latent frames, in float32. On CUDA the Triton kernel, the torch reference and the
compiled reference run in bfloat16 at the same sizes plus Wan-14B's width, and the table gives the
achieved bandwidth (bytes each op must move at least once / median time) and its share of the HBM peak
(target for the Triton kernels: >= 80%).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import cuda_required, device_name, median_seconds, record

from mmpl_fast.kernels import RopeTable, use_backend

# the package re-exports functions under the submodules' names: fetch the modules themselves
rope_mod = importlib.import_module("mmpl_fast.kernels.rope_write")
norm_mod = importlib.import_module("mmpl_fast.kernels.norm_modulate")
denoise_mod = importlib.import_module("mmpl_fast.kernels.denoise")

HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, DESIGN.md section 4 (H200 first: its name has no "H100")
BASELINE = "torch.compile(reference)"
TARGET_HBM = 80  # % of the HBM peak for the Triton kernels on H100/H200 (the README's target)


@dataclass(frozen=True)
class Case:
    """One op at one size: `make(device, dtype)` returns (call(impl), bytes moved)."""

    op: str
    size: str
    make: Callable[[str, torch.dtype], tuple[Callable[[str], Callable[[], object]], int]]

    def __str__(self) -> str:
        return f"{self.op}-{self.size}"


_COMPILED: dict[str, Callable] = {}


def _impl(fn_torch: Callable, fn_triton: Callable, impl: str) -> Callable:
    if impl == "triton":
        return fn_triton
    if impl == "compiled":
        name = f"{fn_torch.__module__}.{fn_torch.__name__}"
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(fn_torch, dynamic=False)
        return _COMPILED[name]
    return fn_torch


def _rope(batch, frames, grid_h, grid_w, heads, head_dim):
    def make(device, dtype):
        tokens = grid_h * grid_w
        shape = (batch, frames, tokens, heads, head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        pool = torch.zeros(batch * frames + 4, tokens, heads, head_dim, device=device, dtype=dtype)
        k_pool, v_pool = pool, pool.clone()
        pages = torch.arange(batch * frames, device=device).view(batch, frames) + 2
        pos = torch.arange(frames, device=device) + 7
        rope = RopeTable.build(head_dim, device=device)

        def call(impl):
            fn = _impl(rope_mod.rope_write_torch, rope_mod.rope_write_triton, impl)
            return lambda: fn(q, k, v, k_pool, v_pool, pages, pos, rope, grid_w)

        return call, 6 * q.numel() * q.element_size()  # read q, k, v; write q_out, k and v pages

    return make


def _norm(batch, frames, tokens, channels):
    def make(device, dtype):
        x = torch.randn(batch, frames, tokens, channels, device=device, dtype=dtype)
        mod = torch.randn(batch, frames, 6, channels, device=device)
        shift, scale = mod[:, :, 0], mod[:, :, 1]

        def call(impl):
            fn = _impl(norm_mod.norm_modulate_torch, norm_mod.norm_modulate_triton, impl)
            return lambda: fn(x, shift, scale)

        return call, 2 * x.numel() * x.element_size()

    return make


def _gated(batch, frames, tokens, channels):
    def make(device, dtype):
        x, y = (torch.randn(batch, frames, tokens, channels, device=device, dtype=dtype) for _ in range(2))
        gate = torch.randn(batch, frames, 6, channels, device=device)[:, :, 2]

        def call(impl):
            fn = _impl(norm_mod.gated_residual_torch, norm_mod.gated_residual_triton, impl)
            return lambda: fn(x, y, gate)

        return call, 3 * x.numel() * x.element_size()

    return make


def _denoise(batch, frames, latent, cfg: bool):
    def make(device, dtype):
        shape = (batch, frames, *latent)
        x, v, vu, noise = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))
        sigma = torch.rand(batch, frames, device=device)
        sigma_next = torch.rand(batch, frames, device=device)
        v_uncond = vu if cfg else None

        def call(impl):
            fn = _impl(denoise_mod.denoise_update_torch, denoise_mod.denoise_update_triton, impl)
            return lambda: fn(x, v, sigma, sigma_next, noise, v_uncond, 5.0)

        return call, (6 if cfg else 5) * x.numel() * x.element_size()

    return make


def _euler(batch, frames, latent):
    def make(device, dtype):
        x, v = (torch.randn(batch, frames, *latent, device=device, dtype=dtype) for _ in range(2))

        def call(impl):
            fn = _impl(denoise_mod.euler_step_torch, denoise_mod.euler_step_triton, impl)
            return lambda: fn(x, v, 0.8, 0.6)

        return call, 3 * x.numel() * x.element_size()

    return make


def _cfg(batch, frames, latent):
    def make(device, dtype):
        u, c = (torch.randn(batch, frames, *latent, device=device, dtype=dtype) for _ in range(2))

        def call(impl):
            fn = _impl(denoise_mod.cfg_combine_torch, denoise_mod.cfg_combine_triton, impl)
            return lambda: fn(u, c, 5.0)

        return call, 3 * u.numel() * u.element_size()

    return make


# Wan2.1-1.3B, one block of 3 latent frames at 480x832: T = 30 x 52 = 1560 tokens, C = 1536 (12 x 128),
# latents 16 x 60 x 104 per frame; Wan-14B has C = 5120 (40 x 128).
WAN_T, WAN_GRID, LATENT = 1560, (30, 52), (16, 60, 104)
CPU_CASES = [
    Case("rope_write", "1.3B-3f", _rope(1, 3, *WAN_GRID, 12, 128)),
    Case("norm_modulate", "1.3B-3f", _norm(1, 3, WAN_T, 1536)),
    Case("gated_residual", "1.3B-3f", _gated(1, 3, WAN_T, 1536)),
    Case("denoise_update", "cfg-2x3f", _denoise(2, 3, LATENT, cfg=True)),
    Case("euler_step", "2x3f", _euler(2, 3, LATENT)),
    Case("cfg_combine", "2x3f", _cfg(2, 3, LATENT)),
]
CUDA_CASES = [
    *CPU_CASES,
    Case("rope_write", "14B-3f", _rope(1, 3, *WAN_GRID, 40, 128)),
    Case("norm_modulate", "14B-3f", _norm(1, 3, WAN_T, 5120)),
    Case("gated_residual", "14B-3f", _gated(1, 3, WAN_T, 5120)),
    Case("denoise_update", "noise-8x3f", _denoise(8, 3, LATENT, cfg=False)),
]


def _hbm_peak(device) -> float | None:
    name = device_name(device)
    return next((peak for key, peak in HBM_PEAK.items() if key in name), None)


def _run(benchmark, case: Case, impl: str, device: str, dtype: torch.dtype, inner: int) -> None:
    call, nbytes = case.make(device, dtype)
    fn = call(impl)
    label = {"torch": "torch reference", "compiled": BASELINE, "triton": "triton"}[impl]
    with use_backend("torch" if impl != "triton" else "triton"):
        try:
            fn()  # warm-up: compiles (torch.compile, Triton) outside the timed rounds
        except Exception as e:  # e.g. torch.compile without a C++ toolchain: skip the row, say why
            if impl != "compiled":
                raise
            record(f"elementwise {case}", label, float("nan"), baseline=BASELINE, device=device,
                   note=f"skipped: torch.compile failed: {type(e).__name__}")  # fmt: skip
            pytest.skip(f"torch.compile failed here: {type(e).__name__}: {str(e)[:200]}")
        if device == "cuda":
            torch.cuda.synchronize()

            def timed():
                for _ in range(inner):
                    fn()
                torch.cuda.synchronize()

        else:
            timed = fn
        benchmark.group = str(case)
        benchmark.pedantic(timed, rounds=9 if device == "cpu" else 20, warmup_rounds=1, iterations=1)
    seconds = median_seconds(benchmark) / (inner if device == "cuda" else 1)
    extra = {"GB/s": nbytes / seconds / 1e9, "MB moved": nbytes / 1e6}
    peak = _hbm_peak(device) if device == "cuda" else None
    if peak is not None:
        extra["% HBM peak"] = 100 * nbytes / seconds / peak
        if impl == "triton":
            extra["target %"] = TARGET_HBM
    record(f"elementwise {case}", label, seconds, baseline=BASELINE, device=device, **extra)


@pytest.mark.parametrize("impl", ["torch", "compiled"])
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_cpu(benchmark, case, impl):
    """The CPU backend (torch reference, float32) against its torch.compile'd version."""
    _run(benchmark, case, impl, "cpu", torch.float32, inner=1)


@cuda_required()
@pytest.mark.parametrize("impl", ["triton", "torch", "compiled"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda(benchmark, case, impl):
    """Triton against the torch reference and its torch.compile'd version, bfloat16."""
    _run(benchmark, case, impl, "cuda", torch.bfloat16, inner=20)
