"""`python -m mmpl_fast.kernels.compile_check`: every kernel compiles for sm_80, sm_89 and sm_90 within limits.

The real compile (``--quick``: one representative configuration per kernel and arch, bf16 at the Wan2.1-1.3B
shapes) runs once in a subprocess: the tests import the kernels under ``TRITON_INTERPRET=1``, and `main`
starts a clean process for the compiler. The rules that fail a configuration are checked on synthetic rows.
"""

from __future__ import annotations

import json

import pytest
import torch

from mmpl_fast.kernels import compile_check
from mmpl_fast.kernels._launch import SHARED_MEMORY_KIB, TABLE_ARCHS

KERNELS = {
    "_stage_attention_kernel",
    "_rope_write_kernel",
    "_norm_modulate_kernel",
    "_gated_residual_kernel",
    "_denoise_update_kernel",
    "_euler_step_kernel",
    "_cfg_combine_kernel",
}


def test_quick_check_compiles_every_kernel_for_every_arch(capfd):
    rc = compile_check.main(["--quick", "--json"])
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    report = json.loads(out)
    assert report["ok"] and report["archs"] == list(TABLE_ARCHS)
    rows = report["rows"]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in TABLE_ARCHS}
    for r in rows:
        assert r["error"] is None and r["failures"] == [], r
        assert r["dtype"] == "bf16" and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
        assert r["shared_bytes"] <= SHARED_MEMORY_KIB[r["arch"]] * 1024
    attention = {r["arch"]: r for r in rows if r["kernel"] == "_stage_attention_kernel"}
    assert {a: r["tensor_cores"] for a, r in attention.items()} == {80: "mma", 89: "mma", 90: "wgmma"}
    assert all(r["tensor_cores"] == "-" for r in rows if r["kernel"] != "_stage_attention_kernel")


def test_problems_reach_every_launcher_on_every_arch_and_dtype():
    """Each problem records a launch (on meta tensors, nothing runs) for every arch and dtype; --quick keeps
    one problem per op, and every op in the package has problems."""
    problems = compile_check.problems()
    ops = {p.op for p in problems}
    assert ops == {"stage_attention", "rope_write", "norm_modulate", "gated_residual", "denoise_update",
                   "euler_step", "cfg_combine"}  # fmt: skip
    assert sorted(p.op for p in problems if p.quick) == sorted(ops)
    seen = set()
    for p in problems:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for arch in TABLE_ARCHS:
                launches = compile_check.record(p, arch, dtype)
                assert all(launch.device.type == "meta" and launch.configs for launch in launches)
                seen.update(launch.name for launch in launches)
    assert seen == KERNELS
    shapes = " ".join(p.shape for p in problems)
    assert "1.3B" in shapes and "14B" in shapes and "mmpl stages 1-3" in shapes and "ar block" in shapes


def _row(**kw) -> compile_check.Row:
    base = dict(kernel="_k", arch=89, dtype="bf16", config="c", default=True, registers=128, spill_bytes=0,
                shared_bytes=64 * 1024, tensor_cores="mma", threads=256)  # fmt: skip
    return compile_check.Row(**{**base, **kw})


@pytest.mark.parametrize(
    "changes, why",
    [
        ({}, None),
        ({"shared_bytes": 100 * 1024}, "shared memory 100 KiB > sm_89's 99 KiB"),
        ({"arch": 80, "shared_bytes": 100 * 1024}, None),
        ({"arch": 90, "shared_bytes": 228 * 1024}, "227 KiB"),
        ({"spill_bytes": 32}, "32 bytes of register spills in bf16"),
        ({"spill_bytes": 32, "dtype": "fp16"}, "spills in fp16"),
        ({"spill_bytes": 32, "dtype": "fp32", "tensor_cores": "none"}, None),  # fp32 may spill, has no tensor cores
        ({"tensor_cores": "none"}, "bf16 dot without tensor cores"),
        ({"registers": 255, "threads": 512}, "255 registers x 512 threads"),
        ({"error": "PTXASError: boom", "registers": None}, "compile error: PTXASError: boom"),
    ],
)
def test_failure_rules(changes, why):
    failures = _row(**changes).failures()
    if why is None:
        assert failures == []
    else:
        assert len(failures) == 1 and why in failures[0]


def test_ptxas_and_tensor_core_parsing():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "    40 bytes stack frame, 32 bytes spill stores, 24 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 480 bytes cmem[0]\n"
    )
    assert compile_check.parse_ptxas(log) == {"registers": 255, "spill_bytes": 56, "static_shared": 1024}
    with pytest.raises(ValueError, match="no register count"):
        compile_check.parse_ptxas("ptxas fatal")
    assert compile_check.tensor_cores("tt.dot", "wgmma.mma_async.sync.aligned") == "wgmma"
    assert compile_check.tensor_cores("tt.dot", "mma.sync.aligned.m16n8k16") == "mma"
    assert compile_check.tensor_cores("tt.dot", "fma.rn.f32") == "none"
    assert compile_check.tensor_cores("tt.load", "ld.global") == "-"


@pytest.mark.parametrize("argv", [["--arch", "75"], ["--arch", "x"], ["--dtype", "fp64"], ["--op", "conv"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        compile_check.main(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err
