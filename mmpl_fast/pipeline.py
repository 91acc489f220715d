"""`Pipeline`: diffusers-style text-to-video (and image/video continuation) with MMPL or AR generation.

``pipe(prompt=..., num_frames=..., ...)`` follows diffusers' `WanPipeline` call style and adds ``mode``,
``layout``, ``chain``, ``segment_prompts`` / ``prompt_schedule``, ``image`` / ``video`` and ``workdir``.

One call, as data::

    prompts -> text encoder -> cross-attention K/V cached once per prompt
    for each window of segments:
        chain part (stages up to the handoff keyframes), segment by segment:
            start latents (noise | re-encoded from the previous segment | the user's image/video)
        populate part, all segments of the window batched per stage
        VAE decode -> stitch (drop the re-encoded overlap) -> frames  (yielded per segment by `stream`)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._generation import (
    DTYPE_NAMES,
    SegmentFrames,
    _all_gather_int,
    _broadcast_int,
    _broadcast_schedule,
    _broadcast_tensor,
    _DeviceState,
    _Emitter,
    _free_memory,
    _Generation,
    _rank,
    _Run,
    _world,
)
from .chain import ChainPlan, encode_start, reencode
from .components import TextEncoder, VideoVAE
from .engine import StageEngine
from .kv_pool import CrossAttentionCache, KVPool
from .layouts import Layout, get_layout
from .loading import load_transformer_with_format, save_transformer
from .model import CausalWanModel
from .sampling import default_sampling, make_sampler
from .scheduler.execute import Executor

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
MODES = {"mmpl": "mmpl", "ar": "ar"}
KINDS = ("tiny", "self_forcing", "causvid", "mmpl", "wan", "world")
FPS = 16  # Wan2.1 video frame rate


@dataclass
class PipelineOutput:
    """`frames`: ``[1, T, H, W, 3]`` floats in [0, 1] for "np" (``[1, T, 3, H, W]`` for "pt", a list of
    PIL image lists for "pil", per-segment latents ``[S, F, C, h, w]`` for "latent": the F latent frames of
    a segment that its video shows, 21 with the terminal chain, 13 with the middle one)."""

    frames: Any
    info: dict = field(default_factory=dict)


def _seed_from(generator, seed) -> int:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed= or generator=, not both")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return seed
    if generator is not None:
        if isinstance(generator, list):
            if len(generator) != 1:
                raise ValueError("generator: one video per call, pass a single torch.Generator")
            generator = generator[0]
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator.initial_seed()
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _to_frames(x, name: str) -> torch.Tensor:
    """An image (PIL, HxWx3 array, 3xHxW tensor) or a clip (list of images, TxHxWx3 array, Tx3xHxW tensor)
    -> float ``[3, T, H, W]`` in [-1, 1]."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name}: empty list of frames")
        return torch.cat([_to_frames(f, name) for f in x], dim=1)
    if hasattr(x, "convert"):  # PIL
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[-1] != 3:
            raise ValueError(f"{name}: expected HxWx3 or TxHxWx3 arrays, got shape {tuple(x.shape)}")
        t = t.permute(3, 0, 1, 2)
        t = t.float() / 127.5 - 1 if t.dtype == torch.uint8 else t.float() * 2 - 1
        return t
    if isinstance(x, torch.Tensor):
        t = x[None] if x.dim() == 3 else x
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{name}: expected 3xHxW or Tx3xHxW tensors in [0, 1], got shape {tuple(x.shape)}")
        return t.float().permute(1, 0, 2, 3) * 2 - 1
    raise TypeError(f"{name}: expected a PIL image, numpy array, tensor or a list of them, got {type(x).__name__}")


#: VAE classes a pipeline folder may name (vae/config.json's ``_class_name``) and the module that defines each.
#: The embedded model's `WorldVAE` lives in its own wing (`mmpl_fast.world`), imported only when a folder names it.
VAE_CLASSES = {"AutoencoderKLWan": "diffusers", "WorldVAE": "mmpl_fast.world.vae"}


def _vae_class(folder: Path):
    """diffusers `AutoencoderKLWan`, or the embedded model's `WorldVAE`, as the folder's config.json says."""
    import importlib

    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"pipeline component missing: {config}")
    try:
        name = json.loads(config.read_text()).get("_class_name", "AutoencoderKLWan")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not valid JSON: {e}") from e
    if name not in VAE_CLASSES:
        raise ValueError(f"{config}: VAE class {name!r} is not one of {', '.join(VAE_CLASSES)}")
    return getattr(importlib.import_module(VAE_CLASSES[name]), name)


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


class Pipeline:
    """Long-video generation with a causal Wan2.1 DiT.

    Args:
        transformer: the causal DiT.
        vae: diffusers `AutoencoderKLWan`.
        text_encoder: umT5 encoder (any transformers encoder returning ``last_hidden_state``).
        tokenizer: its tokenizer.
        kind: what the weights are, to pick sampling defaults: one of `KINDS`.
        default_size: (height, width) used when the call gives none.
        sampling: overrides of the kind's sampling defaults (``sampler``, ``steps``, ``shift``, ``guidance``),
            e.g. the shift a model was trained with; saved with the pipeline.
    """

    def __init__(
        self,
        transformer: CausalWanModel,
        vae,
        text_encoder,
        tokenizer,
        *,
        kind: str = "wan",
        default_size: tuple[int, int] = (480, 832),
        sampling: dict | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        sampling = dict(sampling or {})
        unknown = set(sampling) - {"sampler", "steps", "shift", "guidance"}
        if unknown:
            raise ValueError(f"sampling: unknown keys {sorted(unknown)}; allowed: sampler, steps, shift, guidance")
        self.sampling = sampling
        self.transformer = transformer.eval()
        self.vae = VideoVAE(vae)
        self.text = TextEncoder(tokenizer, text_encoder, transformer.config.text_len)
        self.kind = kind
        self.default_size = default_size
        if self.vae.z_dim != transformer.config.in_channels:
            raise ValueError(
                f"vae latent channels {self.vae.z_dim} != transformer in_channels {transformer.config.in_channels}"
            )
        self.current_segment = self.current_stage = None

    # ---------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        transformer: str | os.PathLike | None = None,
        config=None,
        kind: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Pipeline:
        """Load a diffusers-format Wan2.1 folder (model_index.json, tokenizer/, text_encoder/, vae/, transformer/).

        `transformer` replaces the folder's transformer with a checkpoint in any supported format (original Wan,
        diffusers, Self-Forcing/MMPL ``.pt``). Nothing is downloaded; a missing component is an error naming it.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"pipeline folder not found: {root}")
        if not (root / "model_index.json").exists():
            raise FileNotFoundError(f"{root / 'model_index.json'} is missing: not a diffusers pipeline folder")
        for name in ("tokenizer", "text_encoder", "vae") + (() if transformer else ("transformer",)):
            if not (root / name).is_dir():
                raise FileNotFoundError(f"pipeline component missing: {root / name}")
        weights = Path(transformer) if transformer else root / "transformer"
        model, fmt = load_transformer_with_format(weights, config, device=device, dtype=dtype)
        extra = json.loads((root / "model_index.json").read_text()).get("mmpl_fast", {})
        if kind is None:
            kind = "self_forcing" if fmt == "self_forcing" else extra.get("kind", "wan")
        vae = _vae_class(root / "vae").from_pretrained(root / "vae", local_files_only=True, low_cpu_mem_usage=False)
        vae = vae.to(device)
        text_dtype = dtype if dtype is not None else torch.float32
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", local_files_only=True, dtype=text_dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        size = tuple(extra.get("default_size", (480, 832)))
        return cls(model, vae, encoder.to(device), tokenizer, kind=kind, default_size=size,
                   sampling=extra.get("sampling"))  # fmt: skip

    @classmethod
    def tiny(cls, seed: int = 0, device: torch.device | str = "cpu") -> Pipeline:
        """Random tiny components on the real code path (tests, laptops); the video is noise."""
        from .tiny import tiny_components

        c = tiny_components(seed)
        return cls(
            c["transformer"].to(device), c["vae"].to(device), c["text_encoder"].to(device), c["tokenizer"],
            kind="tiny", default_size=(64, 64),
        )  # fmt: skip

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a diffusers-format folder that `from_pretrained` (and diffusers) can read back."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        save_transformer(self.transformer, root / "transformer")
        self.vae.vae.save_pretrained(root / "vae")
        self.text.encoder.save_pretrained(root / "text_encoder")
        self.text.tokenizer.save_pretrained(root / "tokenizer")
        index = {
            "_class_name": "WanPipeline",
            "tokenizer": ["transformers", type(self.text.tokenizer).__name__],
            "text_encoder": ["transformers", type(self.text.encoder).__name__],
            "vae": [type(self.vae.vae).__module__.split(".")[0], type(self.vae.vae).__name__],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "mmpl_fast": {"kind": self.kind, "default_size": list(self.default_size), "sampling": self.sampling},
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=1))
        return root

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def spatial_multiple(self) -> int:
        return self.vae.spatial * self.transformer.config.patch_size[1]

    # -------------------------------------------------------------------------------------- checking
    def _segment_prompts(self, prompt, segment_prompts, prompt_schedule, num_segments, plan) -> list[str]:
        given = sum(x is not None for x in (prompt, segment_prompts, prompt_schedule))
        if given != 1:
            raise ValueError("pass exactly one of prompt=, segment_prompts= or prompt_schedule=")
        if prompt is not None:
            if isinstance(prompt, (list, tuple)):
                if len(prompt) != 1:
                    raise ValueError(
                        f"prompt: one video per call; got {len(prompt)} prompts (use segment_prompts= for a prompt "
                        "per segment)"
                    )
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
            return [prompt] * num_segments
        if segment_prompts is not None:
            if isinstance(segment_prompts, str) or not isinstance(segment_prompts, Sequence):
                raise TypeError("segment_prompts must be a list of strings, one per segment")
            if len(segment_prompts) == 0:
                raise ValueError("segment_prompts is empty")
            if len(segment_prompts) != num_segments:
                raise ValueError(
                    f"segment_prompts has {len(segment_prompts)} prompts but the video needs {num_segments} segments"
                )
            if any(not isinstance(p, str) or not p.strip() for p in segment_prompts):
                raise ValueError("segment_prompts: every prompt must be a non-empty string")
            return list(segment_prompts)
        # prompt_schedule: [(start_second, prompt), ...]; a segment takes the prompt in force at its start.
        if not isinstance(prompt_schedule, Sequence) or len(prompt_schedule) == 0:
            raise ValueError("prompt_schedule must be a non-empty list of (start_seconds, prompt) pairs")
        sched = []
        for item in prompt_schedule:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"prompt_schedule: expected (start_seconds, prompt) pairs, got {item!r}")
            t, p = item
            if not isinstance(t, (int, float)) or t < 0 or not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt_schedule: bad entry {item!r} (seconds >= 0, non-empty prompt)")
            sched.append((float(t), p))
        sched.sort()
        if sched[0][0] != 0:
            raise ValueError("prompt_schedule: the first prompt must start at 0 seconds")
        out = []
        for s in range(num_segments):
            start = 0 if s == 0 else (plan.first_segment_frames + (s - 1) * plan.later_segment_frames) / FPS
            out.append([p for t, p in sched if t <= start + 1e-9][-1])
        return out

    def check_inputs(self, height, width, num_frames, num_inference_steps, guidance_scale, output_type, mode) -> None:
        m = self.spatial_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if v <= 0 or v % m:
                raise ValueError(f"{name}={v} must be a positive multiple of {m} (VAE {self.vae.spatial}x x patch)")
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames <= 0:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps <= 0):
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if guidance_scale is not None and (not isinstance(guidance_scale, (int, float)) or guidance_scale < 0):
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")

    # ------------------------------------------------------------------------------------------ call
    def __call__(self, prompt=None, *, return_dict: bool = True, **kwargs):
        """Generate one video. Keyword arguments as in `stream`; returns `PipelineOutput` (or a tuple).

        Under torchrun every rank must make the same call; rank 0's output holds the frames, the other ranks'
        ``frames`` is None.
        """
        output_type = kwargs.get("output_type", "np")
        chunks, latents, info = [], [], {}
        for seg in self.stream(prompt, _info=info, **kwargs):
            chunks.append(seg.frames)
            latents.append(seg.latents)
        if _rank() != 0:  # torchrun: rank 0 holds the video; the other ranks only computed their share
            frames = None
        elif output_type == "latent":
            frames = torch.stack(latents)
        elif output_type == "np":
            frames = np.concatenate(chunks, axis=0)[None]
        elif output_type == "pt":
            frames = torch.cat(chunks, dim=0)[None]
        else:
            frames = [[img for chunk in chunks for img in chunk]]
        return PipelineOutput(frames=frames, info=info) if return_dict else (frames,)

    def stream(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 81,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        mode: str = "mmpl",
        layout: str | Layout | None = None,
        chain: str = "terminal",
        segment_prompts: Sequence[str] | None = None,
        prompt_schedule: Sequence[tuple[float, str]] | None = None,
        image=None,
        video=None,
        seed: int | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        batch_segments: int = 4,
        workdir: str | os.PathLike | None = None,
        devices: Sequence[str | torch.device] | None = None,
        policy: str = "adaptive",
        profile: bool = True,
        progress: bool = True,
        _info: dict | None = None,
    ) -> Iterator[SegmentFrames]:
        """Yield each segment's frames as soon as they are final (in order).

        Args (diffusers' meaning unless noted):
            prompt / negative_prompt: text; `segment_prompts` (one per segment) or `prompt_schedule`
                (``[(start_seconds, prompt), ...]``) give each segment its own prompt instead.
            height, width: pixels, multiples of 16 (default: the model's usual size).
            num_frames: video frames; generates enough segments and trims the last one.
            num_inference_steps, guidance_scale, sampler, shift: default by checkpoint kind (few-step for
                Self-Forcing-type weights; 50 UniPC steps, shift 5, guidance 5 for Wan / MMPL weights).
            generator / seed: the seed keying every random number by (seed, segment, stage, step).
            mode: ``"mmpl"`` (plan keyframes, then populate) or ``"ar"`` (blocks of 3 frames).
            layout: a layout name or `Layout`, overriding the mode's.
            chain: ``"terminal"`` (next segment starts from the terminal keyframes) or ``"middle"``.
            image / video: start the first segment from these frames instead of noise.
            batch_segments: at most this many segments hold KV pages on a device at once (so also the largest
                batched launch); the scheduler decides the packing within that and the device's free memory.
            workdir: save each finished segment there; a rerun resumes after the last one.
            devices: run on several devices of this process (e.g. ``["cuda:0", "cuda:1"]``), each with its own
                copy of the transformer and VAE; default: the pipeline's device. Under torchrun each rank runs
                its own device and this must be None.
            policy: how tasks are placed and ordered: ``"adaptive"`` (default), ``"round-robin"`` (the MMPL
                authors' scheme) or ``"cp-first"`` (`mmpl_fast.scheduler`).
            profile: fold the measured task times into the device's cached profile (`scheduler.ProfileCache`,
                under ``$MMPL_FAST_CACHE_DIR``), which later runs schedule with.

        ``info`` of `__call__`'s output gets ``schedule`` (the plan) and ``measured`` (what ran, with measured
        times; `scheduler.plot_timeline` draws either).
        """
        info = _info if _info is not None else {}
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        self.check_inputs(height, width, num_frames, num_inference_steps, guidance_scale, output_type, mode)
        if not isinstance(batch_segments, int) or batch_segments <= 0:
            raise ValueError(f"batch_segments must be a positive int, got {batch_segments!r}")
        from .scheduler import POLICIES

        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        self._devices(devices)  # checks them before any work
        if image is not None and video is not None:
            raise ValueError("pass either image= or video=, not both")
        lay = get_layout(layout if layout is not None else MODES[mode])
        plan = ChainPlan(lay, chain, self.vae.temporal)
        num_segments = plan.segments_for(num_frames)
        prompts = self._segment_prompts(prompt, segment_prompts, prompt_schedule, num_segments, plan)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in ("latents", "velocity"):
                raise ValueError(f"callback_on_step_end_tensor_inputs: {name!r} is not one of 'latents', 'velocity'")
        seed = _seed_from(generator, seed)
        defaults = {**default_sampling(self.kind), **self.sampling}
        steps = num_inference_steps or defaults["steps"]
        guidance = float(defaults["guidance"] if guidance_scale is None else guidance_scale)
        sampler = sampler or defaults["sampler"]
        shift = defaults["shift"] if shift is None else shift
        smp = make_sampler(sampler, steps, shift=shift)
        start_frames = None
        if image is not None or video is not None:
            frames = _to_frames(image if image is not None else video, "image" if image is not None else "video")
            if tuple(frames.shape[2:]) != (height, width):
                raise ValueError(f"image/video frames are {tuple(frames.shape[2:])}, expected {(height, width)}")
            start_frames = frames if image is None else frames[:, :1]

        work = None if _rank() != 0 else self._open_workdir(workdir, run_signature(
            prompts, negative_prompt, height, width, num_frames, steps, guidance, seed, lay, chain, sampler, shift,
            batch_segments,
            start_frames, self.transformer,
        ))  # fmt: skip
        total_video = plan.video_frames(num_segments)
        if total_video != num_frames:
            warnings.warn(
                f"{num_frames} frames is not a whole number of segments: generating {num_segments} segments "
                f"({total_video} frames) and trimming to {num_frames}",
                stacklevel=2,
            )
        info.update(seed=seed, num_segments=num_segments, layout=lay.name, steps=steps, guidance=guidance,
                    sampler=sampler, shift=shift, video_frames=num_frames, generated_frames=total_video,
                    fps=FPS)  # fmt: skip

        # 1. prompts -> text states, once per distinct prompt (each device embeds its cross-attention K/V once)
        neg_key = "\x00negative:" + (negative_prompt or "")
        texts = sorted(set(prompts)) + ([neg_key] if guidance > 1 else [])
        text_states = self.text([t[len("\x00negative:") :] if t == neg_key else t for t in texts])

        # 2. the task DAG of the segments still to make, scheduled on the devices (pre-flight memory check)
        cfg = self.transformer.config
        lh, lw = height // self.vae.spatial, width // self.vae.spatial
        latent_shape = (lay.num_frames, cfg.in_channels, lh, lw)

        def step_callback(stage, i, t, x, v):
            if callback_on_step_end is None:
                return None
            self.current_stage = stage
            named = {"latents": x, "velocity": v}
            # as diffusers: (pipe, step index, timestep tensor, tensors); the index counts the current stage's
            # steps (`pipe.current_segment` / `current_stage` say which)
            t = torch.tensor(t, dtype=torch.float32)
            out = callback_on_step_end(self, i, t, {k: named[k] for k in callback_on_step_end_tensor_inputs})
            return (out or {}).get("latents")

        done = self._load_finished(work, num_segments)
        given = None
        if start_frames is not None:
            given = encode_start(self.vae, start_frames.to(self.device))
        if done:
            given = reencode(self.vae, done[-1], plan) if len(done) < num_segments else None
        first = _broadcast_int(len(done))  # torchrun: only rank 0 reads and writes the workdir
        if _world() > 1 and first < num_segments and (first or given is not None):
            given = _broadcast_tensor(given, (plan.start_latents, *latent_shape[1:]))
        run = _Run(plan, prompts, latent_shape, num_frames, output_type, work, done, given, step_callback, first)
        per_segment = len(plan.stages)
        bar = tqdm(total=num_segments * per_segment, desc="stages", unit="stage", disable=not progress or _rank() != 0)
        bar.update(first * per_segment)
        gen = None
        try:
            emitter = _Emitter(run)
            for s, lat in enumerate(run.done):
                yield emitter.emit(s, self._decode(run, s, lat, self.vae), lat)
            if first < num_segments:
                sched, states, transport, workload = self._schedule(run, lay, chain, smp, steps, guidance, texts,
                                                          text_states, neg_key, seed, batch_segments, policy,
                                                          devices)  # fmt: skip
                gen = _Generation(self, run, sched, states, workload)
                ex = Executor(sched, gen, transport, on_launch=lambda launch: gen.progress(launch, bar))
                info["schedule"] = sched
                for p in ex.run():
                    s = first + p.task.segment
                    video, latents = gen.host_result(p, ex)
                    if run.work is not None:
                        _save_atomic(run.work / f"segment_{s:05d}.safetensors", {"latents": latents}, {})
                    yield emitter.emit(s, video, latents)
                info["measured"] = ex.measured()
                if profile:
                    gen.update_profile(info["measured"])
        finally:
            bar.close()
            info["model_calls"] = gen.model_calls if gen is not None else 0
            self.current_segment = self.current_stage = None

    # ------------------------------------------------------------------------------------- execution
    def _devices(self, devices) -> list[torch.device]:
        """This process's devices: one per rank under torchrun, else `devices` (default: the pipeline's)."""
        if _world() > 1:
            if devices is not None:
                raise ValueError("devices: under torchrun each rank runs one device (the pipeline's)")
            return [self.device]
        if devices is None:
            return [self.device]
        if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
            raise TypeError("devices must be a non-empty list of devices, e.g. ['cuda:0', 'cuda:1']")
        out = []
        for d in devices:
            try:
                dev = torch.device(d)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"devices: {d!r} is not a device: {e}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"devices: {d!r}: CUDA is not available on this machine")
            out.append(dev)
        return out

    def _replica(self, device: torch.device):
        """(transformer, VideoVAE) on `device`: the pipeline's own, or copies made once per device."""
        if device == self.device or (device.type == self.device.type == "cpu"):
            return self.transformer, self.vae
        cache = self.__dict__.setdefault("_replicas", {})
        if device not in cache:
            model = copy.deepcopy(self.transformer).to(device)
            cache[device] = (model, VideoVAE(copy.deepcopy(self.vae.vae).to(device)))
        return cache[device]

    def _schedule(self, run, lay, chain, smp, steps, guidance, texts, text_states, neg_key, seed, batch_segments,
                  policy, devices):  # fmt: skip
        """Plan the remaining segments on the devices, and build each local device's engine."""
        from .scheduler import CostModel, Device, ProfileCache, Workload, build_dag, preflight, schedule
        from .scheduler.execute import DistributedTransport, LocalTransport
        from .scheduler.profiling import device_name

        cfg = self.transformer.config
        devs = self._devices(devices)
        world, rank = _world(), _rank()
        dtype = str(self.transformer.dtype).removeprefix("torch.")
        workload = Workload(cfg, run.latent_shape[2] * self.vae.spatial, run.latent_shape[3] * self.vae.spatial,
                            steps=steps, guidance=guidance, dtype=dtype if dtype in DTYPE_NAMES else "float32",
                            vae_spatial=self.vae.spatial, vae_temporal=self.vae.temporal,
                            num_prompts=len(texts))  # fmt: skip
        names = [device_name(d) for d in devs]
        costs = CostModel(workload, profile=ProfileCache().load(names[0], cfg, workload.dtype))
        dag = build_dag(lay, run.num_segments - run.first, chain)
        if world > 1:  # one device per rank: every rank's free memory, gathered
            mine = _free_memory(devs[0])
            free = _all_gather_int(-1 if mine is None else mine)
            sched_devices = [Device(f"rank {r}", memory_bytes=None if f < 0 else f) for r, f in enumerate(free)]
        else:
            sched_devices = [Device(str(d), memory_bytes=_free_memory(d)) for d in devs]
        memory = preflight(dag, costs, sched_devices)
        capacity = [batch_segments if c is None else min(c, batch_segments) for c in memory.capacity]
        sched = schedule(dag, costs, sched_devices, policy, capacity)
        if world > 1:
            sched = _broadcast_schedule(sched)
        transport = DistributedTransport(self.device) if world > 1 else LocalTransport()
        states = {}
        local = [rank] if world > 1 else list(range(len(devs)))
        peak = sched.peak_resident()
        for i in local:
            dev = devs[0] if world > 1 else devs[i]
            model, vae = self._replica(dev)
            cross = CrossAttentionCache()
            for k, key in enumerate(texts):
                cross.get(model, key, text_states[k : k + 1].to(dev))
            tokens = cfg.tokens_per_frame(*run.latent_shape[2:])
            pages = max(1, peak[i]) * lay.num_frames
            pools = {"cond": KVPool.for_model(model, pages, tokens)}
            if guidance > 1:
                pools["uncond"] = KVPool.for_model(model, pages, tokens)
            engine = StageEngine(model, lay, smp, pools, cross, seed=seed, guidance=guidance, negative_key=neg_key,
                                 stages=run.plan.stages)  # fmt: skip
            states[i] = _DeviceState(dev, engine, vae, names[0 if world > 1 else i])
        return sched, states, transport, workload

    def _decode(self, run: _Run, s: int, latents: torch.Tensor, vae: VideoVAE) -> torch.Tensor:
        """A segment's stitched (not yet trimmed) video ``[3, T, H, W]`` in [-1, 1]."""
        if run.output_type == "latent":
            return torch.zeros(0)
        return run.plan.stitch(s, vae.decode(latents[None, : run.plan.kept_latents]))[0]

    # --------------------------------------------------------------------------------------- helpers
    def _open_workdir(self, workdir, signature: str) -> Path | None:
        if workdir is None:
            return None
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        meta = work / "run.json"
        if meta.exists():
            old = json.loads(meta.read_text()).get("signature")
            if old != signature:
                raise ValueError(
                    f"workdir {work} holds a different run (other prompts, sizes, seed, model or settings); "
                    "use a new workdir or delete it"
                )
        else:
            tmp = meta.with_name("run.json.tmp")
            tmp.write_text(json.dumps({"signature": signature}))
            os.replace(tmp, meta)
        return work

    def _load_finished(self, work: Path | None, num_segments: int) -> list[torch.Tensor]:
        if work is None:
            return []
        from safetensors.torch import load_file

        out = []
        for s in range(num_segments):
            f = work / f"segment_{s:05d}.safetensors"
            if not f.exists():
                break
            out.append(load_file(str(f))["latents"].to(self.device))
        return out


def run_signature(*parts) -> str:
    """A digest of everything that decides a run's output (for resuming in a workdir)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.nn.Module):
            for k, v in sorted(p.state_dict().items()):
                h.update(k.encode())
                h.update(str(float(v.float().sum())).encode())
        elif isinstance(p, torch.Tensor):
            h.update(p.float().cpu().numpy().tobytes())
        elif isinstance(p, Layout):
            h.update(repr(p.stages).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()
