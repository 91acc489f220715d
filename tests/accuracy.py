"""The accuracy rule for kernels (as in flash-attention's tests).

A kernel's error against a float64 reference may be at most twice the error the torch reference makes
in the same dtype, plus a small absolute slack. `report` says where the first mismatches are.
"""

from __future__ import annotations

import pytest
import torch

from mmpl_fast.kernels._dispatch import interpreting

# Kernel tests run on CUDA when there is one, else on CPU tensors through the Triton interpreter (conftest).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        not torch.cuda.is_available() or interpreting(),
        reason="bf16 needs compiled Triton on CUDA (the interpreter has no bf16)",
    ),
    id="bf16",
)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), BF16]

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def report(actual: torch.Tensor, expected: torch.Tensor, limit: float, count: int = 5) -> str:
    diff = (actual.double() - expected.double()).abs()
    bad = (diff > limit).nonzero()[:count]
    rows = [
        f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, want {expected[tuple(i)].item():.6g}"
        for i in bad
    ]
    return f"max error {diff.max().item():.3g} > limit {limit:.3g}; first mismatches:\n" + "\n".join(rows)


def assert_close_to_reference(kernel_out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor) -> None:
    """`exact` is the float64 reference; `torch_out` the torch backend in the kernel's dtype."""
    assert kernel_out.shape == exact.shape, (kernel_out.shape, exact.shape)
    assert torch.isfinite(kernel_out).all(), "kernel output has non-finite values"
    torch_err = (torch_out.double() - exact).abs().max().item()
    limit = 2 * torch_err + ATOL[kernel_out.dtype]
    err = (kernel_out.double() - exact).abs().max().item()
    assert err <= limit, report(kernel_out, exact, limit)
