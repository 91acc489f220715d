"""`Pipeline`: diffusers-style text-to-video (and image/video continuation) with MMPL or AR generation.

``pipe(prompt=..., num_frames=..., ...)`` follows diffusers' `WanPipeline` call (``latents``, ``prompt_embeds``,
``generator``, ``num_videos_per_prompt``, ``output_type``, ``return_dict``, ...) and adds ``mode``, ``layout``,
``chain``, ``segment_prompts`` / ``prompt_schedule``, ``image`` / ``video``, ``workdir`` and the scheduling
options (`request.CallArgs` documents every argument).

One call, as data::

    arguments --request.build_request--> Request (checked once: sizes, prompts, seeds, latents, devices)
    pre-flight: the video's task DAG against each device's free memory (refused before any work)
    per video:
        prompts -> text encoder (or the given prompt_embeds) -> cross-attention K/V cached once per prompt
        scheduler: DAG of the segments still to make, placed on the devices; `_generation._Generation` runs it
        VAE decode -> stitch (drop the re-encoded overlap) -> frames  (yielded per segment by `stream`)
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
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
    decode_segment,
)
from .chain import encode_start, reencode, start_latents
from .components import TextEncoder, VideoVAE
from .cpu import cpu_workers, one_intra_op_thread
from .engine import StageEngine, keyed_noise
from .kv_pool import CrossAttentionCache, KVPool
from .layouts import Layout
from .loading import checkpoint_index, load_transformer_with_format, read_model_index, save_transformer
from .model import CausalWanModel
from .request import (
    DTYPES,
    FPS,
    MODES,
    OUTPUT_TYPES,
    CallArgs,
    ModelFacts,
    Request,
    VideoSpec,
    build_request,
    check_device,
    resolve_dtype,
)
from .sampling import default_sampling
from .scheduler.execute import Executor

__all__ = ["FPS", "KINDS", "MODES", "OUTPUT_TYPES", "Pipeline", "PipelineOutput", "VideoStream", "replicate",
           "run_signature", "weights_digest"]  # fmt: skip

KINDS = ("tiny", "self_forcing", "causvid", "mmpl", "wan", "world")


@dataclass
class PipelineOutput:
    """`frames` (as diffusers' `WanPipelineOutput`): ``[B, T, H, W, 3]`` floats in [0, 1] for "np",
    ``[B, T, 3, H, W]`` for "pt", B lists of PIL images for "pil", the video's latents ``[B, C, F, h, w]`` for
    "latent" (`ChainPlan.video_latent_frames`, the layout `latents=` takes). `info`: what the run resolved and did
    (seeds, sampling, the schedule and the measured one)."""

    frames: Any
    info: dict = field(default_factory=dict)


class VideoStream:
    """What `Pipeline.stream` returns: an iterator of `SegmentFrames` (each segment of each video, in order, as
    soon as it is final); `info` fills in as it runs."""

    def __init__(self, segments: Iterator[SegmentFrames], info: dict):
        self._segments, self.info = segments, info

    def __iter__(self) -> VideoStream:
        return self

    def __next__(self) -> SegmentFrames:
        return next(self._segments)

    def close(self) -> None:
        self._segments.close()


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


def _one_dtype(torch_dtype, dtype):
    """`from_pretrained`'s ``torch_dtype`` (diffusers' name) and its alias ``dtype``: the one given, or both
    when they name the same dtype; a ValueError when they differ."""
    if torch_dtype is None or dtype is None:
        return dtype if torch_dtype is None else torch_dtype
    if resolve_dtype(torch_dtype, "cpu") != resolve_dtype(dtype, "cpu", "dtype"):
        raise ValueError(
            f"torch_dtype={torch_dtype!r} and dtype={dtype!r} differ; pass one of them (dtype is an alias of "
            "torch_dtype)"
        )
    return torch_dtype


def _move(module: torch.nn.Module, device=None, dtype=None) -> torch.nn.Module:
    """``module.to(device, dtype)``, without diffusers' warning that casting skips the modules a model keeps in
    float32 (it is printed even when there are none, as for the Wan VAE)."""
    import logging

    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return module.to(device=device, dtype=dtype)
    finally:
        log.setLevel(level)


def _check_folder(root: Path, transformer) -> None:
    if not root.exists():
        raise FileNotFoundError(f"pipeline folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"pipeline folder {root} is a file; expected a diffusers pipeline folder")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root / 'model_index.json'} is missing: not a diffusers pipeline folder")
    for name in ("tokenizer", "text_encoder", "vae") + (() if transformer else ("transformer",)):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"pipeline component missing: {root / name}")


class Pipeline:
    """Long-video generation with a causal Wan2.1 DiT.

    Args:
        transformer: the causal DiT.
        vae: diffusers `AutoencoderKLWan` (or the embedded model's `WorldVAE`).
        text_encoder: umT5 encoder (any transformers encoder returning ``last_hidden_state``); None when every
            call brings its own ``prompt_embeds``.
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
        text_encoder=None,
        tokenizer=None,
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
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("pass both text_encoder and tokenizer, or neither (then every call needs prompt_embeds)")
        self.sampling = sampling
        self.transformer = transformer.eval()
        self.vae = VideoVAE(vae)
        self.text = None if text_encoder is None else TextEncoder(tokenizer, text_encoder, transformer.config.text_len)
        self.kind = kind
        self.default_size = default_size
        if self.vae.z_dim != transformer.config.in_channels:
            raise ValueError(
                f"vae latent channels {self.vae.z_dim} != transformer in_channels {transformer.config.in_channels}"
            )
        self.current_segment = self.current_stage = None
        self._offload = False  # `enable_model_cpu_offload`: the text encoder stays on the CPU
        self._digest: tuple | None = None  # (key, digest) of the transformer's weights (`_weights_digest`)

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
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        offload: bool = False,
    ) -> Pipeline:
        """Load a diffusers-format Wan2.1 folder (model_index.json, tokenizer/, text_encoder/, vae/, transformer/).

        `torch_dtype` (diffusers' name; `dtype` is an alias, and giving both with different values is an error):
        the dtype of the DiT, its KV pool, the VAE and the text encoder, ``torch.bfloat16`` / ``"bf16"``,
        ``float16`` / ``"fp16"`` or ``float32`` / ``"fp32"``; default bfloat16 on CUDA, float32 on a CPU
        (`request.resolve_dtype`). `offload`: keep the text encoder on the CPU from the start (as
        `enable_model_cpu_offload` does afterwards, without the encoder ever visiting `device`).

        `transformer` replaces the folder's transformer with a checkpoint in any supported format (original Wan,
        diffusers, Self-Forcing/MMPL ``.pt``); `config` describes it (`loading.load_transformer`: a preset, a
        `ModelConfig`, a dict or a config.json; default: beside the weights, else inferred from their shapes).
        The sampling defaults follow the transformer's checkpoint: a Self-Forcing / CausVid / MMPL ``.pt`` is
        ``self_forcing`` (pass ``kind="mmpl"`` for MMPL's multistep weights), a folder's saved kind and
        overrides come with its own transformer only; an explicit `kind` wins. Nothing is downloaded; a missing
        component is an error naming it.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(path)
        _check_folder(root, transformer)
        device = check_device(device)
        dtype = resolve_dtype(_one_dtype(torch_dtype, dtype), device)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        weights = Path(transformer) if transformer else root / "transformer"
        model, fmt = load_transformer_with_format(weights, config, device=device, dtype=dtype)
        extra = read_model_index(root).get("mmpl_fast", {})
        own = extra if not transformer else checkpoint_index(weights).get("mmpl_fast", {})  # what the weights are
        own = {} if fmt == "self_forcing" else own
        kind = kind or ("self_forcing" if fmt == "self_forcing" else own.get("kind", "wan"))
        vae = _vae_class(root / "vae").from_pretrained(root / "vae", local_files_only=True, low_cpu_mem_usage=False,
                                                       torch_dtype=dtype)  # fmt: skip
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        size = tuple(extra.get("default_size", (480, 832)))
        pipe = cls(model, vae.to(device), encoder.to("cpu" if offload else device), tokenizer,
                   kind=kind, default_size=size, sampling=own.get("sampling"))  # fmt: skip
        pipe._offload = bool(offload)
        return pipe

    @classmethod
    def tiny(
        cls, seed: int = 0, device: torch.device | str = "cpu", torch_dtype: torch.dtype | str | None = None
    ) -> Pipeline:
        """Random tiny components on the real code path (tests, laptops); the video is noise. `torch_dtype` as
        `from_pretrained`'s (default: bfloat16 on CUDA, float32 on a CPU)."""
        from .tiny import tiny_components

        device = check_device(device)
        dtype = resolve_dtype(torch_dtype, device)
        c = tiny_components(seed)
        return cls(
            c["transformer"].to(device, dtype), _move(c["vae"], device, dtype), c["text_encoder"].to(device, dtype),
            c["tokenizer"], kind="tiny", default_size=(64, 64),
        )  # fmt: skip

    def to(self, *args, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> Pipeline:
        """Move the components and/or change their dtype, as diffusers' ``pipe.to("cuda")``,
        ``pipe.to(torch.bfloat16)``, ``pipe.to("cuda", torch.bfloat16)``; returns the pipeline. An offloaded
        text encoder (`enable_model_cpu_offload`) stays on the CPU and only changes dtype. Device replicas
        made for ``devices=`` are dropped (made again from the moved weights when next needed)."""
        for a in args:
            if isinstance(a, torch.dtype) or (
                isinstance(a, str) and a.strip().lower().removeprefix("torch.") in DTYPES
            ):
                dtype = a if dtype is None else _one_dtype(dtype, a)
            elif device is None:
                device = a
            else:
                raise TypeError(f"Pipeline.to: two devices given ({device!r}, {a!r})")
        device = None if device is None else check_device(device)
        dtype = None if dtype is None else resolve_dtype(dtype, device or self.device, "dtype")
        self.transformer.to(device=device, dtype=dtype)
        _move(self.vae.vae, device, dtype)
        if self.text is not None:
            self.text.encoder.to(device=torch.device("cpu") if self._offload else device, dtype=dtype)
        self.__dict__.pop("_replicas", None)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the text encoder on the CPU (diffusers' switch, for the component that weighs the most here:
        umT5-XXL is ~11 GB in bf16). Prompts are encoded once per call on the CPU and only their embeddings move
        to the DiT's device, so the encoder never needs GPU memory; the DiT and the VAE stay on (or move to)
        `device` (``cuda:{gpu_id}``; default: the pipeline's device, or ``cuda`` when it is on the CPU and a GPU
        exists). Outputs are the same as without offload (the encoder runs the same math on the CPU)."""
        if device is None and gpu_id is not None:
            device = f"cuda:{gpu_id}"
        if device is None and self.device.type == "cpu" and torch.cuda.is_available():
            device = "cuda"
        self._offload = True
        self.to(device=device)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a diffusers-format folder that `from_pretrained` (and diffusers) can read back."""
        if self.text is None:
            raise ValueError("save_pretrained: this pipeline has no text encoder to save")
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

    def facts(self) -> ModelFacts:
        """What checking a call needs to know of the components."""
        cfg = self.transformer.config
        return ModelFacts(
            spatial=self.vae.spatial, temporal=self.vae.temporal, patch=tuple(cfg.patch_size[1:]),
            in_channels=cfg.in_channels, text_dim=cfg.text_dim, text_len=cfg.text_len,
            default_size=tuple(self.default_size), sampling={**default_sampling(self.kind), **self.sampling},
            has_text_encoder=self.text is not None, device=self.device,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ call
    def __call__(self, *args, return_dict: bool = True, **kwargs) -> PipelineOutput | tuple:
        """Generate videos; arguments as `stream` (`request.CallArgs`). Returns `PipelineOutput`, or
        ``(frames,)`` without `return_dict`, as diffusers' `WanPipeline`.

        Under torchrun every rank must make the same call; rank 0's output holds the frames, the other ranks'
        ``frames`` is None.
        """
        if not isinstance(return_dict, bool):
            raise TypeError(f"return_dict must be True or False, got {return_dict!r}")
        try:
            args = CallArgs(*args, **kwargs)
        except TypeError as e:  # an unknown or repeated argument: name the call the user made
            raise TypeError(str(e).replace("CallArgs.__init__()", "Pipeline.__call__()")) from None
        req = self._request(args)
        info: dict = {}
        segments = list(self._videos(req, info))
        frames = None if _rank() != 0 else _assemble(req, segments)
        return PipelineOutput(frames=frames, info=info) if return_dict else (frames,)

    def stream(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 81,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
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
    ) -> VideoStream:
        """Check the call (every bad argument is refused here, before any work) and return an iterator of each
        segment's frames as soon as they are final, in order (`SegmentFrames`; ``.video`` says which video).

        Arguments: diffusers' `WanPipeline` names first, then this package's (`request.CallArgs` documents all).
        The stream's ``info`` gets ``seeds``, the sampling settings, ``schedule`` (the plan) and ``measured``
        (what ran, with measured times; `scheduler.plot_timeline` draws either).
        """
        args = {k: v for k, v in locals().items() if k != "self"}
        info: dict = {}
        return VideoStream(self._videos(self._request(CallArgs(**args)), info), info)

    def encode_prompt(
        self, prompt: str | list[str], negative_prompt: str | list[str] = "", max_sequence_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' `encode_prompt`: the text encoder's states of the prompts and of the negative prompts, each
        ``[P, L, text_dim]`` with zeroed padding rows (L: `max_sequence_length`, default the model's
        ``text_len``), ready for ``prompt_embeds=`` / ``negative_prompt_embeds=``."""
        if self.text is None:
            raise ValueError("encode_prompt: this pipeline has no text encoder")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        for name, texts in (("prompt", prompts), ("negative_prompt", negatives)):
            if not isinstance(texts, (list, tuple)) or not texts or any(not isinstance(t, str) for t in texts):
                raise TypeError(f"{name} must be a string or a non-empty list of strings, got {texts!r}")
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {len(prompts)} prompts")
        length = self.text.text_len if max_sequence_length is None else max_sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"max_sequence_length must be an int >= 1, got {max_sequence_length!r}")
        # on the DiT's device also when the encoder is offloaded to the CPU (diffusers' execution device)
        return self.text(list(prompts), length).to(self.device), self.text(list(negatives), length).to(self.device)

    def _request(self, args: CallArgs) -> Request:
        return build_request(args, self.facts())

    def prepare_latents(self, seed: int, num_frames: int = 81, height: int | None = None, width: int | None = None,
                        **kwargs) -> torch.Tensor:  # fmt: skip
        """The keyed initial noise a call with `seed` uses, ``[1, C, F, h, w]`` in `latents=`'s layout (so
        ``pipe(latents=pipe.prepare_latents(s, ...), ...)`` equals ``pipe(seed=s, ...)``). `kwargs`: the call's
        ``mode`` / ``layout`` / ``chain`` / ``image`` / ``video``, which decide which frames start from noise."""
        req = self._request(CallArgs(prompt="-", num_frames=num_frames, height=height, width=width, seed=seed,
                                     output_type="latent", **kwargs))  # fmt: skip
        plan, (_, c, h, w) = req.plan, req.latent_shape
        out = torch.zeros(plan.video_latent_frames(req.num_segments), c, h, w)
        first = 0 if req.start_frames is None else start_latents(req.start_frames.shape[1], plan.temporal)
        for s in range(req.num_segments):
            given = range(plan.start_latents if s > 0 else first)  # re-encoded / the user's: not from noise
            frames, at = plan.video_latent_span(s)
            for k in plan.stages:
                todo = [f for f in req.layout.stages[k].frames if f not in given]
                noise = keyed_noise(seed, s, k, 0, (len(todo), c, h, w), "cpu", torch.float32)
                for row, f in enumerate(todo):
                    if f in frames:
                        out[at + f - frames.start] = noise[row]
        return out.transpose(0, 1)[None]

    # ------------------------------------------------------------------------------------- execution
    def _videos(self, req: Request, info: dict) -> Iterator[SegmentFrames]:
        """Every video of the request, one after the other (each its own chain of segments); on a CPU with one
        intra-op thread per worker (see `cpu`)."""
        on_cpu = all(torch.device(d).type == "cpu" for d in (req.devices or [self.device]))
        with one_intra_op_thread() if on_cpu else nullcontext():
            yield from self._run_videos(req, info)

    def _run_videos(self, req: Request, info: dict) -> Iterator[SegmentFrames]:
        placement = self._preflight(req)  # refuses a run that cannot fit before anything is written
        info.update(seeds=[v.seed for v in req.videos], num_segments=req.num_segments, layout=req.layout.name,
                    steps=req.steps, guidance=req.guidance, sampler=req.sampler, shift=req.shift,
                    video_frames=req.num_frames, generated_frames=req.plan.video_frames(req.num_segments), fps=FPS,
                    model_calls=0)  # fmt: skip
        if len(req.videos) == 1:
            info["seed"] = req.videos[0].seed
        if info["generated_frames"] != req.num_frames:
            warnings.warn(
                f"{req.num_frames} frames is not a whole number of segments: generating {req.num_segments} "
                f"segments ({info['generated_frames']} frames) and trimming to {req.num_frames}",
                stacklevel=4,
            )
        for b, video in enumerate(req.videos):
            yield from self._video(req, b, video, placement, info)

    def _video(self, req: Request, b: int, video: VideoSpec, placement: dict, info: dict) -> Iterator[SegmentFrames]:
        """One video: resume what a workdir holds, then schedule and run the remaining segments."""
        work = None  # rank 0 keeps the workdir; the signature (weights included) is computed only for one
        if _rank() == 0 and req.workdir is not None:
            work = self._open_workdir(req.workdir, self._signature(req, video))
        done = self._load_finished(work, req.num_segments)
        run = self._run(req, video, work, done)
        per_segment = len(req.plan.stages)
        bar = tqdm(total=req.num_segments * per_segment, desc="stages", unit="stage",
                   disable=not req.progress or _rank() != 0)  # fmt: skip
        bar.update(run.first * per_segment)
        gen = None
        try:
            emitter = _Emitter(run)
            for s, lat in enumerate(run.done):
                yield emitter.emit(s, decode_segment(run, s, lat, self.vae), lat, b)
            if run.first < req.num_segments:
                sched, states, transport = self._schedule(req, video, run, placement)
                gen = _Generation(run, sched, states, placement["workload"])
                ex = Executor(sched, gen, transport, on_launch=lambda launch: gen.progress(launch, bar))
                info["schedule"] = sched
                for p in ex.run():
                    s = run.first + p.task.segment
                    frames, latents = gen.host_result(p, ex)
                    if run.work is not None:
                        _save_atomic(run.work / f"segment_{s:05d}.safetensors", {"latents": latents}, {})
                    yield emitter.emit(s, frames, latents, b)
                info["measured"] = ex.measured()
                if req.profile:
                    gen.update_profile(info["measured"])
        finally:
            bar.close()
            info["model_calls"] += gen.model_calls if gen is not None else 0
            self.current_segment = self.current_stage = None

    def _run(self, req: Request, video: VideoSpec, work: Path | None, done: list[torch.Tensor]) -> _Run:
        """The video's `_Run`: its start latents (the user's image / video, or the resume point), broadcast from
        rank 0 under torchrun."""
        given = None
        if req.start_frames is not None:
            given = encode_start(self.vae, req.start_frames.to(self.device))
        if done:
            given = reencode(self.vae, done[-1], req.plan) if len(done) < req.num_segments else None
        first = _broadcast_int(len(done))  # torchrun: only rank 0 reads and writes the workdir
        if _world() > 1 and first < req.num_segments and (first or given is not None):
            given = _broadcast_tensor(given, (req.plan.start_latents, *req.latent_shape[1:]))
        return _Run(req.plan, list(video.prompts), req.latent_shape, req.num_frames, req.output_type, work, done,
                    given, self._step_callback(req), first, host_device=self.device, spatial=self.vae.spatial,
                    latents=video.latents)  # fmt: skip

    def _step_callback(self, req: Request) -> Callable:
        """The engine's per-step hook: diffusers' ``callback_on_step_end(pipe, step, timestep, tensors)``."""

        def step(segment, stage, i, t, x, v):
            self.current_segment, self.current_stage = segment, stage
            if req.callback is None:
                return None
            named = {"latents": x, "velocity": v}
            # the step index counts the current stage's steps (`current_segment` / `current_stage` say which)
            tensors = {k: named[k] for k in req.callback_inputs}
            out = req.callback(self, i, torch.tensor(t, dtype=torch.float32), tensors)
            return (out or {}).get("latents")

        return step

    def _devices(self, req: Request) -> list[torch.device]:
        """This process's devices: one per rank under torchrun, else the request's; by default the pipeline's,
        or on a CPU one worker per idle core (`cpu.cpu_workers`)."""
        if _world() > 1:
            return [self.device]
        if req.devices is not None:
            return list(req.devices)
        if self.device.type == "cpu":
            return [self.device] * cpu_workers(limit=req.num_segments * len(req.plan.stages))
        return [self.device]

    def _preflight(self, req: Request) -> dict:
        """Check memory before any work (`scheduler.preflight`): the workload, each device's profile name and
        how many segments each device may hold at once."""
        from .scheduler import CostModel, Device, ProfileCache, Workload, build_dag, preflight
        from .scheduler.profiling import device_name

        cfg, devs = self.transformer.config, self._devices(req)
        dtype = str(self.transformer.dtype).removeprefix("torch.")
        workload = Workload(cfg, req.height, req.width, steps=req.steps, guidance=req.guidance,
                            dtype=dtype if dtype in DTYPE_NAMES else "float32", vae_spatial=self.vae.spatial,
                            vae_temporal=self.vae.temporal,
                            num_prompts=max(len(v.texts) for v in req.videos))  # fmt: skip
        names = [device_name(d) for d in devs]
        costs = CostModel(workload, profile=ProfileCache().load(names[0], cfg, workload.dtype))
        if _world() > 1:  # one device per rank: every rank's free memory, gathered
            mine = _free_memory(devs[0])
            free = _all_gather_int(-1 if mine is None else mine)
            sched_devices = [Device(f"rank {r}", memory_bytes=None if f < 0 else f) for r, f in enumerate(free)]
            loaded = [{"weights"}] * len(free)  # every rank loaded its model before reading its free memory
        else:
            sched_devices = [Device(str(d), memory_bytes=_free_memory(d)) for d in devs]
            loaded = [{"weights"} if self._holds_weights(d) else set() for d in devs]
        # Free memory is read after loading: what a device already holds is not counted again. The text encoder
        # never comes to a replica's device, and where it sits (the pipeline's device, or the CPU when offloaded)
        # it is already out of the free memory read there.
        memory = preflight(build_dag(req.layout, req.num_segments, req.chain), costs, sched_devices, loaded=loaded)
        capacity = [req.batch_segments if c is None else min(c, req.batch_segments) for c in memory.capacity]
        # each device's room for one launch's workspace with `capacity` (not the plan's) segments resident
        workspace = [None if w is None else max(0, w + (c - k) * memory.segment_bytes)
                     for w, c, k in zip(memory.workspace, memory.capacity, capacity)]  # fmt: skip
        return {"devices": devs, "names": names, "workload": workload, "costs": costs,
                "sched_devices": sched_devices, "capacity": capacity, "workspace": workspace}  # fmt: skip

    def _holds_weights(self, device: torch.device) -> bool:
        """Whether the DiT and VAE `device` runs with are already in its memory (the pipeline's own, or a
        replica made for an earlier call)."""
        same = device == self.device or device.type == self.device.type == "cpu"
        return same or device in self.__dict__.get("_replicas", {})

    def _schedule(self, req: Request, video: VideoSpec, run: _Run, placement: dict):
        """Plan the video's remaining segments on the devices, and build each local device's engine."""
        from .scheduler import build_dag, schedule
        from .scheduler.execute import DistributedTransport, LocalTransport

        world, rank, devs = _world(), _rank(), placement["devices"]
        dag = build_dag(req.layout, run.num_segments - run.first, req.chain)
        extra = {"workspace": placement["workspace"]} if req.policy == "adaptive" else {}
        sched = schedule(dag, placement["costs"], placement["sched_devices"], req.policy, placement["capacity"],
                         **extra)  # fmt: skip
        if world > 1:
            sched = _broadcast_schedule(sched)
        transport = DistributedTransport() if world > 1 else LocalTransport()  # buffers: `comm_device`
        texts = self._text_states(req, video)
        peak, states = sched.peak_resident(), {}
        for i in [rank] if world > 1 else range(len(devs)):
            dev = devs[0] if world > 1 else devs[i]
            model, vae = self._replica(dev, i)
            cross = CrossAttentionCache()
            for key, text in texts.items():
                cross.get(model, key, text.to(dev))
            pages = max(1, peak[i]) * req.layout.num_frames
            tokens = model.config.tokens_per_frame(*run.latent_shape[2:])
            pools = {"cond": KVPool.for_model(model, pages, tokens)}
            if req.guidance > 1:
                pools["uncond"] = KVPool.for_model(model, pages, tokens)
            engine = StageEngine(model, req.layout, req.solver, pools, cross, seed=video.seed, guidance=req.guidance,
                                 negative_key=video.negative, stages=req.plan.stages)  # fmt: skip
            states[i] = _DeviceState(dev, engine, vae, placement["names"][0 if world > 1 else i])
        return sched, states, transport

    def _text_states(self, req: Request, video: VideoSpec) -> dict[str, torch.Tensor]:
        """Each text key of the video -> ``[1, L, text_dim]``: the given states, or the encoder's (one call)."""
        prompts = sorted(k for k, t in video.texts.items() if isinstance(t, str))
        encoded = self.text([video.texts[k] for k in prompts], length=req.text_len) if prompts else []
        out = {k: encoded[i : i + 1] for i, k in enumerate(prompts)}
        out.update({k: t[None] for k, t in video.texts.items() if isinstance(t, torch.Tensor)})
        return out

    def _replica(self, device: torch.device, index: int = 0):
        """(transformer, VideoVAE) for scheduler device `index` on `device`: the pipeline's own, or copies made
        once per device (`replicate`: straight onto `device`, never a second copy on the source device). CPU
        workers share the weights, but each gets its own VAE module: a Wan VAE keeps its causal frame cache on
        the module, so two threads decoding through one module corrupt each other."""
        cache = self.__dict__.setdefault("_replicas", {})
        if device == self.device or (device.type == self.device.type == "cpu"):
            if index == 0:
                return self.transformer, self.vae
            if ("cpu", index) not in cache:
                cache["cpu", index] = (self.transformer, VideoVAE(_sharing_weights(self.vae.vae)))
            return cache["cpu", index]
        if device not in cache:
            cache[device] = (replicate(self.transformer, device), VideoVAE(replicate(self.vae.vae, device)))
        return cache[device]

    # --------------------------------------------------------------------------------------- helpers
    def _signature(self, req: Request, video: VideoSpec) -> str:
        """The run's digest for its workdir (computed only when there is one): the call's settings and the
        transformer's weights (`_weights_digest`, computed once and cached)."""
        texts = [(k, v) for k, v in sorted(video.texts.items(), key=lambda kv: kv[0])]
        return run_signature(list(video.prompts), texts, req.height, req.width, req.num_frames, req.steps,
                             req.guidance, video.seed, req.layout, req.chain, req.sampler, req.shift,
                             req.batch_segments, req.text_len, req.start_frames, video.latents,
                             self._weights_digest())  # fmt: skip

    def _weights_digest(self) -> str:
        """`weights_digest` of the transformer, cached: computed again only when a weight tensor was replaced,
        modified in place, moved or cast (its identity, storage, version counter, dtype or device changed)."""
        key = tuple((n, id(t), t.data_ptr(), t._version, t.dtype, t.device)
                    for n, t in self.transformer.state_dict(keep_vars=True).items())  # fmt: skip
        if self._digest is None or self._digest[0] != key:
            self._digest = (key, weights_digest(self.transformer))
        return self._digest[1]

    def _open_workdir(self, workdir: Path | None, signature: str) -> Path | None:
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


def _assemble(req: Request, segments: list[SegmentFrames]) -> Any:
    """The call's output from every segment of every video (diffusers' layouts, see `PipelineOutput`)."""
    per_video: list[list[SegmentFrames]] = [[] for _ in req.videos]
    for seg in segments:
        per_video[seg.video].append(seg)
    if req.output_type == "latent":
        out = []
        for segs in per_video:
            spans = [req.plan.video_latent_span(seg.index)[0] for seg in segs]
            parts = [seg.latents[f.start : f.stop] for seg, f in zip(segs, spans)]
            out.append(torch.cat(parts).transpose(0, 1))  # [C, F, h, w]
        return torch.stack(out)
    if req.output_type == "np":
        return np.stack([np.concatenate([s.frames for s in segs], axis=0) for segs in per_video])
    if req.output_type == "pt":
        return torch.stack([torch.cat([s.frames for s in segs], dim=0) for segs in per_video])
    return [[img for s in segs for img in s.frames] for segs in per_video]


def _sharing_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its own non-tensor state (caches set during a call) and the same parameter and
    buffer tensors (no memory for weights)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def weights_digest(module: torch.nn.Module, sample: int = 1 << 16) -> str:
    """A digest of a module's weights: every tensor's name, shape, dtype and the exact bits of up to `sample` of
    its values, evenly strided (a host copy per tensor, so `Pipeline` computes it once and only for a workdir).
    Bits, not a float sum: a sum's rounding depends on the thread count, and a resumed run must match."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        flat = v.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // sample)].cpu().contiguous()
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(picked.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replicate(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A copy of `module` on `device`, made without a second copy on the source device: the module is deep-copied
    with every parameter and buffer standing in as a meta tensor, allocated on `device` (`to_empty`), and then
    each tensor is copied there from the source, one at a time. Bit-identical to ``deepcopy(module).to(device)``
    (other tensor attributes, small ones such as cached tables, are copied as usual)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    out = copy.deepcopy(module, memo).to_empty(device=device)
    with torch.no_grad():
        for kind in ("named_parameters", "named_buffers"):
            src = dict(getattr(module, kind)(remove_duplicate=False))
            for name, t in getattr(out, kind)(remove_duplicate=False):
                t.copy_(src[name])
    return out


def run_signature(*parts) -> str:
    """A digest of everything that decides a run's output (for resuming in a workdir); a module counts by its
    `weights_digest` (passing that digest instead of the module gives the same signature)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.nn.Module):
            h.update(repr(weights_digest(p)).encode())  # as a digest string given in its place
        elif isinstance(p, torch.Tensor):
            h.update(p.float().cpu().numpy().tobytes())
        elif isinstance(p, Layout):
            h.update(repr(p.stages).encode())
        elif isinstance(p, (list, tuple)) and any(isinstance(x, (torch.Tensor, tuple)) for x in p):
            h.update(run_signature(*p).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()
