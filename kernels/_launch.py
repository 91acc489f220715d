"""How every Triton kernel in `mmpl_fast.kernels` is launched: on its tensors' device, with a proven configuration.

* `device_guard`: Triton launches on ``torch.cuda.current_device()``, not on the tensors' device, and every
  thread has its own current device. `launch` enters this guard for the tensors' device, so a kernel for
  ``cuda:1`` tensors runs on device 1 whatever the calling thread's current device is.
* `launch_arch`: the row of the launch tables a launcher uses. Each op file keeps ONE table of launch
  configurations per (GPU architecture, dtype); ``python -m mmpl_fast.kernels.compile_check`` compiles every
  entry for sm_80, sm_89 and sm_90 and proves it fits (no spills, shared memory within the arch's limit).
  ``None`` is the CPU interpreter (``TRITON_INTERPRET=1``), whose configurations favour few, large programs.
  `target_arch(90)` makes launchers pick a GPU row for any tensors: tests run the GPU tiles in the
  interpreter with it, and the compile check records launches on meta tensors with it.
* `launch`: the one place a kernel starts. On CUDA, with ``MMPL_FAST_AUTOTUNE=1`` and several proven
  configurations, ``triton.autotune`` picks among them; by default the first is used, because tile sizes
  change the summation order and so the last bits of the result (same seed, same video on every device).
* `recording`: instead of launching, record what would be launched (the compile check and the device-guard
  tests use it; nothing runs).

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

# Shared memory one block may use (opt-in maximum), KiB, per compute capability (DESIGN.md section 7).
SHARED_MEMORY_KIB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227}
TABLE_ARCHS = (80, 89, 90)  # the rows of every launch table; each GPU maps to one (`table_arch`)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
AUTOTUNE_ENV = "MMPL_FAST_AUTOTUNE"

T = TypeVar("T")
Arch = int | None  # a row of TABLE_ARCHS, or None for the CPU interpreter
Grid = Callable[[Mapping[str, Any]], tuple[int, ...]]


@dataclass(frozen=True)
class Config:
    """One launch configuration: tile constexprs (``BLOCK_M=128, ...``), warps and software-pipeline stages."""

    tiles: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, num_warps: int, num_stages: int, **tiles: int) -> Config:
        return cls(tuple(tiles.items()), num_warps, num_stages)

    @property
    def meta(self) -> dict[str, int]:
        return dict(self.tiles)

    def __str__(self) -> str:
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in self.tiles)
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


@dataclass
class Launch:
    """A launch as `recording` keeps it: the kernel, its grid rule, positional arguments, constexprs, configs."""

    kernel: Any
    grid: Grid
    args: tuple
    constexprs: dict[str, Any]
    configs: tuple[Config, ...]
    device: torch.device
    name: str = field(default="")


_target: contextvars.ContextVar[Arch] = contextvars.ContextVar("mmpl_fast_target_arch", default=None)
_recorder: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar("mmpl_fast_recorder", default=None)


# ------------------------------------------------------------------------------------------------- devices
def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device, a no-op otherwise (CPU, meta)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. A host tensor reaches a GPU through pinned memory, pinned under that GPU's guard
    (pinning creates a CUDA context on the current device), so the host does not wait and no other GPU is
    touched. A tensor already there is returned as is."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    with device_guard(device):
        return t.pin_memory().to(device, non_blocking=True)


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def table_arch(capability: int) -> int:
    """The launch-table row for a GPU of compute capability `capability` (e.g. 86 for sm_86).

    sm_80/87 (163 KiB shared memory) -> 80; sm_86/89 (99 KiB) -> 89; sm_90 -> 90. Newer GPUs use the 89 row,
    whose configurations fit in 99 KiB (compiled by the check for sm_89 only). Before sm_80 there is no
    bf16 tensor-core path: `_dispatch` sends such GPUs to the torch backend.
    """
    if capability < 80:
        raise RuntimeError(f"the Triton kernels need compute capability 8.0 or newer, got {capability / 10:.1f}")
    if capability in (80, 87):
        return 80
    if 90 <= capability < 100:
        return 90
    return 89


def launch_arch(device: torch.device) -> Arch:
    """The launch-table row for tensors on `device`: `target_arch`'s if set, the GPU's row on CUDA, else None."""
    forced = _target.get()
    if forced is not None:
        return forced
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return table_arch(_capability(index))


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Launchers inside the block pick the `arch` row of their tables whatever the tensors' device."""
    if arch not in TABLE_ARCHS:
        raise ValueError(f"arch: expected one of {TABLE_ARCHS}, got {arch!r}")
    token = _target.set(arch)
    try:
        yield
    finally:
        _target.reset(token)


def pick(table: Mapping[Any, T], arch: Arch, dtype: torch.dtype, op: str, *extra: Any) -> T:
    """The table entry for (arch, dtype name, *extra); the interpreter's entry is keyed ``(None, *extra)``."""
    if arch is None:
        return table[(None, *extra)]
    key = (arch, DTYPE_NAMES.get(dtype), *extra)
    if key not in table:
        allowed = sorted({k[1] for k in table if k[0] == arch})
        raise TypeError(f"{op}: the Triton kernel on a GPU takes {', '.join(allowed)} tensors, got {dtype}")
    return table[key]


# -------------------------------------------------------------------------------------------------- launch
@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block `launch` records launches into the yielded list instead of running them."""
    launches: list[Launch] = []
    token = _recorder.set(launches)
    try:
        yield launches
    finally:
        _recorder.reset(token)


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") == "1"


@functools.cache
def _autotuner(kernel, configs: tuple[Config, ...], key: tuple[str, ...]):
    import triton

    tconfigs = [triton.Config(c.meta, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
    return triton.autotune(configs=tconfigs, key=list(key))(kernel)


def launch(
    kernel,
    grid: Grid,
    args: Sequence,
    *,
    device: torch.device,
    configs: Sequence[Config],
    constexprs: Mapping[str, Any] | None = None,
    autotune_key: Sequence[str] = (),
) -> None:
    """Launch `kernel` on `device` with the first of `configs` (or the autotuned best, see the module docstring).

    `grid` maps the chosen configuration's tiles (a dict) to the launch grid.
    """
    constexprs = dict(constexprs or {})
    configs = tuple(configs)
    with device_guard(device):
        recorder = _recorder.get()
        if recorder is not None:
            recorder.append(Launch(kernel, grid, tuple(args), constexprs, configs, device, _name(kernel)))
            return
        if len(configs) > 1 and autotune_key and device.type == "cuda" and autotune_enabled():
            _autotuner(kernel, configs, tuple(autotune_key))[lambda meta: grid(meta)](*args, **constexprs)
            return
        c = configs[0]
        kernel[grid(c.meta)](*args, **constexprs, **c.meta, num_warps=c.num_warps, num_stages=c.num_stages)


def _name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))
