"""The macro chain: how segments hand over to each other and how their videos are stitched.

Segment s+1 starts from segment s's handoff keyframes (the terminal frames by default, the middle ones
in the lower-memory mode) through the re-encoding the MMPL authors use against drift::

    decode [f0, p_a, p_a, p_b]    (p_a, p_b: the last two handoff latents; p_a twice gives the causal
                                   decoder context), keep the last 5 video frames, encode them:
                                   the 2 latents become frames 0, 1 of segment s+1 (given, not denoised)

Stitching: segment 0 contributes the video of its latent frames up to the handoff; every later segment
drops its first 5 video frames (they repeat the previous segment's last 5). With 21 latent frames, a 4x
temporal VAE and terminal handoff: 81 frames, then 76 per segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .components import VideoVAE
from .layouts import Layout

REENCODE_VIDEO_FRAMES = 5  # video frames kept from the decoded tail (the released method)
CHAIN_MODES = ("terminal", "middle")


@dataclass(frozen=True)
class ChainPlan:
    """Frame arithmetic of a chained video for one layout, chain mode and VAE time compression."""

    layout: Layout
    mode: str = "terminal"
    temporal: int = 4

    def __post_init__(self) -> None:
        if self.mode not in CHAIN_MODES:
            raise ValueError(f"chain mode {self.mode!r} is not one of {', '.join(CHAIN_MODES)}")
        if self.mode not in self.layout.handoff:
            raise ValueError(
                f"layout {self.layout.name!r} has no {self.mode!r} handoff frames "
                f"(it has: {', '.join(self.layout.handoff) or 'none'})"
            )
        if len(self.handoff) < 2:
            raise ValueError(f"layout {self.layout.name!r}: the {self.mode!r} handoff needs at least 2 frames")

    @property
    def handoff(self) -> tuple[int, ...]:
        """Frames of a segment whose latents start the next segment."""
        return self.layout.handoff[self.mode]

    @property
    def kept_latents(self) -> int:
        """Latent frames of a segment that appear in the video (0 .. last handoff frame)."""
        return max(self.handoff) + 1

    @property
    def start_latents(self) -> int:
        """Latent frames a chained segment receives from its predecessor."""
        return 1 + (REENCODE_VIDEO_FRAMES - 1) // self.temporal

    @property
    def first_segment_frames(self) -> int:
        return 1 + (self.kept_latents - 1) * self.temporal

    @property
    def later_segment_frames(self) -> int:
        return self.first_segment_frames - REENCODE_VIDEO_FRAMES

    def video_frames(self, num_segments: int) -> int:
        """Video frames of `num_segments` stitched segments."""
        if num_segments <= 0:
            raise ValueError(f"num_segments must be positive, got {num_segments}")
        return self.first_segment_frames + (num_segments - 1) * self.later_segment_frames

    def segments_for(self, num_frames: int) -> int:
        """Fewest segments whose stitched video has at least `num_frames` frames."""
        if not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        extra = max(0, num_frames - self.first_segment_frames)
        return 1 + math.ceil(extra / self.later_segment_frames)

    def video_latent_frames(self, num_segments: int) -> int:
        """Latent frames of the whole video (diffusers' ``latents`` / ``output_type="latent"`` layout): segment
        0's kept frames, then each later segment's kept frames after the re-encoded ones. With a 4x VAE this is
        ``(video_frames - 1) // 4 + 1``, as for a single clip of that length."""
        return self.kept_latents + (num_segments - 1) * (self.kept_latents - self.start_latents)

    def video_latent_span(self, segment: int) -> tuple[range, int]:
        """(frames of `segment` the video's latents hold, index of the first of them in those latents)."""
        if segment == 0:
            return range(self.kept_latents), 0
        per = self.kept_latents - self.start_latents
        return range(self.start_latents, self.kept_latents), self.kept_latents + (segment - 1) * per

    @property
    def stages(self) -> tuple[int, ...]:
        """Stages each segment runs: those producing its kept latents (the handoff included) and what they
        read. In ``"middle"`` mode the released layout's second populate stage (frames 13-18) makes only
        frames the video drops, so it is left out."""
        return self.layout.stages_for(range(self.kept_latents))

    def chain_stages(self) -> list[int]:
        """Stages that must finish before the next segment can start (up to the last handoff producer)."""
        last = max(self.layout.stage_of(f) for f in self.handoff)
        return list(range(last + 1))

    def populate_stages(self) -> list[int]:
        first = len(self.chain_stages())
        return [k for k in self.stages if k >= first]

    def stitch(self, segment: int, video: torch.Tensor) -> torch.Tensor:
        """The part of a segment's decoded video ``[B, 3, T, H, W]`` that enters the stitched video."""
        return video if segment == 0 else video[:, :, REENCODE_VIDEO_FRAMES:]


def reencode(vae: VideoVAE, latents: torch.Tensor, plan: ChainPlan) -> torch.Tensor:
    """Start latents of the next segment from a finished segment's ``[F, C, h, w]`` latents.

    The authors zero-pad the 5 kept frames to a full segment before encoding and keep the first two latents;
    with a causal VAE (Wan's, and `WorldVAE`) those two latents depend on the 5 frames only, so encoding the 5
    frames alone gives the same latents without the padding's work (tests check it on a Wan VAE).

    Returns ``[plan.start_latents, C, h, w]``.
    """
    a, b = plan.handoff[-2], plan.handoff[-1]
    tail = latents[[0, a, a, b]][None]  # [1, 4, C, h, w]
    video = vae.decode(tail)[:, :, -REENCODE_VIDEO_FRAMES:]
    return vae.encode(video)[0, : plan.start_latents].to(latents.dtype)


def _start_take(video_frames: int) -> int:
    """Video frames of a given clip that start the first segment: its last 5 (the re-encode window) when it has
    them, else its last one."""
    return REENCODE_VIDEO_FRAMES if video_frames >= REENCODE_VIDEO_FRAMES else 1


def start_latents(video_frames: int, temporal: int) -> int:
    """Latent frames `encode_start` makes of a clip of `video_frames` frames (an image: 1)."""
    return 1 + (_start_take(video_frames) - 1) // temporal


def encode_start(vae: VideoVAE, frames: torch.Tensor) -> torch.Tensor:
    """Given start frames ``[3, T, H, W]`` in [-1, 1] (an image is T = 1) -> start latents ``[n, C, h, w]``.

    A clip longer than the re-encode window contributes its last 5 frames, exactly as a previous segment
    would; a shorter one its last frame (one latent), so both paths match the chain.
    """
    t = frames.shape[1]
    return vae.encode(frames[None, :, t - _start_take(t) :])[0]
