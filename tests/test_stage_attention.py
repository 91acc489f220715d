"""Stage attention over a paged KV pool: the Triton kernel and the torch reference (the CPU backend).

The Triton kernel runs under ``use_backend("triton")`` (the CPU interpreter here, set by conftest) and is
held to the accuracy rule of `accuracy.py` against a float64 reference written out in this file (explicit
per-group concatenation of pages, then softmax), not against the torch backend. The torch backend is
checked against the same reference on its uniform (one batched call) and non-uniform (per group) paths.
Two equivalences tie page lists to dense masking: the MMPL segment layout of DESIGN.md section 3, and the
teacher-forcing sequence ``[clean | noisy]`` with one page list per query stage.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from accuracy import ATOL, DEVICE, DTYPES, assert_close_to_reference
from torch.utils._python_dispatch import TorchDispatchMode

from mmpl_fast.kernels import PageTable, stage_attention, use_backend
from mmpl_fast.kernels._launch import TABLE_ARCHS, recording, target_arch
from mmpl_fast.kernels.stage_attention import stage_attention_torch, stage_attention_triton

sa_mod = importlib.import_module("mmpl_fast.kernels.stage_attention")  # the package re-exports the function
# torch reference vs float64: fp32 and fp16 CPU SDPA accumulate in fp32, so the error is the output rounding
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def exact_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_lists: list[list[int]],
    q_lengths: list[int],
    scale: float | None = None,
) -> torch.Tensor:
    """float64 reference, group by group: concatenate the listed pages, softmax(scale q K^T) V; no pages -> 0."""
    q, k_pool, v_pool = q.double(), k_pool.double(), v_pool.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    start = 0
    for pages, n in zip(page_lists, q_lengths, strict=True):
        if pages and n:
            k = torch.cat([k_pool[p] for p in pages])  # [n_pages * T, H, D]
            v = torch.cat([v_pool[p] for p in pages])
            s = torch.einsum("qhd,khd->hqk", q[start : start + n], k) * scale
            out[start : start + n] = torch.einsum("hqk,khd->qhd", s.softmax(dim=-1), v)
        start += n
    assert start == q.shape[0]
    return out


# ------------------------------------------------------------------------------------- awkward shapes
@dataclass(frozen=True)
class Case:
    """One table over a pool of `pool_pages` pages of `tokens` tokens; `q_layout` says how q is strided."""

    name: str
    tokens: int
    heads: int
    head_dim: int
    pages: tuple[tuple[int, ...], ...]
    q_lengths: tuple[int, ...]
    pool_pages: int
    scale: float | None = None
    q_layout: str = "contiguous"  # "fused": q is a slice of a [Nq, 3, H, D] qkv; "transposed": D not contiguous

    def __str__(self) -> str:
        return self.name

    def make(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PageTable]:
        nq, h, d = sum(self.q_lengths), self.heads, self.head_dim
        if self.q_layout == "fused":
            q = randn(nq, 3, h, d, dtype=dtype)[:, 0]
        elif self.q_layout == "transposed":
            q = randn(nq, d, h, dtype=dtype).transpose(1, 2)
        else:
            q = randn(nq, h, d, dtype=dtype)
        k_pool = randn(self.pool_pages, self.tokens, h, d, dtype=dtype)
        v_pool = randn(self.pool_pages, self.tokens, h, d, dtype=dtype)
        table = PageTable.build(self.pages, list(self.q_lengths), device=DEVICE)
        return q, k_pool, v_pool, table


CASES = [
    # T = 10 < one 32-token tile; every group 2 frames reading 3 pages: the torch backend's batched path
    Case("T10-uniform", 10, 2, 32, ((0, 1, 2), (3, 4, 0)), (20, 20), 6),
    # one group: one stage of one segment, pages out of order
    Case("one-group", 37, 2, 32, ((3, 1, 0),), (40,), 4),
    # T = 37: a full tile plus a 5-token tail per page; 1-page group; unequal lengths and counts; shared page 0
    Case("T37-ragged", 37, 2, 64, ((0, 1, 2), (5,), (6, 7, 3, 0)), (45, 7, 33), 8),
    # groups with no pages (-> zeros) and a group with no queries, between ordinary ones
    Case("empty-groups", 10, 2, 32, ((), (1, 2), (), (0,), (3, 1)), (5, 12, 9, 0, 14), 4),
    # keyframe pages 0, 1 shared by every group, pages out of order, a custom scale
    Case("shared-scale", 16, 3, 32, ((0, 1, 2, 3), (0, 1, 4), (6, 5, 0, 1, 2, 3)), (24, 8, 40), 7, scale=0.3),
    # q sliced out of a fused qkv projection (row stride 3 H D); uniform
    Case("fused-qkv", 10, 2, 64, ((2, 0), (1, 2)), (15, 15), 3, q_layout="fused"),
    # q with a non-contiguous head dimension
    Case("transposed-q", 10, 2, 32, ((1,), (0, 1)), (10, 7), 2, q_layout="transposed"),
    # groups 0 and 2 share a (length, page count): one batched call over non-adjacent query rows
    Case("interleaved", 10, 2, 32, ((0, 1), (2,), (3, 0)), (8, 5, 8), 4),
    # head dim 128, once, small
    Case("D128", 12, 1, 128, ((0, 1), (2,)), (16, 8), 3),
    # head dim that is not a power of two (the kernel pads it)
    Case("D40", 10, 2, 40, ((0, 1), (1,)), (9, 11), 2),
]


def _case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def _empty_rows(case: Case) -> list[tuple[int, int]]:
    offsets = [0]
    for n in case.q_lengths:
        offsets.append(offsets[-1] + n)
    return [(offsets[g], offsets[g + 1]) for g, pl in enumerate(case.pages) if not pl]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_float64(case, dtype):
    q, k_pool, v_pool, table = case.make(dtype)
    exact = exact_attention(q, k_pool, v_pool, case.pages, case.q_lengths, case.scale)
    with use_backend("triton"):
        out = stage_attention(q, k_pool, v_pool, table, scale=case.scale)
    with use_backend("torch"):
        torch_out = stage_attention(q, k_pool, v_pool, table, scale=case.scale)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert_close_to_reference(out, torch_out, exact)
    for a, b in _empty_rows(case):  # a group with no pages attends to nothing: exactly zero
        assert (out[a:b] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_matches_float64(case, dtype):
    q, k_pool, v_pool, table = case.make(dtype)
    exact = exact_attention(q, k_pool, v_pool, case.pages, case.q_lengths, case.scale)
    out = stage_attention_torch(q, k_pool, v_pool, table, scale=case.scale)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), exact, atol=ATOL[dtype], rtol=RTOL[dtype])
    for a, b in _empty_rows(case):
        assert (out[a:b] == 0).all()


def test_cases_cover_the_torch_paths():
    """The torch backend batches groups of equal (query length, page count): one batch covering every query,
    several batches of adjacent groups, and a batch of non-adjacent groups must all be among the cases."""
    uniform = {str(c): PageTable.build(c.pages, list(c.q_lengths)).uniform() for c in CASES}
    assert uniform["T10-uniform"] and uniform["fused-qkv"]
    assert not uniform["T37-ragged"] and not uniform["empty-groups"] and not uniform["interleaved"]
    interleaved = _case("interleaved")
    assert interleaved.q_lengths[0] == interleaved.q_lengths[2] != interleaved.q_lengths[1]


def test_torch_accepts_pools_of_any_strides():
    """The CPU path takes pools the Triton kernel rejects (head dim not contiguous)."""
    case = _case("T37-ragged")
    q, k_pool, v_pool, table = case.make(torch.float64)
    k_strided = k_pool.transpose(-1, -2).contiguous().transpose(-1, -2)
    v_strided = v_pool.transpose(0, 1).contiguous().transpose(0, 1)
    assert k_strided.stride(-1) != 1 and not v_strided.is_contiguous()
    exact = exact_attention(q, k_pool, v_pool, case.pages, case.q_lengths)
    torch.testing.assert_close(stage_attention_torch(q, k_strided, v_strided, table), exact)


def test_uniform_table_without_pages_gives_zeros():
    table = PageTable.build([[], []], 6)
    q, pool = randn(12, 2, 32), randn(2, 5, 2, 32)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            assert (stage_attention(q, pool, pool, table) == 0).all()


@pytest.mark.parametrize("case", [_case(n) for n in ("T10-uniform", "one-group", "T37-ragged", "interleaved")], ids=str)
def test_gradients_reach_q_and_pool_pages(case):
    """The torch backend is the training path: gradients flow to q and to exactly the pages that were read."""
    q, k_pool, v_pool, table = case.make(torch.float64)
    for t in (q, k_pool, v_pool):
        t.requires_grad_(True)
    stage_attention_torch(q, k_pool, v_pool, table).square().sum().backward()
    read = sorted({p for pl in case.pages for p in pl})
    unread = sorted(set(range(case.pool_pages)) - set(read))
    assert q.grad.abs().sum() > 0
    for grad in (k_pool.grad, v_pool.grad):
        assert (grad[read].flatten(1).abs().sum(1) > 0).all() and (grad[unread] == 0).all()

    def exact_loss(q, k_pool, v_pool):
        return exact_attention(q, k_pool, v_pool, case.pages, case.q_lengths).square().sum()

    want = torch.autograd.grad(exact_loss(q, k_pool, v_pool), (q, k_pool, v_pool))
    for got, ref in zip((q.grad, k_pool.grad, v_pool.grad), want):
        torch.testing.assert_close(got, ref)


# ------------------------------------------------------------------------------------ MMPL layout
# DESIGN.md section 3, one segment of 21 latent frames: (frames of the stage, frames it reads besides itself)
MMPL_STAGES = [
    ((0, 1), ()),
    ((2, 3, 10, 11, 12, 19, 20), (0, 1)),
    ((4, 5, 6, 7, 8, 9), (0, 1, 2, 3, 10, 11, 12)),
    ((13, 14, 15, 16, 17, 18), (*range(13), 19, 20)),
]
NUM_FRAMES = 21


def _frame_mask(visible: dict[int, set[int]], num_frames: int, tokens: int) -> torch.Tensor:
    """Boolean ``[F*T, F*T]`` token mask from a frame -> visible frames map (frame-major token order)."""
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for i, cols in visible.items():
        mask[i, sorted(cols)] = True
    return mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1).to(DEVICE)


def _dense(q, k, v, mask, dtype):
    """Dense masked SDPA over every frame: ``[N, H, D]`` tensors, bool mask ``[N, N]`` (True = attend)."""
    o = F.scaled_dot_product_attention(*(t.to(dtype).transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask)
    return o[0].transpose(0, 1)


def _tokens(frames, tokens: int) -> torch.Tensor:
    return torch.tensor([f * tokens + t for f in frames for t in range(tokens)], device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mmpl_layout_equals_dense_masked_sdpa(backend):
    """Every stage of a segment in one call, each reading its pages in a shuffled pool (page != frame index),
    equals dense SDPA over all 21 frames with the layout's frame mask."""
    tokens, heads, dim = 6, 2, 32
    q_all, k_all, v_all = (randn(NUM_FRAMES * tokens, heads, dim, dtype=torch.float64) for _ in range(3))
    page_of = torch.randperm(NUM_FRAMES + 3).tolist()  # frame f lives in page page_of[f]; 3 pages unused
    k_pool = torch.zeros(NUM_FRAMES + 3, tokens, heads, dim, device=DEVICE, dtype=torch.float64)
    v_pool = torch.zeros_like(k_pool)
    for f in range(NUM_FRAMES):
        k_pool[page_of[f]] = k_all[f * tokens : (f + 1) * tokens]
        v_pool[page_of[f]] = v_all[f * tokens : (f + 1) * tokens]
    visible = {f: set(frames) | set(reads) for frames, reads in MMPL_STAGES for f in frames}
    assert not visible[4] & {19, 20} and {19, 20} <= visible[13]  # stage 2 does not see the terminal frames
    mask = _frame_mask(visible, NUM_FRAMES, tokens)

    rows = _tokens([f for frames, _ in MMPL_STAGES for f in frames], tokens)  # packed, stage by stage
    table = PageTable.build(
        [[page_of[f] for f in (*reads, *frames)] for frames, reads in MMPL_STAGES],
        [len(frames) * tokens for frames, _ in MMPL_STAGES],
        device=DEVICE,
    )
    exact = _dense(q_all, k_all, v_all, mask, torch.float64)[rows]
    dense32 = _dense(q_all, k_all, v_all, mask, torch.float32)[rows]
    with use_backend(backend):
        out = stage_attention(q_all[rows].float(), k_pool.float(), v_pool.float(), table)
    assert_close_to_reference(out, dense32, exact)

    # causality lives in the page lists: pages no stage-2 query reads do not change its output
    stage2 = slice(table.host_q_offsets[2], table.host_q_offsets[3])
    for f in (13, 14, 15, 16, 17, 18, 19, 20):
        k_pool[page_of[f]] += 5.0
        v_pool[page_of[f]] -= 3.0
    with use_backend(backend):
        again = stage_attention(q_all[rows].float(), k_pool.float(), v_pool.float(), table)
    assert torch.equal(again[stage2], out[stage2])
    assert not torch.equal(again, out)


class _Recorder(TorchDispatchMode):
    """Records every op the torch backend dispatches, with its output sizes and dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, torch.dtype]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [(t.numel(), t.dtype) for t in flat if isinstance(t, torch.Tensor)]))
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_teacher_forcing_groups_equal_dense_masked_attention(backend):
    """Training: the sequence is [clean | noisy] (42 frames). Noisy tokens of stage k see the noisy tokens of
    stage k and the clean frames stage k reads; clean tokens of stage k see the clean frames it reads and its
    own clean frames. One call, one page list per query stage over a pool of clean and noisy pages, equals
    dense masked attention over the whole sequence; the op never builds a mask."""
    tokens, heads, dim = 4, 2, 32
    n = NUM_FRAMES
    seq = 2 * n  # frame j < n: clean frame j; frame n + j: noisy frame j
    q_all, k_all, v_all = (randn(seq * tokens, heads, dim, dtype=torch.float64) for _ in range(3))
    page_of = list(range(seq))[::-1]  # the pool holds the sequence's frames in reverse order
    k_pool = torch.stack([k_all[page_of.index(p) * tokens : (page_of.index(p) + 1) * tokens] for p in range(seq)])
    v_pool = torch.stack([v_all[page_of.index(p) * tokens : (page_of.index(p) + 1) * tokens] for p in range(seq)])

    visible: dict[int, set[int]] = {}
    groups: list[tuple[tuple[int, ...], list[int]]] = []  # (sequence frames of the query group, frames read)
    for noisy in (False, True):
        for frames, reads in MMPL_STAGES:
            own = [n * noisy + f for f in frames]
            read = [*reads, *own] if noisy else [*reads, *frames]
            groups.append((tuple(own), read))
            visible.update({f: set(read) for f in own})
    mask = _frame_mask(visible, seq, tokens)
    # spot checks of the rule: noisy stage 2 reads clean 0..3, 10..12 and noisy 4..9; clean never reads noisy
    assert visible[n + 4] == {0, 1, 2, 3, 10, 11, 12, *range(n + 4, n + 10)}
    assert all(c < n for f in range(n) for c in visible[f])

    rows = _tokens([f for own, _ in groups for f in own], tokens)
    table = PageTable.build(
        [[page_of[f] for f in read] for _, read in groups], [len(own) * tokens for own, _ in groups], device=DEVICE
    )
    exact = _dense(q_all, k_all, v_all, mask, torch.float64)[rows]
    dense32 = _dense(q_all, k_all, v_all, mask, torch.float32)[rows]
    q, kp, vp = q_all[rows].float(), k_pool.float(), v_pool.float()
    recorder = _Recorder()
    with use_backend(backend), recorder if backend == "torch" else contextlib.nullcontext():
        out = stage_attention(q, kp, vp, table)
    assert_close_to_reference(out, dense32, exact)
    if backend == "torch":  # no boolean mask and nothing of dense-score size is ever materialised
        dense_scores = q.shape[0] * seq * tokens
        assert recorder.ops, "the recorder saw no ops"
        for op, outputs in recorder.ops:
            assert all(dt != torch.bool and numel < dense_scores for numel, dt in outputs), op


# ------------------------------------------------------------------------------------------ bad input
def _bad_inputs():
    table = PageTable.build([[0, 1], [1]], [4, 3], device=DEVICE)
    q, pool = randn(7, 2, 16), randn(2, 5, 2, 16)
    return [
        ("table-not-pagetable", (q, pool, pool, [[0, 1], [1]]), TypeError, "PageTable"),
        ("q-rank", (q.flatten(1), pool, pool, table), ValueError, "q"),
        ("pool-rank", (q, pool.flatten(2), pool.flatten(2), table), ValueError, "k_pool"),
        ("k-v-shapes", (q, pool, pool[:, :4], table), ValueError, "k_pool/v_pool"),
        ("heads", (randn(7, 3, 16), pool, pool, table), ValueError, "heads"),
        ("head-dim", (randn(7, 2, 8), pool, pool, table), ValueError, "head_dim"),
        ("q-length", (q[:6], pool, pool, table), ValueError, "7 query tokens"),
        ("dtype", (q.half(), pool, pool, table), TypeError, "dtype"),
        ("kv-dtype", (q, pool, pool.double(), table), TypeError, "dtype"),
        ("head-dim-above-256", (randn(7, 1, 272), *(randn(2, 5, 1, 272),) * 2, table), ValueError, "256"),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, args, exc, match", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises(backend, name, args, exc, match):
    with use_backend(backend), pytest.raises(exc, match=match):
        stage_attention(*args)


def test_triton_rejects_pool_with_strided_head_dim():
    table = PageTable.build([[0]], 3, device=DEVICE)
    q, pool = randn(3, 2, 16), randn(1, 4, 16, 2).transpose(-1, -2)
    with pytest.raises(ValueError, match="head dimension must be contiguous"):
        stage_attention_triton(q, pool, pool, table)


# ---------------------------------------------------------------------------------------- GPU tiles
# The interpreter runs the kernel with every configuration its launch table holds for a GPU. bf16 and fp16
# share their rows (checked below), so fp16 here runs the bf16 tiles too; fp32 has its own small tiles.
def _table_configs() -> list[tuple[str, int, object]]:
    """(dtype name, head-dim bound, configuration) for every distinct GPU configuration in the table."""
    seen = set()
    for (arch, *key), configs in sa_mod.CONFIGS.items():
        if arch is not None and key[0] != "bf16":
            seen.update((key[0], key[1], c) for c in configs)
    return sorted(seen, key=str)


def _tile_case(head_dim: int, config) -> Case:
    """A case that reaches every loop of `config`'s tiles: the first group has two query tiles (the last ragged)
    and reads three pages out of pool order, each two key tiles (the last ragged); a group without pages; a
    group shorter than one query tile."""
    m, n = config.meta["BLOCK_M"], config.meta["BLOCK_N"]
    return Case(f"tiles-{config}", n + n // 2 + 1, 1, head_dim, ((3, 0, 2), (), (1,)), (m + 3, 5, m // 2 + 1), 4)


def _recorded_tiles(case: Case, q, k_pool, v_pool, table) -> tuple[int, int]:
    """(query tiles of the longest group, key tiles per page) of the launch the launcher makes."""
    with recording() as launches:
        stage_attention_triton(q, k_pool, v_pool, table)
    meta = launches[0].configs[0].meta
    return -(-table.max_q_len // meta["BLOCK_M"]), -(-case.tokens // meta["BLOCK_N"])


@pytest.mark.parametrize("dtype_name, head_dim, config", _table_configs(), ids=lambda x: str(x).replace(" ", "-"))
def test_triton_gpu_tiles_match_float64(dtype_name, head_dim, config, monkeypatch):
    """Each GPU configuration of the table (defaults and autotune candidates): several query and key tiles,
    ragged last tiles, pages out of order, an empty group, against the float64 reference."""
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if DEVICE == "cuda" and config not in sa_mod.launch_configs(head_dim, dtype, torch.device(DEVICE)):
        pytest.skip("a configuration of another GPU's row (it may not fit this GPU's shared memory)")
    monkeypatch.setattr(sa_mod, "launch_configs", lambda *_: (config,))
    case = _tile_case(head_dim, config)
    q, k_pool, v_pool, table = case.make(dtype)
    assert _recorded_tiles(case, q, k_pool, v_pool, table) == (2, 2)
    assert case.q_lengths[0] % config.meta["BLOCK_M"] and case.tokens % config.meta["BLOCK_N"]  # ragged tails
    exact = exact_attention(q, k_pool, v_pool, case.pages, case.q_lengths)
    with use_backend("triton"):
        out = stage_attention(q, k_pool, v_pool, table)
    assert_close_to_reference(out, stage_attention_torch(q, k_pool, v_pool, table), exact)
    empty = slice(case.q_lengths[0], case.q_lengths[0] + case.q_lengths[1])
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("arch", TABLE_ARCHS)
def test_launcher_picks_the_table_row_of_its_arch(arch):
    """Under `target_arch`, the launcher offers exactly its table's row for that arch, dtype and head dim."""
    table = PageTable.build([[0]], 4)
    for dtype, name in ((torch.float16, "fp16"), (torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for dim, bound in ((128, 128), (40, 128), (256, 256)):
            q, pool = torch.zeros(4, 1, dim, dtype=dtype), torch.zeros(1, 4, 1, dim, dtype=dtype)
            with target_arch(arch), recording() as launches:
                stage_attention_triton(q, pool, pool, table)
            assert launches[0].configs == sa_mod.CONFIGS[(arch, name, bound)]
            assert launches[0].constexprs["EVEN_D"] == (dim == bound)
    with target_arch(arch), pytest.raises(TypeError, match="bf16, fp16, fp32"):
        stage_attention_triton(
            torch.zeros(4, 1, 16, dtype=torch.float64), *(torch.zeros(1, 4, 1, 16, dtype=torch.float64),) * 2, table
        )


def test_triton_wan_frame_at_gpu_tiles():
    """A whole 1560-token latent frame at head dim 128, attending to itself, with sm_90's fp16 (= bf16) tiles:
    13 query tiles (the last 24 rows) x 25 key tiles (the last 24 tokens)."""
    case = Case("wan-frame", 1560, 1, 128, ((0,),), (1560,), 1)
    q, k_pool, v_pool, table = case.make(torch.float16)
    with target_arch(90):
        assert _recorded_tiles(case, q, k_pool, v_pool, table) == (13, 25)
    exact = exact_attention(q, k_pool, v_pool, case.pages, case.q_lengths)
    with use_backend("triton"), target_arch(90):
        out = stage_attention(q, k_pool, v_pool, table)
    assert_close_to_reference(out, stage_attention_torch(q, k_pool, v_pool, table), exact)


def test_bf16_and_fp16_share_table_rows():
    """The fp16 interpreter tests stand for bf16 on a GPU only because both dtypes pick the same tiles."""
    gpu_rows = [key for key in sa_mod.CONFIGS if key[0] is not None]
    assert {key[0] for key in gpu_rows} == set(TABLE_ARCHS)
    for arch, dt, d in gpu_rows:
        if dt == "bf16":
            assert sa_mod.CONFIGS[(arch, "fp16", d)] == sa_mod.CONFIGS[(arch, dt, d)]
