"""Simulator: schedule a video's DAG on simulated devices and report makespan, speedup, bound and efficiency;
and the memory plan of one device.

Command line (``python -m mmpl_fast.schedule``, also ``python -m mmpl_fast.scheduler``)::

    python -m mmpl_fast.schedule --segments 12 --devices 4 [--speeds 1,1,1,0.5] [--config wan2.1-t2v-1.3b]
        [--policy adaptive|round-robin|cp-first] [--split auto|off] [--chain terminal|middle]
        [--link nvlink|pcie] [--json] [--timeline out.png]

prints the makespan, the speedup over one device (the same policy on one device of the fastest speed), the
lower bound (max of the critical path at the fastest speed and the work over the sum of speeds; with
splitting, each task at its best width), the policy's efficiency (bound / makespan), round-robin's makespan on
the same DAG, and, for the adaptive policy, the same figures without splitting (``--split off``): makespan,
speedup, the planning chain's length (when the last chain task ends) and the time to the first segment
(when segment 0's frames are final). It writes a Gantt timeline (a widened task is one bar across its
devices). ``--json`` prints the figures as one JSON object. Costs come from the cached profile of
``--device-name`` when it covers the workload, else from the FLOP/byte estimate (`costs`).

Memory plan::

    python -m mmpl_fast.schedule --memory --preset wan2.1-t2v-1.3b --device-memory 24 [--guidance 5]
        [--offload] [--dtype bf16] [--height 480 --width 832] [--json]

prints the estimate of `memory.estimate_memory` (the one the pre-flight check uses) for a card of
``--device-memory`` GiB: weights, text encoder, VAE, KV pages per segment and per guidance branch,
activations, the peak with one segment, and the largest ``batch_segments`` that fits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .costs import DTYPE_ALIASES, DTYPE_BYTES, LINKS, CostModel, Hardware, ProfileCache, Workload
from .dag import CHAIN_MODES, TaskDAG, build_dag
from .memory import CUDA_CONTEXT_BYTES, GIB, InsufficientMemoryError, estimate_memory, preflight
from .placement import Bounds, Device, Schedule, lower_bound, simulated_devices
from .policy import POLICIES, SPLIT_MODES, round_robin, schedule

DEFAULT_TIMELINE = "timeline.png"


@dataclass
class SimulationResult:
    """Figures of one simulated run (`to_dict` gives the JSON the CLI prints).

    ``unsplit`` is the same policy's schedule with ``split="off"`` (the schedule itself when not splitting).
    """

    segments: int
    speeds: list[float]
    config: str
    layout: str
    chain: str
    policy: str
    costs: str
    makespan: float
    single_device: float
    round_robin: float
    bounds: Bounds
    schedule: Schedule = field(repr=False)
    unsplit: Schedule | None = field(default=None, repr=False)
    split: str = "off"
    notes: list[str] = field(default_factory=list)
    timeline: str | None = None

    @property
    def speedup(self) -> float:
        return self.single_device / self.makespan if self.makespan > 0 else float("nan")

    @property
    def efficiency(self) -> float:
        return self.bounds.value / self.makespan if self.makespan > 0 else float("nan")

    @property
    def vs_round_robin(self) -> float:
        """Fraction by which the makespan is below round-robin's (negative: slower)."""
        return 1 - self.makespan / self.round_robin if self.round_robin > 0 else 0.0

    @property
    def widened(self) -> int:
        """Tasks that run across several devices."""
        return sum(p.split is not None for p in self.schedule.placements)

    def to_dict(self) -> dict:
        off = self.unsplit if self.unsplit is not None else self.schedule
        return {
            "segments": self.segments, "devices": len(self.speeds), "speeds": self.speeds, "config": self.config,
            "layout": self.layout, "chain": self.chain, "policy": self.policy, "split": self.split,
            "costs": self.costs,
            "makespan_s": round(self.makespan, 4), "single_device_s": round(self.single_device, 4),
            "speedup": round(self.speedup, 4),
            "lower_bound_s": round(self.bounds.value, 4), "critical_path_s": round(self.bounds.critical_path, 4),
            "work_per_speed_s": round(self.bounds.work, 4), "efficiency": round(self.efficiency, 4),
            "round_robin_s": round(self.round_robin, 4), "vs_round_robin": round(self.vs_round_robin, 4),
            "chain_s": round(self.schedule.chain_end(), 4), "first_segment_s": round(self.schedule.segment_done(0), 4),
            "widened_tasks": self.widened,
            "makespan_unsplit_s": round(off.makespan, 4),
            "speedup_unsplit": round(self.single_device / off.makespan, 4) if off.makespan > 0 else None,
            "chain_unsplit_s": round(off.chain_end(), 4), "first_segment_unsplit_s": round(off.segment_done(0), 4),
            "timeline": self.timeline, "notes": self.notes,
        }  # fmt: skip


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_simulate_args(segments, devices, speeds, policy, chain, dtype, memory_gib, link_gbps, split, link):
    """Validated speeds (or None) and the normalised dtype; ValueError naming the bad argument."""
    _positive_int("segments", segments)
    _positive_int("devices", devices)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if chain not in CHAIN_MODES:
        raise ValueError(f"chain must be one of {', '.join(CHAIN_MODES)}, got {chain!r}")
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join([*DTYPE_BYTES, *DTYPE_ALIASES])}, got {dtype!r}")
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_MODES)}, got {split!r}")
    if link not in LINKS:
        raise ValueError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
    if speeds is not None:
        speeds = [float(s) for s in speeds]
        if len(speeds) != devices:
            raise ValueError(f"speeds: expected {devices} values (one per device), got {len(speeds)}")
        if any(not s > 0 for s in speeds):
            raise ValueError(f"speeds must all be > 0, got {speeds}")
    if memory_gib is not None and not memory_gib > 0:
        raise ValueError(f"memory_gib must be > 0, got {memory_gib!r}")
    if link_gbps is not None and not link_gbps > 0:
        raise ValueError(f"link_gbps must be > 0, got {link_gbps!r}")
    return speeds, dtype


def _cost_model(workload: Workload, link: str, link_gbps, device_name, cache) -> tuple[CostModel, str]:
    hardware = Hardware.linked(link) if link_gbps is None else Hardware.linked(link, link_bandwidth=link_gbps * 1e9)
    profile, source = None, f"FLOP/byte estimate ({hardware.name}, {link} links)"
    if device_name is not None:
        cached = (cache or ProfileCache()).load(device_name, workload.config, workload.dtype)
        if any(k.startswith(workload.signature + "|") for k in cached.entries):
            profile, source = cached, f"profile of {device_name!r} (estimate where it has no entry)"
        else:
            source += f"; no cached profile of {device_name!r} for this workload"
    return CostModel(workload, hardware, profile), source


def simulate(
    segments: int = 12,
    devices: int = 4,
    speeds: Sequence[float] | None = None,
    *,
    config: str = "wan2.1-t2v-1.3b",
    policy: str = "adaptive",
    split: str = "auto",
    chain: str = "terminal",
    layout: str = "mmpl",
    height: int = 480,
    width: int = 832,
    steps: int = 4,
    guidance: float = 1.0,
    dtype: str = "bfloat16",
    memory_gib: float | None = None,
    link: str = "nvlink",
    link_gbps: float | None = None,
    device_name: str | None = None,
    cache: ProfileCache | None = None,
    budget: int | None = None,
) -> SimulationResult:
    """Schedule `segments` segments on `devices` simulated devices; see the module docstring.

    Args:
        speeds: relative speed per device (default all 1).
        split: ``"auto"`` (adaptive policy only) lets stage tasks run across several devices; ``"off"``.
        memory_gib: free memory per device (default: not limited); the pre-flight check applies.
        link: ``"nvlink"`` or ``"pcie"`` figures for transfers and collectives (`costs.LINKS`).
        link_gbps: device-to-device bandwidth in GB/s (overrides the link's).
        device_name: use the cached profile of this device name when it covers the workload.
        budget: the adaptive policy's search budget (default: its own).

    Raises:
        ValueError: bad arguments (naming the argument), or `InsufficientMemoryError` when nothing fits.
    """
    speeds, dtype = _check_simulate_args(segments, devices, speeds, policy, chain, dtype, memory_gib, link_gbps,
                                         split, link)  # fmt: skip
    dag = build_dag(layout, segments, chain)
    workload = Workload(config, height=height, width=width, steps=steps, guidance=guidance, dtype=dtype)
    costs, source = _cost_model(workload, link, link_gbps, device_name, cache)
    memory = None if memory_gib is None else int(memory_gib * GIB)
    plan = preflight(dag, costs, simulated_devices(devices, speeds, memory))
    used, cap, ws = plan.usable_devices(), plan.usable_capacity(), plan.usable_workspace()
    extra = {} if budget is None else {"budget": budget}
    if policy == "adaptive":
        unsplit = schedule(dag, costs, used, policy, cap, workspace=ws, **extra)
        sched = unsplit if split == "off" else schedule(dag, costs, used, policy, cap, workspace=ws, split=split,
                                                         **extra)  # fmt: skip
    else:
        sched = unsplit = schedule(dag, costs, used, policy, cap)
    sched.check(costs)
    widen = sched.has_splits
    return SimulationResult(
        segments=segments, speeds=[d.speed for d in used], config=workload.config.name, layout=dag.layout.name,
        chain=chain, policy=sched.policy, costs=source, makespan=sched.makespan,
        single_device=_single_device(dag, costs, used, policy), round_robin=round_robin(dag, costs, used, cap).makespan,
        bounds=lower_bound(dag, costs, used, widen=widen), schedule=sched, unsplit=unsplit,
        split=split if policy == "adaptive" else "off", notes=list(plan.notes),
    )  # fmt: skip


def _single_device(dag: TaskDAG, costs: CostModel, used: Sequence[Device], policy: str) -> float:
    """The same policy's makespan on one device of the fastest speed."""
    fastest = max(used, key=lambda d: d.speed)
    one = Device("sim:single", fastest.speed, fastest.memory_bytes)
    single_plan = preflight(dag, costs, [one])
    return schedule(dag, costs, [one], policy, single_plan.usable_capacity()).makespan


def memory_report(
    config: str = "wan2.1-t2v-1.3b",
    device_memory_gib: float = 24.0,
    *,
    height: int = 480,
    width: int = 832,
    guidance: float = 1.0,
    dtype: str = "bfloat16",
    offload: bool = False,
    layout: str = "mmpl",
    num_prompts: int = 1,
) -> dict:
    """The memory plan of one device with `device_memory_gib` GiB (a CUDA context's reserve taken off): the
    estimate by part (`memory.MemoryBreakdown.to_dict`, bytes), the peak with one segment, whether it fits,
    and the largest ``batch_segments`` that does."""
    if not (isinstance(device_memory_gib, (int, float)) and device_memory_gib > 0):
        raise ValueError(f"device_memory must be a positive number of GiB, got {device_memory_gib!r}")
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    workload = Workload(config, height=height, width=width, guidance=guidance, dtype=dtype, num_prompts=num_prompts)
    costs = CostModel(workload)
    dag = build_dag(layout, 1)
    bd = estimate_memory(costs, dag, text_encoder=not offload)
    usable = int(device_memory_gib * GIB) - CUDA_CONTEXT_BYTES
    return {
        "config": workload.config.name, "height": height, "width": width, "dtype": workload.dtype,
        "guidance": guidance, "branches": workload.branches, "offload": offload,
        "tokens_per_frame": workload.tokens_per_frame, "frames_per_segment": dag.layout.num_frames,
        "device_memory_gib": device_memory_gib, "cuda_context_bytes": CUDA_CONTEXT_BYTES, "usable_bytes": usable,
        **bd.to_dict(),
        "text_encoder_if_resident": estimate_memory(costs, dag, text_encoder=True).text_encoder,
        "fits": bd.peak(1) <= usable, "margin_bytes": usable - bd.peak(1),
        "largest_batch_segments": bd.largest_batch(usable),
    }  # fmt: skip


def _memory_text(m: dict) -> str:
    g = 1 / GIB
    te = (f"{m['text_encoder'] * g:6.2f} GiB" if not m["offload"]
          else f"  0.00 GiB  (offloaded; {m['text_encoder_if_resident'] * g:.2f} GiB if resident)")  # fmt: skip
    fits = "yes" if m["fits"] else f"no, short by {-m['margin_bytes'] * g:.2f} GiB"
    frames = m["frames_per_segment"]
    lines = [
        f"memory plan: {m['config']} at {m['height']}x{m['width']} ({m['tokens_per_frame']} tokens per latent "
        f"frame), {m['dtype']}, {m['branches']} guidance branch(es), text encoder "
        f"{'offloaded' if m['offload'] else 'resident'}",
        f"  DiT weights                {m['dit_weights'] * g:6.2f} GiB",
        f"  text encoder               {te}",
        f"  VAE weights                {m['vae_weights'] * g:6.2f} GiB",
        f"  cross-attention cache      {m['cross_cache'] * g:6.2f} GiB",
        f"  KV per segment per branch  {m['kv_per_branch'] * g:6.2f} GiB  ({frames} frames x "
        f"{m['kv_per_branch'] / frames / 1024**2:.0f} MiB)",
        f"  KV per segment             {m['kv_per_segment'] * g:6.2f} GiB",
        f"  activations                {m['activations'] * g:6.2f} GiB  (largest stage call, all branches)",
        f"  VAE decode workspace       {m['vae_workspace'] * g:6.2f} GiB",
        f"  peak, one segment          {m['peak_one_segment'] * g:6.2f} GiB",
        f"  device                     {m['device_memory_gib']:6.2f} GiB - {m['cuda_context_bytes'] * g:.2f} GiB CUDA "
        f"context = {m['usable_bytes'] * g:.2f} GiB",
        f"  fits                       {fits}; largest batch_segments {m['largest_batch_segments']}",
    ]
    return "\n".join(lines)


def _parse_speeds(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--speeds must be comma-separated numbers like 1,1,1,0.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmpl_fast.schedule",
        description="Simulate scheduling a long MMPL video on several devices, or print a device's memory plan.",
    )
    p.add_argument("--segments", type=int, default=12, help="segments of the video (default 12)")
    p.add_argument("--devices", type=int, default=4, help="simulated devices (default 4)")
    p.add_argument("--speeds", help="relative speed per device, e.g. 1,1,1,0.5 (default all 1)")
    p.add_argument("--config", "--preset", dest="config", default="wan2.1-t2v-1.3b",
                   help="model config preset (default wan2.1-t2v-1.3b)")  # fmt: skip
    p.add_argument("--policy", default="adaptive", help=f"one of {', '.join(POLICIES)} (default adaptive)")
    p.add_argument("--split", default="auto", help="auto: let stage tasks run across devices (adaptive); off")
    p.add_argument("--chain", default="terminal", help="terminal or middle (default terminal)")
    p.add_argument("--layout", default="mmpl", help="layout name (default mmpl)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=4, help="denoising calls per stage (default 4)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (> 1: two caches)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (bf16, default), float16 (fp16) or float32 (fp32)")
    p.add_argument("--memory-gib", type=float, help="free memory per device (default: not limited)")
    p.add_argument("--link", default="nvlink", help="nvlink (default) or pcie: link figures for transfers")
    p.add_argument("--link-gbps", type=float, help="device-to-device bandwidth in GB/s (overrides --link's)")
    p.add_argument("--device-name", help="use the cached profile of this device name (see measure_profile)")
    p.add_argument("--timeline", default=DEFAULT_TIMELINE, help=f"Gantt PNG to write (default {DEFAULT_TIMELINE})")
    p.add_argument("--no-timeline", action="store_true", help="do not write the timeline")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--memory", action="store_true", help="print the memory plan of one device instead")
    p.add_argument("--device-memory", type=float, default=24.0, help="--memory: the card's memory in GiB")
    p.add_argument("--offload", action="store_true", help="--memory: the text encoder is not resident")
    return p


def _report(r: SimulationResult) -> str:
    speeds = ", ".join(f"x{s:g}" for s in r.speeds)
    d = r.to_dict()
    lines = [
        f"{r.segments} segments, layout {r.layout} ({r.chain} chain), {r.config}; costs: {r.costs}",
        f"devices          {len(r.speeds)} ({speeds})",
        f"policy           {r.policy}; split {r.split} ({r.widened} widened tasks)",
        f"makespan         {r.makespan:8.2f} s",
        f"one device       {r.single_device:8.2f} s   speedup {r.speedup:.2f}x",
        f"lower bound      {r.bounds.value:8.2f} s   (critical path {r.bounds.critical_path:.2f} s, "
        f"work / speeds {r.bounds.work:.2f} s)",
        f"efficiency       {r.efficiency:8.3f}     (lower bound / makespan)",
        f"round-robin      {r.round_robin:8.2f} s   (makespan {100 * abs(r.vs_round_robin):.1f}% "
        f"{'below' if r.vs_round_robin >= 0 else 'above'} round-robin's)",
        f"planning chain   {d['chain_s']:8.2f} s   (without splitting {d['chain_unsplit_s']:.2f} s)",
        f"first segment    {d['first_segment_s']:8.2f} s   (without splitting {d['first_segment_unsplit_s']:.2f} s)",
        f"without split    {d['makespan_unsplit_s']:8.2f} s   speedup {d['speedup_unsplit']:.2f}x",
    ]
    if r.timeline:
        lines.append(f"timeline         {r.timeline}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.memory:
            m = memory_report(
                args.config, args.device_memory, height=args.height, width=args.width, guidance=args.guidance,
                dtype=args.dtype, offload=args.offload, layout=args.layout,
            )  # fmt: skip
            print(json.dumps(m) if args.json else _memory_text(m))
            return 0
        result = simulate(
            args.segments, args.devices, _parse_speeds(args.speeds) if args.speeds else None,
            config=args.config, policy=args.policy, split=args.split, chain=args.chain, layout=args.layout,
            height=args.height, width=args.width, steps=args.steps, guidance=args.guidance, dtype=args.dtype,
            memory_gib=args.memory_gib, link=args.link, link_gbps=args.link_gbps, device_name=args.device_name,
        )  # fmt: skip
        if not args.no_timeline:
            from .timeline import plot_timeline

            result.timeline = str(plot_timeline(result.schedule, args.timeline))
    except InsufficientMemoryError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()) if args.json else _report(result))
    return 0
