"""A drop-in for diffusers' `WanPipeline`: the same arguments through both, where the two must agree.

With a layout of one stage holding every frame, one segment is one bidirectional clip, which is what
`WanPipeline` generates: the same transformer weights (diffusers' `WanTransformer3DModel` from the key map),
the same VAE, the same solver with the same sigmas, the caller's `latents`, `prompt_embeds` and
`negative_prompt_embeds`, classifier-free guidance. Our pipeline is built without a text encoder: the embeddings
are used as they are.

Tolerance (float32 on a CPU): latents within 1e-4 absolute (they are of size ~2; measured 2.4e-5), frames
within 2e-5 (in [0, 1]; measured 3.6e-6). The difference is not ours to remove: diffusers computes the time
sinusoid in float32 where Wan (and this package) use float64, which moves each model output by ~1e-5 at
t ~ 1000 (`tests/test_model.py`; with diffusers patched to float64 the latents agree to 7.6e-6, the rest being
attention and matmul summation order); the solver carries it through its steps; the VAE decode shrinks it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from mmpl_fast import Pipeline
from mmpl_fast.layouts import custom
from mmpl_fast.loading import wan_to_diffusers
from mmpl_fast.sampling import make_sampler

FRAMES = 3  # latent frames: 9 video frames
BIDIRECTIONAL = custom("bidirectional", FRAMES, [(tuple(range(FRAMES)), (), "block")], handoff={"terminal": (1, 2)})
STEPS, SHIFT, GUIDANCE = 4, 5.0, 3.0
LATENT_ATOL, FRAME_ATOL = 1e-4, 2e-5


@pytest.fixture(scope="module")
def tiny():
    pipe = Pipeline.tiny(seed=0)
    with torch.no_grad():  # move every weight off its initial value (norms and modulation tables included)
        for p in pipe.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return pipe


def diffusers_pipeline(tiny: Pipeline, sampler: str) -> WanPipeline:
    cfg = tiny.transformer.config
    transformer = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, rope_max_seq_len=cfg.rope_max,
    ).eval()  # fmt: skip
    transformer.load_state_dict(wan_to_diffusers(tiny.transformer.state_dict()), strict=True)
    # The solver ours runs (`make_sampler`): the same diffusers scheduler and config. WanPipeline calls
    # `set_timesteps(num_inference_steps)`, which would give diffusers' default sigmas; MMPL's start at 0.999.
    solver = make_sampler(sampler, STEPS, shift=SHIFT)
    sigmas = solver._base_sigmas()

    class SameSigmas(type(solver._fresh())):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=sigmas, device=device)

    scheduler = SameSigmas.from_config(solver._fresh().config)
    wan = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny.vae.vae, scheduler=scheduler, transformer=transformer)
    wan.set_progress_bar_config(disable=True)
    return wan


def as_tensor(frames) -> torch.Tensor:
    if isinstance(frames, list):  # PIL: B lists of images
        return torch.stack([torch.from_numpy(np.stack([np.asarray(im) for im in video])) for video in frames])
    return torch.as_tensor(np.asarray(frames))


@pytest.mark.parametrize(
    "sampler, prompts, per_prompt",
    [("unipc", 1, 1), ("unipc", 2, 1), ("unipc", 1, 2), ("euler", 1, 1)],
    ids=["unipc", "two-prompts", "two-videos-per-prompt", "euler"],
)
def test_same_arguments_same_video_as_diffusers_wan_pipeline(tiny, sampler, prompts, per_prompt):
    wan = diffusers_pipeline(tiny, sampler)
    ours = Pipeline(tiny.transformer, tiny.vae.vae, kind="tiny")  # no text encoder: the embeddings are used as given
    g = torch.Generator().manual_seed(prompts * 10 + per_prompt)
    cfg = tiny.transformer.config
    batch = prompts * per_prompt
    call = dict(
        height=32, width=32, num_frames=9, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        num_videos_per_prompt=per_prompt, prompt_embeds=torch.randn(prompts, 7, cfg.text_dim, generator=g),
        negative_prompt_embeds=torch.randn(prompts, 5, cfg.text_dim, generator=g),
        latents=torch.randn(batch, cfg.in_channels, FRAMES, 4, 4, generator=g),
    )  # fmt: skip
    mine = dict(layout=BIDIRECTIONAL, sampler=sampler, shift=SHIFT, progress=False, profile=False)
    types = [("latent", LATENT_ATOL), ("np", FRAME_ATOL)]
    if batch == 1 and sampler == "unipc":  # the other output types convert the same frames: once is enough
        types += [("pt", FRAME_ATOL), ("pil", 1)]  # pil: uint8, one rounding step
    for output_type, atol in types:
        theirs = as_tensor(wan(**call, output_type=output_type).frames)
        got = as_tensor(ours(**call, output_type=output_type, **mine).frames)
        assert got.shape == theirs.shape and got.dtype == theirs.dtype, output_type
        diff = (got.double() - theirs.double()).abs().max().item()
        assert diff <= atol, f"{output_type}: max difference {diff:.2e} > {atol:.0e}"
        if output_type == "latent":  # a real comparison: the solver moved the latents far from the noise
            assert (got - call["latents"]).abs().mean() > 0.5
            if batch > 1:
                assert not torch.allclose(got[0], got[1], atol=0.1)  # each video its own noise (and prompt)


def test_return_dict_false_gives_a_tuple_as_diffusers(tiny):
    ours = Pipeline(tiny.transformer, tiny.vae.vae, kind="tiny")
    cfg = tiny.transformer.config
    out = ours(prompt_embeds=torch.randn(1, 4, cfg.text_dim), height=32, width=32, num_frames=9, seed=1,
               layout=BIDIRECTIONAL, return_dict=False, progress=False, profile=False)  # fmt: skip
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 9, 32, 32, 3)
