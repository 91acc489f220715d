"""KV-cached AR rollout against recomputing the growing window without a cache, on CPU (float32).

Run: ``pytest benchmarks/bench_kv_cache.py --benchmark-only``.

One Self-Forcing style rollout of 21 latent frames in blocks of 3 (`layouts.ar`), with the few-step sampler
(steps [1000, 750, 500, 250] warped by shift 5, re-noising between steps). The weights are random: this
measures cost, not quality. Rows, per model config:

* no cache, diffusers: what diffusers offers today. Its bidirectional `WanTransformer3DModel` (same weights,
  copied with `wan_to_diffusers`) runs the whole window, frames 0 .. end of the block, at every step of every
  block; the block's velocities are the last 3 frames of the output. No t = 0 pass is needed. It gets one
  timestep for the whole window (per-frame timesteps would cost it a time embedding per token), and it
  embeds the prompt at every call, as its pipeline does.
* no cache, mmpl_fast: the same full-window recomputation with our model (a fresh view holding every window
  frame, so its attention is bidirectional over the window). Separates the gain of the cache from the
  differences between the two implementations.
* KV cache, mmpl_fast: each call runs only the block's 3 frames and reads the earlier frames' pages from a
  `KVPool`; after the block is denoised, one t = 0 pass writes its clean keys/values (skipped for the last
  block, which no later block reads, as the engine does). The prompt's cross-attention K/V is made once.

Reported: latent frames/s (21 / median rollout time) and the ratio against the diffusers row; also frames/s of
the best round (load from other processes only ever adds time). Each round is one whole rollout; the models
are warmed up with one call each, untimed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from conftest import device_name, median_seconds, record

from mmpl_fast.config import PRESETS, ModelConfig
from mmpl_fast.kv_pool import KVPool
from mmpl_fast.layouts import Layout, ar
from mmpl_fast.loading import wan_to_diffusers
from mmpl_fast.model import CausalWanModel, CrossKV
from mmpl_fast.sampling import FewStepSampler

NUM_FRAMES = 21
BLOCK = 3


@dataclass(frozen=True)
class Case:
    """A model config, the latent frame size (H x W) and how many timed rollouts per row."""

    config: ModelConfig
    latent: tuple[int, int]
    rounds: int

    @property
    def tokens(self) -> int:
        return self.config.tokens_per_frame(*self.latent)

    def __str__(self) -> str:
        c = self.config
        return (
            f"{c.name} (dim {c.dim}, {c.num_heads} heads, {c.num_layers} layers, latent {self.latent[0]}x"
            f"{self.latent[1]} = {self.tokens} tokens/frame)"
        )


MID = ModelConfig(name="mid", dim=512, num_heads=8, num_layers=4, ffn_dim=2048, text_len=64)
CASES = {
    "tiny": Case(PRESETS["tiny"], (32, 32), rounds=3),
    "mid": Case(MID, (16, 16), rounds=3),
}
IMPLS = ("no cache, diffusers", "no cache, mmpl_fast", "KV cache, mmpl_fast")
BASELINE = IMPLS[0]


def _diffusers_twin(model: CausalWanModel):
    """diffusers' bidirectional Wan transformer with `model`'s weights."""
    diffusers = pytest.importorskip("diffusers")
    c = model.config
    ref = diffusers.WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True, eps=c.eps, rope_max_seq_len=c.rope_max,
    )  # fmt: skip
    ref.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def rollout_cached(model, pool: KVPool, cross: CrossKV, layout: Layout, sampler, shape) -> tuple[torch.Tensor, int]:
    """AR rollout over the KV pool (frame f lives in page f). Returns the latents and the model calls made."""
    latents = torch.zeros(1, layout.num_frames, *shape)
    calls = 0
    for k, stage in enumerate(layout.stages):
        frames = list(stage.frames)
        view = pool.view(frames, [frames], [list(stage.reads)])  # built once per block, as the engine does
        x = torch.randn(1, len(frames), *shape)
        run = sampler.start()
        for i, t in enumerate(run.timesteps.tolist()):
            v = model(x, torch.full((1, len(frames)), t), cross, view)
            x = run.step(i, x, v, lambda x=x: torch.randn_like(x))
            calls += 1
        latents[:, frames] = x
        if k + 1 < layout.num_stages:  # later blocks read these frames: write their clean keys/values
            model(x, torch.zeros(1, len(frames)), cross, view)
            calls += 1
    return latents, calls


def rollout_window(forward, layout: Layout, sampler, shape) -> tuple[torch.Tensor, int]:
    """AR rollout without a cache: every call runs the whole window (the block's context, then the block).

    `forward(window [1, n, C, H, W], t: float, frame_pos: list[int])` returns velocities for all n frames.
    """
    latents = torch.zeros(1, layout.num_frames, *shape)
    calls = 0
    for stage in layout.stages:
        frames, context = list(stage.frames), list(stage.reads)
        x = torch.randn(1, len(frames), *shape)
        run = sampler.start()
        for i, t in enumerate(run.timesteps.tolist()):
            v = forward(torch.cat([latents[:, context], x], dim=1), t, context + frames)[:, len(context) :]
            x = run.step(i, x, v, lambda x=x: torch.randn_like(x))
            calls += 1
        latents[:, frames] = x
    return latents, calls


def _build(case: Case, impl: str):
    """A zero-argument rollout for `impl`, warmed up with one model call."""
    torch.manual_seed(0)
    cfg, (h, w) = case.config, case.latent
    shape = (cfg.in_channels, h, w)
    layout, sampler = ar(NUM_FRAMES, BLOCK), FewStepSampler()
    model = CausalWanModel(cfg).eval()
    text = torch.randn(1, cfg.text_len, cfg.text_dim)
    cross = model.embed_context(text)

    if impl == "KV cache, mmpl_fast":
        pool = KVPool.for_model(model, NUM_FRAMES, case.tokens)
        warm = pool.view(range(BLOCK), [list(range(BLOCK))])
        model(torch.randn(1, BLOCK, *shape), torch.zeros(1, BLOCK), cross, warm)
        return lambda: rollout_cached(model, pool, cross, layout, sampler, shape)

    if impl == "no cache, mmpl_fast":
        pool = KVPool.for_model(model, NUM_FRAMES, case.tokens)

        def forward(window, t, frame_pos):
            n = window.shape[1]
            view = pool.view(frame_pos, [list(range(n))])  # a fresh bidirectional view of the window
            return model(window, torch.full((1, n), t), cross, view)

    else:
        ref = _diffusers_twin(model)

        def forward(window, t, frame_pos):
            out = ref(window.transpose(1, 2), torch.tensor([t]), text, return_dict=False)[0]
            return out.transpose(1, 2)

    forward(torch.randn(1, BLOCK, *shape), 1000.0, list(range(BLOCK)))
    return lambda: rollout_window(forward, layout, sampler, shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_ar_rollout(benchmark, case_name, impl):
    case = CASES[case_name]
    with torch.inference_mode():
        rollout = _build(case, impl)
        result = {}

        def timed():
            t0 = time.perf_counter()
            latents, calls = rollout()
            seconds = time.perf_counter() - t0
            result.update(best=min(seconds, result.get("best", seconds)), calls=calls, latents=latents)

        benchmark.pedantic(timed, rounds=case.rounds, iterations=1, warmup_rounds=0)
    seconds, best = median_seconds(benchmark), result["best"]
    if seconds != seconds:  # NaN: benchmarks disabled (--benchmark-disable), one round ran untimed
        seconds = best
    assert result["latents"].shape[1] == NUM_FRAMES and torch.isfinite(result["latents"]).all()
    fps = NUM_FRAMES / seconds
    info = dict(
        frames=NUM_FRAMES, block=BLOCK, steps=FewStepSampler().num_steps, model_calls=result["calls"],
        tokens_per_frame=case.tokens, frames_per_s=fps, best_frames_per_s=NUM_FRAMES / best,
    )  # fmt: skip
    benchmark.extra_info.update(config=case.config.name, impl=impl, device=device_name(), **info)
    record(f"kv-cache AR rollout, {case}", impl, seconds, baseline=BASELINE, **info)
