"""3D RoPE at absolute frame positions, fused with the write of k and v into their pool pages.

Math (Wan2.1 RoPE; pairs are adjacent elements (2j, 2j+1) of each head)::

    pos(token, j) = t  for j <  Jt            t = frame_pos[f] (the frame's true temporal index)
                    y  for Jt <= j < Jt + Jh  y = token // grid_w
                    x  otherwise              x = token %  grid_w
    (a, b) = (u[2j], u[2j+1]);  c = cos[pos, j];  s = sin[pos, j]
    rope(u)[2j] = a c - b s;  rope(u)[2j+1] = a s + b c

    q_out = rope(q);  k_pool[write_pages[b, f]] = rope(k[b, f]);  v_pool[write_pages[b, f]] = v[b, f]

Shapes:
    q, k, v:      [B, F, T, H, D]   T = grid_h * grid_w tokens per latent frame
    k_pool/v_pool:[P, T, H, D]      one layer of the pool (written in place)
    write_pages:  int [B, F]        page of each (segment, frame)
    frame_pos:    int [F]           true temporal index of each frame (may be non-contiguous)
    cos, sin:     float32 [max_pos, D/2] the RopeTable columns: t, then h, then w frequencies
    returns q_out: [B, F, T, H, D] in q's dtype

Limits (what the tests cover): positions must be < max_pos (checked by the caller on host values; the
table does not wrap, and the Triton kernel does not bounds-check it). fp32 and fp16 everywhere (the Triton
interpreter included), bf16 on CUDA only; any even head dim (the Triton path pads D to a power of two),
any T; in the interpreter also with the GPU tiles (`CONFIGS`): ragged token tiles and head groups. q, k, v
may be strided views (e.g. of a fused qkv projection); the pools need a contiguous head dim. Both paths
round rotated k to k's dtype before storing it in the pool's dtype. Duplicate pages in `write_pages` leave
an unspecified one of the writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import resolve, triton_available
from ._launch import DTYPE_NAMES, TABLE_ARCHS, launch, launch_arch, pick, to_device
from ._launch import Config as _C

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None


@dataclass(frozen=True, eq=False)
class RopeTable:
    """cos/sin of Wan2.1's 3D RoPE, ``[max_pos, head_dim // 2]`` each, float32.

    Columns ``[0, t_pairs)`` rotate with the frame index, the next ``h_pairs`` with the token row,
    the rest with the token column. Wan splits a head of size d as d - 4*(d//6), 2*(d//6), 2*(d//6).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    t_pairs: int
    h_pairs: int

    @classmethod
    def build(cls, head_dim: int, max_pos: int = 1024, theta: float = 10000.0, device="cpu") -> RopeTable:
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        dims = [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]
        pos = torch.arange(max_pos, dtype=torch.float64)
        angles = [torch.outer(pos, 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)) for d in dims]
        ang = torch.cat(angles, dim=1)
        return cls(
            cos=ang.cos().float().to(device),
            sin=ang.sin().float().to(device),
            t_pairs=dims[0] // 2,
            h_pairs=dims[1] // 2,
        )

    @property
    def max_pos(self) -> int:
        return self.cos.shape[0]

    def to(self, device) -> RopeTable:
        return RopeTable(self.cos.to(device), self.sin.to(device), self.t_pairs, self.h_pairs)


def _check(q, k, v, k_pool, v_pool, write_pages, frame_pos, rope: RopeTable, grid_w: int) -> None:
    if q.dim() != 5 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v: expected equal shapes [B, F, T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, f, t, h, d = q.shape
    if k_pool.shape != v_pool.shape or k_pool.dim() != 4 or tuple(k_pool.shape[1:]) != (t, h, d):
        raise ValueError(f"k_pool/v_pool: expected [P, {t}, {h}, {d}], got {tuple(k_pool.shape)}")
    if tuple(write_pages.shape) != (b, f):
        raise ValueError(f"write_pages: expected shape {(b, f)}, got {tuple(write_pages.shape)}")
    if tuple(frame_pos.shape) != (f,):
        raise ValueError(f"frame_pos: expected shape {(f,)}, got {tuple(frame_pos.shape)}")
    if write_pages.dtype.is_floating_point or write_pages.dtype.is_complex or write_pages.dtype == torch.bool:
        raise TypeError(f"write_pages: expected an integer tensor, got {write_pages.dtype}")
    if frame_pos.dtype.is_floating_point or frame_pos.dtype.is_complex or frame_pos.dtype == torch.bool:
        raise TypeError(f"frame_pos: expected an integer tensor, got {frame_pos.dtype}")
    if not isinstance(rope, RopeTable):
        raise TypeError(f"rope: expected a RopeTable, got {type(rope).__name__}")
    if rope.cos.shape[1] * 2 != d:
        raise ValueError(f"rope table is for head_dim {rope.cos.shape[1] * 2}, got {d}")
    if grid_w <= 0 or t % grid_w:
        raise ValueError(f"grid_w={grid_w} must divide the {t} tokens per frame")


# --------------------------------------------------------------------------------------------- torch
def _angles(frame_pos: torch.Tensor, tokens: int, grid_w: int, rope: RopeTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (frame, token, pair) cos and sin, ``[F, T, D/2]``."""
    tok = torch.arange(tokens, device=rope.cos.device)
    rows, cols = tok // grid_w, tok % grid_w
    a, b = rope.t_pairs, rope.t_pairs + rope.h_pairs
    f = frame_pos.long().to(rope.cos.device)
    nf = f.shape[0]

    def pick(table: torch.Tensor) -> torch.Tensor:
        t_part = table[f, :a][:, None, :].expand(nf, tokens, a)
        h_part = table[rows, a:b][None].expand(nf, tokens, b - a)
        w_part = table[cols, b:][None].expand(nf, tokens, table.shape[1] - b)
        return torch.cat([t_part, h_part, w_part], dim=-1)

    return pick(rope.cos), pick(rope.sin)


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x ``[B, F, T, H, D]`` by cos/sin ``[F, T, D/2]`` in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, :, None, :], sin[None, :, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


def rope_write_torch(q, k, v, k_pool, v_pool, write_pages, frame_pos, rope: RopeTable, grid_w: int) -> torch.Tensor:
    """Reference and CPU backend."""
    _check(q, k, v, k_pool, v_pool, write_pages, frame_pos, rope, grid_w)
    cos, sin = _angles(frame_pos, q.shape[2], grid_w, rope)
    idx = write_pages.reshape(-1).long()
    k_pool.index_copy_(0, idx, apply_rope_torch(k, cos, sin).flatten(0, 1).to(k_pool.dtype))
    v_pool.index_copy_(0, idx, v.flatten(0, 1).to(v_pool.dtype))
    return apply_rope_torch(q, cos, sin)


# -------------------------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _rope_write_kernel(
        q_ptr, k_ptr, v_ptr, qo_ptr, kp_ptr, vp_ptr, pages_ptr, fpos_ptr, cos_ptr, sin_ptr,
        q_stride_b, q_stride_f, q_stride_t, q_stride_h, q_stride_d,
        k_stride_b, k_stride_f, k_stride_t, k_stride_h, k_stride_d,
        v_stride_b, v_stride_f, v_stride_t, v_stride_h, v_stride_d,
        qo_stride_b, qo_stride_f, qo_stride_t, qo_stride_h,
        kp_stride_p, kp_stride_t, kp_stride_h,
        vp_stride_p, vp_stride_t, vp_stride_h,
        pages_stride_b, pages_stride_f, fpos_stride, cos_stride, sin_stride,
        frames, tokens, heads, head_dim, grid_w, t_pairs, th_pairs,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
    ):  # fmt: skip
        """One (token tile, head group, frame): rotate q/k, write rope(k) and v to the frame's page.

        cos/sin are gathered once per tile ([BLOCK_T, BLOCK_D/2], shared by the heads of the group); a head
        row is loaded whole and split into its (even, odd) pairs, so loads and stores stay contiguous.
        """
        pid_t = tl.program_id(0)
        pid_h = tl.program_id(1)
        bf = tl.program_id(2)
        b = bf // frames
        f = bf % frames
        half: tl.constexpr = BLOCK_D // 2

        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, half)
        t_ok = offs_t < tokens
        mask = t_ok[:, None] & (offs_d < head_dim)[None, :]
        mask_j = t_ok[:, None] & (offs_j < head_dim // 2)[None, :]

        # position of every (token, pair): frame index, token row or token column (Wan's t/h/w split)
        f_pos = tl.load(fpos_ptr + f * fpos_stride).to(tl.int64)
        row = (offs_t // grid_w).to(tl.int64)
        col = (offs_t % grid_w).to(tl.int64)
        jj = offs_j[None, :]
        pos = tl.where(jj < t_pairs, f_pos, tl.where(jj < th_pairs, row[:, None], col[:, None]))
        cos = tl.load(cos_ptr + pos * cos_stride + jj, mask=mask_j, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * sin_stride + jj, mask=mask_j, other=0.0).to(tl.float32)

        page = tl.load(pages_ptr + b * pages_stride_b + f * pages_stride_f).to(tl.int64)
        b64 = b.to(tl.int64)
        f64 = f.to(tl.int64)
        t64 = offs_t.to(tl.int64)[:, None]
        q_row = q_ptr + b64 * q_stride_b + f64 * q_stride_f + t64 * q_stride_t + offs_d[None, :] * q_stride_d
        k_row = k_ptr + b64 * k_stride_b + f64 * k_stride_f + t64 * k_stride_t + offs_d[None, :] * k_stride_d
        v_row = v_ptr + b64 * v_stride_b + f64 * v_stride_f + t64 * v_stride_t + offs_d[None, :] * v_stride_d
        qo_row = qo_ptr + b64 * qo_stride_b + f64 * qo_stride_f + t64 * qo_stride_t + offs_d[None, :]
        kp_row = kp_ptr + page * kp_stride_p + t64 * kp_stride_t + offs_d[None, :]
        vp_row = vp_ptr + page * vp_stride_p + t64 * vp_stride_t + offs_d[None, :]

        h_start = pid_h * HEADS_PER_PROG
        for h in range(h_start, tl.minimum(h_start + HEADS_PER_PROG, heads)):
            q = tl.load(q_row + h * q_stride_h, mask=mask, other=0.0).to(tl.float32)
            qa, qb = tl.split(tl.reshape(q, [BLOCK_T, half, 2]))
            q_rot = tl.interleave(qa * cos - qb * sin, qa * sin + qb * cos)
            tl.store(qo_row + h * qo_stride_h, q_rot.to(qo_ptr.dtype.element_ty), mask=mask)

            k = tl.load(k_row + h * k_stride_h, mask=mask, other=0.0).to(tl.float32)
            ka, kb = tl.split(tl.reshape(k, [BLOCK_T, half, 2]))
            k_rot = tl.interleave(ka * cos - kb * sin, ka * sin + kb * cos)
            # round to k's dtype first, as the reference does, then to the pool's
            k_rot = k_rot.to(k_ptr.dtype.element_ty).to(kp_ptr.dtype.element_ty)
            tl.store(kp_row + h * kp_stride_h, k_rot, mask=mask)

            v = tl.load(v_row + h * v_stride_h, mask=mask, other=0.0)
            tl.store(vp_row + h * vp_stride_h, v.to(vp_ptr.dtype.element_ty), mask=mask)


# The launch table: (arch, dtype) -> configuration (see `_launch`; the compile check proves every entry at
# Wan shapes). BLOCK_T tokens x a whole head (BLOCK_D = head_dim rounded up to a power of two) per tile, for
# HEADS_PER_PROG heads: BLOCK_T is for heads of up to 128 and halves per doubling above; tiles shrink to the
# problem. The interpreter's row (arch None) takes every head in one program (numpy does the inner work).
CONFIGS: dict[tuple, _C] = {
    (None,): _C.of(1, 1, BLOCK_T=64, HEADS_PER_PROG=1 << 30),
    **{(arch, dt): _C.of(4, 1, BLOCK_T=32, HEADS_PER_PROG=4) for arch in TABLE_ARCHS for dt in DTYPE_NAMES.values()},
}


def launch_config(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> _C:
    """The table's configuration for this dtype and device, with its tiles shrunk to the problem."""
    cfg = pick(CONFIGS, launch_arch(device), dtype, "rope_write")
    block_d = max(2, triton.next_power_of_2(head_dim))
    block_t = max(1, min(cfg.meta["BLOCK_T"] * 128 // max(128, block_d), triton.next_power_of_2(tokens)))
    return _C.of(cfg.num_warps, cfg.num_stages, BLOCK_T=block_t, HEADS_PER_PROG=min(heads, cfg.meta["HEADS_PER_PROG"]))


def rope_write_triton(q, k, v, k_pool, v_pool, write_pages, frame_pos, rope: RopeTable, grid_w: int) -> torch.Tensor:
    """Launcher: one program per (token tile, head group, frame); one pass over q, k and v.

    q, k, v may be any strided views (e.g. slices of a fused qkv projection); the pools need a
    contiguous head dimension. Returns rotated q as a new contiguous tensor.
    """
    _check(q, k, v, k_pool, v_pool, write_pages, frame_pos, rope, grid_w)
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("k_pool/v_pool: the head dimension must be contiguous")
    device = q.device
    batch, frames, tokens, heads, dim = q.shape
    cfg = launch_config(tokens, heads, dim, q.dtype, device)
    cos, sin = to_device(rope.cos, device).contiguous(), to_device(rope.sin, device).contiguous()
    write_pages, frame_pos = to_device(write_pages, device), to_device(frame_pos, device)
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    if out.numel() == 0:
        return out
    launch(
        _rope_write_kernel,
        lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(heads, meta["HEADS_PER_PROG"]), batch * frames),
        (
            q, k, v, out, k_pool, v_pool, write_pages, frame_pos, cos, sin,
            *q.stride(), *k.stride(), *v.stride(), *out.stride()[:4],
            *k_pool.stride()[:3], *v_pool.stride()[:3],
            *write_pages.stride(), frame_pos.stride(0), cos.stride(0), sin.stride(0),
            frames, tokens, heads, dim, grid_w, rope.t_pairs, rope.t_pairs + rope.h_pairs,
        ),
        device=device,
        configs=(cfg,),
        constexprs=dict(BLOCK_D=max(2, triton.next_power_of_2(dim))),
    )  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------- public


def rope_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    write_pages: torch.Tensor,
    frame_pos: torch.Tensor,
    rope: RopeTable,
    grid_w: int,
) -> torch.Tensor:
    """Rotate q and k at absolute positions, write rotated k and plain v into their pages; return rotated q.

    See the module docstring for shapes. `k_pool`/`v_pool` are updated in place.
    """
    if resolve("rope_write", q, k, v, k_pool, v_pool) == "triton":
        return rope_write_triton(q, k, v, k_pool, v_pool, write_pages, frame_pos, rope, grid_w)
    return rope_write_torch(q, k, v, k_pool, v_pool, write_pages, frame_pos, rope, grid_w)
