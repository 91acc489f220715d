"""Measure task costs on the device at hand, once per (device name, config, dtype, library versions).

`measure_profile` times one model call of every distinct stage shape of a DAG (the DiT with random weights
over a real `KVPool`: timings do not depend on the weights), multiplies by the calls the stage makes, and,
when a VAE is passed, times the decode and re-encode; everything else keeps the estimate. The result is
stored in the `ProfileCache`, so the next run on the same device, config, dtype and versions reads it
back instead of measuring. `CostModel.observe` folds the times a real run measures into the same profile.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable

from .costs import CostModel, Profile, ProfileCache, Workload, task_signature
from .dag import Task, TaskDAG


def device_name(device) -> str:
    """The name profiles are keyed by: the CUDA device name, or the CPU's."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _timed(fn: Callable[[], object], sync: Callable[[], None], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_profile(
    dag: TaskDAG,
    workload: Workload,
    *,
    device="cpu",
    cache: ProfileCache | None = None,
    vae=None,
    batch_sizes: tuple[int, ...] = (1,),
    warmup: int = 1,
    repeat: int = 3,
    force: bool = False,
) -> Profile:
    """The cached profile for this device, config, dtype and versions, measuring what it lacks for `dag`.

    Args:
        dag: the tasks to cover (its distinct stage shapes are measured).
        workload: model config, size, steps, guidance, dtype.
        device: where to measure.
        cache: where profiles live (default: ``~/.cache/mmpl_fast/profiles``).
        vae: optional ``(decode, encode)`` callables on latents ``[1, C, T, h, w]`` / video ``[1, 3, T, H, W]``
            to time the VAE tasks; without it they keep the estimate.
        batch_sizes: batch sizes to measure populate stages at (batched launches of several segments).
        force: measure again even when the cache has every entry.
    """
    import torch

    for name, value in (("warmup", warmup), ("repeat", repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup" else 1):
            kind = "non-negative" if name == "warmup" else "positive"
            raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    cache = cache if cache is not None else ProfileCache()
    dev = torch.device(device)
    profile = cache.load(device_name(dev), workload.config, workload.dtype)
    todo: dict[str, tuple[Task, int]] = {}
    for t in dag.tasks:
        if not t.is_stage:
            continue
        for b in batch_sizes if t.kind == "populate" else (1,):
            sig = task_signature(t, b)
            if force or profile.get(workload, sig) is None:
                todo.setdefault(sig, (t, b))
    vae_todo = vae is not None and (force or profile.get(workload, task_signature(_decode_task(dag))) is None)
    if not todo and not vae_todo:
        return profile
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    timed = functools.partial(_timed, sync=sync, warmup=warmup, repeat=repeat)
    with torch.no_grad():
        _measure_stages(profile, dag, workload, todo, dev, max(batch_sizes), timed)
    if vae_todo:
        _measure_vae(profile, dag, workload, vae, dev, timed)
    cache.save(profile)
    return profile


def _measure_stages(profile: Profile, dag: TaskDAG, workload: Workload, todo, dev, max_batch: int, timed) -> None:
    """Time one model call of each stage shape in `todo` over a real `KVPool`, times the calls it makes."""
    import torch

    from ..kv_pool import KVPool
    from ..model import CausalWanModel

    estimate = CostModel(workload)
    dtype = getattr(torch, workload.dtype)
    cfg = workload.config
    lh, lw = workload.latent_size
    n_frames = dag.layout.num_frames
    model = CausalWanModel(cfg).to(device=dev, dtype=dtype).eval()
    pool = KVPool(cfg, n_frames * max_batch, workload.tokens_per_frame, device=dev, dtype=dtype)
    text = torch.zeros(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)
    cross1 = model.embed_context(text)
    for sig, (task, b) in todo.items():
        frames = list(task.frames)
        write = [[s * n_frames + f for f in frames] for s in range(b)]
        read = [[s * n_frames + f for f in task.reads] for s in range(b)]
        view = pool.view(frames, write, read)
        x = torch.randn(b, len(frames), cfg.in_channels, lh, lw, device=dev, dtype=dtype)
        ts = torch.full((b, len(frames)), 500.0, device=dev)
        cross = cross1.select([0] * b)
        per_call = timed(functools.partial(model, x, ts, cross, view))
        seconds = per_call * len(estimate.pass_shapes(task)) * workload.branches
        if task.kind == "reencode":  # its VAE part keeps the estimate unless a VAE is timed below
            seconds += estimate.estimate(task, b) - estimate.estimate(_without_vae(task), b)
        profile.record(workload, sig, seconds, alpha=1.0)


def _measure_vae(profile: Profile, dag: TaskDAG, workload: Workload, vae, dev, timed) -> None:
    """Time the decode task and the re-encode's VAE part (decode 4 latents, encode 5 frames)."""
    import torch

    from .costs import REENCODE_LATENTS, REENCODE_VIDEO_FRAMES

    estimate = CostModel(workload)
    dtype = getattr(torch, workload.dtype)
    cfg = workload.config
    lh, lw = workload.latent_size
    decode, encode = vae
    dec_task = _decode_task(dag)
    z = torch.randn(1, cfg.in_channels, len(dec_task.frames), lh, lw, device=dev, dtype=dtype)
    profile.record(workload, task_signature(dec_task), timed(lambda: decode(z)), alpha=1.0)
    re = next((t for t in dag.tasks if t.kind == "reencode"), None)
    if re is None:
        return
    z4 = torch.randn(1, cfg.in_channels, REENCODE_LATENTS, lh, lw, device=dev, dtype=dtype)
    video = torch.randn(1, 3, REENCODE_VIDEO_FRAMES, workload.height, workload.width, device=dev, dtype=dtype)
    vae_s = timed(lambda: (decode(z4), encode(video)))
    sig = task_signature(re)
    dit = profile.get(workload, sig)
    dit = dit - (estimate.estimate(re) - estimate.estimate(_without_vae(re))) if dit is not None else 0.0
    profile.record(workload, sig, max(0.0, dit) + vae_s, alpha=1.0)


def _decode_task(dag: TaskDAG) -> Task:
    return next(t for t in dag.tasks if t.kind == "decode")


def _without_vae(task: Task) -> Task:
    from dataclasses import replace

    return replace(task, kind="start")
