"""LayerNorm (no affine) + per-frame adaLN modulation, and the gated residual add.

Math (Wan2.1, computed in float32, stored in x's dtype)::

    norm_modulate:   y[b, f, t] = LN(x[b, f, t]) * (1 + scale[b, f]) + shift[b, f]
                     LN(u) = (u - mean(u)) / sqrt(var(u) + eps)      over the channel dim C
    gated_residual:  out[b, f, t] = x[b, f, t] + y[b, f, t] * gate[b, f]

Shapes:
    x, y:               [B, F, T, C]   (T tokens per latent frame; one modulation row per frame)
    shift, scale, gate: [B, F, C]      float32 (any strides; broadcast over T)
    returns:            [B, F, T, C]   in x's dtype

Limits (what the tests cover): norm_modulate holds a row in one Triton program, so C <= 8192 there
(Wan-14B has 5120; the launcher raises above); gated_residual tiles C and has no limit. Any C (48, 96,
...), any T, any strides for every input (modulation rows are often chunks of a [B, F, 6, C] tensor).
fp32 and fp16 everywhere (the Triton interpreter included, also with the GPU tiles of the launch tables:
Wan's 1536 and 5120 channels, ragged row and channel tiles), bf16 on CUDA only. Outputs are contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import resolve, triton_available
from ._launch import DTYPE_NAMES, TABLE_ARCHS, launch, launch_arch, pick
from ._launch import Config as _C

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None


_MAX_C = 8192  # one Triton program holds a whole row for the LayerNorm statistics


def _check(x: torch.Tensor, **mods: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, F, T, C], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    b, f, _, c = x.shape
    for name, m in mods.items():
        if tuple(m.shape) != (b, f, c):
            raise ValueError(f"{name}: expected shape {(b, f, c)}, got {tuple(m.shape)}")
        if not m.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {m.dtype}")


# --------------------------------------------------------------------------------------------- torch
def norm_modulate_torch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reference and CPU backend."""
    _check(x, shift=shift, scale=scale)
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.float()[:, :, None]) + shift.float()[:, :, None]).to(x.dtype)


def gated_residual_torch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Reference and CPU backend."""
    _check(x, gate=gate)
    if y.shape != x.shape:
        raise ValueError(f"y: expected shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if not y.dtype.is_floating_point:
        raise TypeError(f"y: expected a floating-point tensor, got {y.dtype}")
    return (x.float() + y.float() * gate.float()[:, :, None]).to(x.dtype)


# -------------------------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _norm_modulate_kernel(
        x_ptr, shift_ptr, scale_ptr, out_ptr,
        x_stride_b, x_stride_f, x_stride_t, x_stride_c,
        shift_stride_b, shift_stride_f, shift_stride_c,
        scale_stride_b, scale_stride_f, scale_stride_c,
        out_stride_b, out_stride_f, out_stride_t,
        frames, tokens, channels, eps,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """BLOCK_T whole rows of one frame: y = (x - mean) * rstd * (1 + scale[b, f]) + shift[b, f], fp32."""
        pid_t = tl.program_id(0)
        bf = tl.program_id(1)
        b = (bf // frames).to(tl.int64)
        f = (bf % frames).to(tl.int64)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < channels
        mask = (offs_t < tokens)[:, None] & c_ok[None, :]
        t64 = offs_t.to(tl.int64)[:, None]

        x = tl.load(
            x_ptr + b * x_stride_b + f * x_stride_f + t64 * x_stride_t + offs_c[None, :] * x_stride_c,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        mean = tl.sum(x, axis=1) / channels
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / channels
        rstd = tl.rsqrt(var + eps)

        shift = tl.load(shift_ptr + b * shift_stride_b + f * shift_stride_f + offs_c * shift_stride_c, mask=c_ok)
        scale = tl.load(scale_ptr + b * scale_stride_b + f * scale_stride_f + offs_c * scale_stride_c, mask=c_ok)
        y = xc * rstd[:, None] * (1.0 + scale.to(tl.float32))[None, :] + shift.to(tl.float32)[None, :]
        out = out_ptr + b * out_stride_b + f * out_stride_f + t64 * out_stride_t + offs_c[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_residual_kernel(
        x_ptr, y_ptr, gate_ptr, out_ptr,
        x_stride_b, x_stride_f, x_stride_t, x_stride_c,
        y_stride_b, y_stride_f, y_stride_t, y_stride_c,
        gate_stride_b, gate_stride_f, gate_stride_c,
        out_stride_b, out_stride_f, out_stride_t,
        frames, tokens, channels,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """A [BLOCK_T, BLOCK_C] tile of one frame: out = x + y * gate[b, f], fp32."""
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        bf = tl.program_id(2)
        b = (bf // frames).to(tl.int64)
        f = (bf % frames).to(tl.int64)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < channels
        mask = (offs_t < tokens)[:, None] & c_ok[None, :]
        t64 = offs_t.to(tl.int64)[:, None]

        x = tl.load(
            x_ptr + b * x_stride_b + f * x_stride_f + t64 * x_stride_t + offs_c[None, :] * x_stride_c, mask=mask
        )
        y = tl.load(
            y_ptr + b * y_stride_b + f * y_stride_f + t64 * y_stride_t + offs_c[None, :] * y_stride_c, mask=mask
        )
        gate = tl.load(gate_ptr + b * gate_stride_b + f * gate_stride_f + offs_c * gate_stride_c, mask=c_ok)
        out = x.to(tl.float32) + y.to(tl.float32) * gate.to(tl.float32)[None, :]
        o_ptrs = out_ptr + b * out_stride_b + f * out_stride_f + t64 * out_stride_t + offs_c[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


# The launch tables: (arch, dtype) -> configuration (see `_launch`; the compile check proves every entry at
# Wan-1.3B and 14B widths). A program holds a [BLOCK_T, BLOCK_C] tile of at most ELEMENTS elements: whole rows
# for norm_modulate (BLOCK_C = C rounded up to a power of two, at least one row), channel tiles of at most
# MAX_C for gated_residual. Tiles shrink to the problem. The interpreter's rows (arch None) favour few, large
# programs (numpy does the inner work).
_GPU_NORM = _C.of(8, 1, ELEMENTS=4096)
_GPU_GATED = _C.of(8, 1, ELEMENTS=4096, MAX_C=2048)
NORM_CONFIGS: dict[tuple, _C] = {
    (None,): _C.of(1, 1, ELEMENTS=16384),
    **{(arch, dt): _GPU_NORM for arch in TABLE_ARCHS for dt in DTYPE_NAMES.values()},
}
GATED_CONFIGS: dict[tuple, _C] = {
    (None,): _C.of(1, 1, ELEMENTS=16384, MAX_C=8192),
    **{(arch, dt): _GPU_GATED for arch in TABLE_ARCHS for dt in DTYPE_NAMES.values()},
}


def _row_config(table: dict, op: str, tokens: int, channels: int, dtype: torch.dtype, device: torch.device) -> _C:
    """BLOCK_T x BLOCK_C tiles from the table's budget: as many rows as fit, whole rows or MAX_C channels."""
    cfg = pick(table, launch_arch(device), dtype, op)
    block_c = min(triton.next_power_of_2(channels), cfg.meta.get("MAX_C", _MAX_C))
    block_t = max(1, min(triton.next_power_of_2(tokens), cfg.meta["ELEMENTS"] // block_c))
    return _C.of(cfg.num_warps, cfg.num_stages, BLOCK_T=block_t, BLOCK_C=block_c)


def norm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Launcher: one program per (tile of rows, frame); the modulation rows are read once per tile.

    Any strides for x, shift and scale (e.g. chunks of a ``[B, F, 6, C]`` modulation tensor).
    """
    _check(x, shift=shift, scale=scale)
    batch, frames, tokens, channels = x.shape
    if channels > _MAX_C:
        raise ValueError(f"x: the Triton norm_modulate holds a row in one program, C <= {_MAX_C}; got C={channels}")
    cfg = _row_config(NORM_CONFIGS, "norm_modulate", tokens, channels, x.dtype, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    launch(
        _norm_modulate_kernel,
        lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), batch * frames),
        (
            x, shift, scale, out,
            *x.stride(), *shift.stride(), *scale.stride(), *out.stride()[:3],
            frames, tokens, channels, float(eps),
        ),
        device=x.device,
        configs=(cfg,),
    )  # fmt: skip
    return out


def gated_residual_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Launcher: one program per (tile of rows, tile of channels, frame). Any strides for x, y and gate."""
    _check(x, gate=gate)
    if y.shape != x.shape:
        raise ValueError(f"y: expected shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if not y.dtype.is_floating_point:
        raise TypeError(f"y: expected a floating-point tensor, got {y.dtype}")
    batch, frames, tokens, channels = x.shape
    cfg = _row_config(GATED_CONFIGS, "gated_residual", tokens, channels, x.dtype, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    launch(
        _gated_residual_kernel,
        lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(channels, meta["BLOCK_C"]), batch * frames),
        (
            x, y, gate, out,
            *x.stride(), *y.stride(), *gate.stride(), *out.stride()[:3],
            frames, tokens, channels,
        ),
        device=x.device,
        configs=(cfg,),
    )  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------- public


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` with one modulation row per latent frame (see module docstring)."""
    if resolve("norm_modulate", x, shift, scale) == "triton":
        return norm_modulate_triton(x, shift, scale, eps)
    return norm_modulate_torch(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` with one gate row per latent frame (see module docstring)."""
    if resolve("gated_residual", x, y, gate) == "triton":
        return gated_residual_triton(x, y, gate)
    return gated_residual_torch(x, y, gate)
