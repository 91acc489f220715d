"""Test setup. Without a GPU, TRITON_INTERPRET=1 must be set before any Triton kernel module is imported,
so the Triton kernels run on CPU tensors (tests force the backend with `use_backend("triton")`). With a GPU
the kernels are compiled and run on CUDA tensors instead."""

import os
import tempfile

# One BLAS thread for numpy: the Triton interpreter does its tile math in numpy, and a second BLAS thread
# spinning on a busy 2-core machine made its small matmuls ~30x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Runs fold their measured task times into a profile cache: keep the tests' out of the user's ~/.cache.
os.environ.setdefault("MMPL_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="mmpl_fast-tests-"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_only(reason: str = "needs a CUDA device"):
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)
