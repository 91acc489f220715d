"""Pre-flight memory check: how many segments each device can hold, or a refusal that says what would fit.

Per device the run needs a fixed part (DiT and VAE weights, cross-attention caches, workspace; see
`CostModel.fixed_bytes`) and, for every segment resident at once, its KV pages (`CostModel.segment_bytes`,
from the same page accounting as `kv_pool.page_bytes`). A device's capacity is
``(free memory - fixed) // segment bytes`` segments; a device that cannot hold one segment is left out,
and when no device can, `preflight` raises `InsufficientMemoryError` naming smaller settings that fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..config import PRESETS
from .costs import CostModel
from .dag import TaskDAG
from .placement import Device

GIB = 1024**3


class InsufficientMemoryError(ValueError):
    """No device can hold the model and one segment; the message says what would fit."""


@dataclass(frozen=True)
class MemoryPlan:
    """Result of `preflight`.

    Attributes:
        devices: the devices checked.
        fixed_bytes: bytes every device needs before any segment.
        segment_bytes: KV bytes of one resident segment.
        capacity: segments each device can hold at once (None: memory not known, not limited).
        notes: devices left out and why.
    """

    devices: tuple[Device, ...]
    fixed_bytes: int
    segment_bytes: int
    capacity: tuple[int | None, ...]
    notes: tuple[str, ...] = ()

    @property
    def usable(self) -> list[int]:
        """Indices of the devices that can hold at least one segment (or whose memory is not known)."""
        return [i for i, c in enumerate(self.capacity) if c is None or c >= 1]

    def usable_devices(self) -> list[Device]:
        return [self.devices[i] for i in self.usable]

    def usable_capacity(self) -> list[int | None]:
        return [self.capacity[i] for i in self.usable]

    def describe(self) -> str:
        parts = [f"{d.name}: {'unknown' if c is None else c} segment(s)" for d, c in zip(self.devices, self.capacity)]
        return (
            f"per device {self.fixed_bytes / GIB:.1f} GiB fixed + {self.segment_bytes / GIB:.2f} GiB per resident "
            f"segment; capacity " + ", ".join(parts)
        )


def _need(costs: CostModel, dag: TaskDAG) -> tuple[int, int]:
    return costs.fixed_bytes(dag), costs.segment_bytes(dag.layout.num_frames)


def _alternatives(costs: CostModel, dag: TaskDAG, free: int) -> list[str]:
    """Settings that would fit one segment in `free` bytes, smallest change first."""
    w = costs.workload
    out: list[str] = []

    def fits(workload) -> tuple[bool, int]:
        cm = CostModel(workload, costs.hardware)
        fixed, seg = _need(cm, dag)
        return fixed + seg <= free, fixed + seg

    if w.branches == 2:
        ok, need = fits(replace(w, guidance=1.0))
        if ok:
            out.append(f"without classifier-free guidance (one KV cache: {need / GIB:.1f} GiB)")
    if w.dtype == "float32":
        ok, need = fits(replace(w, dtype="bfloat16"))
        if ok:
            out.append(f"bfloat16 instead of float32 ({need / GIB:.1f} GiB)")
    step = 16
    for h in range(w.height - step, step - 1, -step):
        wd = max(step, int(round(w.width * h / w.height / step)) * step)
        try:
            candidate = replace(w, height=h, width=wd)
        except ValueError:
            continue
        ok, need = fits(candidate)
        if ok:
            out.append(
                f"a smaller video: {h}x{wd} ({candidate.tokens_per_frame} tokens per latent frame, "
                f"{need / GIB:.1f} GiB)"
            )
            break
    for name, cfg in sorted(PRESETS.items(), key=lambda kv: -kv[1].num_parameters()):
        if name == w.config.name or cfg.num_parameters() >= w.config.num_parameters():
            continue
        ok, need = fits(replace(w, config=cfg))
        if ok:
            out.append(f"the {name} config at {w.height}x{w.width} ({need / GIB:.1f} GiB)")
    return out


def preflight(dag: TaskDAG, costs: CostModel, devices: Sequence[Device]) -> MemoryPlan:
    """Check memory before a run; see the module docstring.

    Raises:
        InsufficientMemoryError: no device can hold the fixed part and one segment.
        ValueError: no devices.
    """
    if not devices:
        raise ValueError("devices: at least one device is required")
    fixed, seg = _need(costs, dag)
    capacity: list[int | None] = []
    notes: list[str] = []
    for d in devices:
        if d.memory_bytes is None:
            capacity.append(None)
            continue
        cap = max(0, (d.memory_bytes - fixed) // seg) if seg > 0 else dag.num_segments
        capacity.append(int(cap))
        if cap < 1:
            notes.append(
                f"{d.name} left out: {d.memory_bytes / GIB:.1f} GiB free < {(fixed + seg) / GIB:.1f} GiB "
                "for one segment"
            )
    plan = MemoryPlan(tuple(devices), fixed, seg, tuple(capacity), tuple(notes))
    if not plan.usable:
        w = costs.workload
        largest = max(devices, key=lambda d: d.memory_bytes or 0)
        free = largest.memory_bytes or 0
        guidance = ", guidance" if w.branches == 2 else ""
        frames = dag.layout.num_frames
        page_mib = seg / frames / 1024**2
        alternatives = _alternatives(costs, dag, free)
        what = "; or ".join(alternatives) or "nothing at this model size: use a device with more memory"
        raise InsufficientMemoryError(
            f"cannot run {w.config.name} at {w.height}x{w.width} ({w.dtype}{guidance}): a device needs "
            f"{fixed / GIB:.1f} GiB (weights, caches, workspace) + {seg / GIB:.1f} GiB of KV pages per resident "
            f"segment ({frames} frames x {page_mib:.0f} MiB) = {(fixed + seg) / GIB:.1f} GiB, but the most free "
            f"memory is {free / GIB:.1f} GiB on {largest.name}. What would fit there: {what}."
        )
    return plan
