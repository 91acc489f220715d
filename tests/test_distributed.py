"""Several processes through torch.distributed (gloo on CPU), launched with torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(WORKER), *args]  # fmt: skip
    env = {**os.environ, "MMPL_FAST_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_gloo_ranks_match_one_process_bit_for_bit(tmp_path):
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.npy")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, str(tmp_path / "two.npy"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert a.shape == (81 + 2 * 76, 32, 32, 3)
    assert np.array_equal(a, b)


def test_a_failing_rank_ends_the_run_on_every_rank(tmp_path):
    res = _torchrun(2, str(tmp_path / "x.npy"), "fail", timeout=240)
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr
    assert not (tmp_path / "x.npy").exists()
