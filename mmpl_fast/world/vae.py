"""`WorldVAE`: the embedded model's small video autoencoder, with the Wan VAE's compression and interface.

Why not a small `AutoencoderKLWan`: its causal 3D convolutions train slowly on a 2-core CPU (about 1 s per
step of four 9-frame 64x64 clips, and thousands of steps before flat-coloured shapes come back sharp), which
does not fit the embedded model's 90-minute training budget. This one is 2D convolutions over groups of
frames and trains in minutes. Everything the pipeline relies on is the same as Wan's:

* compression: 4x in time, causal (the first latent is the first frame alone, each later latent the next 4
  frames), 8x in space (Wan's) or 4x, ``z_dim`` latent channels: ``[B, 3, 1 + 4k, H, W] <-> [B, z, 1 + k,
  H/s, W/s]``. At 8x a small shape of a 64-pixel frame covers about one latent pixel, which caps how well
  shapes come back (63% right measured); 4x gives each shape a few latent pixels;
* interface: ``encode(x).latent_dist`` (a diffusers `DiagonalGaussianDistribution`; the pipeline takes its
  mode), ``decode(z).sample`` clamped to [-1, 1], ``config.latents_mean`` / ``latents_std`` (measured on the
  world after training), ``config.scale_factor_temporal`` / ``scale_factor_spatial``, ``save_pretrained`` /
  ``from_pretrained`` (diffusers `ModelMixin`, safetensors).

Architecture (L = log2 of the spatial compression, 3 or 2)::

    encode  group of 4 frames (the first frame repeated 4 times) -> 12 channels -> conv -> L x (stride-2 conv,
            conv, res blocks) -> 1x1 conv -> mean, logvar                            (each latent on its own)
    decode  [z_{i-1}, z_i] (z_{-1} = z_0: causal context for smooth group boundaries) -> convs -> L x (2x
            upsample, conv, res blocks) -> 12 channels -> 4 frames (latent 0 gives 1 frame: the last of its 4)

``num_res_blocks`` residual blocks per level (0: the plain stack the first shipped model has) and the
upsampling (``"transpose"``: 2x transposed convolutions; ``"nearest"``: nearest-neighbour then a conv, which
leaves no checkerboard on flat colours) are config fields, so every variant loads from its own folder.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

TEMPORAL = 4
SPATIAL_FACTORS = (4, 8)
UPSAMPLING = ("transpose", "nearest")


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=(k - stride + 1) // 2 if stride == 1 else 1)


class _Residual(nn.Module):
    """x + conv(silu(conv(x))): depth without the vanishing signal of a longer plain stack."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_conv(ch, ch), nn.SiLU(), _conv(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _upsample(cin: int, cout: int, mode: str) -> list[nn.Module]:
    if mode == "transpose":
        return [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)]
    return [nn.Upsample(scale_factor=2, mode="nearest"), _conv(cin, cout)]


class WorldVAE(ModelMixin, ConfigMixin):
    """Causal 4x-time, 8x- or 4x-space video autoencoder (see the module docstring).

    Args:
        z_dim: latent channels.
        base_channels: channels at full resolution (x2 per level, capped at 4x).
        latents_mean, latents_std: per-channel statistics of the latents (the pipeline normalises with them).
        scale_factor_spatial: 8 or 4.
        num_res_blocks: residual blocks after each level's resampling (0: the plain stack).
        upsampling: "transpose" or "nearest" (the decoder's 2x steps).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        z_dim: int = 16,
        base_channels: int = 32,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        scale_factor_temporal: int = TEMPORAL,
        scale_factor_spatial: int = 8,
        num_res_blocks: int = 0,
        upsampling: str = "transpose",
    ):
        super().__init__()
        if scale_factor_temporal != TEMPORAL or scale_factor_spatial not in SPATIAL_FACTORS:
            raise ValueError(
                f"WorldVAE compresses {TEMPORAL}x in time and {' or '.join(map(str, SPATIAL_FACTORS))}x in space, "
                f"got {scale_factor_temporal}x and {scale_factor_spatial}x"
            )
        if upsampling not in UPSAMPLING or num_res_blocks < 0:
            raise ValueError(f"upsampling must be one of {UPSAMPLING} and num_res_blocks >= 0, got "
                             f"{upsampling!r}, {num_res_blocks}")  # fmt: skip
        for name, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if stats is not None and len(stats) != z_dim:
                raise ValueError(f"{name}: expected {z_dim} values (one per latent channel), got {len(stats)}")
        if latents_mean is None:
            self.register_to_config(latents_mean=[0.0] * z_dim)
        if latents_std is None:
            self.register_to_config(latents_std=[1.0] * z_dim)
        self.levels = scale_factor_spatial.bit_length() - 1
        self.encoder, self.decoder = self._build(z_dim, base_channels, num_res_blocks, upsampling)
        for m in self.modules():  # He init: PyTorch's default shrinks the signal through this deep a stack
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in self.modules():  # residual blocks start as the identity
            if isinstance(m, _Residual):
                nn.init.zeros_(m.body[-1].weight)

    def _build(self, z_dim: int, c: int, blocks: int, upsampling: str) -> tuple[nn.Sequential, nn.Sequential]:
        widths = [c, 2 * c, 4 * c, 4 * c][: self.levels + 1]
        frame_ch = 3 * TEMPORAL
        enc: list[nn.Module] = [_conv(frame_ch, widths[0]), nn.SiLU()]
        for i in range(self.levels):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.SiLU(),
                    _conv(widths[i + 1], widths[i + 1]), nn.SiLU()]  # fmt: skip
            enc += [_Residual(widths[i + 1]) for _ in range(blocks)]
        enc.append(nn.Conv2d(widths[-1], 2 * z_dim, 1))
        dec: list[nn.Module] = [_conv(2 * z_dim, widths[-1]), nn.SiLU(), _conv(widths[-1], widths[-1]), nn.SiLU()]
        for i in range(self.levels, 0, -1):
            dec += [*_upsample(widths[i], widths[i - 1], upsampling), nn.SiLU(),
                    _conv(widths[i - 1], widths[i - 1]), nn.SiLU()]  # fmt: skip
            dec += [_Residual(widths[i - 1]) for _ in range(blocks)]
        dec.append(_conv(widths[0], frame_ch))
        return nn.Sequential(*enc), nn.Sequential(*dec)

    # ------------------------------------------------------------------------------------------- encode
    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 1 + 4k, H, W]`` -> ``[B, 1 + k, 12, H, W]``: the first frame repeated, then groups of 4."""
        b, c, t, h, w = x.shape
        if c != 3:
            raise ValueError(f"video: expected 3 channels [B, 3, T, H, W], got shape {tuple(x.shape)}")
        if (t - 1) % TEMPORAL:
            raise ValueError(f"video: {t} frames; the causal {TEMPORAL}x encoder needs 1 + {TEMPORAL}k frames")
        if h % 2**self.levels or w % 2**self.levels:
            raise ValueError(f"video: {h}x{w} pixels are not multiples of {2**self.levels}")
        frames = torch.cat([x[:, :, :1].expand(b, c, TEMPORAL, h, w), x[:, :, 1:]], dim=2)
        return frames.view(b, c, -1, TEMPORAL, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * TEMPORAL, h, w)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1] -> posterior over ``[B, z, 1 + k, H/s, W/s]``."""
        g = self._groups(x)
        b, n = g.shape[:2]
        h = self.encoder(g.flatten(0, 1))  # [B*n, 2z, h, w]
        h = h.view(b, n, *h.shape[1:]).transpose(1, 2)  # [B, 2z, n, h, w]
        posterior = DiagonalGaussianDistribution(h)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # ------------------------------------------------------------------------------------------- decode
    def decode_unclamped(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, z, n, h, w]`` -> video ``[B, 3, 1 + 4(n - 1), H, W]`` without the output clamp
        (training uses this: a clamp has no gradient where the output overshoots)."""
        b, zc, n, h, w = z.shape
        prev = torch.cat([z[:, :, :1], z[:, :, :-1]], dim=2)  # causal context: the previous latent
        y = self.decoder(torch.cat([prev, z], dim=1).transpose(1, 2).flatten(0, 1))  # [B*n, 12, H, W]
        y = y.view(b, n, TEMPORAL, 3, *y.shape[-2:]).permute(0, 3, 1, 2, 4, 5).flatten(2, 3)  # [B, 3, 4n, H, W]
        return y[:, :, TEMPORAL - 1 :]  # latent 0 stands for one frame: the last of its group

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latents ``[B, z, n, h, w]`` -> video ``[B, 3, 1 + 4(n - 1), H, W]`` in [-1, 1]."""
        if z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z: expected [B, {self.config.z_dim}, n, h, w], got shape {tuple(z.shape)}")
        out = self.decode_unclamped(z).clamp(-1.0, 1.0)
        return DecoderOutput(sample=out) if return_dict else (out,)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(sample).latent_dist.mode()).sample


def reconstruction_loss(
    vae: WorldVAE,
    video: torch.Tensor,
    latent_noise: float = 0.05,
    l2: float = 1e-4,
    object_weight: float = 10.0,
    edge_weight: float = 0.0,
):
    """Weighted MSE of the unclamped reconstruction of ``[B, 3, T, H, W]`` video in [-1, 1].

    * pixels away from the clip's background colour (its per-channel median) weigh ``1 + object_weight``:
      the shapes are a few percent of the pixels, yet their colour and outline are what the video is about;
    * `edge_weight` adds an outline term: the L1 distance of the horizontal and vertical pixel differences
      (a square's corners and a triangle's slopes are what tell the shapes apart; MSE alone rounds them);
    * the decoder sees the posterior mode plus a little noise (relative to the latents' spread), so it
      tolerates the imperfect latents a generator makes;
    * a small L2 on the latents keeps their scale bounded.

    Returns ``(loss, mse)``, `mse` unweighted (for PSNR).
    """
    m = vae.encode(video).latent_dist.mode()
    z = m + latent_noise * m.detach().std() * torch.randn_like(m)
    out = vae.decode_unclamped(z)
    background = video.flatten(2).median(dim=2).values[:, :, None, None, None]
    weight = 1 + object_weight * ((video - background).abs().amax(1, keepdim=True) > 0.1).float()
    err = (out - video) ** 2
    loss = (weight * err).mean() / weight.mean()
    if edge_weight:
        for dim in (-1, -2):
            loss = loss + edge_weight * (out.diff(dim=dim) - video.diff(dim=dim)).abs().mean()
    return loss + l2 * m.pow(2).mean(), err.mean().detach()
