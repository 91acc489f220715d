"""Point-to-point hand-offs for multi-process generation (torch.distributed, launched by torchrun).

Segments are owned by ranks. The owner of segment s sends the next segment's start latents (the re-encoded
handoff keyframes) to the owner of s + 1, and its decoded video and latents to rank 0, which writes the
video. Every receive is posted with a known shape, so no metadata travels. NCCL on GPUs, gloo on CPU;
multi-node through torchrun's rendezvous. A rank that fails exits; its peers' pending receives then fail
(connection closed, or the process group timeout) and they exit with an error naming the peer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MMPL_FAST_DIST_TIMEOUT"
_START, _VIDEO, _LATENTS = 0, 1, 2


def _tag(segment: int, kind: int) -> int:
    return segment * 4 + kind


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); return whether one exists.

    The timeout (seconds, ``$MMPL_FAST_DIST_TIMEOUT``, default 600) bounds every wait on a peer.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    seconds = float(os.environ.get(TIMEOUT_ENV, "600"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=seconds))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _comm_device(t: torch.Tensor) -> torch.Tensor:
    # gloo moves CPU tensors; NCCL CUDA ones.
    return t if dist.get_backend() == "nccl" else t.cpu()


@dataclass
class Ready:
    """A segment rank 0 produced itself (same interface as a pending receive)."""

    video: torch.Tensor
    latents: torch.Tensor

    def done(self) -> bool:
        return True

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video, self.latents


@dataclass
class Pending:
    """Receives of one remote segment's video and latents."""

    video: torch.Tensor
    latents: torch.Tensor
    works: list
    device: torch.device

    def done(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video.to(self.device), self.latents.to(self.device)


def _segment_frames(run, s: int) -> int:
    return run.plan.first_segment_frames if s == 0 else run.plan.later_segment_frames


def post_segment_recv(pipe, run, s: int, src: int) -> Pending:
    """Post the receives of segment s's stitched video ``[3, T, H, W]`` and latents from rank `src`."""
    _, _, lh, lw = run.latent_shape
    h, w = lh * pipe.vae.spatial, lw * pipe.vae.spatial
    frames = 0 if run.output_type == "latent" else _segment_frames(run, s)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    video = torch.empty((3, frames, h, w) if frames else (0,), dtype=torch.float32, device=dev)
    latents = torch.empty(run.latent_shape, dtype=torch.float32, device=dev)
    works = [dist.irecv(latents, src, tag=_tag(s, _LATENTS))]
    if frames:
        works.append(dist.irecv(video, src, tag=_tag(s, _VIDEO)))
    return Pending(video, latents, works, pipe.device)


def send_segment(video: torch.Tensor, latents: torch.Tensor, s: int) -> list:
    works = [dist.isend(_comm_device(latents.float().contiguous()), 0, tag=_tag(s, _LATENTS))]
    if video.numel():
        works.append(dist.isend(_comm_device(video.float().contiguous()), 0, tag=_tag(s, _VIDEO)))
    return works


def send_start(given: torch.Tensor, s: int, dst: int):
    """Send segment s's start latents to its owner."""
    return dist.isend(_comm_device(given.float().contiguous()), dst, tag=_tag(s, _START))


def recv_start(run, s: int, src: int) -> torch.Tensor:
    """Receive segment s's start latents from the owner of s - 1."""
    n = run.plan.start_latents
    buf = torch.empty((n, *run.latent_shape[1:]), dtype=torch.float32)
    buf = _comm_device(buf) if dist.get_backend() != "nccl" else buf.cuda()
    try:
        dist.recv(buf, src, tag=_tag(s, _START))
    except RuntimeError as e:
        raise RuntimeError(f"waiting for segment {s}'s start latents from rank {src} failed (did it fail?): {e}") from e
    return buf


def wait(p, s: int, src: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        for w in getattr(p, "works", []):
            w.wait()
    except RuntimeError as e:
        raise RuntimeError(f"waiting for segment {s} from rank {src} failed (did it fail?): {e}") from e
    return p.result()


def wait_send(work) -> None:
    try:
        work.wait()
    except RuntimeError as e:
        raise RuntimeError(f"a send to a peer rank failed (did it fail?): {e}") from e
