"""The engine: run one stage of a layout for a batch of segments on one device.

For each segment of the batch, a stage's frames are either *given* (re-encoded from the previous
segment, or encoded from the user's image/video: only written into the cache by a t = 0 pass) or
*denoised* (the sampler's steps, each a model call that writes the frames' pages and reads the pages
the layout grants, then the t = 0 pass on the clean result if a later stage reads these frames).

Random numbers are keyed by (seed, segment, stage, step) and drawn on the CPU, so a segment's video
does not depend on batching, order, device or device count.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .kernels import cfg_combine
from .kv_pool import CrossAttentionCache, KVPool
from .layouts import Layout
from .model import CausalWanModel, CrossKV
from .sampling import Sampler


def noise_seed(seed: int, segment: int, stage: int, step: int) -> int:
    """A 63-bit generator seed from (seed, segment, stage, step): stable across runs and platforms."""
    digest = hashlib.blake2b(f"mmpl_fast:{seed}:{segment}:{stage}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_noise(seed: int, segment: int, stage: int, step: int, shape: Sequence[int], device, dtype) -> torch.Tensor:
    """Standard normal noise for one (segment, stage, step), drawn on the CPU then moved.

    The move to a GPU is asynchronous (from pinned memory), so drawing noise inside a denoising step does not
    make the host wait for the GPU's queued work.
    """
    gen = torch.Generator("cpu").manual_seed(noise_seed(seed, segment, stage, step))
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            noise = noise.pin_memory()  # current device: the noise's, set just above
    return noise.to(device=device, dtype=dtype, non_blocking=True)


@dataclass
class SegmentJob:
    """One segment being generated.

    Attributes:
        index: the segment's number in the video (keys its random numbers and RoPE offsets nothing).
        prompt: key of its prompt in the cross-attention cache.
        latents: ``[F, C, h, w]``; frames fill in as stages finish (given frames from the start). Any device:
            the engine moves what it reads and writes.
        given: frames supplied from outside (re-encode, image, video) rather than denoised.
        done: stages finished.
        initial_noise: frame -> ``[C, h, w]`` step-0 noise replacing the keyed draw of that frame (diffusers'
            ``latents=``); frames not in it keep the keyed noise, and every later draw stays keyed.

    Where the segment's keys and values live is the engine's business (`StageEngine.pages`), so one job can
    move between engines on different devices (`export_pages` / `import_pages`).
    """

    index: int
    prompt: str
    latents: torch.Tensor
    given: frozenset[int] = frozenset()
    done: set[int] = field(default_factory=set)
    initial_noise: dict[int, torch.Tensor] = field(default_factory=dict)


def _with_initial_noise(x: torch.Tensor, jobs: Sequence[SegmentJob], frames: Sequence[int]) -> torch.Tensor:
    """`x` ``[B, F, C, h, w]`` (the keyed step-0 noise of `frames`) with each job's `initial_noise` written in."""
    for b, j in enumerate(jobs):
        for k, f in enumerate(frames):
            if f in j.initial_noise:
                x[b, k] = j.initial_noise[f].to(x)
    return x


# (stage, step index, model timestep, latents after the step, velocity) -> replacement latents or None
StepCallback = Callable[[int, int, float, torch.Tensor, torch.Tensor], torch.Tensor | None]


class StageEngine:
    """Runs stages of `layout` for batches of `SegmentJob`s with one model on one device.

    Args:
        model: the causal DiT.
        layout: the stages of a segment.
        sampler: timesteps and update rule (a fresh solver state per stage).
        pools: ``{"cond": KVPool, "uncond": KVPool}`` (uncond only with guidance).
        cross: cross-attention cache holding every prompt key used (and ``negative_key`` with guidance).
        seed: keys all random numbers.
        guidance: classifier-free guidance scale; 1 or less disables the unconditional branch.
        stages: the stages segments run (default: all); a stage left out is never read, so the stages
            before it skip the t = 0 cache pass of frames only it would read.
    """

    def __init__(
        self,
        model: CausalWanModel,
        layout: Layout,
        sampler: Sampler,
        pools: dict[str, KVPool],
        cross: CrossAttentionCache,
        *,
        seed: int,
        guidance: float = 1.0,
        negative_key: str = "",
        stages: Sequence[int] | None = None,
    ):
        self.model, self.layout, self.sampler = model, layout, sampler
        self.pools, self.cross, self.seed = pools, cross, seed
        self.guidance, self.negative_key = guidance, negative_key
        if self.use_cfg and "uncond" not in pools:
            raise ValueError("guidance > 1 needs an 'uncond' KV pool (one cache per guidance branch)")
        self.stages = tuple(range(layout.num_stages)) if stages is None else tuple(sorted(set(stages)))
        if not set(self.stages) <= set(range(layout.num_stages)):
            raise ValueError(f"stages {tuple(stages)}: layout {layout.name!r} has stages 0..{layout.num_stages - 1}")
        # Frames some later stage that runs reads: only those need the t = 0 cache pass.
        self._read_later = [
            {f for j in self.stages if j > k for f in layout.stages[j].reads} for k in range(layout.num_stages)
        ]
        self.model_calls = 0
        self._pages: dict[int, list[int]] = {}  # segment index -> pool page of each of its frames
        self._page_lock = threading.Lock()
        if isinstance(model, CausalWanModel):  # its RoPE table is built now, not inside the first denoising step
            model.rope(model.device)

    @property
    def use_cfg(self) -> bool:
        return self.guidance > 1.0

    def pages(self, job: SegmentJob) -> list[int]:
        """The pool page of each of the job's frames (allocated on first use; the same in every branch's pool)."""
        with self._page_lock:  # launches on separate CUDA streams call this from their own threads
            if job.index not in self._pages:
                pages = self.pools["cond"].allocate(self.layout.num_frames)
                if self.use_cfg:
                    assert self.pools["uncond"].allocate(self.layout.num_frames) == pages, "pools out of step"
                self._pages[job.index] = pages
            return self._pages[job.index]

    def release(self, job: SegmentJob) -> None:
        """Give a finished segment's pages back."""
        with self._page_lock:
            pages = self._pages.pop(job.index, None)
            if pages is not None:
                for pool in self.pools.values():
                    pool.release(pages)

    def export_pages(self, job: SegmentJob, frames: Sequence[int]) -> list[torch.Tensor]:
        """Copies of the keys and values of `frames`: per guidance branch k then v, ``[layers, n, T, H, D]``."""
        idx = torch.tensor([self.pages(job)[f] for f in frames], device=self.pools["cond"].k.device)
        return [t.index_select(1, idx) for name in sorted(self.pools) for t in (self.pools[name].k, self.pools[name].v)]

    def import_pages(self, job: SegmentJob, frames: Sequence[int], tensors: Sequence[torch.Tensor]) -> None:
        """Write `export_pages`' tensors (from an engine on any device) into this engine's pages of `frames`."""
        names = sorted(self.pools)
        if len(tensors) != 2 * len(names):
            raise ValueError(f"import_pages: expected {2 * len(names)} tensors (k, v per branch), got {len(tensors)}")
        idx = torch.tensor([self.pages(job)[f] for f in frames], device=self.pools["cond"].k.device)
        for i, name in enumerate(names):
            for dst, src in zip((self.pools[name].k, self.pools[name].v), tensors[2 * i : 2 * i + 2]):
                dst.index_copy_(1, idx, src.to(device=dst.device, dtype=dst.dtype))

    def _views(self, jobs, frames, reads) -> dict[str, object]:
        """One view per guidance branch, built once per stage and reused by every step."""
        write = [[self.pages(j)[f] for f in frames] for j in jobs]
        read = [[self.pages(j)[f] for f in reads] for j in jobs]
        return {name: pool.view(frames, write, read) for name, pool in self.pools.items()}

    @property
    def _branches(self) -> tuple[str, ...]:
        return ("cond", "uncond") if self.use_cfg else ("cond",)

    def _cross(self, jobs) -> dict[str, CrossKV]:
        """Each branch's cross-attention K/V batch (one row per job), built once per stage and reused by every
        step: concatenating every layer's text K/V costs a copy per layer."""
        keys = {"cond": [j.prompt for j in jobs], "uncond": [self.negative_key] * len(jobs)}
        return {branch: self.cross.batch(keys[branch]) for branch in self._branches}

    def _call(self, views, cross, x, t, branch: str) -> torch.Tensor:
        timesteps = torch.full(x.shape[:2], float(t), device=x.device, dtype=torch.float32)
        self.model_calls += 1
        return self.model(x, timesteps, cross[branch], views[branch])

    def _cache_pass(self, views, cross, clean) -> None:
        for branch in self._branches:
            self._call(views, cross, clean, 0.0, branch)

    @torch.no_grad()
    def run_stage(self, jobs: Sequence[SegmentJob], stage: int, callback: StepCallback | None = None) -> None:
        """Run stage `stage` for every job (all jobs must have the same given frames in this stage)."""
        if stage not in self.stages:
            raise ValueError(f"run_stage: stage {stage} is not one this engine runs ({self.stages})")
        spec = self.layout.stages[stage]
        given_here = [f for f in spec.frames if f in jobs[0].given]
        if any([f for f in spec.frames if f in j.given] != given_here for j in jobs):
            raise ValueError("run_stage: jobs in one batch must have the same given frames in this stage")
        todo = [f for f in spec.frames if f not in jobs[0].given]
        # The sampler state stays float32 whatever the model's dtype (the model casts its input), as the
        # reference keeps float32 latents between bf16 forwards.
        device, dtype = self.model.device, torch.float32
        cross = self._cross(jobs)

        if given_here:  # re-encoded / user frames: only written into the cache
            clean = torch.stack([j.latents[given_here] for j in jobs]).to(device, dtype)
            self._cache_pass(self._views(jobs, given_here, list(spec.reads)), cross, clean)
        if todo:
            reads = list(spec.reads) + given_here
            shape = (len(todo), *jobs[0].latents.shape[1:])
            noise = lambda step: torch.stack(  # noqa: E731
                [keyed_noise(self.seed, j.index, stage, step, shape, device, dtype) for j in jobs]
            )
            views = self._views(jobs, todo, reads)
            run = self.sampler.start(device)
            x = _with_initial_noise(noise(0), jobs, todo)
            # A step makes no host sync: timesteps are host floats, the views, text K/V and sampler tables are
            # already on the device, and keyed noise moves there asynchronously (tests/test_host_syncs.py).
            for i, t in enumerate(run.timesteps.tolist()):
                v = self._call(views, cross, x, t, "cond")
                if self.use_cfg:
                    v = cfg_combine(self._call(views, cross, x, t, "uncond"), v, self.guidance)
                x = run.step(i, x, v, lambda i=i: noise(i + 1))
                if callback is not None:
                    replaced = callback(stage, i, t, x, v)
                    if replaced is not None:
                        x = replaced.to(device, dtype)
            clean = x
            for b, j in enumerate(jobs):
                j.latents[todo] = clean[b].to(j.latents)
            if set(todo) & self._read_later[stage]:
                self._cache_pass(views, cross, clean)
        for j in jobs:
            j.done.add(stage)
