"""Stage attention over a paged KV pool.

Math, per query group g and head h (bidirectional; no mask inside the pages a group reads)::

    K_g = concat(k_pool[p] for p in pages[g])          # [n_g * T, D]
    V_g = concat(v_pool[p] for p in pages[g])
    out[q] = softmax(scale * q K_g^T) V_g               # for every query token q of group g

Shapes:
    q:       [Nq, H, D]  queries of all groups, packed along Nq (see `PageTable.q_offsets`)
    k_pool:  [P, T, H, D] one layer of the pool: P pages of T tokens (T = tokens per latent frame)
    v_pool:  [P, T, H, D]
    table:   `PageTable` with G groups
    returns: [Nq, H, D] in q's dtype

A group's own frames are written to their pages (`rope_write`) before this call and listed in its page
list, so tokens of one stage see each other (bidirectional) and earlier stages only through the pages
the layout grants: causality lives in the page lists, not in a mask. One launch serves every group of
a batch (many segments, or the query stages of a teacher-forcing sequence); keyframe pages shared by
several groups are read in place. A group with no pages returns zeros.

Limits (what the tests cover): fp32 and fp16 everywhere (the Triton interpreter included); bf16 on
CUDA only; head dims up to 256 (the Triton path pads D to a power of two); any T (tiles are masked
at page ends); groups of unequal length and page count. The interpreter tests run the kernel both with
its interpreter tiles and with every GPU configuration of `CONFIGS` (fp16 stands for bf16: they share
rows): two query tiles and two key tiles per page with ragged last tiles, pages out of pool order, an
empty group, and a whole 1560-token frame at head dim 128 with sm_90's 128 x 64 tiles (13 x 25 tiles).
The Triton kernel keeps the online softmax in fp32.

Launch configurations: `CONFIGS`, one table per (arch, dtype, head-dim bound), proven by
``python -m mmpl_fast.kernels.compile_check`` (no spills, shared memory within each arch's limit, tensor
cores in bf16/fp16). fp32 runs too, with small no-tensor-core tiles (IEEE dots, exact but slow) that fit
every arch; use bf16/fp16 on a GPU for speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import resolve, triton_available
from ._launch import TABLE_ARCHS, launch, launch_arch, pick, to_device
from ._launch import Config as _C
from .page_table import PageTable

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

_LOG2E = 1.4426950408889634


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: PageTable) -> None:
    if not isinstance(table, PageTable):
        raise TypeError(f"table: expected a PageTable, got {type(table).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q: expected [Nq, H, D], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"k_pool/v_pool: expected equal shapes [P, T, H, D], got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    if k_pool.shape[2:] != q.shape[1:]:
        raise ValueError(f"q heads/head_dim {tuple(q.shape[1:])} do not match the pool's {tuple(k_pool.shape[2:])}")
    if q.shape[0] != table.num_queries:
        raise ValueError(f"q: the table packs {table.num_queries} query tokens, q has {q.shape[0]}")
    if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
        raise TypeError(f"q, k_pool, v_pool must share a dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim {q.shape[-1]} is above the supported 256")


# --------------------------------------------------------------------------------------------- torch
def _long_tensor(values: list, device: torch.device) -> torch.Tensor:
    """Host ints as an int64 tensor on `device` (on a GPU through pinned memory: the host does not wait)."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def stage_attention_torch(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: PageTable, scale: float | None = None
) -> torch.Tensor:
    """Reference and CPU backend: gather each group's pages, then SDPA.

    Cost is proportional to the pages actually read. Groups with the same query length and page count
    (all of them for a batch of segments at one stage) run as one batched SDPA call, so a call makes one
    SDPA call per distinct (length, page count), not one per group. Each pool is gathered with a single
    indexing op and SDPA reads q, keys and values as strided ``[B, H, *, D]`` views. (Head-major copies
    make a CPU's SDPA 10-15% faster, but the transposing copy costs as much; written straight from an
    `index_select` it is one small parallel copy per page, which stalls badly when other processes load
    the cores.) Page lists and offsets come from the table's host copies; index tensors reach a GPU without
    a host sync. Differentiable in q, k_pool, v_pool.
    """
    _check(q, k_pool, v_pool, table)
    nq, heads, dim = q.shape
    tokens = k_pool.shape[1]
    offsets = table.host_q_offsets
    buckets: dict[tuple[int, int], list[int]] = {}  # (query length, page count) -> groups
    for g, pages in enumerate(table.host_pages):
        if pages and offsets[g + 1] > offsets[g]:
            buckets.setdefault((offsets[g + 1] - offsets[g], len(pages)), []).append(g)
    covered = sum(length * len(groups) for (length, _), groups in buckets.items())
    out = None
    for (length, npages), groups in buckets.items():
        b, first = len(groups), groups[0]
        idx = _long_tensor([table.host_pages[g] for g in groups], k_pool.device)  # [B, n]
        k = k_pool[idx].reshape(b, npages * tokens, heads, dim).transpose(1, 2)  # [B, H, n*T, D] view
        v = v_pool[idx].reshape(b, npages * tokens, heads, dim).transpose(1, 2)
        consecutive = groups == list(range(first, first + b))
        if consecutive:
            rows = slice(offsets[first], offsets[first] + b * length)
            qg = q[rows]
        else:
            starts = _long_tensor([offsets[g] for g in groups], q.device)
            rows = (starts[:, None] + torch.arange(length, device=q.device)).flatten()
            qg = q.index_select(0, rows)
        qg = qg.view(b, length, heads, dim).transpose(1, 2)  # [B, H, L, D] view
        o = F.scaled_dot_product_attention(qg, k, v, scale=scale).transpose(1, 2)  # [B, L, H, D]
        if consecutive and b * length == nq:  # the only batch, covering every query
            return o.reshape(nq, heads, dim).contiguous()  # SDPA writes [B, L, H, D] for such q: no copy
        if out is None:
            out = q.new_empty(nq, heads, dim) if covered == nq else q.new_zeros(nq, heads, dim)
        if consecutive:
            out[rows].view(b, length, heads, dim).copy_(o)
        else:
            out.index_copy_(0, rows, o.reshape(b * length, heads, dim))
    return out if out is not None else q.new_zeros(nq, heads, dim)


# -------------------------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _stage_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, pages_ptr, counts_ptr, q_offsets_ptr,
        q_stride_n, q_stride_h,
        k_stride_p, k_stride_t, k_stride_h,
        v_stride_p, v_stride_t, v_stride_h,
        o_stride_n, o_stride_h,
        pages_stride_g,
        tokens_per_page, head_dim, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One (query tile, group, head): online softmax over every key tile of every page the group lists.

        The pages x tiles loop is one flat loop (tile j of the group: page j // tiles, tokens from
        (j % tiles) * BLOCK_N), so Triton pipelines loads across page boundaries; the last tile of each page
        is masked when BLOCK_N does not divide the page.
        """
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(q_offsets_ptr + g).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
        q_len = tl.load(q_offsets_ptr + g + 1) - q_start
        if pid_m * BLOCK_M >= q_len:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < q_len
        d_ok = offs_d < (BLOCK_D if EVEN_D else head_dim)  # EVEN_D: a constant mask, no per-element compare
        q_ptrs = q_ptr + (q_start + offs_m)[:, None] * q_stride_n + h * q_stride_h + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        tiles = tl.cdiv(tokens_per_page, BLOCK_N)
        for j in range(0, tl.load(counts_ptr + g) * tiles):
            i = j // tiles
            n = (j - i * tiles) * BLOCK_N + offs_n
            n_ok = n < tokens_per_page
            page = tl.load(pages_ptr + g * pages_stride_g + i).to(tl.int64)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + page * k_stride_p + h * k_stride_h + n[:, None] * k_stride_t + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # fmt: skip
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + page * v_stride_p + h * v_stride_h + n[:, None] * v_stride_t + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # fmt: skip
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = o_ptr + (q_start + offs_m)[:, None] * o_stride_n + h * o_stride_h + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# The launch table: (arch, dtype, head-dim bound) -> proven configurations, the first the default (see
# `_launch`). `python -m mmpl_fast.kernels.compile_check` compiles every entry for its arch at Wan shapes and
# checks registers, spills and shared memory. bf16 and fp16 share their rows, so the interpreter tests in
# fp16 run the bf16 tiles. fp32 takes the no-tensor-core IEEE path: small tiles that fit every arch without
# spills (slow; use bf16/fp16 on a GPU). The interpreter's row (arch None) favours few, large programs.
_TC = {  # tensor-core rows (bf16, fp16) for head dims <= 128 and <= 256
    (80, 128): (
        _C.of(8, 3, BLOCK_M=128, BLOCK_N=64),
        _C.of(8, 3, BLOCK_M=128, BLOCK_N=32),
        _C.of(4, 2, BLOCK_M=64, BLOCK_N=64),
    ),
    (89, 128): (
        _C.of(8, 3, BLOCK_M=128, BLOCK_N=64),
        _C.of(8, 3, BLOCK_M=128, BLOCK_N=32),
        _C.of(4, 2, BLOCK_M=64, BLOCK_N=64),
    ),
    (90, 128): (_C.of(8, 3, BLOCK_M=128, BLOCK_N=64), _C.of(8, 3, BLOCK_M=128, BLOCK_N=128)),
    (80, 256): (_C.of(8, 2, BLOCK_M=64, BLOCK_N=32),),
    (89, 256): (_C.of(8, 2, BLOCK_M=64, BLOCK_N=32),),
    (90, 256): (_C.of(8, 2, BLOCK_M=64, BLOCK_N=64),),
}
_FP32 = {128: (_C.of(4, 2, BLOCK_M=32, BLOCK_N=16),), 256: (_C.of(4, 2, BLOCK_M=16, BLOCK_N=16),)}
CONFIGS: dict[tuple, tuple[_C, ...]] = {
    **{(None, d): (_C.of(1, 1, BLOCK_M=32, BLOCK_N=32),) for d in (128, 256)},
    **{(arch, dt, d): cfg for (arch, d), cfg in _TC.items() for dt in ("bf16", "fp16")},
    **{(arch, "fp32", d): cfg for arch in TABLE_ARCHS for d, cfg in _FP32.items()},
}


def launch_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[_C, ...]:
    """The proven configurations for this head dim, dtype and device (interpreter: one large-tile config)."""
    return pick(CONFIGS, launch_arch(device), dtype, "stage_attention", 128 if head_dim <= 128 else 256)


def stage_attention_triton(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: PageTable, scale: float | None = None
) -> torch.Tensor:
    """Launcher: one program per (query tile, group, head); page lists are read on the device."""
    _check(q, k_pool, v_pool, table)
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("k_pool/v_pool: the head dimension must be contiguous")
    q = q if q.stride(-1) == 1 else q.contiguous()
    nq, heads, dim = q.shape
    configs = launch_configs(dim, q.dtype, q.device)
    out = torch.empty_like(q)
    if nq == 0:
        return out
    table = table.to(q.device)
    scale = (1.0 / math.sqrt(dim)) if scale is None else float(scale)
    block_d = max(16, triton.next_power_of_2(dim))
    max_q, groups = table.max_q_len, table.num_groups
    launch(
        _stage_attention_kernel,
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), groups, heads),
        (
            q, k_pool, v_pool, out, table.pages, table.counts, table.q_offsets,
            q.stride(0), q.stride(1),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
            out.stride(0), out.stride(1),
            table.pages.stride(0),
            k_pool.shape[1], dim, scale * _LOG2E,
        ),
        device=q.device,
        configs=configs,
        constexprs=dict(BLOCK_D=block_d, EVEN_D=block_d == dim, IEEE=q.dtype == torch.float32),
        autotune_key=("tokens_per_page", "head_dim"),
    )  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------- public
def stage_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: PageTable, scale: float | None = None
) -> torch.Tensor:
    """Attention of packed query groups over the pool pages each group lists (see the module docstring).

    Args:
        q: ``[Nq, H, D]`` queries, packed by `table.q_offsets`.
        k_pool, v_pool: ``[P, T, H, D]`` one layer of the KV pool.
        table: the pages each group reads (own pages included).
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``[Nq, H, D]`` in q's dtype.
    """
    if resolve("stage_attention", q, k_pool, v_pool) == "triton":
        return stage_attention_triton(q, k_pool, v_pool, table, scale)
    return stage_attention_torch(q, k_pool, v_pool, table, scale)
