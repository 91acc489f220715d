"""Compile every Triton kernel of `mmpl_fast.kernels` for real GPUs, on a machine without one.

Run: ``python -m mmpl_fast.kernels.compile_check [--arch 80,89,90] [--dtype bf16,fp16,fp32] [--quick] [--json]``.

For each GPU architecture and dtype it calls every launcher the way the model does, at Wan2.1-1.3B and 14B
shapes (head dim 128, 480x832 video = 1560 tokens per latent frame, 12 / 40 heads, the MMPL stages of 4
segments in one call, a 3-frame AR block reading 21 frames, Wan's 16 x 60 x 104 latents), on meta tensors
and under `_launch.target_arch`, so each launcher picks the configuration it would pick on that GPU and
`_launch.recording` keeps the launch instead of running it. Every launch, and every other configuration its
table offers the autotuner, is then compiled for ``GPUTarget("cuda", arch, 32)`` by the kernel's own binder
(dtypes, constexprs, integer specialisation: what a real launch compiles; pointers are assumed 16-byte
aligned), and the PTX goes through the ``ptxas`` bundled with Triton (``-v``) for registers and spills.
Shared memory is Triton's allocation plus any static shared memory; tensor cores are read from the PTX
(``wgmma`` on sm_90, ``mma.sync`` elsewhere).

A configuration fails on a compile error, on shared memory above the arch's per-block limit (sm_80 163 KiB,
sm_89 99 KiB, sm_90 227 KiB), on more registers than the block's warps can hold, on any spill in bf16/fp16,
and on a bf16/fp16 dot without tensor cores. The exit status is 1 when any fails, with one line per
failure on stderr. ``--quick`` compiles one representative configuration per kernel and arch (bf16, the
1.3B shapes, the default configuration): what CI runs.

This is a tool, not a kernel: it reads the Wan presets (`mmpl_fast.config`) and the layouts
(`mmpl_fast.layouts`) lazily, so importing `mmpl_fast.kernels` still imports nothing else.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import _launch
from ._launch import DTYPE_NAMES, SHARED_MEMORY_KIB, TABLE_ARCHS, Config, Launch

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
META = torch.device("meta")
VIDEO = (480, 832)  # Wan2.1's 480p size; latents are 8x smaller (the Wan VAE)
REGISTER_FILE = 65536  # 32-bit registers per SM, sm_80..sm_90: the most one block may use


@dataclass(frozen=True)
class Problem:
    """One launcher call at one shape: `run(dtype)` calls the launcher on meta tensors of that dtype."""

    op: str
    shape: str
    run: Callable[[torch.dtype], object]
    quick: bool = False  # one of the configurations `--quick` (CI) compiles

    def __str__(self) -> str:
        return f"{self.op} {self.shape}"


@dataclass
class Row:
    """One compiled kernel configuration on one arch, with the problems it serves."""

    kernel: str
    arch: int
    dtype: str
    config: str  # tiles, warps, stages and the constexprs that make this variant
    default: bool  # the configuration the launcher uses (else one the autotuner may pick)
    tiles: str = ""  # tiles, warps and stages alone
    problems: list[str] = field(default_factory=list)
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_cores: str = "-"
    threads: int = 0
    seconds: float = 0.0
    error: str | None = None

    def failures(self) -> list[str]:
        """What makes this configuration unusable on its arch (empty when it passes)."""
        if self.error is not None:
            return [f"compile error: {self.error}"]
        out = []
        limit = SHARED_MEMORY_KIB[self.arch] * 1024
        if self.shared_bytes > limit:
            out.append(f"shared memory {self.shared_bytes / 1024:.0f} KiB > sm_{self.arch}'s {limit // 1024} KiB")
        if self.registers * self.threads > REGISTER_FILE:
            out.append(f"{self.registers} registers x {self.threads} threads > {REGISTER_FILE}")
        if self.spill_bytes and self.dtype != "fp32":
            out.append(f"{self.spill_bytes} bytes of register spills in {self.dtype}")
        if self.tensor_cores == "none" and self.dtype != "fp32":
            out.append(f"a {self.dtype} dot without tensor cores")
        return out


# -------------------------------------------------------------------------------------------- problems
def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _models() -> list[tuple[str, object, int, int]]:
    """(label, ModelConfig, tokens per latent frame, grid width) for Wan2.1-1.3B and 14B at 480x832."""
    from mmpl_fast.config import resolve_config

    out = []
    for label, name in (("1.3B", "wan2.1-t2v-1.3b"), ("14B", "wan2.1-t2v-14b")):
        cfg = resolve_config(name)
        lh, lw = VIDEO[0] // 8, VIDEO[1] // 8
        out.append((label, cfg, cfg.tokens_per_frame(lh, lw), lw // cfg.patch_size[2]))
    return out


def _attention_calls() -> list[tuple[str, list[list[int]], list[int]]]:
    """(label, page lists, query frames per group): MMPL stages 1-3 of 4 segments in one call; an AR block."""
    from mmpl_fast.layouts import get_layout

    mmpl, ar = get_layout("mmpl"), get_layout("ar")
    nf = mmpl.num_frames
    stages = [mmpl.stages[k] for k in range(1, mmpl.num_stages)]
    mmpl_pages = [[s * nf + f for f in st.visible] for s in range(4) for st in stages]
    mmpl_frames = [len(st.frames) for _ in range(4) for st in stages]
    last = ar.stages[-1]
    return [
        ("mmpl stages 1-3 x4 segments", mmpl_pages, mmpl_frames),
        (f"ar block of {len(last.frames)} reading {len(last.visible)}", [list(last.visible)], [len(last.frames)]),
    ]


def _attention_problems() -> Iterator[Problem]:
    from .page_table import PageTable
    from .stage_attention import stage_attention_triton

    for label, cfg, tokens, _ in _models():
        heads, dim = cfg.num_heads, cfg.head_dim
        for name, pages, frames in _attention_calls():

            def run(dtype, pages=pages, frames=frames, heads=heads, dim=dim, tokens=tokens):
                table = PageTable.build(pages, [n * tokens for n in frames], device=META)
                pool = _meta(1 + max(max(p) for p in pages), tokens, heads, dim, dtype=dtype)
                q = _meta(table.num_queries, heads, dim, dtype=dtype)
                return stage_attention_triton(q, pool, pool, table)

            yield Problem("stage_attention", f"{label} {name}", run, quick=label == "1.3B" and "mmpl" in name)
    # head dims 129..256 have their own table rows: one problem proves them
    yield Problem("stage_attention", "head_dim 256 (4 heads, 2 pages)", _attention_d256)


def _attention_d256(dtype: torch.dtype):
    from .page_table import PageTable
    from .stage_attention import stage_attention_triton

    _, _, tokens, _ = _models()[0]
    table = PageTable.build([[0, 1]], [2 * tokens], device=META)
    q, pool = _meta(2 * tokens, 4, 256, dtype=dtype), _meta(2, tokens, 4, 256, dtype=dtype)
    return stage_attention_triton(q, pool, pool, table)


def _rope_problems() -> Iterator[Problem]:
    from .rope_write import RopeTable, rope_write_triton

    for label, cfg, tokens, grid_w in _models():
        for b, f, name in ((1, 3, "ar block"), (4, 6, "populate x4")):

            def run(dtype, cfg=cfg, tokens=tokens, grid_w=grid_w, b=b, f=f):
                shape = (b, f, tokens, cfg.num_heads, cfg.head_dim)
                q, k, v = (_meta(*shape, dtype=dtype) for _ in range(3))
                pool = _meta(b * f + 2, *shape[2:], dtype=dtype)
                pages, pos = _meta(b, f, dtype=torch.long), _meta(f, dtype=torch.int32)
                rope = RopeTable.build(cfg.head_dim, cfg.rope_max, device=META)
                return rope_write_triton(q, k, v, pool, pool, pages, pos, rope, grid_w)

            yield Problem("rope_write", f"{label} {name}", run, quick=label == "1.3B" and b == 1)


def _row_problems() -> Iterator[Problem]:
    from .norm_modulate import gated_residual_triton, norm_modulate_triton

    for label, cfg, tokens, _ in _models():
        for b, f, name in ((1, 3, "ar block"), (4, 6, "populate x4")):
            c = cfg.dim

            def norm(dtype, b=b, f=f, c=c, tokens=tokens):
                mod = _meta(b, f, 6, c, dtype=torch.float32)  # the block's six modulation rows
                return norm_modulate_triton(_meta(b, f, tokens, c, dtype=dtype), mod[:, :, 0], mod[:, :, 1])

            def gated(dtype, b=b, f=f, c=c, tokens=tokens):
                x = _meta(b, f, tokens, c, dtype=dtype)
                return gated_residual_triton(
                    x, _meta(b, f, tokens, c, dtype=dtype), _meta(b, f, 6, c, dtype=torch.float32)[:, :, 2]
                )

            quick = label == "1.3B" and b == 1
            yield Problem("norm_modulate", f"{label} {name}", norm, quick=quick)
            yield Problem("gated_residual", f"{label} {name}", gated, quick=quick)


def _denoise_problems() -> Iterator[Problem]:
    """The sampler's calls on Wan latents ``[B, F, 16, 60, 104]``: few-step updates with and without re-noise
    and guidance, per-frame sigmas, the fp32 x0 option, Euler steps and the CFG combine."""
    from .denoise import cfg_combine_triton, denoise_update_triton, euler_step_triton

    _, cfg, _, _ = _models()[0]
    latent = (cfg.out_channels, VIDEO[0] // 8, VIDEO[1] // 8)

    def x(dtype, b=2, f=3):
        return _meta(b, f, *latent, dtype=dtype)

    def per_frame():
        return _meta(2, 3, dtype=torch.float32)

    yield Problem("denoise_update", "re-noise", lambda d: denoise_update_triton(x(d), x(d), 0.8, 0.6, x(d)), True)
    yield Problem(
        "denoise_update", "last step, guided", lambda d: denoise_update_triton(x(d), x(d), 0.3, v_uncond=x(d))
    )
    yield Problem("denoise_update", "per-frame sigmas, guided, re-noise",
                  lambda d: denoise_update_triton(x(d), x(d), per_frame(), per_frame(), x(d), x(d), 5.0))  # fmt: skip
    yield Problem(
        "denoise_update", "fp32 x0", lambda d: denoise_update_triton(x(d), x(d), 0.3, compute_dtype=torch.float32)
    )
    yield Problem("euler_step", "float sigmas", lambda d: euler_step_triton(x(d), x(d), 0.8, 0.6), True)
    yield Problem(
        "euler_step",
        "per-frame sigmas, guided",
        lambda d: euler_step_triton(x(d), x(d), per_frame(), per_frame(), x(d), 5.0),
    )
    yield Problem("cfg_combine", "latents", lambda d: cfg_combine_triton(x(d), x(d), 5.0), True)


@functools.cache
def problems() -> tuple[Problem, ...]:
    """Every launcher call the check makes, per op."""
    return (*_attention_problems(), *_rope_problems(), *_row_problems(), *_denoise_problems())


# ------------------------------------------------------------------------------------------- compiling
def record(problem: Problem, arch: int, dtype: torch.dtype) -> list[Launch]:
    """The launches `problem`'s launcher makes on `arch` in `dtype` (nothing runs)."""
    with _launch.target_arch(arch), _launch.recording() as launches:
        problem.run(dtype)
    if not launches:
        raise RuntimeError(f"{problem}: the launcher made no launch")
    return launches


def _specialise(launch: Launch, config: Config, arch: int):
    """(src, target, options) exactly as `JITFunction.run` would compile this launch for `arch`."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constexprs, **config.meta, "num_warps": config.num_warps, "num_stages": config.num_stages}
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(kernel, signature, constexprs, attrs), target, options


def _ptxas(ptx: str, arch: int, options) -> dict[str, int]:
    """Registers, spill bytes and static shared memory from the bundled ptxas ``-v`` (Triton's own flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", *fmad, "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
        log = subprocess.run([*cmd, src, "-o", src + ".o"], capture_output=True, text=True, check=True).stderr
    return parse_ptxas(log)


def parse_ptxas(log: str) -> dict[str, int]:
    """``ptxas -v`` output -> registers, spill_bytes (stores + loads), static shared bytes."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise ValueError(f"no register count in the ptxas output:\n{log}")
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return {
        "registers": int(regs.group(1)),
        "spill_bytes": sum(int(m.group(1)) for m in (stores, loads) if m),
        "static_shared": int(smem.group(1)) if smem else 0,
    }


def tensor_cores(ttir: str, ptx: str) -> str:
    """``wgmma`` / ``mma`` when the PTX uses tensor cores, ``none`` for a dot without them, ``-`` without a dot."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none" if "tt.dot" in ttir else "-"


def compile_row(launch: Launch, config: Config, arch: int, row: Row) -> Row:
    """Compile one launch in one configuration and fill `row` with what it needs on the GPU."""
    import triton

    t0 = time.perf_counter()
    try:
        src, target, options = _specialise(launch, config, arch)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        usage = _ptxas(compiled.asm["ptx"], arch, options)
    except Exception as e:  # any failure to compile is a result, reported with the row
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        row.seconds = time.perf_counter() - t0
        return row
    row.registers, row.spill_bytes = usage["registers"], usage["spill_bytes"]
    row.shared_bytes = int(compiled.metadata.shared) + usage["static_shared"]
    row.tensor_cores = tensor_cores(compiled.asm["ttir"], compiled.asm["ptx"])
    row.threads = 32 * int(compiled.metadata.num_warps)
    row.seconds = time.perf_counter() - t0
    return row


def _label(launch: Launch, config: Config) -> str:
    """The configuration and the constexprs that make a distinct compiled variant."""
    extra = []
    for k, v in launch.constexprs.items():
        if isinstance(v, bool):
            if v:
                extra.append(k)
        else:
            extra.append(f"{k}={getattr(v, 'name', v)}")
    return " ".join([str(config), *extra])


def run_check(
    archs: Sequence[int], dtypes: Sequence[str], quick: bool = False, ops: Sequence[str] = (), jobs: int = 1
) -> list[Row]:
    """Compile every (problem, arch, dtype) launch and each configuration its table offers; one row per variant
    (launches that compile alike are compiled once). ``jobs > 1`` compiles in that many processes."""
    rows: dict[tuple, Row] = {}
    todo: list[tuple[tuple, tuple]] = []  # (row key, job) for each variant to compile
    for index, problem in enumerate(problems()):
        if (quick and not problem.quick) or (ops and problem.op not in ops):
            continue
        for dtype_name in dtypes:
            for arch in archs:
                for n, launch in enumerate(record(problem, arch, DTYPES[dtype_name])):
                    configs = launch.configs[:1] if quick else launch.configs
                    for i, config in enumerate(configs):
                        label = _label(launch, config)
                        key = (launch.name, arch, dtype_name, label, _signature(launch))
                        if key not in rows:
                            tiles = _tiles(launch, config)
                            rows[key] = Row(launch.name, arch, dtype_name, label, default=i == 0, tiles=tiles)
                            todo.append((key, (index, dtype_name, arch, n, i)))
                        rows[key].problems.append(problem.shape)
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            done = pool.map(_compile_job, [job for _, job in todo], [rows[key] for key, _ in todo])
            for (key, _), row in zip(todo, done):
                rows[key] = row
    else:
        for key, job in todo:
            rows[key] = _compile_job(job, rows[key])
    return list(rows.values())


def _compile_job(job: tuple, row: Row) -> Row:
    """Compile one variant, given as (problem index, dtype name, arch, launch index, config index)."""
    index, dtype_name, arch, n, i = job
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    launch = record(problems()[index], arch, DTYPES[dtype_name])[n]
    return compile_row(launch, launch.configs[i], arch, row)


def _tiles(launch: Launch, config: Config) -> str:
    """The configuration, with the head-dim tile where the kernel has one (it picks the table row)."""
    d = launch.constexprs.get("BLOCK_D")
    return f"{config} (D={d})" if d is not None and "BLOCK_D" not in config.meta else str(config)


def _signature(launch: Launch) -> str:
    """What makes two launches of one kernel compile differently besides the config: argument types and the
    integers Triton specialises (== 1, divisible by 16)."""
    parts = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            parts.append(str(a.dtype))
        elif isinstance(a, bool) or not isinstance(a, int):
            parts.append(type(a).__name__)
        else:
            parts.append("1" if a == 1 else ("16" if a % 16 == 0 else "i"))
    return ",".join(parts)


# ------------------------------------------------------------------------------------------------ report
def table(rows: Sequence[Row]) -> str:
    """Every row as a text table, kernel by kernel."""
    head = ["kernel", "arch", "dtype", "configuration", "regs", "spill B", "smem KiB", "tensor cores", "serves"]
    lines = []
    for r in sorted(rows, key=lambda r: (r.kernel, r.dtype, r.arch, not r.default, r.config)):
        usage = ["-", "-", "-"] if r.error else [str(r.registers), str(r.spill_bytes), f"{r.shared_bytes / 1024:.0f}"]
        status = "FAIL" if r.failures() else ("ok" if r.default else "ok (autotune)")
        serves = f"{len(r.problems)} shapes" if len(r.problems) > 2 else ", ".join(r.problems)
        lines.append([r.kernel.strip("_"), f"sm_{r.arch}", r.dtype, r.config, *usage, r.tensor_cores, serves, status])
    head.append("status")
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [head, *lines])


def summary(rows: Sequence[Row]) -> str:
    """Markdown, one line per kernel, dtype and default tiles, one column per arch: the worst registers, spills
    and shared memory over the variants (specialisations, shapes) that use those tiles, and the tensor cores."""
    archs = sorted({r.arch for r in rows})
    groups: dict[tuple[str, str, str], dict[int, list[Row]]] = {}
    order = {"bf16": 0, "fp16": 1, "fp32": 2}
    for r in sorted(rows, key=lambda r: (r.kernel, order[r.dtype], r.tiles)):
        if r.default:
            groups.setdefault((r.kernel.strip("_").removesuffix("_kernel"), r.dtype, r.tiles), {}).setdefault(
                r.arch, []
            ).append(r)
    head = " | ".join(f"sm_{a}: regs / spill B / smem KiB / tensor cores" for a in archs)
    lines = [f"| kernel | dtype | tiles, warps, stages | {head} |"]
    lines.append("|" + "---|" * (3 + len(archs)))
    for (kernel, dtype, tiles), by_arch in groups.items():
        cells = []
        for a in archs:
            rs = by_arch.get(a, [])
            if not rs or any(r.error for r in rs):
                cells.append("compile error" if rs else "-")
                continue
            tc = "/".join(sorted({r.tensor_cores for r in rs} - {"-"})) or "-"
            regs, spill = max(r.registers for r in rs), max(r.spill_bytes for r in rs)
            smem = max(r.shared_bytes for r in rs) / 1024
            cells.append(f"{regs} / {spill} / {smem:.0f} / {tc}")
        lines.append(f"| {kernel} | {dtype} | {tiles} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_list(text: str, allowed: Sequence, kind: Callable, what: str) -> list:
    try:
        values = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v not in allowed for v in values):
        raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated list of {allowed}, got {text!r}")
    return values


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    ops = ("stage_attention", "rope_write", "norm_modulate", "gated_residual", "denoise_update", "euler_step",
           "cfg_combine")  # fmt: skip
    p = argparse.ArgumentParser(prog="python -m mmpl_fast.kernels.compile_check", description=__doc__.split("\n")[0])
    p.add_argument(
        "--arch",
        default="80,89,90",
        type=lambda s: _parse_list(s, TABLE_ARCHS, int, "--arch"),
        help="GPU architectures, e.g. 80,89,90 (sm_80 A100, sm_89 RTX 4090 / L40, sm_90 H100 / H200)",
    )
    p.add_argument("--dtype", default="bf16,fp16,fp32", type=lambda s: _parse_list(s, tuple(DTYPES), str, "--dtype"))
    p.add_argument("--op", default=[], type=lambda s: _parse_list(s, ops, str, "--op"), help="only these ops")
    p.add_argument("--quick", action="store_true", help="one representative configuration per kernel and arch (CI)")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--markdown", action="store_true", help="print a markdown summary (the README's table)")
    return p.parse_args(argv)  # fmt: skip


def _interpreted() -> bool:
    from .stage_attention import _stage_attention_kernel

    return type(_stage_attention_kernel).__name__ != "JITFunction"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when every configuration fits, 1 otherwise (failures on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _args(argv)
    if _interpreted():  # TRITON_INTERPRET=1 made the kernels interpreter objects: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "mmpl_fast.kernels.compile_check", *argv], env=env).returncode
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice, not ours
    t0 = time.perf_counter()
    rows = run_check(args.arch, ["bf16"] if args.quick else args.dtype, args.quick, args.op, max(1, args.jobs))
    failed = [(r, f) for r in rows for f in r.failures()]
    import triton

    if args.json:
        report = {"triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "archs": args.arch,
                   "seconds": round(time.perf_counter() - t0, 1), "ok": not failed,
                   "rows": [{**asdict(r), "failures": r.failures()} for r in rows]}  # fmt: skip
        print(json.dumps(report, indent=1))
    else:
        print(summary(rows) if args.markdown else table(rows))
        print(f"\n{len(rows)} configurations, {len(failed)} failures, {time.perf_counter() - t0:.0f} s "
              f"(triton {triton.__version__})")  # fmt: skip
    for r, why in failed:
        print(f"FAIL {r.kernel} sm_{r.arch} {r.dtype} [{r.config}] ({', '.join(r.problems)}): {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
