"""The causal Wan2.1 DiT: Wan2.1's exact math, with self-attention over a paged KV cache.

The model never owns a cache. Each call is handed a `CacheView`: the pool tensors, the pages its frames
are written to and the pages each segment may read (its own included). So one forward runs any stage
of any layout for a batch of segments, and bidirectional full-sequence calls are the special case of
one stage holding every frame.

Data flow of one call (B segments, F latent frames each, T tokens per frame, C = dim)::

    x [B, F, Cin, H, W] --patch--> [B, F*T, C] --blocks--> head --unpatch--> [B, F, Cout, H, W]
    timesteps [B, F] --sinusoid (float64)--> time MLP --> e [B, F, C], e6 [B, F, 6, C]  (per-frame adaLN)
    block: norm_modulate -> q,k,v -> RMS q/k norm -> rope_write (pages) -> stage_attention -> gated add
           -> cross-attention to the prompt's cached K/V -> norm_modulate -> FFN -> gated add

Parameter names follow the original Wan checkpoints (`blocks.0.self_attn.q.weight`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, resolve_config
from .kernels import PageTable, RopeTable, gated_residual, norm_modulate, rope_write, stage_attention


@dataclass(frozen=True, eq=False)
class CacheView:
    """What one forward call may touch in the KV pool.

    Attributes:
        k, v: ``[layers, P, T, H, D]`` the pool (written in place at `write_pages`).
        write_pages: int64 ``[B, F]`` device tensor: the page of each segment's frame in this call.
        table: the pages each of the B segments reads, its own `write_pages` included.
        frame_pos: host tuple of the F frames' true temporal indices (RoPE positions).
        frame_pos_dev: the same as an int32 device tensor.
    """

    k: torch.Tensor
    v: torch.Tensor
    write_pages: torch.Tensor
    table: PageTable
    frame_pos: tuple[int, ...]
    frame_pos_dev: torch.Tensor


@dataclass(frozen=True, eq=False)
class CrossKV:
    """Cross-attention keys/values of a batch of prompts, per layer: ``[B, L_text, H, D]`` each."""

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]

    def select(self, index: Sequence[int] | torch.Tensor) -> CrossKV:
        """Rows of the batch (e.g. the prompt of each segment in a batch of segments)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.k[0].device)
        return CrossKV(tuple(t.index_select(0, idx) for t in self.k), tuple(t.index_select(0, idx) for t in self.v))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan2.1's time embedding: ``[cos, sin]`` of t * 10000^(-i/half), computed in float64."""
    half = dim // 2
    pos = t.to(torch.float64).reshape(-1)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim in float32, then the weight (Wan's q/k norm across all heads)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, its affine weights included whatever their dtype (the cross-attention
    pre-norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, x: torch.Tensor, layer: int, view: CacheView, rope: RopeTable, grid_w: int) -> torch.Tensor:
        b, f, t, c = x.shape
        shape = (b, f, t, self.heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(shape)
        k = self.norm_k(self.k(x)).view(shape)
        v = self.v(x).view(shape)
        q = rope_write(q, k, v, view.k[layer], view.v[layer], view.write_pages, view.frame_pos_dev, rope, grid_w)
        o = stage_attention(q.reshape(b * f * t, self.heads, self.head_dim), view.k[layer], view.v[layer], view.table)
        return self.o(o.view(b, f, t, c))


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of embedded text ``[B, L, C]`` -> ``[B, L, H, D]`` each (computed once per prompt)."""
        b, n, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, n, self.heads, self.head_dim)
        return k, self.v(context).view(b, n, self.heads, self.head_dim)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        return self.o(o.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e6, layer, view, cross_k, cross_v, rope, grid_w):
        # x [B, F, T, C]; e6 [B, F, 6, C] float32: shift, scale, gate (attention), shift, scale, gate (FFN)
        b, f, t, c = x.shape
        mod = self.modulation.float()[None] + e6  # [B, F, 6, C]
        h = norm_modulate(x, mod[:, :, 0], mod[:, :, 1], self.eps)
        x = gated_residual(x, self.self_attn(h, layer, view, rope, grid_w), mod[:, :, 2])
        x = x + self.cross_attn(self.norm3(x).view(b, f * t, c), cross_k, cross_v).view(b, f, t, c)
        h = norm_modulate(x, mod[:, :, 3], mod[:, :, 4], self.eps)
        return gated_residual(x, self.ffn(h), mod[:, :, 5])


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        out = cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # Modulated by the time embedding itself, not by the six-way projection.
        mod = self.modulation.float()[None] + e.float()[:, :, None]  # [B, F, 2, C]
        return self.head(norm_modulate(x, mod[:, :, 0], mod[:, :, 1], self.eps))


class CausalWanModel(nn.Module):
    """Wan2.1 DiT whose self-attention reads and writes a paged KV cache through a `CacheView`."""

    def __init__(self, config: str | ModelConfig):
        super().__init__()
        cfg = self.config = resolve_config(config)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._rope: RopeTable | None = None

    def rope(self, device: torch.device) -> RopeTable:
        """The RoPE table on `device` (built lazily: the model may be created on the meta device)."""
        if self._rope is None or self._rope.cos.device != device:
            cfg = self.config
            self._rope = RopeTable.build(cfg.head_dim, cfg.rope_max, cfg.rope_theta, device=device)
        return self._rope

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def embed_context(self, text_states: torch.Tensor) -> CrossKV:
        """Text-encoder states ``[B, L, text_dim]`` -> per-layer cross-attention K/V (once per prompt).

        All L rows are embedded and attended without a mask, as Wan does (padding rows are zeros).
        """
        if text_states.dim() != 3 or text_states.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text_states: expected [B, L, {self.config.text_dim}], got shape {tuple(text_states.shape)}"
            )
        ctx = self.text_embedding(text_states.to(self.dtype))
        kv = [blk.cross_attn.kv(ctx) for blk in self.blocks]
        return CrossKV(tuple(k for k, _ in kv), tuple(v for _, v in kv))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cross: CrossKV, view: CacheView) -> torch.Tensor:
        """Predict the flow velocity of a batch of segments' frames.

        Args:
            x: ``[B, F, Cin, H, W]`` latents of the call's frames.
            timesteps: ``[B, F]`` (or ``[B]``) timestep of each frame, in [0, 1000].
            cross: cross-attention K/V with batch B (`embed_context`, `CrossKV.select`).
            view: pool pages this call writes and reads.

        Returns:
            ``[B, F, Cout, H, W]`` in x's dtype.
        """
        cfg = self.config
        if x.dim() != 5 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"x: expected [B, F, {cfg.in_channels}, H, W], got shape {tuple(x.shape)}")
        b, f, _, hh, ww = x.shape
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(b, f)
        if tuple(timesteps.shape) != (b, f):
            raise ValueError(f"timesteps: expected shape {(b, f)} (one per frame), got {tuple(timesteps.shape)}")
        if cross.batch != b:
            raise ValueError(f"cross: K/V for {cross.batch} prompts, but x has batch {b}")
        if len(view.frame_pos) != f or tuple(view.write_pages.shape) != (b, f):
            raise ValueError(f"view: written for {tuple(view.write_pages.shape)} (batch, frames), x has {(b, f)}")
        ph, pw = cfg.patch_size[1:]
        gh, gw = hh // ph, ww // pw
        limit = cfg.rope_max
        if max(view.frame_pos) >= limit or gh > limit or gw > limit or min(view.frame_pos) < 0:
            raise ValueError(
                f"RoPE positions out of range: frames {min(view.frame_pos)}..{max(view.frame_pos)}, grid {gh}x{gw}; "
                f"the table holds positions 0..{limit - 1} per axis (config.rope_max)"
            )
        t = gh * gw
        if view.k.shape[2] != t:
            raise ValueError(f"view: pool pages hold {view.k.shape[2]} tokens, a {hh}x{ww} latent frame has {t}")

        # [B, F, Cin, H, W] -> conv over each frame -> [B, F, T, C]. The patch and time embeddings run one
        # segment at a time: their small matrix products take other kernel paths for other batch sizes, and a
        # segment's video must not depend on how many segments share its call.
        h = torch.cat([self.patch_embedding(xs.transpose(1, 2).to(self.dtype)) for xs in x.split(1)])
        h = h.flatten(3).permute(0, 2, 3, 1).contiguous()

        sin = sinusoidal_embedding(cfg.freq_dim, timesteps).to(self.time_embedding[0].weight.dtype).view(b, f, -1)
        e = torch.cat([self.time_embedding(row) for row in sin])  # [B*F, C]
        e6 = torch.cat([self.time_projection(row) for row in e.view(b, f, -1)]).float().view(b, f, 6, cfg.dim)
        e = e.float().view(b, f, cfg.dim)

        rope = self.rope(x.device)
        for i, blk in enumerate(self.blocks):
            h = blk(h, e6, i, view, cross.k[i], cross.v[i], rope, gw)

        out = self.head(h, e)  # [B, F, T, pt*ph*pw*Cout]
        out = out.view(b, f, gh, gw, ph, pw, cfg.out_channels)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, f, cfg.out_channels, hh, ww).to(x.dtype)
