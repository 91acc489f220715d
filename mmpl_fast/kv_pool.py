"""The paged KV pool: preallocated pages, page allocation, per-call views, memory accounting.

Layout of the pool (one tensor each for keys and values)::

    k, v: [layers, num_pages, tokens_per_page, heads, head_dim]

A page holds the keys (or values) of one latent frame in one layer; page p of every layer belongs to
the same frame, so one page index names a frame's cache across all layers. Which frame lives in which
page is the caller's business (the engine keeps a map per segment); the pool only hands out free
pages and builds `CacheView`s, so the model never sees anything but tensors and page lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ModelConfig, resolve_config
from .kernels import PageTable
from .model import CacheView, CausalWanModel, CrossKV


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a configuration needs, by part."""

    weights: int
    pages: int
    cross: int

    @property
    def total(self) -> int:
        return self.weights + self.pages + self.cross

    def __str__(self) -> str:
        gib = 1024**3
        return (
            f"{self.total / gib:.2f} GiB (weights {self.weights / gib:.2f}, KV pages {self.pages / gib:.2f}, "
            f"cross-attention cache {self.cross / gib:.2f})"
        )


def page_bytes(config: str | ModelConfig, tokens_per_page: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one page across all layers, keys and values."""
    cfg = resolve_config(config)
    return 2 * cfg.num_layers * tokens_per_page * cfg.dim * _dtype_bytes(dtype)


def memory_bytes(
    config: str | ModelConfig,
    *,
    num_pages: int,
    tokens_per_page: int,
    num_prompts: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    include_weights: bool = True,
) -> MemoryEstimate:
    """Memory of weights, `num_pages` KV pages and the cross-attention cache of `num_prompts` prompts.

    Example: Wan2.1-1.3B, 21 latent frames of 1560 tokens in bf16 is about 6 GB of pages (DESIGN.md).
    """
    cfg = resolve_config(config)
    for name, value in (("num_pages", num_pages), ("tokens_per_page", tokens_per_page), ("num_prompts", num_prompts)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    size = _dtype_bytes(dtype)
    return MemoryEstimate(
        weights=cfg.num_parameters() * size if include_weights else 0,
        pages=num_pages * page_bytes(cfg, tokens_per_page, dtype),
        cross=2 * cfg.num_layers * num_prompts * cfg.text_len * cfg.dim * size,
    )


class KVPool:
    """Preallocated KV pages for every layer of one model, with a free list.

    Args:
        config: the model config (preset name or `ModelConfig`).
        num_pages: capacity in latent frames.
        tokens_per_page: tokens of one latent frame (`ModelConfig.tokens_per_frame`).
    """

    def __init__(
        self,
        config: str | ModelConfig,
        num_pages: int,
        tokens_per_page: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        cfg = self.config = resolve_config(config)
        if not isinstance(num_pages, int) or num_pages <= 0:
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        if not isinstance(tokens_per_page, int) or tokens_per_page <= 0:
            raise ValueError(f"tokens_per_page must be a positive int, got {tokens_per_page!r}")
        shape = (cfg.num_layers, num_pages, tokens_per_page, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest index first

    @classmethod
    def for_model(cls, model: CausalWanModel, num_pages: int, tokens_per_page: int) -> KVPool:
        return cls(model.config, num_pages, tokens_per_page, device=model.device, dtype=model.dtype)

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def tokens_per_page(self) -> int:
        return self.k.shape[2]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages (raises if the pool is too small, saying how many are free)."""
        if n > len(self._free):
            raise RuntimeError(
                f"KV pool exhausted: {n} pages requested, {len(self._free)} free of {self.num_pages}; "
                "build the pool with more pages (see memory_bytes)"
            )
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: Sequence[int]) -> None:
        """Return pages to the free list."""
        taken = set(range(self.num_pages)) - set(self._free)
        for p in pages:
            if p not in taken:
                raise ValueError(f"page {p} is not allocated")
            taken.discard(p)
            self._free.append(p)
        self._free.sort(reverse=True)

    def view(
        self,
        frame_pos: Sequence[int],
        write_pages: Sequence[Sequence[int]],
        read_pages: Sequence[Sequence[int]] | None = None,
        *,
        groups: Sequence[tuple[int, Sequence[int]]] | None = None,
    ) -> CacheView:
        """A view for one call over B segments of F frames each.

        Args:
            frame_pos: the F frames' true temporal indices (RoPE positions), shared by the batch.
            write_pages: ``B`` lists of F pages the call's frames are written to.
            read_pages: ``B`` lists of earlier pages each segment may read (its own pages are added).
            groups: split each segment's F frames into consecutive query groups, each ``(num_frames,
                visible)`` where `visible` lists the call's frames (indices into the F frames) the group
                attends to. This is how one call runs the teacher-forcing sequence ``[clean | noisy]`` with
                a different page list per query stage; `read_pages` is then not allowed.
        """
        frame_pos = tuple(int(p) for p in frame_pos)
        nseg = len(write_pages)
        if nseg == 0:
            raise ValueError("write_pages: at least one segment is required")
        if any(len(w) != len(frame_pos) for w in write_pages):
            raise ValueError(f"write_pages: every segment needs {len(frame_pos)} pages (one per frame)")
        read_pages = read_pages if read_pages is not None else [[] for _ in range(nseg)]
        if len(read_pages) != nseg:
            raise ValueError(f"read_pages: expected {nseg} lists (one per segment), got {len(read_pages)}")
        for pages in [*write_pages, *read_pages]:
            for p in pages:
                if not 0 <= p < self.num_pages:
                    raise ValueError(f"page {p} is outside the pool (0..{self.num_pages - 1})")
        if groups is None:
            lengths: list[int] | int = self.tokens_per_page * len(frame_pos)
            lists = [list(r) + list(w) for r, w in zip(read_pages, write_pages)]
        else:
            if any(read_pages):
                raise ValueError("read_pages: not allowed with groups (groups list what each group reads)")
            if sum(n for n, _ in groups) != len(frame_pos):
                raise ValueError(f"groups: their frame counts must add up to the call's {len(frame_pos)} frames")
            for _, visible in groups:
                if any(not 0 <= j < len(frame_pos) for j in visible):
                    raise ValueError(f"groups: visible frames must index the call's frames 0..{len(frame_pos) - 1}")
            lists = [[w[j] for j in visible] for w in write_pages for _, visible in groups]
            lengths = [n * self.tokens_per_page for _ in write_pages for n, _ in groups]
        device = self.k.device
        return CacheView(
            k=self.k,
            v=self.v,
            write_pages=torch.tensor([list(w) for w in write_pages], dtype=torch.long, device=device),
            table=PageTable.build(lists, lengths, device=device),
            frame_pos=frame_pos,
            frame_pos_dev=torch.tensor(frame_pos, dtype=torch.int32, device=device),
        )


class CrossAttentionCache:
    """Cross-attention K/V computed once per prompt and reused by every call of every segment."""

    def __init__(self) -> None:
        self._entries: dict[str, CrossKV] = {}

    def get(self, model: CausalWanModel, key: str, text_states: torch.Tensor) -> CrossKV:
        """K/V of one prompt (`text_states` ``[1, L, text_dim]``), computed on first use."""
        if key not in self._entries:
            with torch.no_grad():
                self._entries[key] = model.embed_context(text_states)
        return self._entries[key]

    def batch(self, keys: Sequence[str]) -> CrossKV:
        """Stack cached prompts into one batch (one row per segment): a copy of every layer's K/V, so callers
        build it once per stage (`StageEngine`), not per model call. One key returns the cached entry itself."""
        entries = [self._entries[k] for k in keys]
        if len(entries) == 1:
            return entries[0]
        return CrossKV(
            tuple(torch.cat([e.k[i] for e in entries]) for i in range(len(entries[0].k))),
            tuple(torch.cat([e.v[i] for e in entries]) for i in range(len(entries[0].v))),
        )

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
