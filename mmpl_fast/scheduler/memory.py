"""Memory: the estimator of what a run holds on a device, and the pre-flight check built on it.

`estimate_memory` itemises one device's memory for a workload (`MemoryBreakdown`): the DiT weights, the
text encoder (umT5-XXL for the Wan presets; 0 when offloaded: prompts are encoded once, so it need not stay
on the device), the VAE, the cross-attention cache (text K/V per prompt and guidance branch), the KV pages of
one segment per guidance branch (the pipeline allocates every frame of the layout a page per branch), the
activations of the largest stage call, and the VAE's decode workspace. Every byte count follows the tensors
the runtime allocates (`tests/test_memory_plan.py` checks them against real `KVPool`s and models).

`preflight` turns it into capacities: per device a fixed part (weights, caches, workspace) and, for every
segment resident at once, its KV pages; a device holds ``(free memory - fixed) // segment bytes`` segments.
Parts that are already loaded when the free memory was read (``loaded=``) are not counted again. A device
that cannot hold one segment is left out, and when no device can, `preflight` raises
`InsufficientMemoryError` naming smaller settings that fit. ``python -m mmpl_fast.schedule --memory`` prints
the plan for a card of a given size.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from ..config import PRESETS
from .costs import VAE_PARAMETERS, VAE_WORKSPACE_CHANNELS, VAE_WORKSPACE_FRAMES, CostModel
from .dag import TaskDAG
from .placement import Device

GIB = 1024**3
# umT5-XXL's encoder (what Wan2.1 uses): d_model 4096, 24 layers, gated FFN 10240, 256384-token vocabulary:
# 1.05 B embedding + 24 x 193 M per layer = 5.68 B parameters (about 11.4 GB in bf16).
UMT5_XXL_PARAMETERS = 5_680_000_000
UMT5_XXL_DIM = 4096
# A CUDA context and the allocator's own reserve, taken off a card's total memory when planning from its size
# (`--device-memory`); a pre-flight check reads free memory after the context exists and needs no reserve.
CUDA_CONTEXT_BYTES = GIB // 2
PARTS = ("dit", "vae", "text_encoder")
PART_ALIASES = {"weights": ("dit", "vae")}


class InsufficientMemoryError(ValueError):
    """No device can hold the model and one segment; the message says what would fit."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """One device's memory for a workload, by part (bytes). See `estimate_memory`.

    Attributes:
        dit_weights: the transformer's parameters.
        vae_weights: the VAE's parameters.
        text_encoder: the text encoder's parameters while resident (0: offloaded).
        cross_cache: text K/V of every prompt and guidance branch (computed once, kept for the run).
        kv_per_branch: KV pages of one segment in one guidance branch (all frames of the layout).
        branches: guidance branches (2 with classifier-free guidance).
        activations: workspace of the largest stage call of one segment (every branch).
        vae_workspace: workspace of a VAE decode (a causal chunk at full resolution).
        batch_copy: extra bytes per segment of a batched launch (its prompt's text K/V, stacked).
    """

    dit_weights: int
    vae_weights: int
    text_encoder: int
    cross_cache: int
    kv_per_branch: int
    branches: int
    activations: int
    vae_workspace: int
    batch_copy: int

    @property
    def kv_per_segment(self) -> int:
        return self.kv_per_branch * self.branches

    @property
    def weights(self) -> int:
        return self.dit_weights + self.vae_weights + self.text_encoder

    @property
    def fixed(self) -> int:
        """Before any segment: weights, the cross-attention cache and one call's workspace."""
        return self.weights + self.cross_cache + max(self.activations, self.vae_workspace)

    def part_bytes(self, part: str) -> int:
        return {"dit": self.dit_weights, "vae": self.vae_weights, "text_encoder": self.text_encoder}[part]

    def peak(self, batch_segments: int = 1) -> int:
        """Peak bytes with `batch_segments` segments resident and launched as one batch."""
        b = batch_segments
        work = b * self.activations + (b * self.batch_copy if b > 1 else 0)
        return self.weights + self.cross_cache + b * self.kv_per_segment + max(work, self.vae_workspace)

    def largest_batch(self, available: int) -> int:
        """The largest `batch_segments` whose `peak` fits in `available` bytes (0: not even one)."""
        b = 0
        while self.peak(b + 1) <= available and b < 4096:
            b += 1
        return b

    def to_dict(self) -> dict:
        return {
            "dit_weights": self.dit_weights, "vae_weights": self.vae_weights, "text_encoder": self.text_encoder,
            "cross_cache": self.cross_cache, "kv_per_branch": self.kv_per_branch, "branches": self.branches,
            "kv_per_segment": self.kv_per_segment, "activations": self.activations,
            "vae_workspace": self.vae_workspace, "batch_copy_per_segment": self.batch_copy, "fixed": self.fixed,
            "peak_one_segment": self.peak(1),
        }  # fmt: skip


def text_encoder_parameters(costs: CostModel) -> int | None:
    """umT5-XXL's size for a model whose text width is umT5-XXL's (the Wan presets); None: not known."""
    return UMT5_XXL_PARAMETERS if costs.workload.config.text_dim == UMT5_XXL_DIM else None


def estimate_memory(
    costs: CostModel,
    dag: TaskDAG | None = None,
    *,
    text_encoder: bool = False,
    text_encoder_params: int | None = None,
    vae_params: int = VAE_PARAMETERS,
) -> MemoryBreakdown:
    """What one device holds for `costs.workload` (and the stages of `dag`; default: an MMPL segment).

    Args:
        text_encoder: count the text encoder as resident (False: offloaded, or prompts encoded elsewhere).
        text_encoder_params: its parameter count (default: umT5-XXL for the Wan presets, else required when
            `text_encoder` is True).
        vae_params: the VAE's parameter count (default: Wan2.1's VAE, 127 M).

    Raises:
        ValueError: `text_encoder` without a known encoder size.
    """
    from ..layouts import get_layout

    w, c = costs.workload, costs.workload.config
    layout = dag.layout if dag is not None else get_layout("mmpl")
    stages = [t for t in dag.tasks if t.is_stage] if dag is not None else []
    frames = max((len(t.frames) for t in stages), default=max(len(s.frames) for s in layout.stages))
    te = 0
    if text_encoder:
        te_params = text_encoder_params if text_encoder_params is not None else text_encoder_parameters(costs)
        if te_params is None:
            raise ValueError(
                f"text_encoder_params: the text encoder of {c.name!r} (text width {c.text_dim}) has no known size"
            )
        te = te_params * w.dtype_bytes
    return MemoryBreakdown(
        dit_weights=c.num_parameters() * w.dtype_bytes,
        vae_weights=vae_params * w.dtype_bytes,
        text_encoder=te,
        cross_cache=w.num_prompts * costs.cross_bytes(),
        kv_per_branch=layout.num_frames * w.page_bytes() // w.branches,
        branches=w.branches,
        activations=frames * w.tokens_per_frame * (c.ffn_dim + 6 * c.dim) * w.dtype_bytes * w.branches,
        vae_workspace=VAE_WORKSPACE_FRAMES * w.height * w.width * VAE_WORKSPACE_CHANNELS * w.dtype_bytes,
        batch_copy=costs.cross_bytes(),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Result of `preflight`.

    Attributes:
        devices: the devices checked.
        fixed_bytes: bytes every device needs before any segment (nothing loaded yet).
        segment_bytes: KV bytes of one resident segment.
        capacity: segments each device can hold at once (None: memory not known, not limited).
        notes: devices left out and why.
        breakdown: the estimate by part.
        workspace: per device, bytes one launch may use for its workspace while the device holds `capacity`
            segments (what a batched or multi-stream launch must fit in; None: not limited).
    """

    devices: tuple[Device, ...]
    fixed_bytes: int
    segment_bytes: int
    capacity: tuple[int | None, ...]
    notes: tuple[str, ...] = ()
    breakdown: MemoryBreakdown | None = None
    workspace: tuple[int | None, ...] = ()

    @property
    def usable(self) -> list[int]:
        """Indices of the devices that can hold at least one segment (or whose memory is not known)."""
        return [i for i, c in enumerate(self.capacity) if c is None or c >= 1]

    def usable_devices(self) -> list[Device]:
        return [self.devices[i] for i in self.usable]

    def usable_capacity(self) -> list[int | None]:
        return [self.capacity[i] for i in self.usable]

    def usable_workspace(self) -> list[int | None]:
        return [self.workspace[i] if self.workspace else None for i in self.usable]

    def describe(self) -> str:
        parts = [f"{d.name}: {'unknown' if c is None else c} segment(s)" for d, c in zip(self.devices, self.capacity)]
        return (
            f"per device {self.fixed_bytes / GIB:.1f} GiB fixed + {self.segment_bytes / GIB:.2f} GiB per resident "
            f"segment; capacity " + ", ".join(parts)
        )


def _loaded_parts(loaded, n: int) -> list[frozenset[str]]:
    """Normalise `preflight`'s ``loaded``: one set of part names per device."""
    if loaded is None:
        return [frozenset()] * n
    if isinstance(loaded, str) or (loaded and all(isinstance(x, str) for x in loaded)):
        per = [loaded] * n
    else:
        per = list(loaded)
        if len(per) != n:
            raise ValueError(f"loaded: expected one collection of parts per device ({n}), got {len(per)}")
    out = []
    for parts in per:
        names: set[str] = set()
        for p in (parts,) if isinstance(parts, str) else parts:
            if p not in PARTS and p not in PART_ALIASES:
                raise ValueError(f"loaded: unknown part {p!r}; parts: {', '.join(PARTS + tuple(PART_ALIASES))}")
            names.update(PART_ALIASES.get(p, (p,)))
        out.append(frozenset(names))
    return out


def _alternatives(costs: CostModel, dag: TaskDAG, free: int, text_encoder: bool) -> list[str]:
    """Settings that would fit one segment in `free` bytes, smallest change first."""
    w = costs.workload
    out: list[str] = []

    def fits(workload, te: bool = text_encoder) -> tuple[bool, int]:
        need = estimate_memory(CostModel(workload, costs.hardware), dag, text_encoder=te).peak(1)
        return need <= free, need

    if text_encoder:
        ok, need = fits(w, False)
        if ok:
            out.append(f"with the text encoder offloaded ({need / GIB:.1f} GiB)")
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
        ok, need = fits(replace(w, config=cfg), False)
        if ok:
            out.append(f"the {name} config at {w.height}x{w.width} ({need / GIB:.1f} GiB)")
    return out


def preflight(
    dag: TaskDAG,
    costs: CostModel,
    devices: Sequence[Device],
    *,
    loaded: Collection[str] | Sequence[Collection[str]] | None = None,
    text_encoder: bool = False,
) -> MemoryPlan:
    """Check memory before a run; see the module docstring.

    Args:
        loaded: what is already in each device's memory when its free memory (`Device.memory_bytes`) was read,
            so it is not counted again: part names (``"dit"``, ``"vae"``, ``"text_encoder"``; ``"weights"``
            = dit and VAE) for every device, or one collection per device. Default: nothing (plan before
            loading). A pipeline that reads free memory after loading its model on ``cuda:0`` and will copy
            it to ``cuda:1`` passes ``loaded=[{"weights", "text_encoder"}, ()]``.
        text_encoder: whether the text encoder stays resident on the devices during the run (False:
            offloaded or encoded elsewhere; where it is in `loaded`, it is already counted either way).

    Raises:
        InsufficientMemoryError: no device can hold the fixed part and one segment.
        ValueError: no devices, or bad `loaded`.
    """
    if not devices:
        raise ValueError("devices: at least one device is required")
    parts = _loaded_parts(loaded, len(devices))
    bd = estimate_memory(costs, dag, text_encoder=text_encoder)
    fixed, seg = bd.fixed, bd.kv_per_segment
    reserve = max(bd.activations, bd.vae_workspace)  # the single call's workspace inside `fixed`
    capacity: list[int | None] = []
    workspace: list[int | None] = []
    notes: list[str] = []
    for d, have in zip(devices, parts):
        need = fixed - sum(bd.part_bytes(p) for p in have)
        if d.memory_bytes is None:
            capacity.append(None)
            workspace.append(None)
            continue
        cap = max(0, (d.memory_bytes - need) // seg) if seg > 0 else dag.num_segments
        capacity.append(int(cap))
        workspace.append(int(d.memory_bytes - need - cap * seg + reserve))
        if cap < 1:
            notes.append(
                f"{d.name} left out: {d.memory_bytes / GIB:.1f} GiB free < {(need + seg) / GIB:.1f} GiB for one segment"
            )
    plan = MemoryPlan(tuple(devices), fixed, seg, tuple(capacity), tuple(notes), bd, tuple(workspace))
    if not plan.usable:
        _refuse(dag, costs, devices, parts, bd, text_encoder)
    return plan


def _refuse(dag, costs, devices, parts, bd: MemoryBreakdown, text_encoder: bool) -> None:
    w = costs.workload
    i = max(range(len(devices)), key=lambda k: devices[k].memory_bytes or 0)
    largest, have = devices[i], parts[i]
    free = largest.memory_bytes or 0
    loaded = sum(bd.part_bytes(p) for p in have)
    guidance = ", guidance" if w.branches == 2 else ""
    frames = dag.layout.num_frames
    page_mib = bd.kv_per_segment / frames / 1024**2
    alternatives = _alternatives(costs, dag, free + loaded, text_encoder)
    what = "; or ".join(alternatives) or "nothing at this model size: use a device with more memory"
    already = f" ({loaded / GIB:.1f} GiB of it already loaded)" if loaded else ""
    fixed, seg = bd.fixed / GIB, bd.kv_per_segment / GIB
    raise InsufficientMemoryError(
        f"cannot run {w.config.name} at {w.height}x{w.width} ({w.dtype}{guidance}): a device needs {fixed:.1f} GiB "
        f"(weights, caches, workspace){already} + {seg:.1f} GiB of KV pages per resident segment ({frames} frames "
        f"x {page_mib:.0f} MiB) = {fixed + seg:.1f} GiB, but the most free memory is {free / GIB:.1f} GiB on "
        f"{largest.name}. What would fit there: {what}."
    )
