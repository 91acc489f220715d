"""`python -m mmpl_fast.train`: teacher-forcing training of a causal DiT on the procedural world.

From scratch (`--vae-steps N`), a `WorldVAE` is trained first on 32x32 crops of 9-frame world clips (weighted
MSE that favours the shapes over the background; `world.vae.reconstruction_loss`), its latent statistics are
measured and stored in its config, and it is then frozen for the DiT. Without `--vae-steps` the random tiny
Wan VAE of `tiny.py` stands in (tests); with `--init` every component comes from a pipeline folder.

One training step, as data (B clips, N = layout.num_frames latent frames, S = layout.num_stages)::

    world clips (scene seed, seed-keyed start time) --VAE (frozen, any VideoVAE)--> x0 [B, N, C, h, w]
                                                     (encoded once per clip, cached)
    captions --prompt dropout (p -> "")--> tokenizer + text encoder (trained) --> model.embed_context --> cross
    per-stage timesteps t [B, S] --> per frame [B, N]; noise [B, N, C, h, w]
    x_t = (1 - sigma) x0 + sigma noise
    the layout's teacher-forcing sequence [clean | noisy] as ONE model call (Layout.training_sequence):
        clean frames at t = 0, noisy frames at their stage's t, a fresh KV pool, KVPool.view(groups=...):
        noisy stage k sees noisy stage k and the clean frames stage k reads (clean stages < k);
        clean stage k sees the clean frames of stage k and of what it reads
    loss = MSE(v on the noisy frames, noise - x0)   (flow matching)
    AdamW (warm-up, cosine decay), gradient clipping

The attention pattern is not written here: it is the page lists of `Layout.training_sequence`, the same
layout objects the engine runs at inference (tests compare the two). With the ``ar`` layout the same step is
diffusion forcing with per-block timesteps; several layouts alternate step by step (``--layouts mmpl,ar``).

Timesteps (``--timesteps``): ``uniform`` draws each stage's timestep uniformly from the 1000 entries of the
shift-5 training table (`sampling.training_table`, the table the few-step sampler looks sigmas up in);
``few-step`` draws it from the few-step sampler's own timesteps (1000, 937.5, 833.3, 625).

Determinism: every random number of step s (clip choice, prompt dropout, timesteps, noise) comes from a
generator keyed by (seed, s), so a resumed run continues exactly as an uninterrupted one.

Output folder::

    vae/          the trained WorldVAE (with --vae-steps), reused by --resume; vae_log.csv its loss and PSNR
    checkpoint/   transformer.safetensors, text_encoder.safetensors, optimizer.pt, state.json (atomic)
    latents.safetensors   the encoded clips (reused by --resume when the VAE and sizes match)
    log.csv       step, layout, loss, lr, seconds
    pipeline/     at the end: Pipeline.save_pretrained, loadable with Pipeline.from_pretrained
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..components import VideoVAE
from ..config import ModelConfig, resolve_config
from ..kernels import use_backend
from ..kv_pool import KVPool
from ..layouts import Layout, Stage, get_layout
from ..model import CausalWanModel, CrossKV
from ..sampling import few_step_list, training_table
from . import scenes as world

TIMESTEP_MODES = ("uniform", "few-step")
#: Text length of the training default: the longest world caption is 24 words + end-of-text.
TEXT_LEN = 32
#: Scene seeds at or above this are never used for training (held out for evaluation).
HELDOUT_SEED = 1_000_000


# ------------------------------------------------------------------------------------------------- config
def _layout_to_json(lay: Layout) -> dict:
    return {"name": lay.name, "num_frames": lay.num_frames, "start_frames": lay.start_frames,
            "stages": [[list(s.frames), list(s.reads), s.role] for s in lay.stages],
            "handoff": {k: list(v) for k, v in lay.handoff.items()}}  # fmt: skip


def _layout_from_json(d: dict) -> Layout:
    stages = tuple(Stage(tuple(f), tuple(r), role) for f, r, role in d["stages"])
    return Layout(d["name"], d["num_frames"], stages, handoff=d["handoff"], start_frames=d["start_frames"])


@dataclass
class TrainConfig:
    """Everything that decides a training run (a resumed run must use the same values; `steps` may grow).

    Attributes:
        out: output folder.
        layouts: layout names (`get_layout`) or `Layout` objects, used in turn step by step; all must have
            the same number of latent frames.
        steps, batch_size, lr, weight_decay, warmup, grad_clip: optimisation (AdamW, linear warm-up over
            `warmup` steps, cosine decay to 10 % at `steps`).
        timesteps, shift: how each stage's timestep is drawn (`TIMESTEP_MODES`) and the table's shift.
        prompt_dropout: probability of training a clip with the empty prompt (for guidance).
        height, width, fps: video size of the world clips.
        num_clips: distinct training clips (scene seeds ``0 .. num_clips - 1``), each encoded once.
        seed: keys the random components and every step's random numbers.
        save_every: steps between checkpoints (0: only at the end).
        config, text_len: transformer preset and its text length when no `init` folder is given.
        init: a pipeline folder (Pipeline.save_pretrained / a diffusers Wan folder) whose components start the
            run; default: random tiny components from `seed`.
        train_text: also train the text encoder.
        vae_steps: without `init`, first train a `WorldVAE` for this many steps (0: keep the random tiny Wan VAE,
            which only tests use); `vae_batch` clips of 9 frames per step, peak learning rate `vae_lr`,
            `vae_channels` channels at full resolution, `vae_spatial`x spatial compression (8 or 4),
            `vae_blocks` residual blocks per level, `vae_upsampling` ("transpose" / "nearest"), `vae_edge`
            the weight of the outline term (`vae.reconstruction_loss`).
    """

    out: str | os.PathLike = "runs/train"
    layouts: Sequence[str | Layout] = ("mmpl", "ar")
    steps: int = 2000
    batch_size: int = 4
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    timesteps: str = "uniform"
    shift: float = 5.0
    prompt_dropout: float = 0.1
    height: int = 64
    width: int = 64
    fps: float = world.FPS
    num_clips: int = 256
    seed: int = 0
    save_every: int = 200
    config: str = "tiny"
    text_len: int = TEXT_LEN
    init: str | None = None
    train_text: bool = True
    vae_steps: int = 0
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_channels: int = 16
    vae_spatial: int = 8
    vae_blocks: int = 0
    vae_upsampling: str = "transpose"
    vae_edge: float = 0.0
    _layouts: tuple[Layout, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def positive_int(name, low=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")

        for name in ("steps", "batch_size", "height", "width", "num_clips", "text_len"):
            positive_int(name)
        for name in ("vae_batch", "vae_channels"):
            positive_int(name)
        for name in ("warmup", "seed", "save_every", "vae_steps", "vae_blocks"):
            positive_int(name, 0)
        for name, low, high in (("lr", 0, math.inf), ("grad_clip", 0, math.inf), ("shift", 0, math.inf),
                                ("fps", 0, math.inf), ("vae_lr", 0, math.inf)):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v < high:
                raise ValueError(f"{name} must be a number > {low}, got {v!r}")
        if not 0 <= self.weight_decay or not 0 <= self.prompt_dropout <= 1:
            raise ValueError(
                f"weight_decay must be >= 0 and prompt_dropout in [0, 1], got {self.weight_decay}, "
                f"{self.prompt_dropout}"
            )
        if self.vae_spatial not in (4, 8) or self.vae_upsampling not in ("transpose", "nearest"):
            raise ValueError(f"vae_spatial must be 4 or 8 and vae_upsampling 'transpose' or 'nearest', got "
                             f"{self.vae_spatial!r}, {self.vae_upsampling!r}")  # fmt: skip
        if isinstance(self.vae_edge, bool) or not isinstance(self.vae_edge, (int, float)) or not self.vae_edge >= 0:
            raise ValueError(f"vae_edge must be a number >= 0, got {self.vae_edge!r}")
        if self.timesteps not in TIMESTEP_MODES:
            raise ValueError(f"timesteps {self.timesteps!r} is not one of {', '.join(TIMESTEP_MODES)}")
        grid = self.vae_spatial * resolve_config(self.config).patch_size[1]
        if self.height % grid or self.width % grid:
            raise ValueError(
                f"height, width must be multiples of {grid} (VAE {self.vae_spatial}x x patch), got "
                f"{self.height}x{self.width}"
            )
        if self.num_clips > HELDOUT_SEED:
            raise ValueError(f"num_clips must be <= {HELDOUT_SEED} (higher scene seeds are held out)")
        if isinstance(self.layouts, (str, Layout)):
            self.layouts = (self.layouts,)
        lays = tuple(get_layout(x) for x in self.layouts)
        if not lays:
            raise ValueError("layouts: give at least one layout")
        if len({lay.num_frames for lay in lays}) != 1:
            raise ValueError(f"layouts must have the same number of latent frames, got {[x.num_frames for x in lays]}")
        self._layouts = lays
        resolve_config(self.config)  # ValueError for an unknown preset
        if self.init is not None and not Path(self.init, "model_index.json").is_file():
            raise ValueError(f"init {self.init}: not a pipeline folder (no model_index.json)")
        if self.init is not None and self.vae_steps:
            raise ValueError("vae_steps: the VAE comes from init; train one only for a run from scratch")

    @property
    def layout_objects(self) -> tuple[Layout, ...]:
        return self._layouts

    @property
    def num_frames(self) -> int:
        """Latent frames of one training clip (the layouts' segment length)."""
        return self._layouts[0].num_frames

    def model_config(self) -> ModelConfig:
        return resolve_config(self.config).replace(text_len=self.text_len)

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d["out"] = str(d["out"])
        d["layouts"] = [_layout_to_json(x) for x in self._layouts]
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["layouts"] = tuple(_layout_from_json(x) for x in d["layouts"])
        return cls(**d)


# --------------------------------------------------------------------------------------------------- data
def video_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[3, T, H, W]`` in [-1, 1] (the VAE's input convention)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


class ClipBank:
    """World clips as normalised latents: clip i is scene i from a seed-keyed start time (`world.clip`).

    Each clip is rendered and encoded alone the first time it is used (so its latents do not depend on
    batching) and kept in memory; `save` / `load` keep them across runs of the same VAE and sizes.
    """

    def __init__(self, vae: VideoVAE, num_clips: int, num_frames: int, height: int, width: int, fps: float):
        from ..pipeline import run_signature

        self.vae, self.num_clips, self.num_frames = vae, num_clips, num_frames
        self.height, self.width, self.fps = height, width, fps
        self.video_frames = vae.video_frames(num_frames)
        self.signature = run_signature("clipbank-v1", vae.vae, num_frames, height, width, fps)
        self._latents: dict[int, torch.Tensor] = {}
        self._captions: dict[int, str] = {}
        self._dirty = False

    def __len__(self) -> int:
        return len(self._latents)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        """Latents ``[B, N, C, h, w]`` (float32) and captions of clips `indices`."""
        for i in indices:
            i = int(i)
            if i not in self._latents:
                frames, text = world.clip(i, self.video_frames, self.height, self.width, fps=self.fps)
                self._latents[i] = self.vae.encode(video_to_tensor(frames)[None])[0].float().cpu().contiguous()
                self._captions[i] = text
                self._dirty = True
            elif i not in self._captions:
                self._captions[i] = world.caption(world.sample_scene(i))
        return torch.stack([self._latents[int(i)] for i in indices]), [self._captions[int(i)] for i in indices]

    def save(self, path: Path) -> None:
        if not self._dirty:
            return
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({f"clip_{i:07d}": v for i, v in self._latents.items()}, str(tmp), {"signature": self.signature})
        os.replace(tmp, path)
        self._dirty = False

    def load(self, path: Path) -> int:
        """Take the clips stored at `path` if they were made the same way; returns how many."""
        from safetensors import safe_open

        if not path.is_file():
            return 0
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("signature") != self.signature:
                return 0
            for key in f.keys():
                self._latents[int(key.split("_")[1])] = f.get_tensor(key)
        return len(self._latents)


# ------------------------------------------------------------------------------------------------ the VAE
VAE_CLIP_FRAMES = 9  # 1 + 2 * 4: the lone first frame and two groups of four, as the causal VAE sees them
VAE_CROP = 32  # the VAE trains on crops (it is convolutional): 4x the steps per second of 64x64 frames, and the
#                crops are mostly shape, not background
VAE_STAT_CLIPS = 64  # clips whose latents give the per-channel mean / std the pipeline normalises with


def _cosine_lr(peak: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10 % of `peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _vae_batch(cfg: TrainConfig, step: int) -> torch.Tensor:
    """``[vae_batch, 3, 9, c, c]`` crops of world clips for step `step`: training scenes, random start times,
    one random crop of ``c = min(VAE_CROP, H, W)`` pixels (on the VAE's latent grid) per step."""
    gen = np.random.default_rng([cfg.seed, 0x7AE, step])
    clips = []
    for _ in range(cfg.vae_batch):
        scene = world.sample_scene(int(gen.integers(cfg.num_clips)))
        start = int(gen.integers(int(60 * cfg.fps)))
        clips.append(video_to_tensor(world.render(scene, VAE_CLIP_FRAMES, cfg.height, cfg.width, start=start,
                                                  fps=cfg.fps)))  # fmt: skip
    x = torch.stack(clips)
    ch, cw = min(VAE_CROP, cfg.height), min(VAE_CROP, cfg.width)
    s = cfg.vae_spatial
    y0 = int(gen.integers(0, (cfg.height - ch) // s + 1)) * s
    x0 = int(gen.integers(0, (cfg.width - cw) // s + 1)) * s
    return x[..., y0 : y0 + ch, x0 : x0 + cw].contiguous()


def train_vae(cfg: TrainConfig, *, progress: bool = True):
    """Train a `WorldVAE` on world clips (or load the finished one from ``out/vae``); returns it (eval mode).

    After training, the per-channel mean and std of its latents over `VAE_STAT_CLIPS` full-length clips go
    into its config, so the pipeline's normalised latents have unit scale. A VAE run interrupted before the
    end starts again (it takes minutes); ``out/vae_log.csv`` has its loss and PSNR per step.
    """
    from .vae import WorldVAE, reconstruction_loss

    folder = Path(cfg.out) / "vae"
    done = folder / "state.json"
    settings = {"steps": cfg.vae_steps, "channels": cfg.vae_channels, "spatial": cfg.vae_spatial,
                "blocks": cfg.vae_blocks, "upsampling": cfg.vae_upsampling, "edge": cfg.vae_edge}  # fmt: skip
    if done.is_file() and json.loads(done.read_text()) == settings:
        return WorldVAE.from_pretrained(folder).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = WorldVAE(base_channels=cfg.vae_channels, scale_factor_spatial=cfg.vae_spatial,
                       num_res_blocks=cfg.vae_blocks, upsampling=cfg.vae_upsampling).train()  # fmt: skip
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        folder.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.vae_steps, desc="vae", unit="step", disable=not progress)
        with open(Path(cfg.out) / "vae_log.csv", "w", newline="") as fh:
            log = csv.writer(fh)
            log.writerow(["step", "mse", "psnr", "lr"])
            recent: list[float] = []
            for step in range(cfg.vae_steps):
                lr = _cosine_lr(cfg.vae_lr, step, cfg.vae_steps, min(100, cfg.vae_steps // 10 + 1))
                for g in opt.param_groups:
                    g["lr"] = lr
                loss, mse = reconstruction_loss(vae, _vae_batch(cfg, step), edge_weight=cfg.vae_edge)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
                opt.step()
                psnr = 10 * math.log10(4.0 / max(float(mse.detach()), 1e-12))  # peak-to-peak 2 in [-1, 1]
                log.writerow([step + 1, f"{float(mse):.6f}", f"{psnr:.2f}", f"{lr:.3e}"])
                recent = (recent + [psnr])[-50:]
                bar.set_postfix(psnr=f"{sum(recent) / len(recent):.1f}dB")
                bar.update(1)
        bar.close()
    vae.eval()
    with torch.no_grad():  # latent statistics over full-length clips of the training scenes
        z = torch.cat([
            vae.encode(video_to_tensor(world.clip(i, 1 + 20 * 4, cfg.height, cfg.width, fps=cfg.fps)[0])[None])
            .latent_dist.mode()
            for i in range(min(VAE_STAT_CLIPS, cfg.num_clips))
        ])  # fmt: skip
    dims = (0, 2, 3, 4)
    vae.register_to_config(latents_mean=z.mean(dims).tolist(), latents_std=z.std(dims).clamp_min(1e-4).tolist())
    tmp = folder.with_name("vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    (tmp / "state.json").write_text(json.dumps(settings))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return vae


# ---------------------------------------------------------------------------------------------- the loss
def encode_prompts(tokenizer, encoder: torch.nn.Module, prompts: Sequence[str], text_len: int) -> torch.Tensor:
    """Prompts -> ``[B, text_len, text_dim]`` with gradients, padding rows zeroed: exactly what
    `components.TextEncoder` computes at inference (same tokenizer call, same masking)."""
    tok = tokenizer(list(prompts), padding="max_length", max_length=text_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    device = next(encoder.parameters()).device
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    states = encoder(ids, attention_mask=mask).last_hidden_state
    return states * mask[..., None].to(states.dtype)


def sample_timesteps(
    layout: Layout, batch: int, generator: torch.Generator, mode: str = "uniform", shift: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep per (clip, stage), spread to the stage's frames: ``(timesteps, sigmas)`` float32 ``[B, N]``.

    Both come from the 1000-entry shift-`shift` training table (the sampler looks its sigmas up there):
    ``uniform`` picks any entry, ``few-step`` one of the few-step sampler's steps.
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(TIMESTEP_MODES)}")
    table_t, table_s = training_table(shift)
    total = len(table_t)
    if mode == "uniform":
        entry = torch.randint(total, (batch, layout.num_stages), generator=generator)
    else:
        choices = torch.tensor([total - s for s in few_step_list(4, total)])
        entry = choices[torch.randint(len(choices), (batch, layout.num_stages), generator=generator)]
    stage_of = torch.tensor([layout.stage_of(f) for f in range(layout.num_frames)])
    entry = entry[:, stage_of]  # [B, N]
    return table_t[entry], table_s[entry]


def teacher_forcing_loss(
    model: CausalWanModel,
    layout: Layout,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    cross: CrossKV,
) -> torch.Tensor:
    """Flow-matching loss of one teacher-forcing call over the layout's ``[clean | noisy]`` sequence.

    Args:
        x0, noise: ``[B, N, C, h, w]`` clean latents and their noise.
        timesteps, sigmas: ``[B, N]`` each noisy frame's timestep and noise level (`sample_timesteps`).
        cross: cross-attention K/V with batch B (with gradients if the text side is trained).

    Returns:
        the scalar MSE between the velocity predicted on the noisy frames and ``noise - x0``.
    """
    b, n, _, h, w = x0.shape
    if n != layout.num_frames:
        raise ValueError(f"x0 has {n} latent frames, layout {layout.name!r} has {layout.num_frames}")
    seq = layout.training_sequence()
    order = torch.tensor(seq.frames, device=x0.device)  # call frame j is latent frame order[j]
    noisy = torch.tensor(seq.noisy, device=x0.device)
    s = sigmas.to(x0)[:, :, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    x_call = torch.where(noisy[None, :, None, None, None], x_t[:, order], x0[:, order])  # [B, 2N, C, h, w]
    t_call = torch.where(noisy[None], timesteps.to(torch.float32)[:, order], 0.0)  # [B, 2N]
    pool = KVPool.for_model(model, b * 2 * n, model.config.tokens_per_frame(h, w))  # fresh: k/v keep their grads
    view = pool.view(seq.frames, [list(range(i * 2 * n, (i + 1) * 2 * n)) for i in range(b)], groups=seq.groups)
    with use_backend("torch"):  # the Triton ops have no autograd: training runs the torch references, also on CUDA
        v = model(x_call, t_call, cross, view)
    target = (noise - x0)[:, order]
    return F.mse_loss(v[:, noisy].float(), target[:, noisy].float())


# ---------------------------------------------------------------------------------------------- trainer
def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of all random numbers of training step `step` (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"mmpl_fast.train:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def build_components(cfg: TrainConfig) -> dict:
    """Transformer, VAE module, tokenizer and text encoder that start the run (see `TrainConfig.init`)."""
    if cfg.init is None:
        from ..tiny import tiny_components

        return tiny_components(cfg.seed, cfg.model_config())
    from ..pipeline import Pipeline

    pipe = Pipeline.from_pretrained(cfg.init, torch_dtype=torch.float32)  # training keeps fp32 weights on any device
    return {"transformer": pipe.transformer, "vae": pipe.vae.vae, "tokenizer": pipe.text.tokenizer,
            "text_encoder": pipe.text.encoder}  # fmt: skip


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up, then cosine decay to 10 %."""
    return _cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup)


class Trainer:
    """Holds the run: components, optimiser, clip bank, step counter; `step`, `save`, `load`, `export`."""

    def __init__(self, cfg: TrainConfig, components: dict | None = None, *, progress: bool = False):
        self.cfg = cfg
        c = components if components is not None else build_components(cfg)
        if cfg.vae_steps and components is None:
            c = {**c, "vae": train_vae(cfg, progress=progress)}
        self.kind = "tiny" if cfg.init is None and not cfg.vae_steps else "world"
        self.model: CausalWanModel = c["transformer"].float().train()
        self.tokenizer = c["tokenizer"]
        self.text_encoder = c["text_encoder"].float().train(cfg.train_text)
        self.text_encoder.requires_grad_(cfg.train_text)
        self.vae = VideoVAE(c["vae"])
        self.vae.vae.requires_grad_(False)
        if self.vae.z_dim != self.model.config.in_channels:
            raise ValueError(f"VAE latent channels {self.vae.z_dim} != transformer in_channels "
                             f"{self.model.config.in_channels}")  # fmt: skip
        params = list(self.model.parameters()) + (list(self.text_encoder.parameters()) if cfg.train_text else [])
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.bank = ClipBank(self.vae, cfg.num_clips, cfg.num_frames, cfg.height, cfg.width, cfg.fps)
        self.step_index = 0
        self.out = Path(cfg.out)

    def batch(self, step: int) -> dict:
        """The inputs of step `step`: layout, x0, noise, timesteps, sigmas, prompts (all from its generator)."""
        cfg = self.cfg
        gen = step_generator(cfg.seed, step)
        layout = cfg.layout_objects[step % len(cfg.layout_objects)]
        idx = torch.randint(cfg.num_clips, (cfg.batch_size,), generator=gen).tolist()
        x0, captions = self.bank.get(idx)
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout).tolist()
        prompts = ["" if d else c for d, c in zip(drop, captions)]
        timesteps, sigmas = sample_timesteps(layout, cfg.batch_size, gen, cfg.timesteps, cfg.shift)
        noise = torch.randn(x0.shape, generator=gen)
        return dict(layout=layout, x0=x0, noise=noise, timesteps=timesteps, sigmas=sigmas, prompts=prompts)

    def loss(self, b: dict) -> torch.Tensor:
        device = self.model.device
        with torch.set_grad_enabled(self.cfg.train_text and torch.is_grad_enabled()):
            states = encode_prompts(self.tokenizer, self.text_encoder, b["prompts"], self.model.config.text_len)
        cross = self.model.embed_context(states)
        return teacher_forcing_loss(self.model, b["layout"], b["x0"].to(device), b["noise"].to(device),
                                    b["timesteps"].to(device), b["sigmas"].to(device), cross)  # fmt: skip

    def step(self) -> tuple[float, float]:
        """One optimisation step; returns ``(loss, lr)``."""
        lr = lr_at(self.cfg, self.step_index)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss = self.loss(self.batch(self.step_index))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.step_index += 1
        return float(loss.detach()), lr

    # ------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Write ``out/checkpoint`` atomically (a new folder renamed over the old one) and the clip bank."""
        from safetensors.torch import save_model

        self.out.mkdir(parents=True, exist_ok=True)
        final, tmp, old = self.out / "checkpoint", self.out / "checkpoint.tmp", self.out / "checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(self.model, str(tmp / "transformer.safetensors"))
        save_model(self.text_encoder, str(tmp / "text_encoder.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"step": self.step_index, "config": self.cfg.to_json()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        self.bank.save(self.out / "latents.safetensors")
        return final

    def load(self) -> int:
        """Continue from ``out/checkpoint``; the run's settings must equal the saved ones (steps may grow)."""
        from safetensors.torch import load_model

        ckpt = self.out / "checkpoint"
        if not (ckpt / "state.json").is_file():
            raise ValueError(f"resume: no checkpoint in {ckpt}")
        state = json.loads((ckpt / "state.json").read_text())
        saved, now = state["config"], self.cfg.to_json()
        differ = [k for k in now if k not in ("steps", "save_every", "out") and saved.get(k) != now[k]]
        if differ:
            raise ValueError(f"resume: settings differ from the checkpoint's: {', '.join(differ)} "
                             "(rerun the same command with --resume)")  # fmt: skip
        load_model(self.model, str(ckpt / "transformer.safetensors"))
        load_model(self.text_encoder, str(ckpt / "text_encoder.safetensors"))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.step_index = int(state["step"])
        self.bank.load(self.out / "latents.safetensors")
        return self.step_index

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """Save the trained components as a pipeline folder (`Pipeline.from_pretrained` loads it)."""
        from ..pipeline import Pipeline

        self.model.eval()
        self.text_encoder.eval()
        sampling = {"shift": self.cfg.shift} if self.kind == "world" else None  # sample with the trained shift
        pipe = Pipeline(self.model, self.vae.vae, self.text_encoder, self.tokenizer, kind=self.kind,
                        default_size=(self.cfg.height, self.cfg.width), sampling=sampling)  # fmt: skip
        root = pipe.save_pretrained(path if path is not None else self.out / "pipeline")
        self.model.train()
        self.text_encoder.train(self.cfg.train_text)
        return root


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    seconds: float
    checkpoint: Path | None
    pipeline: Path | None


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    components: dict | None = None,
    progress: bool = True,
    export: bool | str | os.PathLike = True,
) -> TrainResult:
    """Run (or continue) training to ``cfg.steps``; returns the losses of the steps run here.

    `export`: write the final pipeline folder to ``out/pipeline`` (True), to a given folder, or not (False).
    """
    trainer = Trainer(cfg, components, progress=progress)
    out = Path(cfg.out)
    if resume:
        trainer.load()
    else:
        if (out / "checkpoint").exists():
            raise ValueError(f"{out} already holds a checkpoint: pass --resume, or use a new --out")
        trainer.bank.load(out / "latents.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.csv"
    new_log = not log_path.exists() or not resume
    losses: list[float] = []
    start = time.perf_counter()
    ckpt = None
    bar = tqdm(total=cfg.steps, initial=trainer.step_index, desc="train", unit="step", disable=not progress)
    with open(log_path, "w" if new_log else "a", newline="") as fh:
        log = csv.writer(fh)
        if new_log:
            log.writerow(["step", "layout", "loss", "lr", "seconds"])
        while trainer.step_index < cfg.steps:
            layout = cfg.layout_objects[trainer.step_index % len(cfg.layout_objects)].name
            loss, lr = trainer.step()
            losses.append(loss)
            log.writerow([trainer.step_index, layout, f"{loss:.6f}", f"{lr:.3e}", f"{time.perf_counter() - start:.2f}"])
            fh.flush()
            recent = losses[-20:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr:.1e}", clips=len(trainer.bank))
            bar.update(1)
            if cfg.save_every and trainer.step_index % cfg.save_every == 0 and trainer.step_index < cfg.steps:
                ckpt = trainer.save()
    bar.close()
    ckpt = trainer.save()
    pipe = trainer.export(None if export is True else export) if export else None
    return TrainResult(losses, trainer.step_index, time.perf_counter() - start, ckpt, pipe)


# --------------------------------------------------------------------------------------------------- CLI
EXAMPLE = (
    "python -m mmpl_fast.train --out runs/embedded --config embedded --vae-steps 7000 --steps 3500 --batch-size 8 "
    "--num-clips 2000 --shift 3 --layouts mmpl,ar --export mmpl_fast/assets/embedded"
)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m mmpl_fast.train",
        description="Teacher-forcing training (MMPL layouts, and diffusion forcing for the ar layout) of a causal "
        "DiT on the procedural world; writes checkpoints and, at the end, a pipeline folder.",
        epilog=f"example: {EXAMPLE}",
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d["out"].default, help="output folder (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
    g.add_argument("--steps", type=int, default=d["steps"].default, help="total steps (default %(default)s)")
    g.add_argument("--save-every", type=int, default=d["save_every"].default,
                   help="steps between checkpoints, 0: only at the end (default %(default)s)")  # fmt: skip
    g.add_argument("--seed", type=int, default=d["seed"].default, help="random seed (default %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    m = p.add_argument_group("what is trained")
    m.add_argument("--layouts", default="mmpl,ar",
                   help="comma-separated layouts used in turn: mmpl, mmpl-no-early, mmpl-no-mid, ar, arN "
                   "(default %(default)s)")  # fmt: skip
    m.add_argument("--init", default=None, help="pipeline folder whose components start the run "
                   "(default: random tiny components)")  # fmt: skip
    m.add_argument(
        "--config", default=d["config"].default, help="transformer preset without --init (default %(default)s)"
    )
    m.add_argument("--text-len", type=int, default=d["text_len"].default,
                   help="text tokens per prompt without --init (default %(default)s)")  # fmt: skip
    m.add_argument("--freeze-text", action="store_true", help="do not train the text encoder")
    m.add_argument("--export", default=None, help="write the final pipeline folder here (default OUT/pipeline)")

    v = p.add_argument_group("the VAE (runs from scratch only)")
    v.add_argument("--vae-steps", type=int, default=d["vae_steps"].default,
                   help="first train a WorldVAE for this many steps; 0 keeps the random tiny Wan VAE, for tests "
                   "(default %(default)s)")  # fmt: skip
    v.add_argument("--vae-batch", type=int, default=d["vae_batch"].default, help="clips per VAE step "
                   "(default %(default)s)")  # fmt: skip
    v.add_argument("--vae-lr", type=float, default=d["vae_lr"].default, help="peak VAE learning rate "
                   "(default %(default)s)")  # fmt: skip
    v.add_argument("--vae-channels", type=int, default=d["vae_channels"].default,
                   help="VAE channels at full resolution (default %(default)s)")  # fmt: skip
    v.add_argument("--vae-spatial", type=int, choices=(4, 8), default=d["vae_spatial"].default,
                   help="VAE spatial compression (default %(default)s; 4 keeps small shapes apart)")  # fmt: skip
    v.add_argument("--vae-blocks", type=int, default=d["vae_blocks"].default,
                   help="residual blocks per VAE level (default %(default)s)")  # fmt: skip
    v.add_argument("--vae-upsampling", choices=("transpose", "nearest"), default=d["vae_upsampling"].default,
                   help="the VAE decoder's 2x steps (default %(default)s)")  # fmt: skip
    v.add_argument("--vae-edge", type=float, default=d["vae_edge"].default,
                   help="weight of the VAE's outline loss (default %(default)s)")  # fmt: skip

    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--batch-size", type=int, default=d["batch_size"].default, help="clips per step (default %(default)s)"
    )
    o.add_argument("--lr", type=float, default=d["lr"].default, help="peak AdamW learning rate (default %(default)s)")
    o.add_argument("--weight-decay", type=float, default=d["weight_decay"].default, help="(default %(default)s)")
    o.add_argument("--warmup", type=int, default=d["warmup"].default, help="warm-up steps (default %(default)s)")
    o.add_argument("--grad-clip", type=float, default=d["grad_clip"].default, help="(default %(default)s)")
    o.add_argument("--timesteps", choices=TIMESTEP_MODES, default=d["timesteps"].default,
                   help="each stage's timestep: uniform over the shift table, or the few-step sampler's "
                   "(default %(default)s)")  # fmt: skip
    o.add_argument("--shift", type=float, default=d["shift"].default, help="timestep shift (default %(default)s)")
    o.add_argument("--prompt-dropout", type=float, default=d["prompt_dropout"].default,
                   help="probability of the empty prompt, for guidance (default %(default)s)")  # fmt: skip

    w = p.add_argument_group("data (the procedural world)")
    w.add_argument(
        "--height", type=int, default=d["height"].default, help="pixels, multiple of 16 (default %(default)s)"
    )
    w.add_argument("--width", type=int, default=d["width"].default, help="pixels, multiple of 16 (default %(default)s)")
    w.add_argument("--num-clips", type=int, default=d["num_clips"].default,
                   help="distinct training clips, each encoded once (default %(default)s)")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    layouts = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    return TrainConfig(
        out=args.out, layouts=layouts, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip, timesteps=args.timesteps,
        shift=args.shift, prompt_dropout=args.prompt_dropout, height=args.height, width=args.width,
        num_clips=args.num_clips, seed=args.seed, save_every=args.save_every, config=args.config,
        text_len=args.text_len, init=args.init, train_text=not args.freeze_text, vae_steps=args.vae_steps,
        vae_batch=args.vae_batch, vae_lr=args.vae_lr, vae_channels=args.vae_channels, vae_spatial=args.vae_spatial,
        vae_blocks=args.vae_blocks, vae_upsampling=args.vae_upsampling, vae_edge=args.vae_edge,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads <= 0:
                raise ValueError(f"--threads must be > 0, got {args.threads}")
            torch.set_num_threads(args.threads)
        cfg = config_from_args(args)
        result = train(cfg, resume=args.resume, progress=not args.quiet, export=args.export or True)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    tail = result.losses[-20:]
    mean = sum(tail) / len(tail) if tail else float("nan")
    print(
        f"trained {result.steps} steps ({len(result.losses)} here) in {result.seconds:.1f} s; "
        f"mean loss of the last {len(tail)}: {mean:.4f}; checkpoint {result.checkpoint}; pipeline {result.pipeline}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
