"""Test setup. TRITON_INTERPRET must be set before any Triton kernel module is imported, so the
Triton kernels run on CPU tensors here (tests force the backend with `use_backend("triton")`)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_only(reason: str = "needs a CUDA device"):
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)
