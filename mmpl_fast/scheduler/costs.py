"""Cost model: how long each task of the DAG takes, from a profile when one exists, else from FLOPs and bytes.

Costs are seconds on a *reference* device (speed 1); a device of speed ``v`` takes ``cost / v``.

Profiles are measured once per (device name, model config, dtype, library versions) and cached as JSON under
``~/.cache/mmpl_fast/profiles/`` (``$MMPL_FAST_CACHE_DIR`` overrides the root). Inside a profile, an entry is
keyed by the workload (size, steps, guidance) and the task's signature (kind, stage, frames, reads, batch),
and is updated from the times a run measures (exponential moving average, `CostModel.observe`).

The estimate (no profile) is a roofline per model call::

    seconds = max(FLOPs / Hardware.matmul_flops, bytes / Hardware.memory_bandwidth) + launch overhead
    FLOPs   = 2 q L (4 d^2 + 2 d^2 + 2 d f)        self-attn q k v o, cross-attn q o, FFN (q query tokens)
            + 4 d q (k + text_len) L               attention: QK^T and PV over k cached tokens and the text
    bytes   = weights + k d 2 L (KV read) + activations

A stage runs `steps` calls plus, when a later stage reads its frames, one t = 0 cache pass; guidance doubles
the calls (two branches). VAE tasks use FLOPs per video pixel measured for the Wan2.1 VAE, divided by the
VAE's assumed throughput. Every constant below says where it comes from; a profile replaces all of them.

Packing and splitting: `streams_cost` / `streams_ends` price tasks launched together on CUDA streams of one
device, `launch_workspace` what a batched or multi-stream launch needs in memory; `split_cost` prices one
stage task across several devices (`split.Split`: compute divided as the busiest device sees it, plus the
all-to-alls and other collectives over the link, `Hardware.link_bandwidth` / `collective_latency`, or a
profile's measured link figures), and `move_seconds` the KV pages and latents that move between where a task
left them and where its successor reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import ModelConfig, resolve_config
from .dag import Edge, Task
from .split import Split, all_to_all_fraction, head_slots, holdings, move_cells, needs, split_tokens

# --- estimate constants ---------------------------------------------------------------------------------------
# Effective throughput of the DiT's matmuls + attention in bf16 on an H100 SXM (989 TFLOP/s dense peak;
# FlashAttention-3 ~600 TFLOP/s forward at head dim 128, DESIGN.md section 4): a round 40% of peak.
H100_MATMUL_FLOPS = 400e12
# The Wan VAE's causal 3D convolutions (96-384 channels, decoded in small causal chunks) run well below the
# transformer's efficiency; assumed half of it. Replace with a profile.
H100_VAE_FLOPS = 200e12
# 80% of the H100 SXM's 3.35 TB/s HBM.
H100_MEMORY_BANDWIDTH = 0.8 * 3.35e12
# Peer copies between devices: NVLink-class (H100 SXM nodes reach 300+ GB/s per direction in practice);
# PCIe-only machines: ~25 GB/s (`Hardware(link_bandwidth=25e9)`, CLI ``--link-gbps 25``).
NVLINK_BANDWIDTH = 200e9
LINK_LATENCY = 20e-6
PCIE_BANDWIDTH = 25e9
PCIE_LATENCY = 30e-6
# A collective (all-to-all, all-gather) among the devices of a split: NCCL's small-message latency inside one
# node is tens of microseconds; assumed 25 us over NVLink, 50 us over PCIe. A profile's measured values win.
COLLECTIVE_LATENCY = 25e-6
PCIE_COLLECTIVE_LATENCY = 50e-6
LINKS = {
    "nvlink": dict(link_bandwidth=NVLINK_BANDWIDTH, link_latency=LINK_LATENCY, collective_latency=COLLECTIVE_LATENCY),
    "pcie": dict(link_bandwidth=PCIE_BANDWIDTH, link_latency=PCIE_LATENCY, collective_latency=PCIE_COLLECTIVE_LATENCY),
}
# Kernel launches per transformer layer per call (norms, projections, rope/page write, attention, FFN) and
# seconds per launch without CUDA graphs: what batching several segments into one call saves.
KERNELS_PER_LAYER = 12
LAUNCH_SECONDS = 5e-6
# FLOPs per video pixel of the Wan2.1 VAE (diffusers `AutoencoderKLWan` defaults), counted with
# `torch.utils.flop_counter` on the meta device: decoding 21 latents of 60x104 to 81 x 480 x 832 frames is
# 275 TFLOP (8.5 MFLOP/pixel); encoding 81 frames of 480 x 832 is 164 TFLOP (5.1 MFLOP/pixel; 5 frames: 5.4).
VAE_DECODE_FLOP_PER_PIXEL = 8.5e6
VAE_ENCODE_FLOP_PER_PIXEL = 5.2e6
# Parameters of that VAE (encoder 53.6 M + decoder 73.3 M) and a rough bound on its decode workspace:
# a causal chunk of 4 frames at full resolution, 96 channels, ~6 live tensors.
VAE_PARAMETERS = 127_000_000
VAE_WORKSPACE_FRAMES = 4
VAE_WORKSPACE_CHANNELS = 96 * 6
# The re-encode (chain.py): decode 4 latents [f0, p_a, p_a, p_b], keep the last 5 video frames, encode them.
REENCODE_LATENTS = 4
REENCODE_VIDEO_FRAMES = 5
# Host writer: frames to a video encoder; ~300 frames/s at 480 x 832 (libx264, a few cores). Assumed.
HOST_PIXELS_PER_SECOND = 1.2e8
# Bytes of one latent element (the engine keeps latents in float32).
LATENT_BYTES = 4

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}
# Link figures a profile may hold (measured), overriding `Hardware`'s.
LINK_KEYS = ("link_bandwidth", "link_latency", "collective_latency")
PROFILE_ALPHA = 0.25


@dataclass(frozen=True)
class Hardware:
    """Throughputs of the reference device the estimate assumes (defaults: one H100 SXM, NVLink peers;
    ``Hardware.linked("pcie")`` for PCIe-only peers)."""

    name: str = "H100 (estimate)"
    matmul_flops: float = H100_MATMUL_FLOPS
    vae_flops: float = H100_VAE_FLOPS
    memory_bandwidth: float = H100_MEMORY_BANDWIDTH
    link_bandwidth: float = NVLINK_BANDWIDTH
    link_latency: float = LINK_LATENCY
    collective_latency: float = COLLECTIVE_LATENCY
    launch_seconds: float = LAUNCH_SECONDS
    host_pixels_per_second: float = HOST_PIXELS_PER_SECOND

    def __post_init__(self) -> None:
        for key in ("matmul_flops", "vae_flops", "memory_bandwidth", "link_bandwidth", "host_pixels_per_second"):
            if not getattr(self, key) > 0:
                raise ValueError(f"Hardware.{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("link_latency", "collective_latency", "launch_seconds"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"Hardware.{key} must be >= 0, got {getattr(self, key)!r}")

    @classmethod
    def linked(cls, link: str, **changes) -> Hardware:
        """The default device with `link` peers (one of `LINKS`: ``"nvlink"``, ``"pcie"``)."""
        if link not in LINKS:
            raise ValueError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
        return cls(**{**LINKS[link], **changes})


@dataclass(frozen=True)
class Workload:
    """What one video asks of the model: config, size, sampler steps, guidance, dtype.

    Attributes:
        config: model config (preset name or `ModelConfig`).
        height, width: video pixels.
        steps: denoising model calls per stage (few-step Self-Forcing sampling: 4).
        guidance: classifier-free guidance scale; above 1 every call runs twice (two caches).
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        vae_spatial, vae_temporal: the VAE's compression (Wan2.1: 8 and 4).
        num_prompts: distinct prompts (cross-attention caches kept on every device).
    """

    config: ModelConfig | str = "wan2.1-t2v-1.3b"
    height: int = 480
    width: int = 832
    steps: int = 4
    guidance: float = 1.0
    dtype: str = "bfloat16"
    vae_spatial: int = 8
    vae_temporal: int = 4
    num_prompts: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", resolve_config(self.config))
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        for key in ("height", "width", "steps", "vae_spatial", "vae_temporal", "num_prompts"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Workload.{key} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"Workload.dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if not isinstance(self.guidance, (int, float)) or self.guidance < 0:
            raise ValueError(f"Workload.guidance must be a non-negative number, got {self.guidance!r}")
        if self.height % self.vae_spatial or self.width % self.vae_spatial:
            raise ValueError(
                f"Workload height/width {self.height}x{self.width} must be multiples of {self.vae_spatial}"
            )
        _ = self.tokens_per_frame  # validates the patch grid

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.vae_spatial, self.width // self.vae_spatial

    @property
    def tokens_per_frame(self) -> int:
        return self.config.tokens_per_frame(*self.latent_size)

    @property
    def branches(self) -> int:
        """Model calls per step: 2 with classifier-free guidance, else 1."""
        return 2 if self.guidance > 1 else 1

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def signature(self) -> str:
        """Profile sub-key: what changes a task's time besides the device/config/dtype/versions."""
        return f"{self.height}x{self.width}/steps{self.steps}/branches{self.branches}"

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from `latent_frames` latents of a causal VAE (the first latent is 1 frame)."""
        return 1 + (latent_frames - 1) * self.vae_temporal if latent_frames > 0 else 0

    def page_bytes(self) -> int:
        """KV bytes of one latent frame across layers, keys and values, all guidance branches."""
        c = self.config
        return 2 * c.num_layers * self.tokens_per_frame * c.dim * self.dtype_bytes * self.branches


def task_signature(task: Task, batch: int = 1) -> str:
    """What a task's time depends on inside one workload: kind, stage, frame counts and batch."""
    stage = "" if task.stage is None else str(task.stage)
    return f"{task.kind}{stage}:f{len(task.frames)}r{len(task.reads)}g{len(task.given)}:b{batch}"


# --- profile cache -----------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions that change kernel speed: mmpl_fast, torch, triton (when installed), CUDA."""
    from .._version import __version__

    out = {"mmpl_fast": __version__}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = str(torch.version.cuda)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "none"
    return out


def config_key(config: ModelConfig) -> str:
    """What a profile is keyed by for the model: its geometry, not its name (a loaded folder's config is named
    after the folder, and two names may share one geometry)."""
    c = config
    return (f"dim{c.dim}-heads{c.num_heads}-layers{c.num_layers}-ffn{c.ffn_dim}-freq{c.freq_dim}-text{c.text_dim}x"
            f"{c.text_len}-in{c.in_channels}-out{c.out_channels}-patch{'x'.join(map(str, c.patch_size))}")  # fmt: skip


def cache_dir() -> Path:
    """Root of mmpl_fast's on-disk cache: ``$MMPL_FAST_CACHE_DIR`` or ``~/.cache/mmpl_fast``."""
    env = os.environ.get("MMPL_FAST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmpl_fast"


@dataclass
class Profile:
    """Measured task times for one (device name, config, dtype, library versions).

    Attributes:
        key: ``{"device": ..., "config": ..., "dtype": ..., "versions": {...}}``.
        entries: ``"<workload signature>|<task signature>" -> seconds``.
        counts: how many measurements each entry has seen.
    """

    key: dict
    entries: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_device(
        cls, device_name: str, config: str | ModelConfig, dtype: str, versions: dict | None = None
    ) -> Profile:
        if not isinstance(device_name, str) or not device_name:
            raise ValueError(f"device_name must be a non-empty str, got {device_name!r}")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        key = {
            "device": device_name,
            "config": config_key(resolve_config(config)),
            "dtype": dtype,
            "versions": dict(versions if versions is not None else library_versions()),
        }
        return cls(key)

    @property
    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.key['device']}-{self.key['config']}-{self.key['dtype']}")
        return f"{slug}-{digest}.json"

    def get(self, workload: Workload, signature: str) -> float | None:
        return self.entries.get(f"{workload.signature}|{signature}")

    def link(self, key: str) -> float | None:
        """A measured link figure (one of `LINK_KEYS`: bytes/s or seconds), or None."""
        return self.entries.get(f"link|{key}")

    def record_link(self, key: str, value: float, alpha: float = PROFILE_ALPHA) -> float:
        """Fold one measured link figure in (e.g. from timing an all-to-all between two devices)."""
        if key not in LINK_KEYS:
            raise ValueError(f"key must be one of {', '.join(LINK_KEYS)}, got {key!r}")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"value must be a finite positive number, got {value!r}")
        k = f"link|{key}"
        old = self.entries.get(k)
        self.entries[k] = float(value) if old is None else (1 - alpha) * old + alpha * float(value)
        self.counts[k] = self.counts.get(k, 0) + 1
        return self.entries[k]

    def record(self, workload: Workload, signature: str, seconds: float, alpha: float = PROFILE_ALPHA) -> float:
        """Fold one measurement in (the first sets the entry; later ones move it by `alpha`). Returns the entry."""
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite non-negative number, got {seconds!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        k = f"{workload.signature}|{signature}"
        old = self.entries.get(k)
        self.entries[k] = float(seconds) if old is None else (1 - alpha) * old + alpha * float(seconds)
        self.counts[k] = self.counts.get(k, 0) + 1
        return self.entries[k]

    def to_dict(self) -> dict:
        return {"key": self.key, "entries": self.entries, "counts": self.counts}


class ProfileCache:
    """Profiles as JSON files in ``<cache_dir>/profiles`` (one per device, config, dtype and versions)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else cache_dir() / "profiles"

    def path(self, profile: Profile) -> Path:
        return self.directory / profile.filename

    def load(self, device_name: str, config: str | ModelConfig, dtype: str, versions: dict | None = None) -> Profile:
        """The cached profile for this key, or an empty one (unreadable files count as missing)."""
        profile = Profile.for_device(device_name, config, dtype, versions)
        path = self.path(profile)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return profile
        if data.get("key") != profile.key:
            return profile
        profile.entries = {str(k): float(v) for k, v in data.get("entries", {}).items()}
        profile.counts = {str(k): int(v) for k, v in data.get("counts", {}).items()}
        return profile

    def save(self, profile: Profile) -> Path:
        """Write atomically (temporary file + rename); returns the path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(profile)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(profile.to_dict(), f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# --- the cost model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassShape:
    """One model call of a stage: query tokens, key tokens (cached + own) per segment."""

    query_tokens: int
    key_tokens: int


# A holding names where a task's outputs live: its devices (the home device first) and its split (None: one
# device). See `split` for what each device of a split holds.
Holding = tuple[tuple[int, ...], Split | None]


class CostModel:
    """Seconds per task on a speed-1 device: the profile's entry when there is one, else the roofline estimate.

    Args:
        workload: model config, size, steps, guidance, dtype.
        hardware: throughputs of the reference device (used by the estimate and for transfers).
        profile: measured times for this device/config/dtype (optional); measured link figures in it
            (`Profile.record_link`) replace the hardware's.
    """

    def __init__(
        self, workload: Workload | None = None, hardware: Hardware | None = None, profile: Profile | None = None
    ):
        self.workload = workload if workload is not None else Workload()
        self.hardware = hardware if hardware is not None else Hardware()
        self.profile = profile
        self._memo: dict[tuple, float] = {}

    def with_hardware(self, **changes) -> CostModel:
        return CostModel(self.workload, replace(self.hardware, **changes), self.profile)

    def link(self, key: str) -> float:
        """A link figure (`LINK_KEYS`): the profile's measured value when it has one, else the hardware's."""
        measured = self.profile.link(key) if self.profile is not None else None
        return measured if measured is not None else getattr(self.hardware, key)

    # ---- per task
    def cost(self, task: Task, batch: int = 1) -> float:
        """Seconds for one launch of `batch` tasks like `task` (batched segments) on a speed-1 device."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        sig = task_signature(task, batch)
        key = (sig, batch)
        if key in self._memo:
            return self._memo[key]
        measured = self.profile.get(self.workload, sig) if self.profile is not None else None
        if measured is None and self.profile is not None:
            # scale a measured launch of the same task at the nearest other batch size by the estimate's batching
            # ratio, so measured and estimated seconds (another device's) never mix for one task
            other = self._measured_batches(task)
            if other:
                b = min(other, key=lambda k: (abs(k - batch), k))
                measured = other[b] * self.estimate(task, batch) / self.estimate(task, b)
        value = measured if measured is not None else self.estimate(task, batch)
        self._memo[key] = value
        return value

    def _measured_batches(self, task: Task) -> dict[int, float]:
        """The profile's measured launches of `task`, by batch size."""
        prefix = f"{self.workload.signature}|{task_signature(task, 1)[:-1]}"
        key = ("batches", prefix)
        if key not in self._memo:
            self._memo[key] = {int(k[len(prefix):]): v for k, v in self.profile.entries.items()
                               if k.startswith(prefix) and k[len(prefix):].isdigit()}  # fmt: skip
        return self._memo[key]

    def source(self, task: Task, batch: int = 1) -> str:
        """``"profile"`` or ``"estimate"``: where `cost` gets its number."""
        if self.profile is not None and self.profile.get(self.workload, task_signature(task, batch)) is not None:
            return "profile"
        return "estimate"

    def observe(self, task: Task, seconds: float, batch: int = 1, *, device_speed: float = 1.0) -> float:
        """Fold a measured task time into the profile (creating an in-memory one if needed).

        `seconds` is measured on a device of relative `device_speed`; it is stored as speed-1 seconds.
        Save with `ProfileCache.save(model.profile)`.
        """
        if not device_speed > 0:
            raise ValueError(f"device_speed must be > 0, got {device_speed!r}")
        if self.profile is None:
            self.profile = Profile.for_device(self.hardware.name, self.workload.config, self.workload.dtype)
        self._memo.clear()
        return self.profile.record(self.workload, task_signature(task, batch), seconds * device_speed)

    def pass_shapes(self, task: Task) -> list[PassShape]:
        """The model calls of a stage task, per segment and guidance branch (empty for VAE/host tasks)."""
        if not task.is_stage:
            return []
        t = self.workload.tokens_per_frame
        shape = PassShape(len(task.frames) * t, (len(task.frames) + len(task.reads)) * t)
        denoised = len(task.frames) - len(task.given)
        calls = (self.workload.steps if denoised > 0 else 0) + (1 if task.cache_pass or denoised == 0 else 0)
        return [shape] * calls

    def launch_overhead(self, task: Task) -> float:
        """Seconds of kernel launches in `task`'s model calls (what batching or streams can hide)."""
        per_call = self.workload.config.num_layers * KERNELS_PER_LAYER * self.hardware.launch_seconds
        return len(self.pass_shapes(task)) * per_call

    def pass_flops(self, shape: PassShape, heads: int = 1) -> float:
        """FLOPs of one call (one segment, one branch); with ``heads = h`` those of the busiest device of an
        h-way head-parallel split (a token shard through the linear layers, its padded head slots in attention)."""
        c = self.workload.config
        d, f, n, q, k = c.dim, c.ffn_dim, c.num_layers, shape.query_tokens, shape.key_tokens
        patch = c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
        linear = 2 * q * n * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * q * d * patch * (c.in_channels + c.out_channels)
        attention = 4 * d * q * (k + c.text_len) * n
        if heads == 1:
            return float(linear + attention)
        return float(linear * split_tokens(q, heads) / q + attention * head_slots(c.num_heads, heads) / c.num_heads)

    def pass_bytes(self, shape: PassShape, batch: int = 1, heads: int = 1) -> float:
        """Bytes one call of `batch` segments moves: weights once, each segment's KV and activations (on one
        device of an h-way head split: all weights, its heads' KV, its token shard's activations)."""
        c, b = self.workload.config, self.workload.dtype_bytes
        weights = c.num_parameters() * b
        kv = 2 * c.num_layers * c.dim * b * (shape.key_tokens + shape.query_tokens)
        activations = shape.query_tokens * c.num_layers * (10 * c.dim + 2 * c.ffn_dim) * b
        if heads == 1:
            return float(weights + batch * (kv + activations))
        q = shape.query_tokens
        kv = kv * head_slots(c.num_heads, heads) / c.num_heads
        return float(weights + batch * (kv + activations * split_tokens(q, heads) / q))

    def _dit_seconds(self, task: Task, batch: int = 1, heads: int = 1, branch_ways: int = 1) -> float:
        """Roofline seconds of the task's model calls on one device (of a split: the busiest one)."""
        hw, w = self.hardware, self.workload
        seconds = 0.0
        calls = batch * w.branches // branch_ways  # the guidance branches are extra segments of the same launch
        overhead = w.config.num_layers * KERNELS_PER_LAYER * hw.launch_seconds
        for shape in self.pass_shapes(task):
            compute = calls * self.pass_flops(shape, heads) / hw.matmul_flops
            memory = self.pass_bytes(shape, calls, heads) / hw.memory_bandwidth
            seconds += max(compute, memory) + overhead
        return seconds

    def estimate(self, task: Task, batch: int = 1) -> float:
        """Roofline seconds of one launch of `batch` tasks like `task` on the reference hardware."""
        hw, w = self.hardware, self.workload
        h, wd = w.height, w.width
        if task.kind == "write":
            return batch * w.video_frames(len(task.frames)) * h * wd / hw.host_pixels_per_second
        if task.kind == "decode":
            return batch * w.video_frames(len(task.frames)) * h * wd * VAE_DECODE_FLOP_PER_PIXEL / hw.vae_flops
        seconds = self._dit_seconds(task, batch)
        if task.kind == "reencode":
            pixels = h * wd
            vae = w.video_frames(REENCODE_LATENTS) * pixels * VAE_DECODE_FLOP_PER_PIXEL
            vae += REENCODE_VIDEO_FRAMES * pixels * VAE_ENCODE_FLOP_PER_PIXEL
            seconds += batch * vae / hw.vae_flops
        return seconds

    # ---- packing several tasks into one launch
    def streams_cost(self, tasks: Sequence[Task]) -> float:
        """Seconds of `tasks` launched at once on separate CUDA streams of one device (speed 1).

        They share the device's compute and bandwidth (their work adds up) and hide each other's kernel-launch
        gaps: all launch overheads but the longest one's. Unlike a batch, the tasks need not be of the same
        stage. Never shorter than the longest task alone.
        """
        singles = [self.cost(t) for t in tasks]
        overheads = [self.launch_overhead(t) for t in tasks]
        return max(sum(singles) - (sum(overheads) - max(overheads)), max(singles))

    def streams_ends(self, tasks: Sequence[Task]) -> list[float]:
        """Seconds after a streams launch starts at which each of `tasks` is done (speed 1). The streams share
        the device (processor sharing: with n members the shortest ends at n times its own work, and so on),
        scaled so that the last ends at `streams_cost`."""
        singles = [self.cost(t) for t in tasks]
        n, total = len(singles), sum(singles)
        ends, before = [0.0] * n, 0.0
        for rank, i in enumerate(sorted(range(n), key=singles.__getitem__)):
            ends[i] = before + (n - rank) * singles[i]
            before += singles[i]
        scale = self.streams_cost(tasks) / total if total > 0 else 0.0
        return [e * scale for e in ends]

    def activation_bytes(self, task: Task) -> int:
        """Workspace of one model call of `task` (one segment, every guidance branch): per query token the FFN
        hidden state and about six hidden-size tensors alive at the peak. 0 for VAE and host tasks."""
        if not task.is_stage:
            return 0
        w, c = self.workload, self.workload.config
        return len(task.frames) * w.tokens_per_frame * (c.ffn_dim + 6 * c.dim) * w.dtype_bytes * w.branches

    def cross_bytes(self) -> int:
        """Text K/V of one prompt, every layer and guidance branch (the cross-attention cache of one prompt)."""
        w, c = self.workload, self.workload.config
        return 2 * c.num_layers * c.text_len * c.dim * w.dtype_bytes * w.branches

    def launch_workspace(self, tasks: Sequence[Task], mode: str = "single") -> int:
        """Bytes one launch needs beyond the KV pages: every member's activations (streams run them at once
        too), plus, for a batch of several segments, the stacked copy of their prompts' text K/V that one
        batched call reads (`CrossAttentionCache.batch`); a call of one segment on its own stream reads its
        prompt's cache in place."""
        act = sum(self.activation_bytes(t) for t in tasks)
        if mode == "batch" and len(tasks) > 1:
            act += len(tasks) * self.cross_bytes()
        return act

    # ---- moldable tasks (one task across several devices; see `split`)
    def check_split(self, task: Task, split: Split) -> None:
        """Raise ValueError when `task` cannot run as `split` (not a stage task, branch split without guidance,
        more head ways than heads)."""
        if not task.is_stage:
            raise ValueError(f"split: {task.name} is not a stage task (VAE and host tasks run on one device)")
        if split.branches == 2 and self.workload.branches != 2:
            raise ValueError(f"split: {task.name}: a guidance-branch split needs guidance > 1")
        if split.heads > self.workload.config.num_heads:
            raise ValueError(f"split: {split.heads} head ways > {self.workload.config.num_heads} heads")

    def split_cost(self, task: Task, split: Split) -> float:
        """Seconds of `task` run as `split` on devices of speed 1 (see `split` for the scheme).

        The model calls' compute divides as the busiest device sees it (token shard, padded head slots, one
        branch); the re-encode's VAE part stays on the home device (not divided). Added: per call and layer
        two all-to-alls of the shard's q, k, v and output over the link (plus the per-collective latency); per
        denoising step, the exchange of the branches' velocities; the final latents' all-gather; with
        ``kv="gather"``, collecting the written KV pages on the home device. With a profile, the measured
        unsplit time is scaled by the estimate's split ratio.
        """
        key = ("split", task_signature(task), split)
        if key in self._memo:
            return self._memo[key]
        self.check_split(task, split)
        base, est = self.cost(task), self.estimate(task)
        divided = self._dit_seconds(task) - self._dit_seconds(task, 1, split.heads, split.branches)
        scale = base / est if est > 0 else 1.0
        value = base - scale * divided + self.split_comm_seconds(task, split)
        self._memo[key] = value
        return value

    def split_options(self, task: Task, max_ways: int, kv: str = "split") -> list[Split]:
        """For each width 2..`max_ways`, the cheapest way to split `task` (head-parallel; guidance-branch parallel,
        alone or with heads, when guidance is on); empty for tasks that cannot be split."""
        if not task.is_stage:
            return []
        key = ("options", task_signature(task), max_ways, kv)
        if key in self._memo:
            return list(self._memo[key])
        w, c = self.workload, self.workload.config
        out = []
        for k in range(2, max_ways + 1):
            shapes = [(k, 1)] + ([(k // 2, 2)] if w.branches == 2 and k % 2 == 0 else [])
            options = [Split(h, b, kv) for h, b in shapes if h <= c.num_heads]
            if options:
                out.append(min(options, key=lambda sp: (self.split_cost(task, sp), sp.branches)))
        self._memo[key] = tuple(out)
        return out

    def split_comm_seconds(self, task: Task, split: Split) -> float:
        """Seconds of the collectives a split adds to `task` (see `split_cost`)."""
        w, c = self.workload, self.workload.config
        bw, lat = self.link("link_bandwidth"), self.link("collective_latency")
        patch = c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
        q = len(task.frames) * w.tokens_per_frame
        seconds = 0.0
        if split.heads > 1:
            padded = head_slots(c.num_heads, split.heads) * split.heads * c.head_dim
            calls = w.branches // split.branches
            for shape in self.pass_shapes(task):  # q, k, v in and the output back, per layer
                sent = 4 * shape.query_tokens * padded * w.dtype_bytes * all_to_all_fraction(split.heads)
                seconds += calls * c.num_layers * (sent / bw + 2 * lat)
        if split.branches == 2 and len(task.frames) > len(task.given):
            velocity = split_tokens(q, split.heads) * c.out_channels * patch * LATENT_BYTES
            seconds += w.steps * (velocity / bw + lat)
        lh, lw = w.latent_size
        latents = len(task.frames) * c.in_channels * lh * lw * LATENT_BYTES
        seconds += latents * (split.ways - 1) / split.ways / bw + lat
        if split.kv == "gather" and task.cache_pass:
            branches, (lo, hi) = split.shard(0, c.num_heads, w.branches)
            home_share = len(branches) / w.branches * (hi - lo) / c.num_heads
            seconds += len(task.frames) * w.page_bytes() * (1 - home_share) / bw + lat
        return seconds

    # ---- data movement and memory
    def edge_bytes(self, edge: Edge) -> int:
        """Bytes that move when the edge's endpoints run on different devices: KV pages for stage edges,
        latents for chain/decode edges, nothing for host edges (the writer's copy is part of its cost)."""
        key = ("bytes", edge.kind, len(edge.frames))
        value = self._memo.get(key)
        if value is None:
            value = 0
            if edge.kind == "stage":
                value = len(edge.frames) * self.workload.page_bytes()
            elif edge.kind in ("chain", "decode"):
                lh, lw = self.workload.latent_size
                value = len(edge.frames) * self.workload.config.in_channels * lh * lw * LATENT_BYTES
            self._memo[key] = value
        return value

    def transfer_seconds(self, edge: Edge) -> float:
        """Seconds to move the edge's data between two devices (0 for edges without data)."""
        size = self.edge_bytes(edge)
        return 0.0 if size == 0 else self.link("link_latency") + size / self.link("link_bandwidth")

    def move_seconds(self, edge: Edge, src: Holding, dst: Holding) -> float:
        """Seconds to bring the edge's data from where its source task left it to where its destination task
        reads it; `src`, `dst` are (devices, split) holdings. KV pages move per (branch, head) cell: a device
        receives only the cells it lacks, the busiest receiver or sender sets the time. Latents are on every
        device of a split and are read on the destination's home device. Between two single devices this is
        `transfer_seconds` (or 0 on the same device)."""
        key = ("move", edge.kind, len(edge.frames), src, dst)
        value = self._memo.get(key)
        if value is not None:
            return value
        size = self.edge_bytes(edge)
        if size == 0:
            value = 0.0
        elif edge.kind != "stage":
            value = 0.0 if dst[0][0] in src[0] else self.transfer_seconds(edge)
        else:
            h, b = self.workload.config.num_heads, self.workload.branches
            recv, send, _ = move_cells(holdings(src[0], src[1], h, b), needs(dst[0], dst[1], h, b))
            most = max(recv, send) * size / (h * b)
            value = 0.0 if most == 0 else self.link("link_latency") + most / self.link("link_bandwidth")
        self._memo[key] = value
        return value

    def segment_bytes(self, num_frames: int) -> int:
        """KV pages a segment of `num_frames` latent frames holds on a device while its stages run there."""
        return num_frames * self.workload.page_bytes()

    def describe(self) -> str:
        w = self.workload
        return (
            f"{w.config.name} {w.height}x{w.width} ({w.tokens_per_frame} tokens/frame), {w.steps} steps"
            f"{', guidance' if w.branches == 2 else ''}, {w.dtype}; "
            + (
                f"profile of {self.profile.key['device']}"
                if self.profile and self.profile.entries
                else f"estimate for {self.hardware.name}"
            )  # fmt: skip
        )
