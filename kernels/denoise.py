"""Denoise updates of the flow-matching samplers: x0 from velocity with re-noise, Euler step, CFG combine.

Math (elementwise; sigma and sigma' are per row, g is the guidance scale)::

    v_eff = v_uncond + g (v - v_uncond)   when v_uncond is given, else v

    denoise_update:  x0     = x_t - sigma v_eff                        in compute_dtype (float64 by default)
                     x_next = (1 - sigma') x0 + sigma' noise           in float32, from x0 as stored
    euler_step:      out    = x + (sigma' - sigma) v_eff               in float32
    cfg_combine:     out    = u + g (c - u)                            in float32

`denoise_update` is Self-Forcing's few-step update in one pass: its x0 is computed in float64 and
rounded to the latent dtype, and the re-noise to the next timestep starts from that rounded x0 in
float32 (DESIGN.md, sampler facts). `euler_step` follows diffusers' flow-matching Euler step (float32,
dt = sigma' - sigma).

Shapes:
    x_t / x, v, v_uncond, noise, u, c: equal shapes ``[B, F, ...]`` (any trailing dims)
    sigma, sigma_next: a Python float, or a tensor of shape ``[]``, ``[B]`` or ``[B, F]``: one value per row,
                       a row being everything after those leading dims (per-segment or per-frame sigmas)
    returns: tensors of x_t's (x's, u's) dtype and shape, contiguous

Limits (what the tests cover): fp32 and fp16 everywhere (the Triton interpreter included), bf16 on CUDA
only; float64 math in Triton (CUDA and the interpreter support it). Non-contiguous inputs are copied
once before the Triton launch. At most 65535 rows (B * F) when sigmas are per row. The interpreter tests
also run the GPU block size of `CONFIGS` with ragged last blocks.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ._dispatch import resolve, triton_available
from ._launch import DTYPE_NAMES, TABLE_ARCHS, launch, launch_arch, pick, to_device
from ._launch import Config as _C

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

Sigma = float | torch.Tensor
_COMPUTE_DTYPES = (torch.float32, torch.float64)


def _check_tensor(name: str, t, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device}, got one on {t.device}")


def _check_sigma(name: str, sigma, x: torch.Tensor) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real | torch.Tensor):
        raise TypeError(f"{name}: expected a float or a tensor of shape [B] or [B, F], got {type(sigma).__name__}")
    if isinstance(sigma, torch.Tensor):
        if sigma.dtype.is_complex or sigma.dtype == torch.bool:
            raise TypeError(f"{name}: expected a real tensor, got {sigma.dtype}")
        if sigma.dim() > 2 or sigma.dim() > x.dim() or tuple(sigma.shape) != tuple(x.shape[: sigma.dim()]):
            allowed = " or ".join(str(list(x.shape[:r])) for r in range(3) if r <= x.dim())
            raise ValueError(f"{name}: expected shape {allowed} (leading dims of x), got {list(sigma.shape)}")


def _check_guidance(guidance) -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"guidance: expected a float, got {type(guidance).__name__}")


def _check_update(x, v, sigma, sigma_next, noise, v_uncond, guidance, x_name: str = "x_t") -> None:
    _check_tensor(x_name, x)
    _check_tensor("v", v, x)
    if v_uncond is not None:
        _check_tensor("v_uncond", v_uncond, x)
        if v_uncond.dtype != v.dtype:
            raise TypeError(f"v_uncond: expected v's dtype {v.dtype}, got {v_uncond.dtype}")
    if noise is not None:
        _check_tensor("noise", noise, x)
    _check_sigma("sigma", sigma, x)
    if sigma_next is not None:
        _check_sigma("sigma_next", sigma_next, x)
    _check_guidance(guidance)


def _check_denoise(x_t, v, sigma, sigma_next, noise, v_uncond, guidance, compute_dtype) -> None:
    _check_update(x_t, v, sigma, sigma_next, noise, v_uncond, guidance)
    if noise is not None and sigma_next is None:
        raise ValueError("sigma_next: required when noise is given (the re-noise needs the next sigma)")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected torch.float32 or torch.float64, got {compute_dtype}")


def _check_cfg(u, c, guidance) -> None:
    _check_tensor("u", u)
    _check_tensor("c", c, u)
    if c.dtype != u.dtype:
        raise TypeError(f"c: expected u's dtype {u.dtype}, got {c.dtype}")
    _check_guidance(guidance)


def _check_euler(x, v, sigma, sigma_next, v_uncond, guidance) -> None:
    _check_update(x, v, sigma, sigma_next, None, v_uncond, guidance, x_name="x")
    if sigma_next is None:
        raise TypeError("sigma_next: expected a float or a tensor of shape [B] or [B, F], got None")


# --------------------------------------------------------------------------------------------- torch
def _per_row(sigma: Sigma, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sigma as a tensor of `dtype` that broadcasts over x's rows."""
    if isinstance(sigma, torch.Tensor):
        return sigma.to(device=x.device, dtype=dtype).reshape(tuple(sigma.shape) + (1,) * (x.dim() - sigma.dim()))
    return torch.full((), float(sigma), dtype=dtype, device=x.device)


def _guided(v: torch.Tensor, v_uncond: torch.Tensor | None, guidance: float, dtype: torch.dtype) -> torch.Tensor:
    if v_uncond is None:
        return v.to(dtype)
    vu = v_uncond.to(dtype)
    return vu + guidance * (v.to(dtype) - vu)


def denoise_update_torch(
    x_t: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma | None = None,
    noise: torch.Tensor | None = None,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference and CPU backend."""
    _check_denoise(x_t, v, sigma, sigma_next, noise, v_uncond, guidance, compute_dtype)
    x0 = x_t.to(compute_dtype) - _per_row(sigma, x_t, compute_dtype) * _guided(v, v_uncond, guidance, compute_dtype)
    x0 = x0.to(x_t.dtype)
    if noise is None:
        return x0, None
    s_next = _per_row(sigma_next, x_t, torch.float32)
    return x0, ((1 - s_next) * x0.float() + s_next * noise.float()).to(x_t.dtype)


def euler_step_torch(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Reference and CPU backend."""
    _check_euler(x, v, sigma, sigma_next, v_uncond, guidance)
    dt = _per_row(sigma_next, x, torch.float32) - _per_row(sigma, x, torch.float32)
    return (x.float() + dt * _guided(v, v_uncond, guidance, torch.float32)).to(x.dtype)


def cfg_combine_torch(u: torch.Tensor, c: torch.Tensor, guidance: float) -> torch.Tensor:
    """Reference and CPU backend."""
    _check_cfg(u, c, guidance)
    uf = u.float()
    return (uf + guidance * (c.float() - uf)).to(u.dtype)


# -------------------------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _row_value(ptr, stride_b, stride_f, b, f, hi, lo, SCALAR: tl.constexpr, DTYPE: tl.constexpr):
        """A row's sigma in DTYPE: loaded per row, or a host float passed as fp32 hi + lo (fp64-exact enough)."""
        if SCALAR:
            return tl.cast(hi, DTYPE) + tl.cast(lo, DTYPE)
        return tl.load(ptr + b * stride_b + f * stride_f).to(DTYPE)

    @triton.jit
    def _guided_velocity(v_ptr, vu_ptr, offs, mask, g_hi, g_lo, HAS_UNCOND: tl.constexpr, DTYPE: tl.constexpr):
        """v, or v_uncond + g (v - v_uncond), in DTYPE."""
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(DTYPE)
        if HAS_UNCOND:
            vu = tl.load(vu_ptr + offs, mask=mask, other=0.0).to(DTYPE)
            v = vu + (tl.cast(g_hi, DTYPE) + tl.cast(g_lo, DTYPE)) * (v - vu)
        return v

    @triton.jit
    def _denoise_update_kernel(
        x_ptr, v_ptr, vu_ptr, noise_ptr, x0_ptr, xn_ptr, s_ptr, sn_ptr,
        s_stride_b, s_stride_f, sn_stride_b, sn_stride_f,
        s_hi, s_lo, sn_hi, g_hi, g_lo,
        frames, inner,
        S_SCALAR: tl.constexpr, SN_SCALAR: tl.constexpr, HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr,
        COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One block of one row: x0 = x_t - sigma v_eff (COMPUTE), x_next = (1 - sigma') x0 + sigma' noise (fp32)."""
        pid = tl.program_id(0)
        row = tl.program_id(1)
        b = row // frames
        f = row % frames
        cols = pid * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        offs = row.to(tl.int64) * inner + cols

        sigma = _row_value(s_ptr, s_stride_b, s_stride_f, b, f, s_hi, s_lo, S_SCALAR, COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        v = _guided_velocity(v_ptr, vu_ptr, offs, mask, g_hi, g_lo, HAS_UNCOND, COMPUTE)
        x0 = (x - sigma * v).to(x0_ptr.dtype.element_ty)
        tl.store(x0_ptr + offs, x0, mask=mask)
        if HAS_NOISE:
            s_next = _row_value(sn_ptr, sn_stride_b, sn_stride_f, b, f, sn_hi, 0.0, SN_SCALAR, tl.float32)
            n = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x_next = (1.0 - s_next) * x0.to(tl.float32) + s_next * n
            tl.store(xn_ptr + offs, x_next.to(xn_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _euler_step_kernel(
        x_ptr, v_ptr, vu_ptr, out_ptr, s_ptr, sn_ptr,
        s_stride_b, s_stride_f, sn_stride_b, sn_stride_f,
        s_hi, sn_hi, g_hi,
        frames, inner,
        S_SCALAR: tl.constexpr, SN_SCALAR: tl.constexpr, HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One block of one row: out = x + (sigma' - sigma) v_eff, fp32."""
        pid = tl.program_id(0)
        row = tl.program_id(1)
        b = row // frames
        f = row % frames
        cols = pid * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        offs = row.to(tl.int64) * inner + cols

        sigma = _row_value(s_ptr, s_stride_b, s_stride_f, b, f, s_hi, 0.0, S_SCALAR, tl.float32)
        s_next = _row_value(sn_ptr, sn_stride_b, sn_stride_f, b, f, sn_hi, 0.0, SN_SCALAR, tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = _guided_velocity(v_ptr, vu_ptr, offs, mask, g_hi, 0.0, HAS_UNCOND, tl.float32)
        out = x + (s_next - sigma) * v
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cfg_combine_kernel(u_ptr, c_ptr, out_ptr, numel, g, BLOCK: tl.constexpr):
        """out = u + g (c - u), fp32."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = u + tl.cast(g, tl.float32) * (c - u)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _hi_lo(value: float) -> tuple[float, float]:
    """Split a host float into fp32 hi + lo so a kernel can rebuild it in fp64 (Triton passes floats as fp32)."""
    hi = float(np.float32(value))
    return hi, value - hi


def _row_layout(x: torch.Tensor, *sigmas) -> tuple[int, int, int, int]:
    """(rank, rows, frames, inner): rows span the leading dims of the highest-rank sigma tensor."""
    rank = max((s.dim() for s in sigmas if isinstance(s, torch.Tensor)), default=0)
    rows = 1
    for n in x.shape[:rank]:
        rows *= n
    frames = x.shape[1] if rank == 2 else 1
    return rank, rows, frames, x.numel() // rows


def _sigma_args(sigma: Sigma | None, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int, float, float]:
    """(pointer, stride over B, stride over F, hi, lo) of one sigma: a per-row tensor or a host float."""
    if not isinstance(sigma, torch.Tensor):
        return x, 0, 0, *_hi_lo(float(sigma or 0.0))
    s = to_device(sigma, x.device)
    s = s.reshape(tuple(s.shape) + (1,) * (rank - s.dim())).expand(x.shape[:rank])  # [B] broadcasts over F: stride 0
    strides = [*s.stride(), 0, 0]
    return s, strides[0], strides[1], 0.0, 0.0


# The launch table: (arch, dtype of x) -> configuration (see `_launch`; the compile check proves every entry
# at Wan latent sizes). A program handles BLOCK elements of one row (of the whole tensor for cfg_combine);
# BLOCK shrinks to the row, not below 128. The interpreter's row (arch None) favours few, large programs.
CONFIGS: dict[tuple, _C] = {
    (None,): _C.of(1, 1, BLOCK=16384),
    **{(arch, dt): _C.of(4, 1, BLOCK=2048) for arch in TABLE_ARCHS for dt in DTYPE_NAMES.values()},
}


def launch_config(inner: int, dtype: torch.dtype, device: torch.device, op: str) -> _C:
    """The table's configuration for x's dtype and device, BLOCK shrunk to rows of `inner` elements."""
    arch = launch_arch(device)
    cfg = pick(CONFIGS, arch, dtype, op)
    floor = 1 if arch is None else 128
    return _C.of(cfg.num_warps, cfg.num_stages, BLOCK=min(cfg.meta["BLOCK"], max(floor, triton.next_power_of_2(inner))))


def _check_rows(rows: int) -> None:
    if rows > 65535:
        raise ValueError(f"sigma: at most 65535 rows (B * F) with per-row sigmas in Triton, got {rows}")


def _row_grid(inner: int, rows: int):
    return lambda meta: (triton.cdiv(inner, meta["BLOCK"]), rows)


def denoise_update_triton(
    x_t: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma | None = None,
    noise: torch.Tensor | None = None,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher: one program per (block, row); reads x_t, v (v_uncond, noise) once, writes x0 (x_next)."""
    _check_denoise(x_t, v, sigma, sigma_next, noise, v_uncond, guidance, compute_dtype)
    has_noise = noise is not None
    x_t, v = x_t.contiguous(), v.contiguous()
    v_uncond = v_uncond.contiguous() if v_uncond is not None else None
    noise = noise.contiguous() if has_noise else None
    x0 = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    x_next = torch.empty_like(x0) if has_noise else None
    if x0.numel() == 0:
        return x0, x_next
    sigma_next = sigma_next if has_noise else None
    rank, rows, frames, inner = _row_layout(x_t, sigma, sigma_next)
    _check_rows(rows)
    s_ptr, s_sb, s_sf, s_hi, s_lo = _sigma_args(sigma, x_t, rank)
    sn_ptr, sn_sb, sn_sf, sn_hi, _ = _sigma_args(sigma_next, x_t, rank)
    g_hi, g_lo = _hi_lo(float(guidance))
    launch(
        _denoise_update_kernel,
        _row_grid(inner, rows),
        (
            x_t, v, v_uncond if v_uncond is not None else v, noise if has_noise else x_t,
            x0, x_next if has_noise else x0, s_ptr, sn_ptr,
            s_sb, s_sf, sn_sb, sn_sf,
            s_hi, s_lo, sn_hi, g_hi, g_lo,
            frames, inner,
        ),
        device=x_t.device,
        configs=(launch_config(inner, x_t.dtype, x_t.device, "denoise_update"),),
        constexprs=dict(
            S_SCALAR=not isinstance(sigma, torch.Tensor), SN_SCALAR=not isinstance(sigma_next, torch.Tensor),
            HAS_UNCOND=v_uncond is not None, HAS_NOISE=has_noise,
            COMPUTE=tl.float64 if compute_dtype == torch.float64 else tl.float32,
        ),
    )  # fmt: skip
    return x0, x_next


def euler_step_triton(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Launcher: one program per (block, row)."""
    _check_euler(x, v, sigma, sigma_next, v_uncond, guidance)
    x, v = x.contiguous(), v.contiguous()
    v_uncond = v_uncond.contiguous() if v_uncond is not None else None
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rank, rows, frames, inner = _row_layout(x, sigma, sigma_next)
    _check_rows(rows)
    s_ptr, s_sb, s_sf, s_hi, _ = _sigma_args(sigma, x, rank)
    sn_ptr, sn_sb, sn_sf, sn_hi, _ = _sigma_args(sigma_next, x, rank)
    launch(
        _euler_step_kernel,
        _row_grid(inner, rows),
        (
            x, v, v_uncond if v_uncond is not None else v, out, s_ptr, sn_ptr,
            s_sb, s_sf, sn_sb, sn_sf,
            s_hi, sn_hi, float(guidance),
            frames, inner,
        ),
        device=x.device,
        configs=(launch_config(inner, x.dtype, x.device, "euler_step"),),
        constexprs=dict(
            S_SCALAR=not isinstance(sigma, torch.Tensor), SN_SCALAR=not isinstance(sigma_next, torch.Tensor),
            HAS_UNCOND=v_uncond is not None,
        ),
    )  # fmt: skip
    return out


def cfg_combine_triton(u: torch.Tensor, c: torch.Tensor, guidance: float) -> torch.Tensor:
    """Launcher: a flat elementwise pass."""
    _check_cfg(u, c, guidance)
    u, c = u.contiguous(), c.contiguous()
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    numel = out.numel()
    if numel == 0:
        return out
    launch(
        _cfg_combine_kernel,
        lambda meta: (triton.cdiv(numel, meta["BLOCK"]),),
        (u, c, out, numel, float(guidance)),
        device=u.device,
        configs=(launch_config(numel, u.dtype, u.device, "cfg_combine"),),
    )
    return out


# -------------------------------------------------------------------------------------------- public
def denoise_update(
    x_t: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma | None = None,
    noise: torch.Tensor | None = None,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x0 from a velocity prediction, and optionally the re-noised sample at the next sigma, in one pass.

    Args:
        x_t: ``[B, F, ...]`` the noisy sample.
        v: velocity prediction, x_t's shape (the conditional branch when `v_uncond` is given).
        sigma: noise level of x_t: a float, or a ``[B]`` / ``[B, F]`` tensor (per segment / per frame).
        sigma_next: noise level to re-noise to (needed when `noise` is given), same forms as `sigma`.
        noise: fresh noise, x_t's shape; without it no re-noise is done and ``x_next`` is None.
        v_uncond: unconditional velocity for classifier-free guidance, v's shape and dtype.
        guidance: guidance scale g (used only with `v_uncond`).
        compute_dtype: dtype of the x0 math, torch.float64 (default, as Self-Forcing) or torch.float32.

    Returns:
        ``(x0, x_next)`` in x_t's dtype; ``x_next`` is None when `noise` is None.
    """
    tensors = [t for t in (x_t, v, noise, v_uncond) if isinstance(t, torch.Tensor)]
    if resolve("denoise_update", *tensors) == "triton":
        return denoise_update_triton(x_t, v, sigma, sigma_next, noise, v_uncond, guidance, compute_dtype)
    return denoise_update_torch(x_t, v, sigma, sigma_next, noise, v_uncond, guidance, compute_dtype)


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    v_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Flow-matching Euler step ``x + (sigma_next - sigma) * v_eff`` in float32 (see the module docstring).

    `sigma`/`sigma_next` are floats or ``[B]`` / ``[B, F]`` tensors; with `v_uncond`, ``v_eff`` is the
    guided velocity ``v_uncond + guidance * (v - v_uncond)``. Returns x's dtype and shape.
    """
    tensors = [t for t in (x, v, v_uncond) if isinstance(t, torch.Tensor)]
    if resolve("euler_step", *tensors) == "triton":
        return euler_step_triton(x, v, sigma, sigma_next, v_uncond, guidance)
    return euler_step_torch(x, v, sigma, sigma_next, v_uncond, guidance)


def cfg_combine(u: torch.Tensor, c: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance ``u + guidance * (c - u)`` in float32, stored in u's dtype.

    Args:
        u: unconditional prediction; c: conditional prediction, u's shape and dtype.
        guidance: the guidance scale (1 returns c, 0 returns u).
    """
    tensors = [t for t in (u, c) if isinstance(t, torch.Tensor)]
    if resolve("cfg_combine", *tensors) == "triton":
        return cfg_combine_triton(u, c, guidance)
    return cfg_combine_torch(u, c, guidance)
