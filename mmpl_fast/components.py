"""Thin wrappers over the reused components: the umT5 text encoder (transformers) and the Wan VAE
(diffusers `AutoencoderKLWan`). Nothing here is rewritten; the wrappers fix the conventions:

* text: every prompt becomes ``[text_len, text_dim]`` states whose padding rows are zero (as Wan does;
  the DiT attends all rows without a mask);
* latents: the model's latents are the VAE's, normalised per channel, ``(z - mean) / std``, laid out
  ``[B, F, C, h, w]`` (frames before channels, as the engine indexes frames);
* video: float in [-1, 1], ``[B, 3, T, H, W]`` at the VAE boundary; the pipeline converts to uint8/np.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TextEncoder:
    """Prompts -> ``[B, text_len, text_dim]`` states with zeroed padding rows."""

    def __init__(self, tokenizer, encoder: torch.nn.Module, text_len: int):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], length: int | None = None) -> torch.Tensor:
        """``[len(prompts), length, text_dim]`` (default length: `text_len`)."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.text_len if length is None else length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        states = self.encoder(ids, attention_mask=mask).last_hidden_state
        return states * mask[..., None].to(states.dtype)


class VideoVAE:
    """A Wan-style video VAE with the model's latent normalisation and frame-major layout.

    Takes diffusers `AutoencoderKLWan`, or the embedded model's `world.vae.WorldVAE` (same interface and
    compression): anything with ``encode(x).latent_dist.mode()``, ``decode(z).sample`` and a config holding
    ``z_dim``, ``latents_mean``, ``latents_std`` and its compression.
    """

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval()
        cfg = vae.config
        self.z_dim = cfg.z_dim
        if "temperal_downsample" in cfg:  # AutoencoderKLWan: its layers decide (scale_factor_* are defaults)
            self.temporal = 2 ** sum(bool(x) for x in cfg.temperal_downsample)
            self.spatial = 2 ** (len(cfg.dim_mult) - 1)
        else:
            self.temporal, self.spatial = cfg.scale_factor_temporal, cfg.scale_factor_spatial
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, 1, -1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, 1, -1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames of a causal encode of `video_frames` frames (1 + (T - 1) / temporal)."""
        return 1 + (video_frames - 1) // self.temporal

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` in [-1, 1] -> normalised latents ``[B, F, z, h, w]`` (the posterior mode)."""
        z = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mode().float().transpose(1, 2)
        return (z - self._mean.to(z.device)) / self._std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, F, z, h, w]`` -> video ``[B, 3, T, H, W]`` in [-1, 1] (float32)."""
        z = latents.float() * self._std.to(latents.device) + self._mean.to(latents.device)
        video = self.vae.decode(z.transpose(1, 2).to(self.device, self.dtype)).sample
        return video.float().clamp(-1, 1)
