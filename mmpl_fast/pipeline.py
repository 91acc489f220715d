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

from .chain import ChainPlan, encode_start, reencode
from .components import TextEncoder, VideoVAE
from .engine import SegmentJob, StageEngine
from .kv_pool import CrossAttentionCache, KVPool
from .layouts import Layout, get_layout
from .loading import load_transformer, read_state_dict, save_transformer
from .model import CausalWanModel
from .sampling import default_sampling, make_sampler

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
MODES = {"mmpl": "mmpl", "ar": "ar"}
KINDS = ("tiny", "self_forcing", "causvid", "mmpl", "wan")
FPS = 16  # Wan2.1 video frame rate


@dataclass
class PipelineOutput:
    """`frames`: ``[1, T, H, W, 3]`` floats in [0, 1] for "np" (``[1, T, 3, H, W]`` for "pt", a list of
    PIL image lists for "pil", per-segment latents ``[S, F, C, h, w]`` for "latent")."""

    frames: Any
    info: dict = field(default_factory=dict)


@dataclass
class SegmentFrames:
    """What `Pipeline.stream` yields: one segment's final frames (overlap with the previous one dropped)."""

    index: int
    frames: Any
    latents: torch.Tensor
    num_segments: int


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
    ):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
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
        from diffusers import AutoencoderKLWan
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
        _, fmt = read_state_dict(weights)
        model = load_transformer(weights, config, device=device, dtype=dtype)
        extra = json.loads((root / "model_index.json").read_text()).get("mmpl_fast", {})
        if kind is None:
            kind = "self_forcing" if fmt == "self_forcing" else extra.get("kind", "wan")
        vae = AutoencoderKLWan.from_pretrained(root / "vae", local_files_only=True).to(device)
        text_dtype = dtype if dtype is not None else torch.float32
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", local_files_only=True, dtype=text_dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        size = tuple(extra.get("default_size", (480, 832)))
        return cls(model, vae, encoder.to(device), tokenizer, kind=kind, default_size=size)

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
            "vae": ["diffusers", "AutoencoderKLWan"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "mmpl_fast": {"kind": self.kind, "default_size": list(self.default_size)},
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
        """Generate one video. Keyword arguments as in `stream`; returns `PipelineOutput` (or a tuple)."""
        output_type = kwargs.get("output_type", "np")
        chunks, latents, info = [], [], {}
        for seg in self.stream(prompt, _info=info, **kwargs):
            chunks.append(seg.frames)
            latents.append(seg.latents)
        if output_type == "latent":
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
            batch_segments: segments populated together in one batched call (also bounds KV memory).
            workdir: save each finished window of segments there; a rerun resumes after them.
        """
        info = _info if _info is not None else {}
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        self.check_inputs(height, width, num_frames, num_inference_steps, guidance_scale, output_type, mode)
        if not isinstance(batch_segments, int) or batch_segments <= 0:
            raise ValueError(f"batch_segments must be a positive int, got {batch_segments!r}")
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
        defaults = default_sampling(self.kind)
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

        work = self._open_workdir(workdir, run_signature(
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
                    video_frames=num_frames, generated_frames=total_video, fps=FPS)  # fmt: skip

        # 1. prompts -> cross-attention K/V, once per distinct prompt
        cross = CrossAttentionCache()
        neg_key = "\x00negative:" + (negative_prompt or "")
        texts = sorted(set(prompts)) + ([neg_key] if guidance > 1 else [])
        states = self.text([t[len("\x00negative:") :] if t == neg_key else t for t in texts])
        for i, key in enumerate(texts):
            cross.get(self.transformer, key, states[i : i + 1])

        # 2. engine with one pool per guidance branch, sized for one window of segments
        cfg = self.transformer.config
        lh, lw = height // self.vae.spatial, width // self.vae.spatial
        tokens = cfg.tokens_per_frame(lh, lw)
        pages = batch_segments * lay.num_frames
        pools = {"cond": KVPool.for_model(self.transformer, pages, tokens)}
        if guidance > 1:
            pools["uncond"] = KVPool.for_model(self.transformer, pages, tokens)
        engine = StageEngine(self.transformer, lay, smp, pools, cross, seed=seed, guidance=guidance,
                             negative_key=neg_key)  # fmt: skip
        latent_shape = (lay.num_frames, cfg.in_channels, lh, lw)

        def step_callback(stage, i, t, x, v):
            if callback_on_step_end is None:
                return None
            self.current_stage = stage
            named = {"latents": x, "velocity": v}
            out = callback_on_step_end(self, i, t, {k: named[k] for k in callback_on_step_end_tensor_inputs})
            return (out or {}).get("latents")

        done = self._load_finished(work, num_segments)
        given = None
        if start_frames is not None:
            given = encode_start(self.vae, start_frames.to(self.device))
        if done:
            given = reencode(self.vae, done[-1], plan) if len(done) < num_segments else None
        run = _Run(plan, prompts, engine, latent_shape, num_frames, output_type, work, done, given, step_callback)
        bar = tqdm(
            total=num_segments * lay.num_stages, desc="stages", unit="stage", disable=not progress or _rank() != 0
        )
        bar.update(len(done) * lay.num_stages)
        try:
            if _world() > 1:
                yield from self._stream_distributed(run, bar)
            else:
                yield from self._stream_local(run, bar, batch_segments)
        finally:
            bar.close()
            info["model_calls"] = engine.model_calls
            self.current_segment = self.current_stage = None

    # ------------------------------------------------------------------------------------- executors
    def _new_job(self, run: _Run, s: int, given: torch.Tensor | None) -> SegmentJob:
        lat = torch.zeros(run.latent_shape, dtype=torch.float32, device=self.device)
        idx: frozenset[int] = frozenset()
        if given is not None:
            lat[: given.shape[0]] = given.to(lat)
            idx = frozenset(range(given.shape[0]))
        return SegmentJob(index=s, prompt=run.prompts[s], latents=lat, given=idx)

    def _chain_part(self, run: _Run, job: SegmentJob, bar) -> torch.Tensor | None:
        """Run a segment's chain stages; return the next segment's start latents (None for the last)."""
        self.current_segment = job.index
        for k in run.plan.chain_stages():
            bar.set_description(f"segment {job.index} stage {k} ({run.plan.layout.stages[k].role})")
            run.engine.run_stage([job], k, run.callback)
            bar.update(1)
        return reencode(self.vae, job.latents, run.plan) if job.index + 1 < run.num_segments else None

    def _populate(self, run: _Run, window: list[SegmentJob], bar) -> None:
        for k in run.plan.populate_stages():
            role = run.plan.layout.stages[k].role
            bar.set_description(f"segments {window[0].index}-{window[-1].index} stage {k} ({role})")
            run.engine.run_stage(window, k, run.callback)
            bar.update(len(window))
        for j in window:
            run.engine.release(j)
            if run.work is not None:
                _save_atomic(run.work / f"segment_{j.index:05d}.safetensors", {"latents": j.latents}, {})

    def _decode(self, run: _Run, s: int, latents: torch.Tensor) -> torch.Tensor:
        """A segment's stitched (not yet trimmed) video ``[3, T, H, W]`` in [-1, 1]."""
        if run.output_type == "latent":
            return torch.zeros(0)
        return run.plan.stitch(s, self.vae.decode(latents[None, : run.plan.kept_latents]))[0]

    def _stream_local(self, run: _Run, bar, batch_segments: int) -> Iterator[SegmentFrames]:
        emitter = _Emitter(run)
        for s, lat in enumerate(run.done):
            yield emitter.emit(s, self._decode(run, s, lat), lat)
        given, window = run.given, []
        for s in range(len(run.done), run.num_segments):
            job = self._new_job(run, s, given)
            given = self._chain_part(run, job, bar)
            window.append(job)
            if len(window) < batch_segments and s + 1 < run.num_segments:
                continue
            self._populate(run, window, bar)
            for j in window:
                yield emitter.emit(j.index, self._decode(run, j.index, j.latents), j.latents)
            window = []

    def _stream_distributed(self, run: _Run, bar) -> Iterator[SegmentFrames]:
        """Segments round-robin over the ranks of the default process group (torchrun). Start latents pass
        from the owner of segment s to the owner of s + 1; decoded segments go to rank 0, which yields them."""
        from . import distributed as d

        rank, world = _rank(), _world()
        owner = [s % world for s in range(run.num_segments)]
        first = len(run.done)
        emitter = _Emitter(run) if rank == 0 else None
        pending = {}
        if rank == 0:
            for s, lat in enumerate(run.done):
                yield emitter.emit(s, self._decode(run, s, lat), lat)
            for s in range(first, run.num_segments):
                if owner[s] != 0:
                    pending[s] = d.post_segment_recv(self, run, s, owner[s])
        sends = []
        given_local = run.given
        try:
            for s in range(first, run.num_segments):
                if owner[s] != rank:
                    continue
                if s == first or owner[s - 1] == rank:
                    given = run.given if s == first else given_local
                else:
                    given = d.recv_start(run, s, owner[s - 1])
                job = self._new_job(run, s, given)
                given_local = self._chain_part(run, job, bar)
                if given_local is not None and owner[s + 1] != rank:
                    sends.append(d.send_start(given_local, s + 1, owner[s + 1]))
                self._populate(run, [job], bar)
                video = self._decode(run, s, job.latents)
                if rank == 0:
                    pending[s] = d.Ready(video, job.latents)
                    while emitter.next in pending and pending[emitter.next].done():
                        nxt = emitter.next
                        yield emitter.emit(nxt, *pending.pop(nxt).result())
                else:
                    sends.extend(d.send_segment(video, job.latents, s))
            if rank == 0:
                while emitter.next < run.num_segments:
                    nxt = emitter.next
                    yield emitter.emit(nxt, *d.wait(pending.pop(nxt), nxt, owner[nxt]))
            for w in sends:
                d.wait_send(w)
        except RuntimeError as e:
            raise RuntimeError(f"rank {rank} of {world}: {e}") from e

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


@dataclass
class _Run:
    """Everything one generation needs after its inputs are checked."""

    plan: ChainPlan
    prompts: list[str]
    engine: StageEngine
    latent_shape: tuple[int, ...]
    num_frames: int
    output_type: str
    work: Path | None
    done: list[torch.Tensor]
    given: torch.Tensor | None
    callback: Callable

    @property
    def num_segments(self) -> int:
        return len(self.prompts)


class _Emitter:
    """Turns stitched segment videos into output frames in order, trimming the video to `num_frames`."""

    def __init__(self, run: _Run):
        self.run = run
        self.emitted = 0
        self.next = 0

    def emit(self, s: int, video: torch.Tensor, latents: torch.Tensor) -> SegmentFrames:
        assert s == self.next, "segments are emitted in order"
        self.next += 1
        run = self.run
        if run.output_type == "latent":
            return SegmentFrames(s, [], latents, run.num_segments)
        video = video[:, : max(0, run.num_frames - self.emitted)]
        self.emitted += video.shape[1]
        video = ((video + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).cpu()  # [T, H, W, 3]
        if run.output_type == "np":
            frames = video.numpy()
        elif run.output_type == "pt":
            frames = video.permute(0, 3, 1, 2)
        else:
            from PIL import Image

            frames = [Image.fromarray((f * 255).round().to(torch.uint8).numpy()) for f in video]
        return SegmentFrames(s, frames, latents, run.num_segments)


def _rank() -> int:
    return torch.distributed.get_rank() if _world() > 1 else 0


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
