"""One call of `Pipeline`, checked and normalised once: `CallArgs` (the arguments as given) -> `Request`.

`build_request` refuses every bad argument before any work starts (``ValueError`` / ``TypeError`` naming the
argument, the value and what is allowed) and resolves everything the run needs: the layout and its chain
arithmetic, the sampling settings of the checkpoint kind, one `VideoSpec` per output video (its prompt per
segment, its seed, its initial noise), the start frames and the devices. `Pipeline.stream` passes the request
on; nothing after it looks at the raw arguments again.

Batch semantics follow diffusers' `WanPipeline`: ``B = number of prompts x num_videos_per_prompt`` videos, video
``b`` made from prompt ``b // num_videos_per_prompt``; `latents`, a list of `generator`s and the output all have
``B`` rows, in that order.

Seeds (the key of every random number, `engine.keyed_noise(seed, segment, stage, step)`), for video ``b``:

* ``seed=s``: ``s + b``;
* ``generator=g`` (one `torch.Generator`): the ``b``-th of ``B`` draws ``torch.randint(0, 2**63 - 1, (),
  generator=g)``, made here, once per call, on the generator's device, before any device work: the generator's
  state advances by exactly ``B`` draws whatever the number of devices or ranks (as diffusers, a reused
  generator gives a new video; a freshly seeded one repeats it);
* ``generator=[g_0, ..., g_{B-1}]``: one such draw from ``g_b``;
* neither: a random seed (the same on every torchrun rank), reported in ``info["seeds"]``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._generation import _broadcast_int, _world
from .chain import ChainPlan
from .layouts import Layout, get_layout
from .sampling import SAMPLERS, Sampler, make_sampler
from .scheduler import POLICIES

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
MODES = {"mmpl": "mmpl", "ar": "ar"}
CALLBACK_INPUTS = ("latents", "velocity")
FPS = 16  # Wan2.1 video frame rate
SEED_LIMIT = 2**63  # seeds are 63-bit (`engine.noise_seed`)
NEGATIVE = "\x00negative:"  # text keys of negative prompts (never a user's prompt: it starts with NUL)
EMBEDS = "\x00embeds:"  # text keys of given prompt embeddings


@dataclass
class CallArgs:
    """The arguments of one `Pipeline` call, as given (diffusers' `WanPipeline` names and order first).

    Args (diffusers' meaning unless noted):
        prompt: a prompt, or a list of prompts (one video each, times `num_videos_per_prompt`).
        negative_prompt: text for the unconditional branch (one, or one per prompt); default empty.
        height, width: pixels, multiples of the VAE's compression x the patch (default: the model's usual size).
        num_frames: video frames; enough segments are generated and the last one trimmed.
        num_inference_steps, guidance_scale: default by checkpoint kind (few-step for Self-Forcing-type weights;
            50 UniPC steps, shift 5, guidance 5 for Wan / MMPL weights).
        num_videos_per_prompt: videos per prompt (each with its own seed).
        generator: a `torch.Generator` or one per video: see the module docstring for the seed it gives.
        latents: ``[B, C, F, H / s, W / s]``, the initial noise of the whole video (s: the VAE's spatial
            compression; F: the video's latent frames, `ChainPlan.video_latent_frames`). It replaces the step-0
            noise of the frames each segment denoises (segment 0's first F0 frames, then every later segment's
            frames after the re-encoded ones, in order); later stochastic draws stay keyed by the seed.
        prompt_embeds, negative_prompt_embeds: ``[P, L, text_dim]`` text-encoder states (umT5's), used as they
            are: no text encoder is needed.
        output_type: ``"np"`` ``[B, T, H, W, 3]``, ``"pt"`` ``[B, T, 3, H, W]``, ``"pil"`` (B lists of images) or
            ``"latent"`` ``[B, C, F, H / s, W / s]`` (the same frames as `latents`).
        callback_on_step_end: ``f(pipe, step, timestep, {name: tensor})`` after every denoising step; may return
            ``{"latents": ...}`` to replace them (``pipe.current_segment`` / ``current_stage`` say where).
        callback_on_step_end_tensor_inputs: names passed to it: ``"latents"``, ``"velocity"``.
        max_sequence_length: text rows per prompt (default: the transformer's ``text_len``, 512 for Wan).
        mode: ``"mmpl"`` (plan keyframes, then populate) or ``"ar"`` (blocks of 3 frames).
        layout: a layout name or `Layout`, overriding the mode's.
        chain: ``"terminal"`` (next segment starts from the terminal keyframes) or ``"middle"``.
        segment_prompts / prompt_schedule: a prompt per segment, or ``[(start_seconds, prompt), ...]``.
        image / video: start the first segment from these frames (PIL, arrays, tensors, or a file path).
        seed: an int instead of `generator`.
        sampler, shift: the solver (``few-step``, ``unipc``, ``euler``) and timestep shift (default by kind).
        batch_segments: at most this many segments hold KV pages on a device at once.
        workdir: save each finished segment there; a rerun resumes after the last one (one video per call).
        devices: several devices of this process (e.g. ``["cuda:0", "cuda:1"]``); None under torchrun.
        policy: ``"adaptive"``, ``"round-robin"`` or ``"cp-first"`` (`mmpl_fast.scheduler`).
        profile: fold the measured task times into the device's cached profile.
        progress: show a progress bar.
    """

    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int = 81
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_videos_per_prompt: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    output_type: str = "np"
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)
    max_sequence_length: int | None = None
    _: KW_ONLY
    mode: str = "mmpl"
    layout: str | Layout | None = None
    chain: str = "terminal"
    segment_prompts: Sequence[str] | None = None
    prompt_schedule: Sequence[tuple[float, str]] | None = None
    image: Any = None
    video: Any = None
    seed: int | None = None
    sampler: str | None = None
    shift: float | None = None
    batch_segments: int = 4
    workdir: str | os.PathLike | None = None
    devices: Sequence[str | torch.device] | None = None
    policy: str = "adaptive"
    profile: bool = True
    progress: bool = True


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of the pipeline's components."""

    spatial: int  # VAE spatial compression
    temporal: int  # VAE temporal compression
    patch: tuple[int, int]  # the DiT's spatial patch
    in_channels: int
    text_dim: int
    text_len: int
    default_size: tuple[int, int]
    sampling: dict  # the kind's defaults with the pipeline's overrides
    has_text_encoder: bool
    device: torch.device

    @property
    def multiple(self) -> int:
        return self.spatial * self.patch[0]


@dataclass(frozen=True)
class VideoSpec:
    """One output video: the text key of each segment's prompt and of the negative prompt, what each key stands
    for (a prompt to encode, or given states ``[L, text_dim]``), its seed and its initial noise
    ``[F, C, h, w]`` (`CallArgs.latents` of this video, frames first) or None."""

    prompts: tuple[str, ...]
    negative: str
    texts: dict[str, str | torch.Tensor]
    seed: int
    latents: torch.Tensor | None = None


@dataclass(frozen=True)
class Request:
    """A checked, normalised call: everything `Pipeline.stream` runs on."""

    videos: tuple[VideoSpec, ...]
    height: int
    width: int
    num_frames: int
    layout: Layout
    plan: ChainPlan
    num_segments: int
    steps: int
    guidance: float
    sampler: str
    shift: float
    solver: Sampler
    output_type: str
    text_len: int
    spatial: int  # the VAE's spatial compression
    latent_shape: tuple[int, int, int, int]  # (F, C, h, w) of one segment's latents
    start_frames: torch.Tensor | None = None  # [3, T, H, W] in [-1, 1]
    callback: Callable | None = None
    callback_inputs: tuple[str, ...] = ("latents",)
    batch_segments: int = 4
    workdir: Path | None = None
    devices: tuple[torch.device, ...] | None = None  # None: the pipeline's device (or the rank's)
    policy: str = "adaptive"
    profile: bool = True
    progress: bool = True

    @property
    def chain(self) -> str:
        return self.plan.mode


# ------------------------------------------------------------------------------------------- checks
def _int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _real(name: str, value, *, low: float = 0.0, strict: bool = False) -> float:
    """A finite number >= low (> low when strict); nan and inf are refused."""
    what = f"a finite number {'>' if strict else '>='} {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _choice(name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    return value


def check_device(value, name: str = "device") -> torch.device:
    """`value` as a torch device this machine can run on; ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        raise TypeError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {value!r}")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} {value!r} is not a device torch knows ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {value!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if dev.type == "meta" or available is None or not available():
            raise ValueError(f"{name} {value!r}: not a device that can run here (cpu, cuda, cuda:N)")
    return dev


#: The dtypes a pipeline runs in, by every name `resolve_dtype` accepts.
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip


def resolve_dtype(dtype, device, name: str = "torch_dtype") -> torch.dtype:
    """The dtype a pipeline on `device` runs in: `dtype` (a `torch.dtype` or a name of `DTYPES`, e.g. "bf16"),
    or by default bfloat16 on CUDA and float32 elsewhere (a CPU has no fast bf16 path and the tests' Triton
    interpreter no bf16 at all). Decided from the device's type only, so it needs no GPU to answer "cuda"."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"{name} {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[key]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name} must be torch.bfloat16, torch.float16 or torch.float32 (or its name), got {dtype!r}")
    return dtype


def check_devices(devices) -> tuple[torch.device, ...] | None:
    """This process's devices (None: the pipeline's own). Under torchrun each rank runs one device."""
    if devices is None:
        return None
    if _world() > 1:
        raise ValueError("devices: under torchrun each rank runs one device (the pipeline's); pass devices=None")
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
        raise TypeError(f"devices must be a non-empty list of devices, e.g. ['cuda:0', 'cuda:1'], got {devices!r}")
    return tuple(check_device(d, f"devices: {d!r}; device") for d in devices)


def check_workdir(workdir, name: str = "workdir") -> Path | None:
    """A folder to keep a resumable run in (it may not exist yet; a file there is refused)."""
    if workdir is None:
        return None
    if not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {workdir!r}")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} exists and is not a folder")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"{name} {path}: {parent} is a file, not a folder")
    return path


# ------------------------------------------------------------------------------------------- frames
def load_media(path, name: str, clip: bool) -> np.ndarray:
    """An image (`clip` False: ``[H, W, 3]``) or every frame of a video or animated file (``[T, H, W, 3]``),
    uint8; ValueError naming `name` when the file is neither."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{name} not found: {p}")
    what = "a video" if clip else "an image"
    if p.is_dir():
        raise ValueError(f"{name} {p} is a folder; expected {what} file")
    import imageio.v3 as iio

    try:
        frames = np.stack(list(iio.imiter(p))) if clip else np.asarray(iio.imread(p))
    except Exception as e:  # imageio raises many types for files it cannot decode
        raise ValueError(f"{name} {p} is not {what} file imageio can read ({type(e).__name__})") from None
    if frames.dtype != np.uint8 or frames.ndim != (4 if clip else 3) - (frames.shape[-1] not in (3, 4)):
        raise ValueError(f"{name} {p}: expected 8-bit RGB frames, got {frames.dtype} of shape {frames.shape}")
    if frames.shape[-1] not in (3, 4):
        frames = np.repeat(frames[..., None], 3, axis=-1)  # grey
    return frames[..., :3]


def to_frames(x, name: str) -> torch.Tensor:
    """An image (PIL, HxWx3 array, 3xHxW tensor, file path) or a clip (list of images, TxHxWx3 array, Tx3xHxW
    tensor, video file) -> float ``[3, T, H, W]`` in [-1, 1]. Arrays are uint8, or floats in [0, 1]."""
    if isinstance(x, (str, os.PathLike)):
        x = load_media(x, name, clip=name == "video")
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name}: empty list of frames")
        return torch.cat([to_frames(f, name) for f in x], dim=1)
    if hasattr(x, "convert"):  # PIL
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name}: expected uint8 or float arrays, got {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t[None] if t.dim() == 3 else t
        if t.dim() != 4 or t.shape[-1] != 3:
            raise ValueError(f"{name}: expected HxWx3 or TxHxWx3 arrays, got shape {tuple(x.shape)}")
        t = t.permute(0, 3, 1, 2)
    elif isinstance(x, torch.Tensor):
        t = x[None] if x.dim() == 3 else x
        if t.dim() != 4 or t.shape[1] != 3 or not (t.dtype.is_floating_point or t.dtype == torch.uint8):
            raise ValueError(f"{name}: expected 3xHxW or Tx3xHxW tensors in [0, 1], got {t.dtype} {tuple(x.shape)}")
    else:
        raise TypeError(f"{name}: expected a PIL image, array, tensor, file path or a list of them, got {type(x)}")
    if t.dtype == torch.uint8:
        return t.float().permute(1, 0, 2, 3) / 127.5 - 1
    t = t.float()
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ValueError(f"{name}: float pixel values must be finite and in [0, 1], got {t.min()}..{t.max()}")
    return t.permute(1, 0, 2, 3) * 2 - 1


def _start_frames(args: CallArgs, height: int, width: int) -> torch.Tensor | None:
    if args.image is not None and args.video is not None:
        raise ValueError("pass either image= or video=, not both")
    if args.image is None and args.video is None:
        return None
    name = "image" if args.image is not None else "video"
    frames = to_frames(args.image if args.image is not None else args.video, name)
    if tuple(frames.shape[2:]) != (height, width):
        raise ValueError(f"{name} frames are {tuple(frames.shape[2:])}, expected {(height, width)} (height, width)")
    return frames[:, :1] if name == "image" else frames


# ------------------------------------------------------------------------------------------ prompts
def segment_prompts(prompt, segment_list, schedule, num_segments: int, plan: ChainPlan) -> list[str]:
    """The prompt of each segment from exactly one of `prompt` (a string), `segment_list`, `schedule`."""
    if sum(x is not None for x in (prompt, segment_list, schedule)) != 1:
        raise ValueError("pass exactly one of prompt=, prompt_embeds=, segment_prompts= or prompt_schedule=")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string or a list of them, got {prompt!r}")
        return [prompt] * num_segments
    if segment_list is not None:
        if isinstance(segment_list, str) or not isinstance(segment_list, Sequence):
            raise TypeError("segment_prompts must be a list of strings, one per segment")
        if len(segment_list) == 0:
            raise ValueError("segment_prompts is empty")
        if len(segment_list) != num_segments:
            raise ValueError(f"segment_prompts has {len(segment_list)} prompts but the video needs {num_segments} "
                             "segments")  # fmt: skip
        if any(not isinstance(p, str) or not p.strip() for p in segment_list):
            raise ValueError("segment_prompts: every prompt must be a non-empty string")
        return list(segment_list)
    return _scheduled_prompts(schedule, num_segments, plan)


def _scheduled_prompts(schedule, num_segments: int, plan: ChainPlan) -> list[str]:
    """``[(start_seconds, prompt), ...]``: a segment takes the prompt in force at its start."""
    if isinstance(schedule, str) or not isinstance(schedule, Sequence) or len(schedule) == 0:
        raise ValueError("prompt_schedule must be a non-empty list of (start_seconds, prompt) pairs")
    sched = []
    for item in schedule:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"prompt_schedule: expected (start_seconds, prompt) pairs, got {item!r}")
        t, p = item
        ok_t = isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
        if not ok_t or not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt_schedule: bad entry {item!r} (finite seconds >= 0, non-empty prompt)")
        sched.append((float(t), p))
    sched.sort()
    if sched[0][0] != 0:
        raise ValueError("prompt_schedule: the first prompt must start at 0 seconds")
    out = []
    for s in range(num_segments):
        start = 0 if s == 0 else (plan.first_segment_frames + (s - 1) * plan.later_segment_frames) / FPS
        out.append([p for t, p in sched if t <= start + 1e-9][-1])
    return out


def _embeds(name: str, value, facts: ModelFacts, rows: int | None = None) -> torch.Tensor:
    """Given text-encoder states ``[P, L, text_dim]``, checked."""
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor [P, L, {facts.text_dim}], got {type(value).__name__}")
    if value.dim() != 3 or value.shape[0] < 1 or value.shape[1] < 1 or value.shape[2] != facts.text_dim:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected [P, L, {facts.text_dim}] (umT5 states)")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} has {value.shape[0]} rows but there are {rows} prompts")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds nan or inf values")
    return value.detach()


def _prompt_list(args: CallArgs, num_segments: int, plan: ChainPlan, facts: ModelFacts) -> list[tuple]:
    """Per prompt: (segment text keys, {key: prompt text or states})."""
    if args.prompt_embeds is not None:
        if any(x is not None for x in (args.prompt, args.segment_prompts, args.prompt_schedule)):
            raise ValueError("pass exactly one of prompt=, prompt_embeds=, segment_prompts= or prompt_schedule=")
        states = _embeds("prompt_embeds", args.prompt_embeds, facts)
        return [((f"{EMBEDS}{i}",) * num_segments, {f"{EMBEDS}{i}": s}) for i, s in enumerate(states)]
    if not facts.has_text_encoder:
        raise ValueError("this pipeline has no text encoder: pass prompt_embeds= (umT5 states [P, L, text_dim])")
    if isinstance(args.prompt, (list, tuple)):
        if not args.prompt:
            raise ValueError("prompt: empty list of prompts")
        out = []
        for p in args.prompt:
            keys = segment_prompts(p, args.segment_prompts, args.prompt_schedule, num_segments, plan)
            out.append((tuple(keys), {k: k for k in keys}))
        return out
    keys = segment_prompts(args.prompt, args.segment_prompts, args.prompt_schedule, num_segments, plan)
    return [(tuple(keys), {k: k for k in keys})]


def _negatives(args: CallArgs, num_prompts: int, guidance: float, facts: ModelFacts) -> list[tuple[str, Any]]:
    """Per prompt: (negative text key, prompt text or states)."""
    if args.negative_prompt_embeds is not None:
        if args.negative_prompt is not None:
            raise ValueError("pass either negative_prompt= or negative_prompt_embeds=, not both")
        states = _embeds("negative_prompt_embeds", args.negative_prompt_embeds, facts, rows=num_prompts)
        return [(f"{NEGATIVE}{EMBEDS}{i}", s) for i, s in enumerate(states)]
    neg = args.negative_prompt if args.negative_prompt is not None else ""
    negs = [neg] * num_prompts if isinstance(neg, str) else neg
    if not isinstance(negs, (list, tuple)) or any(not isinstance(n, str) for n in negs):
        raise TypeError(f"negative_prompt must be a string or a list of strings, got {args.negative_prompt!r}")
    if len(negs) != num_prompts:
        raise ValueError(f"negative_prompt has {len(negs)} entries but there are {num_prompts} prompts")
    if guidance > 1 and not facts.has_text_encoder:
        raise ValueError("guidance_scale > 1 without a text encoder needs negative_prompt_embeds=")
    return [(NEGATIVE + n, n) for n in negs]


# -------------------------------------------------------------------------------------------- seeds
def _draw(g, name: str) -> int:
    if not isinstance(g, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, got {type(g).__name__}")
    return int(torch.randint(0, SEED_LIMIT - 1, (), generator=g, device=g.device))


def seeds_for(generator, seed, count: int) -> list[int]:
    """The seed of each of `count` videos (the module docstring gives the mapping)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed= or generator=, not both")
    if seed is not None:
        seed = _int("seed", seed, low=0)
        if seed + count > SEED_LIMIT:
            raise ValueError(f"seed must be < 2**63 - {count - 1}, got {seed}")
        return [seed + b for b in range(count)]
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"generator: a list of {len(generator)} generators for {count} videos (pass one per "
                             "video, or a single one)")  # fmt: skip
        return [_draw(g, f"generator[{i}]") for i, g in enumerate(generator)]
    if generator is not None:
        return [_draw(generator, "generator") for _ in range(count)]
    base = _broadcast_int(int(torch.randint(0, 2**31 - 1, ()).item()))  # every torchrun rank gets rank 0's
    return [base + b for b in range(count)]


# ------------------------------------------------------------------------------------------ latents
def _latents(value, count: int, plan: ChainPlan, num_segments: int, shape: tuple[int, ...]) -> list:
    """`CallArgs.latents` -> per video ``[F, C, h, w]`` (frames first, float32), or Nones."""
    if value is None:
        return [None] * count
    frames = plan.video_latent_frames(num_segments)
    want = (count, shape[0], frames, *shape[1:])
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"latents must be a float tensor of shape {list(want)}, got {type(value).__name__}")
    if tuple(value.shape) != want:
        raise ValueError(f"latents has shape {list(value.shape)}; expected [B, C, F, h, w] = {list(want)} for "
                         f"{count} video(s) of {num_segments} segment(s)")  # fmt: skip
    if not torch.isfinite(value).all():
        raise ValueError("latents holds nan or inf values")
    return [v.detach().transpose(0, 1).float().contiguous() for v in value]


# ---------------------------------------------------------------------------------------- the request
def _sampling(args: CallArgs, facts: ModelFacts) -> tuple[int, float, str, float, Sampler]:
    d = facts.sampling
    steps = d["steps"] if args.num_inference_steps is None else _int("num_inference_steps", args.num_inference_steps)
    guidance = d["guidance"] if args.guidance_scale is None else args.guidance_scale
    guidance = _real("guidance_scale", guidance)
    sampler = _choice("sampler", d["sampler"] if args.sampler is None else args.sampler, SAMPLERS)
    shift = _real("shift", d["shift"] if args.shift is None else args.shift, strict=True)
    return steps, guidance, sampler, shift, make_sampler(sampler, steps, shift=shift)


def _size(args: CallArgs, facts: ModelFacts) -> tuple[int, int]:
    out = []
    for name, v, default in (("height", args.height, facts.default_size[0]), ("width", args.width,
                                                                             facts.default_size[1])):  # fmt: skip
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if v <= 0 or v % facts.multiple:
            raise ValueError(f"{name}={v} must be a positive multiple of {facts.multiple} (VAE {facts.spatial}x x "
                             f"patch {facts.patch[0]})")  # fmt: skip
        out.append(int(v))
    return out[0], out[1]


def _options(args: CallArgs) -> dict:
    """The run options that need nothing of the model."""
    for name in ("profile", "progress"):
        if not isinstance(getattr(args, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(args, name)!r}")
    inputs = args.callback_on_step_end_tensor_inputs
    if isinstance(inputs, str) or not isinstance(inputs, Sequence):
        raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names, got {inputs!r}")
    for name in inputs:
        if name not in CALLBACK_INPUTS:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {name!r} is not one of 'latents', 'velocity'")
    if args.callback_on_step_end is not None and not callable(args.callback_on_step_end):
        raise TypeError(f"callback_on_step_end must be callable, got {args.callback_on_step_end!r}")
    return dict(
        output_type=_choice("output_type", args.output_type, OUTPUT_TYPES),
        batch_segments=_int("batch_segments", args.batch_segments),
        policy=_choice("policy", args.policy, POLICIES),
        workdir=check_workdir(args.workdir),
        callback=args.callback_on_step_end,
        callback_inputs=tuple(inputs),
        profile=args.profile,
        progress=args.progress,
    )


def build_request(args: CallArgs, facts: ModelFacts) -> Request:
    """Check every argument of `args` against the model (`facts`) and resolve the run; see the module docstring."""
    height, width = _size(args, facts)
    num_frames = _int("num_frames", args.num_frames)
    nvpp = _int("num_videos_per_prompt", args.num_videos_per_prompt)
    options = _options(args)
    _choice("mode", args.mode, MODES)
    layout = get_layout(args.layout if args.layout is not None else MODES[args.mode])
    plan = ChainPlan(layout, args.chain, facts.temporal)
    num_segments = plan.segments_for(num_frames)
    steps, guidance, sampler, shift, solver = _sampling(args, facts)
    prompts = _prompt_list(args, num_segments, plan, facts)
    negatives = _negatives(args, len(prompts), guidance, facts)
    count = len(prompts) * nvpp
    if options["workdir"] is not None and count > 1:
        raise ValueError(f"workdir: a resumable run makes one video per call, this call makes {count}")
    seeds = seeds_for(args.generator, args.seed, count)
    shape = (facts.in_channels, height // facts.spatial, width // facts.spatial)
    latents = _latents(args.latents, count, plan, num_segments, shape)
    text_len = facts.text_len if args.max_sequence_length is None else _int("max_sequence_length",
                                                                            args.max_sequence_length)  # fmt: skip
    videos = []
    for b in range(count):
        keys, texts = prompts[b // nvpp]
        neg_key, neg = negatives[b // nvpp]
        texts = {**texts, neg_key: neg} if guidance > 1 else dict(texts)
        videos.append(VideoSpec(keys, neg_key, texts, seeds[b], latents[b]))
    return Request(
        videos=tuple(videos), height=height, width=width, num_frames=num_frames, layout=layout, plan=plan,
        num_segments=num_segments, steps=steps, guidance=guidance, sampler=sampler, shift=shift, solver=solver,
        text_len=text_len, spatial=facts.spatial, latent_shape=(layout.num_frames, *shape),
        start_frames=_start_frames(args, height, width), devices=check_devices(args.devices), **options,
    )  # fmt: skip
