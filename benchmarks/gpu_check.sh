#!/usr/bin/env bash
# The prepared GPU check of mmpl_fast (issue 11): one H100 / H200, at most 8 minutes, one results table.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--wheels DIR]
#
# Steps, each stopped when its share of the budget runs out (reported; the later steps still run):
#   1. tests    the kernel tests compiled on CUDA (no interpreter): tests/test_stage_attention.py and
#               tests/test_kernels_elementwise.py, bf16 / fp16 / fp32 against float64 references.
#   2. attn     stage attention: the Triton kernel against the torch reference, dense masked SDPA, compiled
#               FlexAttention, flash-attn and xformers where installed; TFLOP/s of useful (unmasked) work.
#               Target: >= 450 TFLOP/s bf16 on the MMPL populate rows.
#   3. elem     rope_write, norm_modulate, gated_residual, denoise, Euler, CFG against the torch reference:
#               % of the HBM peak. Target: >= 80%. (The torch.compile baselines are left out: compiling
#               them takes longer than the budget; run benchmarks/bench_kernels_elementwise.py for them.)
#   4. e2e      the embedded model end to end on cuda: python -m mmpl_fast.generate --device cuda (a 10 s
#               video); without imageio-ffmpeg (mp4 writing) the same pipeline call, timed in Python.
#   5. packing  populating 4 segments of Wan-1.3B geometry on one GPU, batched against sequential
#               (benchmarks/bench_multiprocess.py::test_cuda_one_gpu_packing).
# Logs, the benchmark tables (.md, .json) and the results table (gpu_check.md) go to DIR (default
# benchmarks/results/gpu_check). The exit status is 0 when no step failed (skips and missed targets are
# reported, not failures).
#
# Needs this repository and PyPI packages only: torch with CUDA, triton, pytest, pytest-benchmark, numpy;
# diffusers (steps 4-5) and imageio-ffmpeg, flash-attn, xformers are optional: what is missing is skipped and
# named. On a machine without network, --wheels DIR installs wheels fetched elsewhere with
#   pip download --no-deps --only-binary=:all: -d DIR diffusers importlib_metadata imageio-ffmpeg
# into a temporary folder first. --dry-run prints every command instead of running it, and still checks that
# each pytest selection collects tests (it runs on a machine without a GPU).

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR="$ROOT/benchmarks/results/gpu_check"
BUDGET=480
DRY_RUN=0
WHEELS=""
PROMPT="a large red circle bouncing and a small blue square moving right on a black background"

usage() { sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2
    exit 2
fi

cd "$ROOT" || exit 2
PY=$(command -v python3 || command -v python) || { echo "gpu_check.sh: no python3 on PATH" >&2; exit 2; }
mkdir -p "$OUT_DIR"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
START=$SECONDS

# ------------------------------------------------------------------------------------------------ setup
unset TRITON_INTERPRET MMPL_FAST_BACKEND   # compiled Triton on CUDA, the default backend choice
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$WHEELS" ]]; then
    SITE=$(mktemp -d)
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "+ $PY -m pip install -q --no-index --no-deps --target $SITE $WHEELS/*.whl"
    else
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
            || echo "gpu_check.sh: installing the wheels in $WHEELS failed; going on without them" >&2
    fi
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
# setup.py installs kernels/ as mmpl_fast.kernels; from a plain checkout a link gives the same import
if [[ ! -e "$ROOT/mmpl_fast/kernels" ]]; then
    echo "+ ln -s ../kernels mmpl_fast/kernels   # mmpl_fast.kernels from a checkout that is not pip-installed"
    [[ $DRY_RUN -eq 1 ]] || ln -s ../kernels "$ROOT/mmpl_fast/kernels"
fi

# which optional packages are installed (found, not imported: one quick python start)
AVAILABLE=" $("$PY" -c "
import importlib.util as u
names = ('xdist', 'pytest_benchmark', 'diffusers', 'imageio_ffmpeg', 'flash_attn', 'xformers')
print(' '.join(n for n in names if u.find_spec(n)))" 2>/dev/null) "
has() { [[ "$AVAILABLE" == *" $1 "* ]]; }

remaining() { echo $((BUDGET - (SECONDS - START))); }

record() {  # name, status, seconds, detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"
    printf '== %-8s %-28s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME SHARE COMMAND...: run under min(SHARE, time left) seconds, log to OUT_DIR/NAME.log
run_step() {
    local name=$1 share=$2 left limit rc t0 detail status
    shift 2
    left=$(remaining)
    limit=$(( share < left ? share : left ))
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+ timeout %ss' "$share"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    if (( limit < 20 )); then
        record "$name" "skipped: budget spent" 0 "${left}s of ${BUDGET}s left"
        return 0
    fi
    t0=$SECONDS
    touch "$OUT_DIR/.started"  # benchmark tables written after this are this step's
    timeout -s INT -k 15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    detail=$(grep -E '(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$OUT_DIR/$name.log" | tail -n 1 \
        | sed 's/=//g; s/^ *//; s/ *$//')
    case $rc in
        0) status="ok" ;;
        124|130|137) status="TIMED OUT after ${limit}s" ;;
        5) status="ok (nothing selected)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [[ -z "$detail" ]] && detail=$(tail -n 1 "$OUT_DIR/$name.log" | cut -c1-160)
    record "$name" "$status" $((SECONDS - t0)) "$detail"
    for ext in md json; do
        if [[ "benchmarks/results/latest.$ext" -nt "$OUT_DIR/.started" ]]; then
            cp "benchmarks/results/latest.$ext" "$OUT_DIR/$name.$ext"
        fi
    done
}

# The benchmark rows this check runs: one -k expression for the three files (module names select the part of
# each file), so a dry run can check every selection with one collection.
SELECT="(bench_stage_attention and test_cuda and (populate or block7))"
SELECT+=" or (bench_kernels_elementwise and test_cuda and not compiled)"
SELECT+=" or test_cuda_one_gpu_packing"
ATTN=benchmarks/bench_stage_attention.py
ELEM=benchmarks/bench_kernels_elementwise.py
PACK=benchmarks/bench_multiprocess.py
TESTS=(tests/test_stage_attention.py tests/test_kernels_elementwise.py)

# dry run: the test files must exist and each benchmark file's share of SELECT must collect tests
check_selections() {
    local listing f n failed=0
    for f in "${TESTS[@]}"; do
        [[ -f "$f" ]] || { echo "gpu_check.sh: $f is missing" >&2; failed=1; }
    done
    listing=$("$PY" -m pytest --collect-only -q -p no:cacheprovider "$ATTN" "$ELEM" "$PACK" -k "$SELECT" 2>&1)
    for f in "$ATTN" "$ELEM" "$PACK"; do
        n=$(grep -c "^$f::" <<< "$listing")
        echo "  $f: $n benchmark rows selected"
        (( n > 0 )) || { echo "gpu_check.sh: the selection collects nothing in $f" >&2; failed=1; }
    done
    return "$failed"
}

skip() { record "$1" "skipped: $2" 0 "${3:-}"; }

# -------------------------------------------------------------------------------------------- device
if [[ $DRY_RUN -eq 0 ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: torch sees no CUDA device; this check needs one (--dry-run shows the commands)" >&2
        exit 2
    fi
fi
DEVICE=$("$PY" -c "
import torch, triton
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (dry run)'
print(f'{name}; torch {torch.__version__}, triton {triton.__version__}')" 2>/dev/null)
echo "gpu_check: $DEVICE; budget ${BUDGET}s; optional packages found:${AVAILABLE% }; output in $OUT_DIR"

XDIST=()
has xdist && XDIST=(-n 8)  # the kernels' Triton compiles dominate step 1: spread them over processes
BENCH=(-p no:cacheprovider --benchmark-only --benchmark-disable-gc --benchmark-columns=median)

# ------------------------------------------------------------------------------------------------ steps
COLLECT_FAILED=0
if [[ $DRY_RUN -eq 1 ]]; then
    check_selections || COLLECT_FAILED=1
fi
run_step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rf ${XDIST[@]+"${XDIST[@]}"} "${TESTS[@]}"

if has pytest_benchmark; then
    run_step attn 150 "$PY" -m pytest -q "${BENCH[@]}" "$ATTN" -k "$SELECT"
    run_step elem 60 "$PY" -m pytest -q "${BENCH[@]}" "$ELEM" -k "$SELECT"
else
    skip attn "pytest-benchmark is not installed" "pip install pytest-benchmark"
    skip elem "pytest-benchmark is not installed" "pip install pytest-benchmark"
fi

if ! has diffusers; then
    skip e2e "diffusers is not installed" "pip install diffusers (or --wheels)"
elif has imageio_ffmpeg; then
    run_step e2e 50 "$PY" -m mmpl_fast.generate --device cuda --prompt "$PROMPT" --seconds 10 \
        --out "$OUT_DIR/e2e.mp4" --quiet
else  # no mp4 writer: the same pipeline call, timed, frames not written
    run_step e2e 50 "$PY" -c "
import time, torch
from mmpl_fast import embedded
t0 = time.perf_counter(); pipe = embedded.load_pipeline('cuda'); load = time.perf_counter() - t0
pipe(prompt='$PROMPT', num_frames=161, seed=0, progress=False)  # warm-up: Triton compiles
torch.cuda.synchronize(); t0 = time.perf_counter()
out = pipe(prompt='$PROMPT', num_frames=161, seed=0, progress=False)
torch.cuda.synchronize(); s = time.perf_counter() - t0
print(f'embedded model, 10 s video (161 frames) on cuda: {s:.2f} s, {161 / s:.1f} frames/s (load {load:.1f} s; imageio-ffmpeg missing: no mp4)')
"
fi

if ! has diffusers; then
    skip packing "diffusers is not installed" "pip install diffusers (or --wheels)"
elif has pytest_benchmark; then
    run_step packing 60 "$PY" -m pytest -q "${BENCH[@]}" "$PACK" -k "$SELECT"
else
    skip packing "pytest-benchmark is not installed" "pip install pytest-benchmark"
fi

if [[ $DRY_RUN -eq 1 ]]; then
    echo "dry run: nothing was run on a GPU"
    exit "$COLLECT_FAILED"
fi

# ---------------------------------------------------------------------------------------------- report
"$PY" - "$OUT_DIR" "$DEVICE" "$((SECONDS - START))" <<'PYEOF' | tee "$OUT_DIR/gpu_check.md"
import json, sys, time
from pathlib import Path

out, device, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"## mmpl_fast GPU check: {device}; {time.strftime('%Y-%m-%d')}, {seconds} s\n")
print("| step | status | seconds | detail |\n|---|---|---|---|")
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, secs, detail = (line.split("\t") + [""] * 4)[:4]
    print(f"| {name} | {status} | {secs} | {detail} |")

rows = []
for f in sorted(out.glob("*.json")):
    rows += json.loads(f.read_text()).get("results", [])
checks = []
for r in rows:
    if "target TFLOP/s" in r and r.get("useful TFLOP/s") is not None:
        checks.append((r["group"], r["useful TFLOP/s"], r["target TFLOP/s"], "TFLOP/s"))
    if "target %" in r and r.get("% HBM peak") is not None:
        checks.append((r["group"], r["% HBM peak"], r["target %"], "% of HBM peak"))
if checks:
    print("\n| target | measured | goal | met |\n|---|---|---|---|")
    for group, value, goal, unit in checks:
        print(f"| {group} | {value:.1f} {unit} | >= {goal} | {'yes' if value >= goal else 'NO'} |")
for f in sorted(out.glob("*.md")):
    if f.name != "gpu_check.md":
        print(f"\n### {f.stem}\n" + f.read_text())
PYEOF

if grep -q $'\tFAILED' "$STEPS"; then
    exit 1
fi
exit 0
