"""Joining the process group torchrun describes, for multi-process (and multi-node) generation.

Under torchrun every rank runs one device; `Pipeline.stream` then plans the video once (rank 0 computes the
schedule and broadcasts it), and `scheduler.execute.DistributedTransport` moves what crosses ranks point to
point: KV pages and latents between the ranks that produce and consume them, decoded segments to rank 0,
which writes the video, per peer in one order every rank derives from the schedule (NCCL matches messages in
issue order and ignores tags). NCCL on GPUs (each rank's GPU made current and bound to the process group
before anything runs), gloo on CPU; multi-node through torchrun's rendezvous. Every wait on
a peer is bounded by the process group's timeout, so a failed rank ends the run on every rank with an error
naming the peer, never a hang; rerunning the same command with ``--workdir`` resumes it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MMPL_FAST_DIST_TIMEOUT"


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); return whether one exists.

    The timeout (seconds, ``$MMPL_FAST_DIST_TIMEOUT``, default 600) bounds every wait on a peer.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    seconds = float(os.environ.get(TIMEOUT_ENV, "600"))
    if cuda:  # the rank's GPU, current before the process group binds NCCL to it (device_id)
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)  # current device: the rank's, for NCCL and whatever uses the current one
        dist.init_process_group("nccl", timeout=timedelta(seconds=seconds), device_id=local)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
    return True


def comm_device() -> torch.device:
    """Where this rank's collective and point-to-point buffers live: under NCCL its GPU (``LOCAL_RANK``, the
    device `init_from_env` binds), under gloo the CPU. The rule lives in `scheduler.execute.comm_device`, which
    `DistributedTransport` uses too."""
    from .scheduler.execute import comm_device as rule

    return rule(dist)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
