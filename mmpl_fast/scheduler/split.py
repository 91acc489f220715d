"""Moldable tasks: one stage task of one segment run across several devices at once, and where its KV pages go.

A `Split` says how a stage task (a plan, a re-encode's cache prefill, a populate stage) is divided among the
``ways`` devices of its placement (`Placement.devices`, the first one is the task's *home*):

* **head-parallel** (``heads = h``, DeepSpeed-Ulysses style): every device holds all weights and takes
  ``1/h`` of the stage's query tokens (sequence split) through the linear layers, the norms and the
  cross-attention; around the self-attention, one all-to-all turns q, k, v from sequence-split into
  head-split (each device gets every token of its heads) and one turns the output back. The KV pages the
  stage writes come out head-split, and the cached pages it reads must be head-split on the same devices.
  Heads that do not divide are padded: each device gets ``ceil(H / h)`` head slots (`head_slots`), the
  real heads spread as evenly as possible (`head_ranges`). Wan2.1-1.3B (12 heads): h = 2, 3, 4, 6 divide
  (6, 4, 3, 2 heads each); h = 5 pads to 15 (3 slots; real heads 3,3,2,2,2); h = 8 pads to 16 (2 slots;
  real heads 2,2,2,2,1,1,1,1): attention runs at 12/15 and 12/16 of the ideal. Wan2.1-14B (40 heads):
  h = 2, 4, 5, 8 divide (20, 10, 8, 5 heads each); h = 3, 6, 7 pad to 42.
* **guidance-branch parallel** (``branches = 2``, only with classifier-free guidance): the conditional
  and the unconditional call run on two devices, each with its own KV cache; the two velocities meet
  once per denoising step for the guidance combine.
* both (``heads = h, branches = 2``, 2h devices): device ``r`` runs branch ``r // h``, head group ``r % h``.

KV placement (``kv``): the pages a split task writes are either kept where they were computed
(``"split"``: each device keeps its heads / branch; a later task that runs split the same way on the same
devices reads them in place, any other reader collects the missing shards over the links) or gathered onto
the home device at the end of the task (``"gather"``: the task takes longer, its readers find whole pages
there). The cost model (`CostModel.split_cost`, `CostModel.move_seconds`) prices both; the policy chooses.

What an executor does with a widened placement ``p`` (``p.split`` not None), the contract:

1. every device in ``p.devices`` joins the launch at ``p.start`` (`Schedule.launches_on` lists it for each
   of them; it is always a launch of its own, stream 0); shard ``r`` = ``p.devices[r]`` runs
   ``p.split.shard(r, num_heads, branches)``: its guidance branches and its real head range. Per layer:
   norms, q/k/v projections and the RMS q/k norm (over the whole hidden size, as Wan does) on the
   device's token shard with all heads; all-to-all to (all tokens, its head slots); RoPE, page write and
   stage attention for its heads; all-to-all back; the rest on its token shard. A re-encode runs its VAE
   part on the home device and hands the two latents to the others;
2. its inputs: the stage's latents / noise (the keyed random numbers of the whole stage, as unsplit, of
   which each device keeps its token shard), the read frames' KV pages restricted to the shard's heads and
   branches (received as the `move_seconds` accounting says: only the cells a device lacks), the
   cross-attention cache of the prompt (every device holds it);
3. after the task, every device of the split holds the stage's final latents (an all-gather inside the
   task), and the written pages sit per ``p.split.kv``: head/branch-split on the devices, or whole on
   ``p.devices[0]``;
4. edges out of the task are served from those holdings: latents from the home device, pages from the
   devices that hold each (branch, head) cell (`holdings`).

Head-parallel attention is exact per head (heads are independent) and every other layer works token by
token, so a split computes the same function as the unsplit task; only the matmul shapes of a token shard
differ, which can change float rounding (the executor states its tolerance).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

KV_MODES = ("split", "gather")
MAX_BRANCHES = 2


@dataclass(frozen=True)
class Split:
    """How one task runs across ``ways = heads * branches`` devices (see the module docstring).

    Attributes:
        heads: head-parallel ways (Ulysses all-to-all around attention); 1: not head-split.
        branches: 2 to run the guidance branches on separate devices (needs guidance > 1), else 1.
        kv: ``"split"`` (written KV pages stay with the shard that computed them) or ``"gather"`` (collected
            onto the home device, ``Placement.devices[0]``, at the end of the task).
    """

    heads: int = 1
    branches: int = 1
    kv: str = "split"

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"Split.heads must be a positive int, got {self.heads!r}")
        if self.branches not in (1, MAX_BRANCHES) or isinstance(self.branches, bool):
            raise ValueError(f"Split.branches must be 1 or 2, got {self.branches!r}")
        if self.kv not in KV_MODES:
            raise ValueError(f"Split.kv must be one of {', '.join(KV_MODES)}, got {self.kv!r}")
        if self.ways < 2:
            raise ValueError(f"Split: heads * branches must be >= 2 (an unsplit task has no Split), got {self}")

    @property
    def ways(self) -> int:
        """Devices the task runs on."""
        return self.heads * self.branches

    @property
    def kind(self) -> str:
        """``"heads"``, ``"branch"`` or ``"heads+branch"``."""
        if self.branches == 1:
            return "heads"
        return "branch" if self.heads == 1 else "heads+branch"

    def shard(self, rank: int, num_heads: int, num_branches: int) -> tuple[tuple[int, ...], tuple[int, int]]:
        """What device ``rank`` of the placement computes: (guidance branches, real head range [lo, hi))."""
        if not 0 <= rank < self.ways:
            raise ValueError(f"rank must be in [0, {self.ways}), got {rank!r}")
        branches = (rank // self.heads,) if self.branches == 2 else tuple(range(num_branches))
        return branches, _head_ranges(num_heads, self.heads)[rank % self.heads]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ways": self.ways, "heads": self.heads, "branches": self.branches, "kv": self.kv}


def head_slots(num_heads: int, ways: int) -> int:
    """Heads per device after padding `num_heads` to a multiple of `ways` (Ulysses' all-to-all needs equal
    chunks): ``ceil(num_heads / ways)``."""
    return -(-num_heads // ways)


def head_ranges(num_heads: int, ways: int) -> list[tuple[int, int]]:
    """Contiguous real-head ranges per device, sizes differing by at most one (the padding heads, zeros, fill
    the rest of each device's `head_slots`)."""
    if ways < 1 or num_heads < 1:
        raise ValueError(f"num_heads and ways must be positive, got {num_heads!r}, {ways!r}")
    return list(_head_ranges(num_heads, ways))


@functools.lru_cache(maxsize=256)
def _head_ranges(num_heads: int, ways: int) -> tuple[tuple[int, int], ...]:
    base, extra = divmod(num_heads, ways)
    out, lo = [], 0
    for r in range(ways):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return tuple(out)


# A holding: which (branch, head range) cells of a task's KV pages each device has. Cells are the unit of
# the move accounting: bytes per cell = page bytes / (branches * heads).
Cells = tuple[tuple[int, tuple[int, ...], tuple[int, int]], ...]  # (device, branches, (lo, hi)) per device


def holdings(devices: tuple[int, ...], split: Split | None, num_heads: int, num_branches: int) -> Cells:
    """Where the KV pages a task wrote live: whole on the home device, or per shard (``kv="split"``)."""
    if split is None or split.kv == "gather":
        return ((devices[0], tuple(range(num_branches)), (0, num_heads)),)
    return needs(devices, split, num_heads, num_branches)


def needs(devices: tuple[int, ...], split: Split | None, num_heads: int, num_branches: int) -> Cells:
    """What a task reads of its inputs' KV pages, per device: everything on the home device when unsplit,
    each shard's branches and heads when split."""
    if split is None:
        return ((devices[0], tuple(range(num_branches)), (0, num_heads)),)
    return tuple((d, *split.shard(r, num_heads, num_branches)) for r, d in enumerate(devices))


def _overlap(a: tuple[tuple[int, ...], tuple[int, int]], b: tuple[tuple[int, ...], tuple[int, int]]) -> int:
    common = len(set(a[0]) & set(b[0]))
    return common * max(0, min(a[1][1], b[1][1]) - max(a[1][0], b[1][0]))


def move_cells(have: Cells, want: Cells) -> tuple[int, int, int]:
    """(most cells one device receives, most cells one device sends, messages) to bring `want` from `have`.

    A device receives the cells it wants from the devices that hold them (never from itself); the busiest
    receiver and the busiest sender set the time (every device has its own link, as with NVLink/NVSwitch or
    one PCIe lane set per device)."""
    recv: dict[int, int] = {}
    send: dict[int, int] = {}
    messages = 0
    for dst, *w in want:
        for src, *h in have:
            if src == dst:
                continue
            n = _overlap(tuple(w), tuple(h))
            if n:
                recv[dst] = recv.get(dst, 0) + n
                send[src] = send.get(src, 0) + n
                messages += 1
    return max(recv.values(), default=0), max(send.values(), default=0), messages


def all_to_all_fraction(ways: int) -> float:
    """Share of a sequence-split tensor's total size that each device sends in one all-to-all: ``(k-1)/k^2``."""
    return (ways - 1) / ways**2 if ways > 1 else 0.0


def split_tokens(tokens: int, ways: int) -> int:
    """Query tokens of the largest sequence shard."""
    return math.ceil(tokens / ways)
