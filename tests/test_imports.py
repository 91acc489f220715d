"""Importing the package does nothing CUDA-related and needs no GPU; the CLIs' --help runs without one."""

from __future__ import annotations

import subprocess
import sys


def test_import_touches_no_cuda():
    code = (
        "import torch, mmpl_fast, mmpl_fast.kernels, mmpl_fast.scheduler, mmpl_fast.train, mmpl_fast.evaluate\n"
        "from mmpl_fast import Pipeline\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised at import'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_schedule_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "mmpl_fast.schedule", "--help"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0
    for flag in ("--segments", "--devices", "--speeds", "--config", "--policy", "--json", "--timeline"):
        assert flag in out.stdout
