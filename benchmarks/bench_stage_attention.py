"""Stage attention over a paged KV pool against FlexAttention, dense masked SDPA and (on CUDA) flash-attn/xformers.

Run: ``pytest benchmarks/bench_stage_attention.py --benchmark-only``.

Every implementation solves the same problem: the query groups of a `PageTable` built from a layout's stages
for S segments whose frames live in one pool (segment s, frame f -> page ``s * F + f``), the packed queries
ordered segment by segment, stage by stage. Useful work is `PageTable.useful_flops` (QK^T and PV over the
pages each group may read, nothing masked) for every row, so FLOP/s compare like for like.

* paged: `stage_attention` (the torch backend on a CPU, the Triton kernel on CUDA). Its page gathers are timed.
* FlexAttention: ``torch.compile(flex_attention)`` with a block mask made from the same page lists, over each
  segment's frames laid out ``[S, H, F*T, D]``. The layout and the block mask are made outside the timing.
* dense masked SDPA: the same ``[S, H, F*T, D]`` keys/values (all frames) and a boolean ``[L, F*T]`` mask,
  made outside the timing.

CPU (float32): a tiny geometry and Wan's head geometry (12 heads x 128) at 156 tokens per latent frame for
the MMPL segment layout (stages 1, 2, 3 as separate calls and as one call). Each row gives useful GFLOP/s and
their share of the same machine's ``torch.mm`` throughput (2048^3 float32). Columns marked "paired" come from
a second timing in the same test where the row, a matmul and (for the paged row) the FlexAttention and dense
rows of the same problem run in turn, round by round, so load from other processes hits all of them alike.

CUDA (bfloat16, Wan-1.3B: 1560 tokens per frame, 12 x 128; one Wan-14B row with 40 heads): MMPL plan/populate
stages for 4 segments and Self-Forcing AR blocks of 3 frames reading up to 21, with the Triton kernel, the torch
reference, the peers above, and flash-attn / xformers where installed. Target: >= 450 TFLOP/s of useful work
for the Triton kernel on the populate rows. FA2's paged cache needs pages of a multiple of 256 tokens,
so at 1560 tokens per frame the flash-attn and xformers rows gather the pages first (timed). Rows give TFLOP/s
of useful work and % of the 989 TFLOP/s dense bf16 peak (DESIGN.md section 4).

A peer that is not installed or does not run is skipped with the reason, which is kept in the results table.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_required, median_seconds, record, time_it

from mmpl_fast.kernels import PageTable, stage_attention, use_backend
from mmpl_fast.layouts import get_layout

PEAK_BF16 = 989e12  # H100 SXM / H200 dense bf16 FLOP/s, DESIGN.md section 4
MATMUL_N = {"cpu": 2048, "cuda": 8192}  # the matmul yardstick: square fp32 on a CPU, bf16 on a GPU


@dataclass(frozen=True)
class Problem:
    """One call: `stages` (indices into the layout) of `segments` segments, T tokens per frame, H x D heads."""

    name: str
    layout: str
    stages: tuple[int, ...]
    segments: int
    tokens: int
    heads: int
    head_dim: int

    def __str__(self) -> str:
        return self.name


@dataclass
class Inputs:
    """A problem's tensors: the paged form and the dense ``[S, H, *, D]`` form the peers take."""

    q: torch.Tensor  # [S * L, H, D] packed queries
    k_pool: torch.Tensor  # [S * F, T, H, D]
    v_pool: torch.Tensor
    table: PageTable
    visible: torch.Tensor  # bool [L, F]: may query row i (of any segment) read frame f
    q_dense: torch.Tensor  # [S, H, L, D]
    k_dense: torch.Tensor  # [S, H, F * T, D]
    v_dense: torch.Tensor
    mask: torch.Tensor  # bool [L, F * T]

    @property
    def useful_flops(self) -> int:
        _, tokens, heads, dim = self.k_pool.shape
        return self.table.useful_flops(tokens, heads, dim)

    def packed(self, o_dense: torch.Tensor) -> torch.Tensor:
        """``[S, H, L, D]`` -> the packed ``[S * L, H, D]`` of the paged form."""
        return o_dense.transpose(1, 2).reshape(self.q.shape)


@functools.cache
def make_inputs(problem: Problem, device: str, dtype: torch.dtype) -> Inputs:
    layout = get_layout(problem.layout)
    nf, t, h, d, s = layout.num_frames, problem.tokens, problem.heads, problem.head_dim, problem.segments
    stages = [layout.stages[k] for k in problem.stages]
    length = sum(len(st.frames) for st in stages) * t  # queries per segment
    gen = torch.Generator(device=device).manual_seed(0)
    q, k_pool, v_pool = (
        torch.randn(shape, generator=gen, device=device, dtype=dtype)
        for shape in ((s * length, h, d), (s * nf, t, h, d), (s * nf, t, h, d))
    )
    table = PageTable.build(
        [[seg * nf + f for f in st.visible] for seg in range(s) for st in stages],
        [len(st.frames) * t for _ in range(s) for st in stages],
        device=device,
    )
    visible = torch.zeros(length, nf, dtype=torch.bool, device=device)
    row = 0
    for st in stages:
        visible[row : row + len(st.frames) * t, list(st.visible)] = True
        row += len(st.frames) * t
    return Inputs(
        q=q,
        k_pool=k_pool,
        v_pool=v_pool,
        table=table,
        visible=visible,
        q_dense=q.view(s, length, h, d).transpose(1, 2).contiguous(),
        k_dense=k_pool.view(s, nf * t, h, d).transpose(1, 2).contiguous(),
        v_dense=v_pool.view(s, nf * t, h, d).transpose(1, 2).contiguous(),
        mask=visible.repeat_interleave(t, dim=1),
    )


# ------------------------------------------------------------------------------------------ implementations
class Unavailable(Exception):
    """A peer that cannot run here; the message says why."""


def _paged(backend: str) -> Callable[[Inputs], Callable[[], torch.Tensor]]:
    def make(x: Inputs):
        def run():
            with use_backend(backend):
                return stage_attention(x.q, x.k_pool, x.v_pool, x.table)

        return run

    return make


def _dense_sdpa(x: Inputs):
    return lambda: x.packed(F.scaled_dot_product_attention(x.q_dense, x.k_dense, x.v_dense, attn_mask=x.mask))


@functools.cache
def _compiled_flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:  # torch < 2.5
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({e})") from e
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))  # one compile per shape
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _flex(x: Inputs):
    flex, create_block_mask = _compiled_flex()
    tokens, visible = x.k_pool.shape[1], x.visible

    def mask_mod(b, h, q_idx, kv_idx):
        return visible[q_idx, kv_idx // tokens]

    try:
        block_mask = create_block_mask(
            mask_mod, None, None, x.q_dense.shape[2], x.k_dense.shape[2], device=str(x.q.device)
        )
        flex(x.q_dense, x.k_dense, x.v_dense, block_mask=block_mask)  # compiles here, outside the timing
    except Exception as e:  # the inductor CPU backend needs a C++ toolchain; report whatever stops it
        raise Unavailable(f"torch.compile(flex_attention) failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return lambda: x.packed(flex(x.q_dense, x.k_dense, x.v_dense, block_mask=block_mask))


def _gather(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's pages, concatenated: ``[sum_g n_g * T, H, D]`` (the copy a non-paged kernel needs)."""
    idx = torch.tensor([p for pl in x.table.host_pages for p in pl], device=x.q.device)
    _, tokens, heads, dim = x.k_pool.shape
    return (
        x.k_pool.index_select(0, idx).view(-1, heads, dim),
        x.v_pool.index_select(0, idx).view(-1, heads, dim),
    )


def _flash_varlen(x: Inputs):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise Unavailable(f"flash_attn is not installed ({e})") from e
    tokens = x.k_pool.shape[1]
    counts = [len(pl) * tokens for pl in x.table.host_pages]
    cu_k = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=x.q.device)
    max_q, max_k = x.table.max_q_len, max(counts)

    def run():
        k, v = _gather(x)  # timed: flash-attn reads contiguous K/V per sequence
        return flash_attn_varlen_func(x.q, k, v, x.table.q_offsets, cu_k, max_q, max_k)

    return run


def _flash_kvcache(x: Inputs):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        raise Unavailable(f"flash_attn is not installed ({e})") from e
    if not x.table.uniform():
        raise Unavailable("flash_attn_with_kvcache takes one query length and cache length per call")
    groups, length, npages = x.table.num_groups, x.table.q_length(0), x.table.max_pages
    _, tokens, heads, dim = x.k_pool.shape
    seqlens = torch.full((groups,), npages * tokens, dtype=torch.int32, device=x.q.device)
    q = x.q.view(groups, length, heads, dim)
    if tokens % 256 == 0:  # FA2's paged cache wants blocks of a multiple of 256 tokens: pages are blocks
        block_table = x.table.pages
        return lambda: flash_attn_with_kvcache(
            q, x.k_pool, x.v_pool, cache_seqlens=seqlens, block_table=block_table
        ).view_as(x.q)

    def run():  # pages are not FA2 blocks: gather each group's pages into a contiguous cache (timed)
        k, v = _gather(x)
        k, v = (t.view(groups, npages * tokens, heads, dim) for t in (k, v))
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens).view_as(x.q)

    return run


def _xformers(x: Inputs):
    try:
        from xformers.ops import memory_efficient_attention
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError as e:
        raise Unavailable(f"xformers is not installed ({e})") from e
    tokens, table = x.k_pool.shape[1], x.table
    bias = BlockDiagonalMask.from_seqlens(
        q_seqlen=[table.q_length(g) for g in range(table.num_groups)],
        kv_seqlen=[len(pl) * tokens for pl in table.host_pages],
    )

    def run():
        k, v = _gather(x)  # timed
        return memory_efficient_attention(x.q[None], k[None], v[None], attn_bias=bias)[0]

    return run


PAGED = "paged stage_attention"
DENSE = "dense masked SDPA"
FLEX = "FlexAttention compiled"
IMPLS: dict[str, Callable[[Inputs], Callable[[], torch.Tensor]]] = {
    DENSE: _dense_sdpa,
    FLEX: _flex,
    PAGED: _paged("torch"),  # the CPU path; on CUDA the Triton kernel runs under "triton"
    "triton (ours)": _paged("triton"),
    "torch reference": _paged("torch"),
    "flash_attn varlen": _flash_varlen,
    "flash_attn kvcache": _flash_kvcache,
    "xformers": _xformers,
}


# -------------------------------------------------------------------------------------------------- running
_BUILT: dict[tuple[str, str], Callable[[], object]] = {}  # (group, impl) -> timed callable, for the paired runs


def _matmul(device: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    a = torch.randn(MATMUL_N[device], MATMUL_N[device], device=device, dtype=dtype)
    return lambda: torch.mm(a, a)


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turn round by round, so load from other processes hits all."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_it(fn, warmup=0, repeat=1))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _run(benchmark, problem: Problem, impl: str, device: str, dtype: torch.dtype, rounds: int, inner: int):
    """Time `impl` with pytest-benchmark, then again interleaved with a matmul (and, for our kernel, with the
    FlexAttention and dense rows of the same problem), which gives the paired columns."""
    group = f"stage attention {problem} ({device}, {str(dtype).removeprefix('torch.')})"
    x = make_inputs(problem, device, dtype)
    try:
        fn = IMPLS[impl](x)
        out = fn()  # warm-up, and every implementation must compute the same thing as the torch reference
    except (Unavailable, torch.OutOfMemoryError) as e:  # dense rows can outgrow a GPU (math-path fallback)
        reason = str(e) if isinstance(e, Unavailable) else f"out of memory: {str(e).splitlines()[0]}"
        record(group, impl, float("nan"), baseline=DENSE, device=device, note=f"skipped: {reason}")
        if device == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(reason)
    if impl not in (PAGED, "torch reference"):
        ref = IMPLS["torch reference"](x)()
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def repeated(f):
        def run():
            for _ in range(inner):
                f()
            sync()

        return run

    timed = _BUILT[(group, impl)] = repeated(fn)
    benchmark.group = group
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = median_seconds(benchmark) / inner
    best = benchmark.stats.stats.min / inner if getattr(benchmark, "stats", None) else float("nan")

    paired = {impl: timed, "mm": repeated(_matmul(device, dtype))}
    if impl in (PAGED, "triton (ours)"):
        paired.update({peer: _BUILT[(group, peer)] for peer in (FLEX, DENSE) if (group, peer) in _BUILT})
    med = {name: t / inner for name, t in _interleaved(paired, rounds).items()}
    mm, flops = 2 * MATMUL_N[device] ** 3 / med["mm"], x.useful_flops / med[impl]
    extra = {"useful GFLOP/s": x.useful_flops / seconds / 1e9, "min ms": best * 1e3}
    if device == "cpu":
        extra.update({"mm GFLOP/s (paired)": mm / 1e9, "% of mm (paired)": 100 * flops / mm})
    else:
        extra.update({"useful TFLOP/s": x.useful_flops / seconds / 1e12, "mm TFLOP/s (paired)": mm / 1e12})
        extra["% of 989 TFLOP/s"] = 100 * x.useful_flops / seconds / PEAK_BF16
        if impl == "triton (ours)" and "populate" in problem.name:
            extra["target TFLOP/s"] = TARGET_TFLOPS
    for peer in (FLEX, DENSE):
        if peer in med and peer != impl:
            extra[f"speedup vs {peer} (paired)"] = med[peer] / med[impl]
    record(group, impl, seconds, baseline=DENSE, device=device, **extra)


# ---------------------------------------------------------------------------------------------------- CPU
# Wan's head geometry (12 x 128) at 156 tokens per latent frame; the MMPL segment layout: stage 1 plans
# frames 2, 3, 10-12, 19, 20 reading 0, 1; stage 2 populates 4-9; stage 3 populates 13-18 (DESIGN.md section 3).
WAN_T, WAN_H, WAN_D = 156, 12, 128
CPU_PROBLEMS = [
    Problem("tiny mmpl stages 1-3 x4 segments", "mmpl", (1, 2, 3), 4, 16, 4, 32),
    Problem("wan-156 mmpl stage 1 (plan)", "mmpl", (1,), 1, WAN_T, WAN_H, WAN_D),
    Problem("wan-156 mmpl stage 2 (populate)", "mmpl", (2,), 1, WAN_T, WAN_H, WAN_D),
    Problem("wan-156 mmpl stage 3 (populate)", "mmpl", (3,), 1, WAN_T, WAN_H, WAN_D),
    Problem("wan-156 mmpl stages 1-3 one call", "mmpl", (1, 2, 3), 1, WAN_T, WAN_H, WAN_D),
]


def test_cpu_matmul(benchmark):
    """The machine's float32 matmul throughput, the yardstick for the useful FLOP/s of every CPU row."""
    n = MATMUL_N["cpu"]
    mm = _matmul("cpu", torch.float32)
    benchmark.group = "matmul fp32 (cpu)"
    benchmark.pedantic(mm, rounds=7, warmup_rounds=2, iterations=1)
    seconds = median_seconds(benchmark)
    record(f"matmul {n}^3 fp32 (cpu)", "torch.mm", seconds, **{"GFLOP/s": 2 * n**3 / seconds / 1e9})


@pytest.mark.parametrize("impl", [DENSE, FLEX, PAGED])  # the paged row last: it reports speedups over both
@pytest.mark.parametrize("problem", CPU_PROBLEMS, ids=str)
def test_cpu(benchmark, problem, impl):
    """The CPU path (torch backend, float32) against compiled FlexAttention and dense masked SDPA."""
    tiny = problem.tokens * problem.heads * problem.head_dim < 1e5
    _run(benchmark, problem, impl, "cpu", torch.float32, rounds=30 if tiny else 5, inner=1)


# --------------------------------------------------------------------------------------------------- CUDA
# Wan2.1-1.3B at 480x832: 1560 tokens per latent frame, 12 heads x 128. MMPL stages for a batch of 4 segments
# (plan, the two populate halves, all three in one call) and Self-Forcing AR blocks of 3 frames.
# Wan-14B (40 heads) for the populate stage that reads the most. Names carry `-k` handles (populate, block7)
# that benchmarks/gpu_check.sh selects by.
CUDA_PROBLEMS = [
    Problem("wan-1.3b mmpl stage 1 (plan) x4", "mmpl", (1,), 4, 1560, 12, 128),
    Problem("wan-1.3b mmpl stage 2 (populate) x4", "mmpl", (2,), 4, 1560, 12, 128),
    Problem("wan-1.3b mmpl stage 3 (populate) x4", "mmpl", (3,), 4, 1560, 12, 128),
    Problem("wan-1.3b mmpl stages 1-3 x4 one call", "mmpl", (1, 2, 3), 4, 1560, 12, 128),
    Problem("wan-14b mmpl stage 3 (populate) x4", "mmpl", (3,), 4, 1560, 40, 128),
    Problem("wan-1.3b ar block4 (3 frames reading 12)", "ar", (3,), 1, 1560, 12, 128),
    Problem("wan-1.3b ar block7 (3 frames reading 21)", "ar", (6,), 1, 1560, 12, 128),
]
TARGET_TFLOPS = 450  # bf16 on MMPL populate shapes, H100/H200 (the README's target)
CUDA_IMPLS = [DENSE, FLEX, "torch reference", "flash_attn varlen", "flash_attn kvcache", "xformers", "triton (ours)"]


@cuda_required()
@pytest.mark.parametrize("impl", CUDA_IMPLS)  # the Triton row last: it reports speedups over FlexAttention/SDPA
@pytest.mark.parametrize("problem", CUDA_PROBLEMS, ids=str)
def test_cuda(benchmark, problem, impl):
    """The Triton kernel (bfloat16) against the torch reference and every peer that is installed."""
    _run(benchmark, problem, impl, "cuda", torch.bfloat16, rounds=10, inner=5)
