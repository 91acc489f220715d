"""`WorldVAE`: the Wan VAE's compression and interface, causality, loading through the pipeline, training."""

from __future__ import annotations

import pytest
import torch

from mmpl_fast.components import VideoVAE
from mmpl_fast.world.train import TrainConfig, train_vae
from mmpl_fast.world.vae import WorldVAE, reconstruction_loss


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WorldVAE(base_channels=8).eval()


def test_compression_matches_the_wan_vae(vae):
    x = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 16, 3, 4, 6)  # 1 + (9 - 1) / 4 latents, 8x in space
    y = vae.decode(z).sample
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert torch.equal(y, vae.decode_unclamped(z).clamp(-1, 1))
    one = vae.encode(x[:, :, :1]).latent_dist.mode()
    assert one.shape == (2, 16, 1, 4, 6) and vae.decode(one).sample.shape == (2, 3, 1, 32, 48)
    w = VideoVAE(vae)
    assert (w.temporal, w.spatial, w.z_dim) == (4, 8, 16)
    assert w.latent_frames(81) == 21 and w.video_frames(21) == 81


def test_encoder_and_decoder_are_causal(vae):
    x = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    later = x.clone()
    later[:, :, 5:] = 0  # frames of latents 2, 3 change
    z2 = vae.encode(later).latent_dist.mode()
    assert torch.equal(z[:, :, :2], z2[:, :, :2]) and not torch.equal(z[:, :, 2:], z2[:, :, 2:])
    y, y2 = vae.decode(z).sample, vae.decode(torch.cat([z[:, :, :2], z2[:, :, 2:]], 2)).sample
    assert torch.equal(y[:, :, :5], y2[:, :, :5])  # frames of latents 0, 1 do not see later latents


def test_bad_inputs(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="expected \\[B, 16"):
        vae.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="latents_mean: expected 16 values"):
        WorldVAE(latents_mean=[0.0] * 3)
    with pytest.raises(ValueError, match="4x in time"):
        WorldVAE(scale_factor_temporal=2)
    with pytest.raises(ValueError, match="4 or 8x in space"):
        WorldVAE(scale_factor_spatial=2)
    with pytest.raises(ValueError, match="upsampling"):
        WorldVAE(upsampling="bilinear")


@pytest.mark.parametrize("blocks,upsampling", [(1, "nearest"), (2, "transpose")])
def test_4x_variant_with_residual_blocks_keeps_the_interface(blocks, upsampling, tmp_path):
    torch.manual_seed(0)
    vae = WorldVAE(base_channels=8, scale_factor_spatial=4, num_res_blocks=blocks, upsampling=upsampling).eval()
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (1, 16, 3, 4, 6)  # 4x in space
    assert vae.decode(z).sample.shape == x.shape
    assert VideoVAE(vae).spatial == 4
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 5, 14, 16))
    plain = WorldVAE(base_channels=8, scale_factor_spatial=4, upsampling=upsampling)
    assert sum(p.numel() for p in vae.parameters()) > sum(p.numel() for p in plain.parameters())
    vae.save_pretrained(tmp_path / "vae")  # the variant is in the folder's config: it loads as itself
    back = WorldVAE.from_pretrained(tmp_path / "vae")
    assert (back.config.num_res_blocks, back.config.upsampling, back.config.scale_factor_spatial) == (
        blocks, upsampling, 4)  # fmt: skip
    assert torch.equal(back.decode(z).sample, vae.decode(z).sample)


def test_outline_term_penalises_blurred_edges():
    torch.manual_seed(0)
    vae = WorldVAE(base_channels=8, scale_factor_spatial=4).eval()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    torch.manual_seed(1)
    plain, mse = reconstruction_loss(vae, x)
    torch.manual_seed(1)
    edged, mse2 = reconstruction_loss(vae, x, edge_weight=0.5)
    assert torch.equal(mse, mse2) and edged > plain


def test_save_and_load_keep_weights_and_statistics(vae, tmp_path):
    vae.register_to_config(latents_mean=[0.5] * 16, latents_std=[2.0] * 16)
    vae.save_pretrained(tmp_path / "vae")
    back = WorldVAE.from_pretrained(tmp_path / "vae")
    assert back.config.latents_mean == [0.5] * 16 and back.config.base_channels == 8
    for (k, a), (_, b) in zip(vae.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = VideoVAE(back).encode(x)
    raw = back.encode(x).latent_dist.mode().transpose(1, 2)
    assert torch.allclose(z, (raw - 0.5) / 2.0)  # the pipeline normalises with the stored statistics


@pytest.mark.parametrize("variant", [{}, dict(vae_spatial=4, vae_blocks=1, vae_upsampling="nearest", vae_edge=0.5)])
def test_a_few_vae_steps_lower_the_loss_and_fill_in_the_statistics(tmp_path, variant):
    cfg = TrainConfig(out=tmp_path, vae_steps=40, vae_batch=2, vae_lr=2e-3, vae_channels=8, height=32, width=32,
                      num_clips=8, config="tiny", **variant)  # fmt: skip
    vae = train_vae(cfg, progress=False)
    rows = (tmp_path / "vae_log.csv").read_text().splitlines()[1:]
    mse = [float(r.split(",")[1]) for r in rows]
    assert len(mse) == 40 and sum(mse[-10:]) < 0.7 * sum(mse[:10])
    std = vae.config.latents_std
    assert len(std) == 16 and all(s > 0 for s in std) and std != [1.0] * 16
    again = train_vae(cfg, progress=False)  # finished: loaded, not retrained
    assert again.config.latents_std == std
    assert VideoVAE(again).spatial == cfg.vae_spatial
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    loss, m = reconstruction_loss(vae, x)
    assert loss >= m > 0
