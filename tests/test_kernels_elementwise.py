"""The elementwise kernels (rope_write, norm_modulate, gated_residual, denoise updates) and the dispatcher (all
ops, stage attention included).

Each Triton kernel runs under ``use_backend("triton")`` (the CPU interpreter here, set by conftest) and is
held to the accuracy rule of `accuracy.py` against a float64 reference written out in this file, not
against the torch backend it is compared with.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from accuracy import DEVICE, DTYPES, assert_close_to_reference

from mmpl_fast.kernels import (
    PageTable,
    RopeTable,
    _dispatch,
    cfg_combine,
    denoise_update,
    euler_step,
    gated_residual,
    norm_modulate,
    rope_write,
    stage_attention,
    use_backend,
)
from mmpl_fast.kernels._launch import TABLE_ARCHS, recording, target_arch
from mmpl_fast.kernels.denoise import cfg_combine_torch, denoise_update_torch, euler_step_torch
from mmpl_fast.kernels.norm_modulate import gated_residual_torch, norm_modulate_torch
from mmpl_fast.kernels.rope_write import rope_write_torch

# the package re-exports functions under the submodules' names: fetch the modules themselves
rope_mod = importlib.import_module("mmpl_fast.kernels.rope_write")
norm_mod = importlib.import_module("mmpl_fast.kernels.norm_modulate")
denoise_mod = importlib.import_module("mmpl_fast.kernels.denoise")
attention_mod = importlib.import_module("mmpl_fast.kernels.stage_attention")


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# ------------------------------------------------------------------------------------------ rope_write
def wan_rope_exact(x: torch.Tensor, frame_pos: list[int], grid_w: int, theta: float = 1e4) -> torch.Tensor:
    """Wan2.1's rope_apply in float64, written from its definition (complex rotation of adjacent pairs)."""
    _, nf, t, _, d = x.shape
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    inv = [1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n) for n in dims]
    tok = torch.arange(t, dtype=torch.float64)
    pos_t = torch.tensor(frame_pos, dtype=torch.float64)[:, None, None].expand(nf, t, 1)
    pos_h = torch.div(tok, grid_w, rounding_mode="floor")[None, :, None].expand(nf, t, 1)
    pos_w = (tok % grid_w)[None, :, None].expand(nf, t, 1)
    ang = torch.cat([pos_t * inv[0], pos_h * inv[1], pos_w * inv[2]], dim=-1).to(x.device)  # [F, T, D/2]
    rot = torch.polar(torch.ones_like(ang), ang)[None, :, :, None, :]
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2)


def make_qkv(b, f, t, h, d, layout: str, dtype):
    if layout == "fused":  # views of one [B, F, T, 3, H, D] projection output
        return randn(b, f, t, 3, h, d, dtype=dtype).unbind(3)
    if layout == "transposed":  # head dim not contiguous
        return [randn(b, f, t, d, h, dtype=dtype).transpose(-1, -2) for _ in range(3)]
    return [randn(b, f, t, h, d, dtype=dtype) for _ in range(3)]


# (B, F, grid_h, grid_w, heads, head_dim, frame positions, layout of q/k/v)
ROPE_CASES = [
    (1, 3, 3, 5, 2, 32, [0, 1, 2], "contiguous"),
    (1, 7, 3, 3, 3, 64, [2, 3, 10, 11, 12, 19, 20], "fused"),
    (2, 2, 2, 7, 2, 48, [5, 17], "transposed"),
    (2, 1, 1, 5, 1, 12, [30], "fused"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"B{c[0]}F{c[1]}T{c[2] * c[3]}H{c[4]}D{c[5]}-{c[7]}")
def test_rope_write_triton(dtype, case):
    check_rope_write(dtype, case)


def check_rope_write(dtype, case):
    """Triton rope_write against Wan's rope in float64: rotated q, rotated k and plain v in their pages only."""
    b, f, grid_h, grid_w, heads, dim, frame_pos, layout = case
    tokens = grid_h * grid_w
    rope = RopeTable.build(dim, max_pos=32, device=DEVICE)
    q, k, v = make_qkv(b, f, tokens, heads, dim, layout, dtype)
    before = [x.clone() for x in (q, k, v)]
    num_pages = b * f + 3
    write_pages = torch.randperm(num_pages, device=DEVICE)[: b * f].view(b, f)
    pos = torch.tensor(frame_pos, device=DEVICE)
    pool_shape = (num_pages, tokens, heads, dim)
    k_init, v_init = randn(*pool_shape, dtype=dtype), randn(*pool_shape, dtype=dtype)
    k_pool, v_pool = k_init.clone(), v_init.clone()
    k_ref, v_ref = k_init.clone(), v_init.clone()

    with use_backend("triton"):
        q_out = rope_write(q, k, v, k_pool, v_pool, write_pages, pos, rope, grid_w)
    q_torch = rope_write_torch(q, k, v, k_ref, v_ref, write_pages, pos, rope, grid_w)

    assert q_out.dtype == dtype
    assert_close_to_reference(q_out, q_torch, wan_rope_exact(q, frame_pos, grid_w))
    written = write_pages.flatten()
    assert_close_to_reference(k_pool[written], k_ref[written], wan_rope_exact(k, frame_pos, grid_w).flatten(0, 1))
    assert torch.equal(v_pool[written], v.flatten(0, 1))
    others = torch.ones(num_pages, dtype=torch.bool, device=DEVICE)
    others[written] = False
    assert torch.equal(k_pool[others], k_init[others]) and torch.equal(v_pool[others], v_init[others])
    assert all(torch.equal(x, y) for x, y in zip((q, k, v), before, strict=True)), "inputs were modified"


def test_rope_write_rejects_bad_input():
    b, f, t, h, d = 1, 2, 6, 2, 16
    rope = RopeTable.build(d, max_pos=8)
    q, k, v = make_qkv(b, f, t, h, d, "contiguous", torch.float32)
    pool = torch.zeros(4, t, h, d, device=DEVICE)
    pages, pos = torch.tensor([[0, 1]], device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    with use_backend("triton"):
        with pytest.raises(TypeError, match="write_pages"):
            rope_write(q, k, v, pool, pool.clone(), pages.float(), pos, rope, 3)
        with pytest.raises(ValueError, match="write_pages"):
            rope_write(q, k, v, pool, pool.clone(), pages.view(2, 1), pos, rope, 3)
        with pytest.raises(ValueError, match="frame_pos"):
            rope_write(q, k, v, pool, pool.clone(), pages, pos[:1], rope, 3)
        with pytest.raises(ValueError, match="grid_w"):
            rope_write(q, k, v, pool, pool.clone(), pages, pos, rope, 4)
        with pytest.raises(ValueError, match="head_dim"):
            rope_write(q, k, v, pool, pool.clone(), pages, pos, RopeTable.build(8, 8), 3)
        with pytest.raises(ValueError, match="head dimension must be contiguous"):
            strided = torch.zeros(4, t, d, h, device=DEVICE).transpose(-1, -2)
            rope_write(q, k, v, strided, strided.clone(), pages, pos, rope, 3)


# ---------------------------------------------------------------------------------------- norm_modulate
# (B, F, T, C, x is a non-contiguous view)
NORM_CASES = [(1, 1, 5, 48, False), (2, 3, 7, 96, True), (1, 2, 33, 64, False), (2, 1, 3, 200, True)]


def make_x(b, f, t, c, strided: bool, dtype):
    if strided:  # a [B, F, C, T] buffer seen as [B, F, T, C]
        return (randn(b, f, c, t) * 3 + 1).to(dtype).transpose(2, 3)
    return (randn(b, f, t, c) * 3 + 1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: f"B{c[0]}F{c[1]}T{c[2]}C{c[3]}{'-strided' * c[4]}")
def test_norm_modulate_triton(dtype, case):
    b, f, t, c, strided = case
    x = make_x(b, f, t, c, strided, dtype)
    mod = randn(b, f, 6, c)  # float32 modulation; shift/scale are non-contiguous chunks of it
    shift, scale = mod[:, :, 3], mod[:, :, 4]
    with use_backend("triton"):
        out = norm_modulate(x, shift, scale, 1e-6)
    exact = F.layer_norm(x.double(), (c,), eps=1e-6) * (1 + scale.double()[:, :, None]) + shift.double()[:, :, None]
    assert out.dtype == dtype and out.is_contiguous()
    assert_close_to_reference(out, norm_modulate_torch(x, shift, scale, 1e-6), exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: f"B{c[0]}F{c[1]}T{c[2]}C{c[3]}{'-strided' * c[4]}")
def test_gated_residual_triton(dtype, case):
    b, f, t, c, strided = case
    x = make_x(b, f, t, c, strided, dtype)
    y = make_x(b, f, t, c, not strided, dtype)
    gate = randn(b, f, 6, c)[:, :, 2]
    with use_backend("triton"):
        out = gated_residual(x, y, gate)
    exact = x.double() + y.double() * gate.double()[:, :, None]
    assert out.dtype == dtype
    assert_close_to_reference(out, gated_residual_torch(x, y, gate), exact)


def test_norm_modulate_rejects_bad_input():
    x = randn(1, 2, 3, 8)
    mod = randn(1, 2, 8)
    with use_backend("triton"):
        with pytest.raises(ValueError, match="x: expected"):
            norm_modulate(x[0], mod, mod)
        with pytest.raises(ValueError, match="scale"):
            norm_modulate(x, mod, mod[:, :1])
        with pytest.raises(TypeError, match="x: expected a floating-point"):
            norm_modulate(x.int(), mod, mod)
        with pytest.raises(ValueError, match="C <= 8192"):
            norm_modulate(randn(1, 1, 1, 8200), randn(1, 1, 8200), randn(1, 1, 8200))
        with pytest.raises(ValueError, match="y: expected"):
            gated_residual(x, x[:, :1], mod)
        with pytest.raises(ValueError, match="gate"):
            gated_residual(x, x, mod[0])


# -------------------------------------------------------------------------------------------- denoise
B, NF, LATENT = 2, 3, (4, 5, 7)  # x: [B, F, C, H, W] with odd sizes

SIGMAS = {
    "floats": lambda: (0.8125, 0.4),
    "per-segment": lambda: (torch.rand(B, device=DEVICE), torch.rand(B, device=DEVICE, dtype=torch.float64)),
    "per-frame": lambda: (torch.rand(B, NF, device=DEVICE), 0.3),
    "mixed": lambda: (torch.tensor(0.6, device=DEVICE), torch.rand(B, NF, device=DEVICE).t().contiguous().t()),
}


def per_row(sigma, x: torch.Tensor) -> torch.Tensor:
    if isinstance(sigma, torch.Tensor):
        return sigma.double().reshape(tuple(sigma.shape) + (1,) * (x.dim() - sigma.dim()))
    return torch.tensor(sigma, dtype=torch.float64, device=x.device)


def guided_exact(v, v_uncond, guidance):
    return v.double() if v_uncond is None else v_uncond.double() + guidance * (v.double() - v_uncond.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigmas", list(SIGMAS))
@pytest.mark.parametrize("guidance", [None, 3.5], ids=["no-cfg", "cfg3.5"])
@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_denoise_update_triton(dtype, sigmas, guidance, compute_dtype):
    x, v, noise = (randn(B, NF, *LATENT, dtype=dtype) for _ in range(3))
    v_uncond = randn(B, NF, *LATENT, dtype=dtype) if guidance else None
    g = guidance or 1.0
    sigma, sigma_next = SIGMAS[sigmas]()
    with use_backend("triton"):
        x0, x_next = denoise_update(x, v, sigma, sigma_next, noise, v_uncond, g, compute_dtype)
        x0_only, none = denoise_update(x, v, sigma, v_uncond=v_uncond, guidance=g, compute_dtype=compute_dtype)
    x0_torch, next_torch = denoise_update_torch(x, v, sigma, sigma_next, noise, v_uncond, g, compute_dtype)
    x0_exact = x.double() - per_row(sigma, x) * guided_exact(v, v_uncond, g)
    s_next = per_row(sigma_next, x)
    next_exact = (1 - s_next) * x0_exact + s_next * noise.double()
    assert x0.dtype == dtype and x_next.dtype == dtype and none is None
    assert_close_to_reference(x0, x0_torch, x0_exact)
    assert_close_to_reference(x_next, next_torch, next_exact)
    assert torch.equal(x0_only, x0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigmas", list(SIGMAS))
@pytest.mark.parametrize("guidance", [None, 4.0], ids=["no-cfg", "cfg4"])
def test_euler_step_triton(dtype, sigmas, guidance):
    x, v = randn(B, NF, *LATENT, dtype=dtype), randn(B, NF, *LATENT, dtype=dtype)
    v_uncond = randn(B, NF, *LATENT, dtype=dtype) if guidance else None
    g = guidance or 1.0
    sigma, sigma_next = SIGMAS[sigmas]()
    with use_backend("triton"):
        out = euler_step(x, v, sigma, sigma_next, v_uncond, g)
    exact = x.double() + (per_row(sigma_next, x) - per_row(sigma, x)) * guided_exact(v, v_uncond, g)
    assert out.dtype == dtype
    assert_close_to_reference(out, euler_step_torch(x, v, sigma, sigma_next, v_uncond, g), exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance", [0.0, 1.0, 4.5])
def test_cfg_combine_triton(dtype, guidance):
    u = randn(3, 5, 7, dtype=dtype)
    c = randn(3, 7, 5, dtype=dtype).transpose(1, 2)  # non-contiguous
    with use_backend("triton"):
        out = cfg_combine(u, c, guidance)
    exact = u.double() + guidance * (c.double() - u.double())
    assert out.dtype == dtype and out.shape == u.shape
    assert_close_to_reference(out, cfg_combine_torch(u, c, guidance), exact)


def test_denoise_ops_reject_bad_input():
    x = randn(B, NF, 4)
    v = randn(B, NF, 4)
    with use_backend("triton"):
        with pytest.raises(ValueError, match="v: expected shape"):
            denoise_update(x, v[:, :1], 0.5)
        with pytest.raises(ValueError, match="sigma: expected shape"):
            denoise_update(x, v, torch.rand(NF))
        with pytest.raises(ValueError, match="sigma_next: expected shape"):
            denoise_update(x, v, 0.5, torch.rand(B, NF, 4), torch.randn_like(x))
        with pytest.raises(ValueError, match="sigma_next: required"):
            denoise_update(x, v, 0.5, noise=torch.randn_like(x))
        with pytest.raises(ValueError, match="compute_dtype"):
            denoise_update(x, v, 0.5, compute_dtype=torch.float16)
        with pytest.raises(TypeError, match="x_t: expected a floating-point"):
            denoise_update(x.long(), v, 0.5)
        with pytest.raises(TypeError, match="sigma: expected a float"):
            denoise_update(x, v, "0.5")
        with pytest.raises(TypeError, match="guidance"):
            denoise_update(x, v, 0.5, v_uncond=v, guidance=torch.tensor(2.0))
        with pytest.raises(TypeError, match="v_uncond: expected v's dtype"):
            denoise_update(x, v, 0.5, v_uncond=v.double())
        with pytest.raises(ValueError, match="noise: expected shape"):
            denoise_update(x, v, 0.5, 0.2, noise=v[:1])
        with pytest.raises(ValueError, match="sigma_next: expected shape"):
            euler_step(x, v, 0.5, torch.rand(B + 1))
        with pytest.raises(TypeError, match="sigma_next"):
            euler_step(x, v, 0.5, None)
        with pytest.raises(ValueError, match="c: expected shape"):
            cfg_combine(x, v[:1], 2.0)
        with pytest.raises(TypeError, match="c: expected u's dtype"):
            cfg_combine(x, v.double(), 2.0)


# ---------------------------------------------------------------------------------------------- GPU tiles
# The interpreter runs each kernel with the block sizes a GPU uses (`target_arch`): several tiles with a ragged
# last one in every tiled dimension. The elementwise tables hold one configuration for every arch (checked
# below), so sm_90's stands for all.
GPU_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]


def gpu_grid(fn, *args, **kwargs) -> tuple[dict, tuple[int, ...]]:
    """(tiles, grid) of the launch `fn(*args)` makes with sm_90's table row (recorded, not run)."""
    with target_arch(90), recording() as launches:
        fn(*args, **kwargs)
    meta = launches[0].configs[0].meta
    return meta, launches[0].grid(meta)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_rope_write_gpu_tiles(dtype):
    """45 tokens in 32-token tiles (the last 13 tokens), 6 heads in groups of 4 (the last 2), head dim 128."""
    case = (1, 2, 5, 9, 6, 128, [4, 17], "fused")
    q, k, v = make_qkv(1, 2, 45, 6, 128, "contiguous", dtype)
    pool = torch.zeros(3, 45, 6, 128, dtype=dtype)
    pages, pos, rope = torch.tensor([[2, 0]]), torch.tensor([4, 17]), RopeTable.build(128, max_pos=32)
    meta, grid = gpu_grid(rope_mod.rope_write_triton, q, k, v, pool, pool.clone(), pages, pos, rope, 9)
    assert (meta["BLOCK_T"], meta["HEADS_PER_PROG"], grid) == (32, 4, (2, 2, 2))
    with target_arch(90):
        check_rope_write(dtype, case)


NORM_GPU_CASES = [(1, 2, 5, 1536, False), (1, 1, 3, 5120, True)]  # 1.3B and 14B widths: whole rows of 2048 / 8192


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", NORM_GPU_CASES, ids=lambda c: f"T{c[2]}C{c[3]}")
def test_norm_modulate_gpu_tiles(dtype, case):
    b, f, t, c, strided = case
    x, mod = make_x(b, f, t, c, strided, dtype), randn(b, f, 6, c)
    meta, grid = gpu_grid(norm_mod.norm_modulate_triton, x, mod[:, :, 0], mod[:, :, 1])
    assert grid[0] >= 3 and meta["BLOCK_C"] > c  # several row tiles; the row's tail is masked
    assert meta["BLOCK_T"] == 1 or t % meta["BLOCK_T"]  # the last row tile is ragged (1.3B: 2 rows per tile)
    with target_arch(90):
        test_norm_modulate_triton(dtype, case)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gated_residual_gpu_tiles(dtype):
    """C = 5120 in 2048-channel tiles (the last 1024), 3 tokens in 2-token tiles (the last 1)."""
    case = (1, 2, 3, 5120, True)
    x = make_x(*case, dtype)
    meta, grid = gpu_grid(norm_mod.gated_residual_triton, x, x, randn(1, 2, 5120))
    assert (meta["BLOCK_T"], meta["BLOCK_C"], grid) == (2, 2048, (2, 3, 2))
    with target_arch(90):
        test_gated_residual_triton(dtype, case)


def test_denoise_ops_gpu_tiles(monkeypatch):
    """Rows of 2500 elements in 2048-element blocks (the last 452); CFG over 15000 elements in 8 blocks."""
    monkeypatch.setattr(sys.modules[__name__], "LATENT", (4, 25, 25))
    x = randn(B, NF, 4, 25, 25)
    meta, grid = gpu_grid(denoise_mod.denoise_update_triton, x, x, torch.rand(B, NF), 0.3, x)
    assert (meta["BLOCK"], grid) == (2048, (2, B * NF))
    meta, grid = gpu_grid(denoise_mod.cfg_combine_triton, x, x, 2.0)
    assert (meta["BLOCK"], grid) == (2048, (8,))
    with target_arch(90):
        for dtype in (torch.float16, torch.float32):
            for sigmas in ("per-frame", "mixed"):
                test_denoise_update_triton(dtype, sigmas, 3.5, torch.float64)
                test_euler_step_triton(dtype, sigmas, 4.0)
            u, c = randn(B, NF, 4, 25, 25, dtype=dtype), randn(B, NF, 4, 25, 25, dtype=dtype)
            with use_backend("triton"):
                out = cfg_combine(u, c, 4.5)
            exact = u.double() + 4.5 * (c.double() - u.double())
            assert_close_to_reference(out, cfg_combine_torch(u, c, 4.5), exact)


def test_elementwise_tables_hold_one_config_for_every_arch():
    """So the sm_90 runs above stand for sm_80 and sm_89 too (stage attention's rows do differ per arch)."""
    for table in (rope_mod.CONFIGS, norm_mod.NORM_CONFIGS, norm_mod.GATED_CONFIGS, denoise_mod.CONFIGS):
        gpu = {key: cfg for key, cfg in table.items() if key[0] is not None}
        assert {key[0] for key in gpu} == set(TABLE_ARCHS) and len(set(gpu.values())) == 1


# ------------------------------------------------------------------------------------------- dispatch
def _calls() -> dict:
    """One small call of every op in this file, keyed by op name."""
    rope = RopeTable.build(8, max_pos=4)
    q, k, v = make_qkv(1, 1, 2, 1, 8, "contiguous", torch.float32)
    pool = torch.zeros(2, 2, 1, 8, device=DEVICE)
    pages, pos = torch.tensor([[1]], device=DEVICE), torch.tensor([0], device=DEVICE)
    x, mod = randn(1, 1, 2, 8), randn(1, 1, 8)
    return {
        "rope_write": lambda: rope_write(q, k, v, pool, pool.clone(), pages, pos, rope, 2),
        "norm_modulate": lambda: norm_modulate(x, mod, mod),
        "gated_residual": lambda: gated_residual(x, x, mod),
        "denoise_update": lambda: denoise_update(x, x, 0.5),
        "euler_step": lambda: euler_step(x, x, 0.5, 0.25),
        "cfg_combine": lambda: cfg_combine(x, x, 2.0),
        "stage_attention": lambda: stage_attention(q[0, 0], pool, pool.clone(), PageTable.build([[0, 1]], 2, DEVICE)),
    }


TRITON_FNS = {
    "rope_write": (rope_mod, "rope_write_triton"),
    "norm_modulate": (norm_mod, "norm_modulate_triton"),
    "gated_residual": (norm_mod, "gated_residual_triton"),
    "denoise_update": (denoise_mod, "denoise_update_triton"),
    "euler_step": (denoise_mod, "euler_step_triton"),
    "cfg_combine": (denoise_mod, "cfg_combine_triton"),
    "stage_attention": (attention_mod, "stage_attention_triton"),
}


@pytest.mark.parametrize("op", list(TRITON_FNS))
def test_forced_triton_on_cpu_without_interpreter_raises(op, monkeypatch):
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    x = torch.zeros(2)  # CPU even where CUDA exists
    with use_backend("triton"), pytest.raises(RuntimeError, match="cannot run"):
        _dispatch.resolve(op, x)
    if DEVICE == "cpu":
        with use_backend("triton"), pytest.raises(RuntimeError, match=op):
            _calls()[op]()


def _spy_triton(monkeypatch) -> list[str]:
    """Replace every `*_triton` launcher by one that records its op name and fails loudly if used."""
    used: list[str] = []
    for op, (mod, name) in TRITON_FNS.items():
        real = getattr(mod, name)

        def spy(*args, _op=op, _real=real, **kwargs):
            used.append(_op)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    return used


def test_env_torch_picks_torch(monkeypatch):
    used = _spy_triton(monkeypatch)
    monkeypatch.setenv("MMPL_FAST_BACKEND", "torch")
    for fn in _calls().values():
        fn()
    assert used == []


def test_env_triton_picks_triton(monkeypatch):
    used = _spy_triton(monkeypatch)
    monkeypatch.setenv("MMPL_FAST_BACKEND", "triton")
    for fn in _calls().values():
        fn()
    assert used == list(TRITON_FNS)


def test_use_backend_overrides_env(monkeypatch):
    used = _spy_triton(monkeypatch)
    monkeypatch.setenv("MMPL_FAST_BACKEND", "triton")
    with use_backend("torch"):
        for fn in _calls().values():
            fn()
    assert used == []


def test_auto_on_cpu_picks_torch(monkeypatch):
    used = _spy_triton(monkeypatch)
    monkeypatch.delenv("MMPL_FAST_BACKEND", raising=False)
    if DEVICE != "cpu":
        pytest.skip("auto picks triton for CUDA tensors")
    for fn in _calls().values():
        fn()
    assert used == []


def test_bad_backend_name_raises(monkeypatch):
    with pytest.raises(ValueError, match="not a backend"), use_backend("cuda"):
        pass
    monkeypatch.setenv("MMPL_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="MMPL_FAST_BACKEND"):
        cfg_combine(torch.zeros(2), torch.zeros(2), 1.0)


class _CudaLike:
    """Stands in for a CUDA tensor in `resolve` (which reads only `is_cuda` and `device`)."""

    is_cuda = True

    def __init__(self, index: int):
        self.device = torch.device("cuda", index)


@pytest.mark.parametrize("capability, want", [(75, "torch"), (80, "triton"), (86, "triton"), (90, "triton")])
def test_auto_sends_gpus_before_sm80_to_torch(capability, want, monkeypatch):
    """The launch tables start at sm_80: older GPUs take the torch backend, and forcing Triton there raises."""
    from mmpl_fast.kernels import _launch

    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "_capability", lambda index: capability if index == 1 else 90)
    monkeypatch.delenv("MMPL_FAST_BACKEND", raising=False)
    assert _dispatch.resolve("stage_attention", _CudaLike(1)) == want
    assert _dispatch.resolve("stage_attention", _CudaLike(0)) == "triton"
    if want == "torch":
        with use_backend("triton"), pytest.raises(RuntimeError, match=r"cuda:1 has compute capability 7\.5"):
            _dispatch.resolve("stage_attention", _CudaLike(1))


def test_table_arch_maps_gpus_to_proven_rows():
    from mmpl_fast.kernels._launch import table_arch

    assert [table_arch(c) for c in (80, 86, 87, 89, 90, 100, 120)] == [80, 89, 80, 89, 90, 89, 89]
    with pytest.raises(RuntimeError, match="8.0 or newer"):
        table_arch(75)
