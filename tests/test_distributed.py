"""Several processes through torch.distributed (gloo on CPU, with NCCL's message matching), launched with torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> np.ndarray:
    """The video of one process (the reference every multi-process run must reproduce)."""
    out = tmp_path_factory.mktemp("one") / "one.npy"
    res = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return np.load(out)


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_under_nccl_message_order_match_one_process_bit_for_bit(one_process, tmp_path, ranks):
    """gloo with NCCL's point-to-point semantics (tags ignored, issue order per peer, one operation at a time
    per pair: `nccl_order`): the frames equal one process's, and every pair of ranks matched its messages."""
    out = tmp_path / "run.npy"
    res = _torchrun(ranks, str(out), "--nccl-order")
    assert res.returncode == 0, res.stderr[-3000:]
    frames = np.load(out)
    assert frames.shape == (81 + 2 * 76, 32, 32, 3)
    assert np.array_equal(frames, one_process)
    logs = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]
    for a in range(ranks):  # the i-th message a sent to b is the i-th b received from a: same shape and dtype
        for b in range(ranks):
            sent = [(shape, dtype) for peer, kind, shape, dtype in logs[a] if peer == b and kind == "send"]
            got = [(shape, dtype) for peer, kind, shape, dtype in logs[b] if peer == a and kind == "recv"]
            assert sent == got, (a, b)
    # The schedule exercised what NCCL makes hard: data both ways between two ranks, and (3 ranks) the writer
    # on rank 0 receiving from two peers.
    carried = {(src, dst) for src, dst, kind in json.loads(Path(f"{out}.edges.json").read_text()) if kind != "order"}
    assert any((b, a) in carried for a, b in carried)
    if ranks == 3:
        assert {1, 2} <= {src for src, dst in carried if dst == 0}


def test_a_failing_rank_ends_the_run_on_every_rank(tmp_path):
    res = _torchrun(2, str(tmp_path / "x.npy"), "--fail", timeout=240)
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr
    assert not (tmp_path / "x.npy").exists()
