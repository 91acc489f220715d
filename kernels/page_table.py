"""`PageTable`: which KV-pool pages each query group may read.

A *query group* is the tokens of one stage of one segment (or, in training, one query stage of one
sequence). Its keys and values are the concatenation of the pages it lists, in order. Pages shared by
many groups (keyframes) are listed by each of them and read in place, never copied::

    pool pages:   [ p0 | p1 | p2 | p3 | p4 | p5 | ... ]       each page = one latent frame, T tokens
    group 0 reads  p0 p1 p2 p3                               (its own frames' pages included)
    group 1 reads  p0 p1 p4                                  (p0, p1 shared with group 0)
    queries:      [ group 0 tokens | group 1 tokens ]        packed; q_offsets = [0, L0, L0 + L1]

The table holds device tensors for kernels and host copies for the CPU path, so neither backend has
to read device memory from the host inside a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._launch import to_device


@dataclass(frozen=True, eq=False)
class PageTable:
    """Page lists and packed query offsets of G query groups.

    Attributes:
        pages: int32 ``[G, max(1, max_pages)]`` page indices, padded with -1.
        counts: int32 ``[G]`` number of valid entries per row of `pages`.
        q_offsets: int32 ``[G + 1]`` start of each group's queries in the packed query tensor.
        host_pages: the same page lists as Python tuples.
        host_q_offsets: the same offsets as a Python tuple.
    """

    pages: torch.Tensor
    counts: torch.Tensor
    q_offsets: torch.Tensor
    host_pages: tuple[tuple[int, ...], ...]
    host_q_offsets: tuple[int, ...]

    @classmethod
    def build(
        cls,
        page_lists: Sequence[Sequence[int]],
        q_lengths: Sequence[int] | int,
        device: torch.device | str = "cpu",
    ) -> PageTable:
        """Build a table from host lists. `q_lengths` is one length per group, or one for all groups."""
        host_pages = tuple(tuple(int(p) for p in pl) for pl in page_lists)
        groups = len(host_pages)
        if groups == 0:
            raise ValueError("page_lists: at least one query group is required")
        if isinstance(q_lengths, int):
            q_lengths = [q_lengths] * groups
        if len(q_lengths) != groups:
            raise ValueError(f"q_lengths: expected {groups} lengths (one per group), got {len(q_lengths)}")
        if any(int(n) < 0 for n in q_lengths):
            raise ValueError(f"q_lengths: lengths must be >= 0, got {list(q_lengths)}")
        if any(p < 0 for pl in host_pages for p in pl):
            raise ValueError("page_lists: page indices must be >= 0")
        width = max(1, max(len(pl) for pl in host_pages))
        padded = [list(pl) + [-1] * (width - len(pl)) for pl in host_pages]
        offsets = [0]
        for n in q_lengths:
            offsets.append(offsets[-1] + int(n))
        device = torch.device(device)
        return cls(
            pages=to_device(torch.tensor(padded, dtype=torch.int32), device),
            counts=to_device(torch.tensor([len(pl) for pl in host_pages], dtype=torch.int32), device),
            q_offsets=to_device(torch.tensor(offsets, dtype=torch.int32), device),
            host_pages=host_pages,
            host_q_offsets=tuple(offsets),
        )

    @property
    def num_groups(self) -> int:
        return len(self.host_pages)

    @property
    def num_queries(self) -> int:
        return self.host_q_offsets[-1]

    @property
    def max_q_len(self) -> int:
        return max(b - a for a, b in zip(self.host_q_offsets[:-1], self.host_q_offsets[1:]))

    @property
    def max_pages(self) -> int:
        return max(len(pl) for pl in self.host_pages)

    def q_length(self, group: int) -> int:
        return self.host_q_offsets[group + 1] - self.host_q_offsets[group]

    def uniform(self) -> bool:
        """True when every group has the same query length and the same number of pages."""
        lengths = {self.q_length(g) for g in range(self.num_groups)}
        counts = {len(pl) for pl in self.host_pages}
        return len(lengths) == 1 and len(counts) == 1

    def pages_read(self) -> int:
        """Total (group, page) pairs: the work the attention does is proportional to this times the query length."""
        return sum(len(pl) for pl in self.host_pages)

    def useful_flops(self, tokens_per_page: int, num_heads: int, head_dim: int) -> int:
        """FLOPs of the unmasked attention work (QK^T and PV, 2 multiply-adds each)."""
        total = 0
        for g, pl in enumerate(self.host_pages):
            total += 4 * self.q_length(g) * len(pl) * tokens_per_page * num_heads * head_dim
        return total

    def to(self, device: torch.device | str) -> PageTable:
        """The table with its tensors on `device` (itself when they are there already). Host tensors reach a
        GPU through pinned memory pinned under that GPU's guard: no host wait, no context on another GPU."""
        device = torch.device(device)
        if self.pages.device == device:
            return self
        return PageTable(
            pages=to_device(self.pages, device),
            counts=to_device(self.counts, device),
            q_offsets=to_device(self.q_offsets, device),
            host_pages=self.host_pages,
            host_q_offsets=self.host_q_offsets,
        )
