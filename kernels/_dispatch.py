"""Backend choice for every op in `mmpl_fast.kernels`.

Each op has two implementations with one signature: a Triton kernel and a torch reference (which is
also the CPU backend). The choice is made here, in one place:

* ``auto`` (default): Triton when every tensor is on CUDA and Triton imports, the torch reference otherwise;
  with ``TRITON_INTERPRET=1`` Triton also runs on CPU tensors (slowly), which is how the tests exercise it.
* ``MMPL_FAST_BACKEND=torch|triton`` in the environment, or ``with use_backend("triton"):``, forces one.
  A forced backend that cannot run raises ``RuntimeError`` saying why.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "MMPL_FAST_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmpl_fast_backend", default=None)


@functools.cache
def triton_available() -> bool:
    """True when `triton` imports (it does not need a GPU to import)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else ``$MMPL_FAST_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``"torch"`` or ``"triton"`` (or restore ``"auto"``) for the ops called inside the block."""
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def resolve(op: str, *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for a call of `op` on `tensors`."""
    want = requested_backend()
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = triton_available() and (on_cuda or interpreting())
    if want == "torch":
        return "torch"
    if want == "triton":
        if not runnable:
            why = (
                "triton does not import"
                if not triton_available()
                else ("its tensors are on the CPU (set TRITON_INTERPRET=1 before importing to run Triton there)")
            )
            raise RuntimeError(f"{op}: the triton backend was forced but cannot run: {why}")
        return "triton"
    return "triton" if (runnable and on_cuda) else "torch"
