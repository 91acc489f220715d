"""`benchmarks/gpu_check.sh`, the prepared GPU check, tested without a GPU.

The dry run prints every command and checks that each benchmark selection collects rows. The full control
flow (steps, time budget, failures, the results table with its targets) runs against a stand-in ``python3``
that plays torch-with-CUDA, pytest and the CLI, in a copy of the script inside a scratch folder.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")  # fmt: skip


def _run(*args, cwd=ROOT, env=None, script=SCRIPT) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_dry_run_prints_every_step_and_collects_every_selection(tmp_path):
    out = _run("--dry-run", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for path in ("bench_stage_attention.py", "bench_kernels_elementwise.py", "bench_multiprocess.py"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"benchmarks/{path}:"))
        assert int(line.split(":")[1].split()[0]) > 0, line
    assert "tests/test_stage_attention.py tests/test_kernels_elementwise.py" in text
    assert "-m mmpl_fast.generate --device cuda" in text
    assert text.count("+ timeout") == 5 and "nothing was run on a GPU" in text


@pytest.mark.parametrize("argv", [["--budget", "soon"], ["--frobnicate"]])
def test_bad_arguments_exit_2(argv):
    out = _run(*argv)
    assert out.returncode == 2 and "gpu_check.sh" in out.stderr


STAND_IN = '''#!{python}
"""A stand-in python3: torch with a CUDA device, pytest that passes (or fails for {fail}) and writes benchmark
tables, the generate CLI; the report script (stdin) runs in the real python."""
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["-"]:
    os.execv({python!r}, [{python!r}, *args])
code = args[1] if args[:1] == ["-c"] else ""
if "find_spec" in code:
    print("pytest_benchmark diffusers imageio_ffmpeg")
elif "get_device_name" in code:
    print("Stand-in GPU; torch 0, triton 0")
elif args[:2] == ["-m", "pytest"]:
    which = next((a for a in args if a.endswith(".py")), "")
    if "{fail}" in which:
        print("1 failed, 2 passed in 1.00s")
        sys.exit(1)
    os.makedirs("benchmarks/results", exist_ok=True)
    rows = [{{"group": "stage attention populate", "name": "triton (ours)", "useful TFLOP/s": 512.0,
             "target TFLOP/s": 450}}] if "attention" in which else []
    if "elementwise" in which:
        rows.append({{"group": "elementwise rope", "name": "triton", "% HBM peak": 70.0, "target %": 80}})
    json.dump({{"results": rows}}, open("benchmarks/results/latest.json", "w"))
    open("benchmarks/results/latest.md", "w").write("| case |\\n|---|\\n| " + which + " |\\n")
    print("3 passed in 1.00s")
elif args[:2] == ["-m", "mmpl_fast.generate"]:
    print("wrote e2e.mp4: 161 frames in 2.0 s")
'''


def _scratch_repo(tmp_path: Path, fail: str) -> Path:
    """A folder laid out like the repository, holding a copy of the script and a stand-in python3 on PATH."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "mmpl_fast" / "kernels").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu_check.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "python3"
    stand_in.write_text(textwrap.dedent(STAND_IN.format(python=sys.executable, fail=fail or "-none-")))
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    return repo


def _stand_in_run(tmp_path, *args, fail: str = ""):
    repo = _scratch_repo(tmp_path, fail)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    out = _run(*args, "--out", str(tmp_path / "out"), cwd=repo, env=env, script=repo / "benchmarks" / "gpu_check.sh")
    return out, tmp_path / "out"


def test_steps_report_and_targets(tmp_path):
    out, results = _stand_in_run(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    report = (results / "gpu_check.md").read_text()
    assert report == out.stdout[out.stdout.index("## mmpl_fast GPU check") :]
    assert "Stand-in GPU" in report
    for step in ("tests", "attn", "elem", "e2e", "packing"):
        assert f"| {step} | ok |" in report, step
    assert "3 passed in 1.00s" in report and "161 frames" in report
    assert "| stage attention populate | 512.0 TFLOP/s | >= 450 | yes |" in report
    assert "| elementwise rope | 70.0 % of HBM peak | >= 80 | NO |" in report  # a missed target is reported
    assert "### attn" in report and "bench_stage_attention.py" in report  # each step's benchmark table


def test_a_failing_step_fails_the_check_and_the_rest_still_run(tmp_path):
    out, results = _stand_in_run(tmp_path, fail="bench_kernels_elementwise")
    assert out.returncode == 1
    report = (results / "gpu_check.md").read_text()
    assert "| elem | FAILED (exit 1) |" in report and "1 failed, 2 passed" in report
    assert "| e2e | ok |" in report and "| packing | ok |" in report


def test_a_spent_budget_skips_steps(tmp_path):
    out, results = _stand_in_run(tmp_path, "--budget", "10")
    assert out.returncode == 0
    report = (results / "gpu_check.md").read_text()
    assert report.count("skipped: budget spent") == 5
