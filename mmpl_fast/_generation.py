"""How one `Pipeline.stream` call runs: the pieces behind its execution (internal to the pipeline layer).

It receives what it needs (the checked run, each device's engine and VAE) and never imports or touches the
`Pipeline` itself.

* `_Run`: everything one video's generation needs once its inputs are checked;
* `decode_segment`: a segment's kept latents -> its stitched video;
* `_DeviceState`, `_Generation`: what each scheduled task does on its device and what each edge between
  devices carries (`scheduler.execute.Work`);
* `_Emitter`: stitched segment videos -> output frames, in order, trimmed to the asked length;
* torch.distributed helpers: rank / world size, broadcasting the plan and the resume state from rank 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chain import ChainPlan, reencode
from .components import VideoVAE
from .engine import SegmentJob, StageEngine


@dataclass
class SegmentFrames:
    """What `Pipeline.stream` yields: one segment's final frames (overlap with the previous one dropped) and
    the latents its video shows (`ChainPlan.kept_latents` frames)."""

    index: int
    frames: Any
    latents: torch.Tensor
    num_segments: int
    video: int = 0  # which video of the call (`num_videos_per_prompt`, a list of prompts)


@dataclass
class _Run:
    """Everything one video's generation needs after its inputs are checked.

    `callback(segment, stage, step, timestep, latents, velocity)` runs after every denoising step (the first
    segment of a batched launch is named) and may return replacement latents. `latents`, when given, is the
    video's initial noise ``[F_video, C, h, w]`` (`ChainPlan.video_latent_span` says which segment frame each
    row starts)."""

    plan: ChainPlan
    prompts: list[str]
    latent_shape: tuple[int, ...]
    num_frames: int
    output_type: str
    work: Path | None
    done: list[torch.Tensor]
    given: torch.Tensor | None  # start latents of segment `first` (image / video / resume), else None
    callback: Callable
    first: int = 0  # segments already finished (resume): the DAG covers segments first .. num_segments - 1
    host_device: torch.device = torch.device("cpu")  # where the writer's results go
    spatial: int = 8  # the VAE's spatial compression
    latents: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return len(self.prompts)

    def video_frames(self, s: int) -> int:
        """Frames segment `s` adds to the stitched video."""
        return self.plan.first_segment_frames if s == 0 else self.plan.later_segment_frames

    def initial_noise(self, s: int) -> dict[int, torch.Tensor]:
        """Step-0 noise of segment `s`'s frames from the given `latents` (empty without): frame -> ``[C, h, w]``."""
        if self.latents is None:
            return {}
        frames, at = self.plan.video_latent_span(s)
        return {f: self.latents[at + k] for k, f in enumerate(frames)}


def decode_segment(run: _Run, s: int, latents: torch.Tensor, vae: VideoVAE) -> torch.Tensor:
    """A segment's stitched (not yet trimmed) video ``[3, T, H, W]`` in [-1, 1] (empty for latent output)."""
    if run.output_type == "latent":
        return torch.zeros(0)
    return run.plan.stitch(s, vae.decode(latents[None, : run.plan.kept_latents]))[0]


@dataclass
class _DeviceState:
    """What one device holds during a run: its engine (model replica, KV pools, cross-attention cache), its
    VAE, its copy of each segment's latents, and the videos it decoded."""

    device: torch.device
    engine: StageEngine
    vae: VideoVAE
    name: str
    jobs: dict[int, SegmentJob] = field(default_factory=dict)
    videos: dict[int, torch.Tensor] = field(default_factory=dict)


class _Generation:
    """The pipeline's side of a scheduled run (`scheduler.execute.Work`): what each task does on its device
    and what each edge carries.

    * stage tasks: `StageEngine.run_stage` on the device's engine, for every segment of a batched launch; a
      segment's first stage starts from the given latents (the run's image / video / resume start), or
      re-encodes the previous segment's handoff frames (`chain.reencode`) on this device;
    * decode: the kept latents through the device's VAE, stitched (`ChainPlan.stitch`);
    * edges between devices carry KV pages (stage edges: the frames a later stage reads), latents (chain and
      decode edges: what the re-encode and the decode read) or the decoded video and latents (to the writer);
    * a segment's pages on a device are given back after its last stage task there.
    """

    def __init__(self, run: _Run, schedule, states: dict[int, _DeviceState], workload):
        from .scheduler import HOST

        self.run_, self.schedule, self.states, self.workload = run, schedule, states, workload
        self.dag = schedule.dag
        self._last_stage: dict[tuple[int, int], int] = {}  # (segment, device) -> its last stage task there
        for p in sorted(schedule.placements, key=lambda p: p.start):
            if p.task.is_stage:
                self._last_stage[p.task.segment, p.device] = p.task.index
        # Local uses of each (segment, device) job: its stage tasks and decode there, the next segment's
        # re-encode there, and the writer when it reads the decode device's results in this process.
        self._uses: dict[tuple[int, int], int] = {}
        for p in schedule.placements:
            t, d = p.task, p.device
            if d == HOST:  # the writer runs here (in-process, or rank 0) and reads the decode device's results
                (dec,) = [e.src for e in self.dag.preds[t.index] if e.kind == "write"]
                d = schedule.placement(dec).device
                if _rank() != 0 or d not in states:
                    continue
            elif d not in states:
                continue
            segs = [t.segment - 1, t.segment] if t.stage == 0 and t.segment > 0 else [t.segment]
            for seg in segs:
                self._uses[seg, d] = self._uses.get((seg, d), 0) + 1
        self._lock = threading.Lock()

    def _used(self, segment: int, device: int) -> None:
        """One local use of the job is over; drop the device's copy after the last one."""
        with self._lock:
            self._uses[segment, device] -= 1
            if self._uses[segment, device] == 0:
                self.states[device].jobs.pop(self.run_.first + segment, None)
                self.states[device].videos.pop(self.run_.first + segment, None)

    # ---- Work
    def device_context(self, device: int) -> AbstractContextManager:
        """Makes the device's CUDA device the current one (entered by the thread running its launches)."""
        return on_device(self.states[device].device)

    def _segment(self, task) -> int:
        return self.run_.first + task.segment

    def _job(self, st: _DeviceState, seg: int) -> SegmentJob:
        if seg not in st.jobs:
            lat = torch.zeros(self.run_.latent_shape, dtype=torch.float32, device=st.device)
            st.jobs[seg] = SegmentJob(index=seg, prompt=self.run_.prompts[seg], latents=lat,
                                      initial_noise=self.run_.initial_noise(seg))  # fmt: skip
        return st.jobs[seg]

    def _start(self, st: _DeviceState, task) -> SegmentJob:
        """A segment's job at its first stage, with its given start latents."""
        run, seg = self.run_, self._segment(task)
        if task.segment == 0:
            given = run.given
        else:
            given = reencode(st.vae, st.jobs[seg - 1].latents, run.plan)
        job = self._job(st, seg)
        if given is not None:
            job.latents[: given.shape[0]] = given.to(job.latents)
            job.given = frozenset(range(given.shape[0]))
        return job

    def run(self, launch) -> None:
        """One launch: placements sharing a stream id are one batched call; several stream ids run on their own
        CUDA streams at once (one host thread each), or one after the other on a CPU."""
        st = self.states[launch[0].device]
        streams: dict[int, list] = {}
        for p in launch:
            streams.setdefault(p.stream, []).append(p)
        groups = list(streams.values())
        if len(groups) == 1 or st.device.type != "cuda":
            for g in groups:
                self._run_group(st, g)
            return
        errors: list[BaseException] = []
        main = torch.cuda.current_stream(st.device)

        def on_stream(g):
            try:
                stream = torch.cuda.Stream(st.device)
                stream.wait_stream(main)  # the pages and latents it reads were written on the main stream
                with torch.cuda.device(st.device), torch.cuda.stream(stream):  # a new thread: set its device
                    self._run_group(st, g)
                    torch.cuda.current_stream(st.device).synchronize()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=on_stream, args=(g,)) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _run_group(self, st: _DeviceState, group) -> None:
        task = group[0].task
        if task.is_stage:
            jobs = [self._start(st, p.task) if p.task.stage == 0 else self._job(st, self._segment(p.task))
                    for p in group]  # fmt: skip
            segment, callback = jobs[0].index, self.run_.callback
            st.engine.run_stage(jobs, task.stage, lambda *step: callback(segment, *step))
        elif task.kind == "decode":
            for p in group:
                seg = self._segment(p.task)
                st.videos[seg] = decode_segment(self.run_, seg, st.jobs[seg].latents, st.vae)

    def finish(self, launch) -> None:
        st = self.states[launch[0].device]
        for p in launch:
            t = p.task
            if t.is_stage and self._last_stage[t.segment, p.device] == t.index:
                st.engine.release(st.jobs[self._segment(t)])
            for seg in [t.segment - 1, t.segment] if t.stage == 0 and t.segment > 0 else [t.segment]:
                self._used(seg, p.device)

    def payload(self, edge):
        from .scheduler.execute import TensorSpec

        run, st = self.run_, next(iter(self.states.values()))
        n = len(edge.frames)
        if edge.kind == "stage":
            pool = st.engine.pools["cond"]
            shape = (pool.k.shape[0], n, *pool.k.shape[2:])
            return [TensorSpec(shape, pool.k.dtype)] * (2 * len(st.engine.pools))
        if edge.kind in ("chain", "decode"):
            return [TensorSpec((n, *run.latent_shape[1:]))]
        if edge.kind == "write":
            seg = self._segment(self.dag.tasks[edge.dst])
            latents = TensorSpec(tuple(run.latent_shape))
            if run.output_type == "latent":
                return [latents]
            h, w = (x * run.spatial for x in run.latent_shape[2:])
            return [TensorSpec((3, run.video_frames(seg), h, w)), latents]
        return []

    def export(self, edge, device):
        st = self.states[device]
        seg = self._segment(self.dag.tasks[edge.src])
        job = st.jobs[seg]
        if edge.kind == "stage":
            return st.engine.export_pages(job, edge.frames)
        if edge.kind in ("chain", "decode"):
            return [job.latents[list(edge.frames)]]
        if edge.kind == "write":
            return ([] if self.run_.output_type == "latent" else [st.videos[seg]]) + [job.latents]
        raise AssertionError(edge.kind)

    def accept(self, edge, device, tensors) -> None:
        st = self.states[device]
        job = self._job(st, self._segment(self.dag.tasks[edge.src]))
        if edge.kind == "stage":
            st.engine.import_pages(job, edge.frames, tensors)
        elif edge.kind in ("chain", "decode"):
            job.latents[list(edge.frames)] = tensors[0].to(job.latents)
        else:
            raise AssertionError(edge.kind)

    # ---- the writer's side
    def host_result(self, p, executor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stitched video, latents) of the segment of host placement `p`, then frees what devices kept of it."""
        seg = self._segment(p.task)
        (decode,) = [e.src for e in self.dag.preds[p.task.index] if e.kind == "write"]
        dev = self.schedule.placement(decode).device
        host = self.run_.host_device
        if dev in self.states:
            st = self.states[dev]
            video, latents = st.videos.get(seg, torch.zeros(0)), st.jobs[seg].latents
            video, latents = video.to(host), latents.to(host)
            self._used(p.task.segment, dev)
        else:
            got = executor.host_inputs(p)[decode]
            video, latents = (torch.zeros(0), got[0]) if self.run_.output_type == "latent" else tuple(got)
        return video.to(host), latents.to(host)

    def progress(self, launch, bar) -> None:
        stages = [p for p in launch if p.task.is_stage]
        if stages:
            with self._lock:
                t = stages[0].task
                segs = ",".join(str(self._segment(p.task)) for p in stages)
                role = self.dag.layout.stages[t.stage].role
                bar.set_description(f"segment{'s' if len(stages) > 1 else ''} {segs} stage {t.stage} ({role})")
                bar.update(len(stages))

    @property
    def model_calls(self) -> int:
        return sum(st.engine.model_calls for st in self.states.values())

    def update_profile(self, measured) -> None:
        """Fold the measured launch times into each device's cached profile (`CostModel.observe`)."""
        from .scheduler import CostModel, ProfileCache

        cache = ProfileCache()
        by_device: dict[int, list] = {}
        for group in measured.launches():
            if group[0].device in self.states:
                by_device.setdefault(group[0].device, []).append(group)
        workload = self.workload
        for d, groups in by_device.items():
            st = self.states[d]
            costs = CostModel(workload, profile=cache.load(st.name, workload.config, workload.dtype))
            for g in groups:
                costs.observe(g[0].task, max(p.end for p in g) - g[0].start, batch=len(g))
            cache.save(costs.profile)


class _Emitter:
    """Turns stitched segment videos into output frames in order, trimming the video to `num_frames`."""

    def __init__(self, run: _Run):
        self.run = run
        self.emitted = 0
        self.next = 0

    def emit(self, s: int, video: torch.Tensor, latents: torch.Tensor, index: int = 0) -> SegmentFrames:
        assert s == self.next, "segments are emitted in order"
        self.next += 1
        run = self.run
        latents = latents[: run.plan.kept_latents]  # in "middle" mode the later frames are never generated
        if run.output_type == "latent":
            return SegmentFrames(s, [], latents, run.num_segments, index)
        video = video[:, : max(0, run.num_frames - self.emitted)]
        self.emitted += video.shape[1]
        video = ((video + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).cpu()  # [T, H, W, 3]
        if run.output_type == "np":
            frames = video.numpy()
        elif run.output_type == "pt":
            frames = video.permute(0, 3, 1, 2)
        else:
            from PIL import Image

            frames = [Image.fromarray((f * 255).round().to(torch.uint8).numpy()) for f in video]
        return SegmentFrames(s, frames, latents, run.num_segments, index)


def _rank() -> int:
    return torch.distributed.get_rank() if _world() > 1 else 0


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _available_ram() -> int | None:
    """Bytes of RAM the kernel says a new allocation can take without swapping (``MemAvailable`` of
    /proc/meminfo); None where that file does not exist (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on a device (what the pre-flight check plans with): on CUDA, NVML's reading through
    `scheduler.Telemetry`, else CUDA's own; on a CPU, the RAM available (`_available_ram`); None (not limited)
    where neither is known."""
    if device.type == "cpu":
        return _available_ram()
    if device.type != "cuda":
        return None
    from .scheduler import Telemetry

    index = device.index if device.index is not None else torch.cuda.current_device()  # current device: "cuda"
    tel = Telemetry()
    try:
        for stats in tel.read():
            if stats.cuda_index == index and stats.memory_free is not None:
                return int(stats.memory_free)
    finally:
        tel.close()
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def on_device(device: torch.device) -> AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (Triton and everything else that uses the current device
    then runs there), nothing for others."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _comm_device() -> torch.device:
    from .distributed import comm_device

    return comm_device()


def _broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank (torchrun); `value` itself in one process."""
    if _world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    torch.distributed.broadcast(t, 0)
    return int(t.item())


def _all_gather_int(value: int) -> list[int]:
    """Every rank's `value`, in rank order (torchrun)."""
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    out = [torch.empty_like(t) for _ in range(_world())]
    torch.distributed.all_gather(out, t)
    return [int(x.item()) for x in out]


def _broadcast_tensor(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Rank 0's float32 tensor of `shape` on every rank (torchrun); `t` itself in one process."""
    if _world() == 1:
        return t
    buf = (t.float().to(_comm_device()) if _rank() == 0 else torch.empty(shape, device=_comm_device())).contiguous()
    torch.distributed.broadcast(buf, 0)
    return buf


def _broadcast_schedule(sched):
    """Rank 0's schedule on every rank, so all ranks run the same plan (profiles may differ between ranks)."""
    from dataclasses import replace as _replace

    from .scheduler import Schedule

    n = len(sched.placements)
    buf = torch.zeros(n, 6, dtype=torch.float64, device=_comm_device())
    if _rank() == 0:
        rows = [[p.task.index, p.device, p.stream, p.batch, p.start, p.end] for p in sched.placements]
        buf.copy_(torch.tensor(rows, dtype=torch.float64))
    torch.distributed.broadcast(buf, 0)
    template = {p.task.index: p for p in sched.placements}
    placements = []
    for row in buf.cpu().tolist():
        p = template[int(row[0])]
        placements.append(_replace(p, device=int(row[1]), stream=int(row[2]), batch=int(row[3]), start=row[4],
                                   end=row[5]))  # fmt: skip
    return Schedule(sched.dag, sched.devices, tuple(placements), sched.policy, sched.capacity)
