"""Backend choice for every op in `mmpl_fast.kernels`.

Each op has two implementations with one signature: a Triton kernel and a torch reference (which is
also the CPU backend). The choice is made here, in one place:

* ``auto`` (default): Triton when every tensor is on CUDA and Triton imports, the torch reference otherwise;
  with ``TRITON_INTERPRET=1`` Triton also runs on CPU tensors (slowly), which is how the tests exercise it.
* ``MMPL_FAST_BACKEND=torch|triton`` in the environment, or ``with use_backend("triton"):``, forces one.
  A forced backend that cannot run raises ``RuntimeError`` saying why.
* GPUs before sm_80 (no bf16 tensor cores; the launch tables start at sm_80, see `_launch`) take the torch
  backend under ``auto``; forcing Triton there raises.

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


def _old_gpu(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why the tensors' GPU cannot run the Triton kernels (before sm_80: no bf16 tensor cores), else None."""
    from ._launch import _capability  # a cached device query, made only for CUDA tensors

    for t in tensors:
        if t.is_cuda:
            index = t.device.index if t.device.index is not None else torch.cuda.current_device()
            if _capability(index) < 80:
                return f"{t.device} has compute capability {_capability(index) / 10:.1f}; the kernels need 8.0+"
    return None


def resolve(op: str, *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for a call of `op` on `tensors`."""
    want = requested_backend()
    if want == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    why = None
    if not triton_available():
        why = "triton does not import"
    elif not (on_cuda or interpreting()):
        why = "its tensors are on the CPU (set TRITON_INTERPRET=1 before importing to run Triton there)"
    elif on_cuda and not interpreting():
        why = _old_gpu(tensors)
    if want == "triton":
        if why is not None:
            raise RuntimeError(f"{op}: the triton backend was forced but cannot run: {why}")
        return "triton"
    return "triton" if (why is None and on_cuda) else "torch"
