"""Simulator: schedule a video's DAG on simulated devices and report makespan, speedup, bound and efficiency.

Command line (``python -m mmpl_fast.schedule``, also ``python -m mmpl_fast.scheduler``)::

    python -m mmpl_fast.schedule --segments 12 --devices 4 [--speeds 1,1,1,0.5] [--config wan2.1-t2v-1.3b]
        [--policy adaptive|round-robin|cp-first] [--chain terminal|middle] [--json] [--timeline out.png]

prints the makespan, the speedup over one device (the same policy on one device of the fastest speed), the
lower bound (max of the critical path at the fastest speed and the work over the sum of speeds), the
policy's efficiency (bound / makespan) and round-robin's makespan on the same DAG, and writes a Gantt
timeline PNG. ``--json`` prints the same figures as one JSON object. Costs come from the cached profile of
``--device-name`` when it covers the workload, else from the FLOP/byte estimate (`costs`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .costs import DTYPE_BYTES, CostModel, Hardware, ProfileCache, Workload
from .dag import CHAIN_MODES, build_dag
from .memory import GIB, InsufficientMemoryError, preflight
from .placement import Bounds, Device, Schedule, lower_bound, simulated_devices
from .policy import POLICIES, round_robin, schedule

DEFAULT_TIMELINE = "timeline.png"


@dataclass
class SimulationResult:
    """Figures of one simulated run (`to_dict` gives the JSON the CLI prints)."""

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

    def to_dict(self) -> dict:
        return {
            "segments": self.segments,
            "devices": len(self.speeds),
            "speeds": self.speeds,
            "config": self.config,
            "layout": self.layout,
            "chain": self.chain,
            "policy": self.policy,
            "costs": self.costs,
            "makespan_s": round(self.makespan, 4),
            "single_device_s": round(self.single_device, 4),
            "speedup": round(self.speedup, 4),
            "lower_bound_s": round(self.bounds.value, 4),
            "critical_path_s": round(self.bounds.critical_path, 4),
            "work_per_speed_s": round(self.bounds.work, 4),
            "efficiency": round(self.efficiency, 4),
            "round_robin_s": round(self.round_robin, 4),
            "vs_round_robin": round(self.vs_round_robin, 4),
            "timeline": self.timeline,
            "notes": self.notes,
        }


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def simulate(
    segments: int = 12,
    devices: int = 4,
    speeds: Sequence[float] | None = None,
    *,
    config: str = "wan2.1-t2v-1.3b",
    policy: str = "adaptive",
    chain: str = "terminal",
    layout: str = "mmpl",
    height: int = 480,
    width: int = 832,
    steps: int = 4,
    guidance: float = 1.0,
    dtype: str = "bfloat16",
    memory_gib: float | None = None,
    link_gbps: float | None = None,
    device_name: str | None = None,
    cache: ProfileCache | None = None,
) -> SimulationResult:
    """Schedule `segments` segments on `devices` simulated devices; see the module docstring.

    Args:
        speeds: relative speed per device (default all 1).
        memory_gib: free memory per device (default: not limited); the pre-flight check applies.
        link_gbps: device-to-device bandwidth for KV transfers (default: NVLink-class, `costs.NVLINK_BANDWIDTH`).
        device_name: use the cached profile of this device name when it covers the workload.

    Raises:
        ValueError: bad arguments (naming the argument), or `InsufficientMemoryError` when nothing fits.
    """
    _positive_int("segments", segments)
    _positive_int("devices", devices)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if chain not in CHAIN_MODES:
        raise ValueError(f"chain must be one of {', '.join(CHAIN_MODES)}, got {chain!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
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
    dag = build_dag(layout, segments, chain)
    workload = Workload(config, height=height, width=width, steps=steps, guidance=guidance, dtype=dtype)
    hardware = Hardware() if link_gbps is None else Hardware(link_bandwidth=link_gbps * 1e9)
    profile, source = None, f"FLOP/byte estimate ({hardware.name})"
    if device_name is not None:
        cached = (cache or ProfileCache()).load(device_name, workload.config, dtype)
        if any(k.startswith(workload.signature + "|") for k in cached.entries):
            profile, source = cached, f"profile of {device_name!r} (estimate where it has no entry)"
        else:
            source += f"; no cached profile of {device_name!r} for this workload"
    costs = CostModel(workload, hardware, profile)
    memory = None if memory_gib is None else int(memory_gib * GIB)
    devs = simulated_devices(devices, speeds, memory)
    notes: list[str] = []
    plan = preflight(dag, costs, devs)
    notes += list(plan.notes)
    used, cap = plan.usable_devices(), plan.usable_capacity()
    sched = schedule(dag, costs, used, policy, cap)
    sched.check(costs)
    rr = round_robin(dag, costs, used, cap)
    fastest = max(used, key=lambda d: d.speed)
    one = Device("sim:single", fastest.speed, fastest.memory_bytes)
    single_plan = preflight(dag, costs, [one])
    single = schedule(dag, costs, [one], policy, single_plan.usable_capacity())
    return SimulationResult(
        segments=segments,
        speeds=[d.speed for d in used],
        config=workload.config.name,
        layout=dag.layout.name,
        chain=chain,
        policy=sched.policy,
        costs=source,
        makespan=sched.makespan,
        single_device=single.makespan,
        round_robin=rr.makespan,
        bounds=lower_bound(dag, costs, used),
        schedule=sched,
        notes=notes,
    )


def _parse_speeds(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--speeds must be comma-separated numbers like 1,1,1,0.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmpl_fast.schedule",
        description="Simulate scheduling a long MMPL video on several devices.",
    )
    p.add_argument("--segments", type=int, default=12, help="segments of the video (default 12)")
    p.add_argument("--devices", type=int, default=4, help="simulated devices (default 4)")
    p.add_argument("--speeds", help="relative speed per device, e.g. 1,1,1,0.5 (default all 1)")
    p.add_argument("--config", default="wan2.1-t2v-1.3b", help="model config preset (default wan2.1-t2v-1.3b)")
    p.add_argument("--policy", default="adaptive", help=f"one of {', '.join(POLICIES)} (default adaptive)")
    p.add_argument("--chain", default="terminal", help="terminal or middle (default terminal)")
    p.add_argument("--layout", default="mmpl", help="layout name (default mmpl)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=4, help="denoising calls per stage (default 4)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (> 1: two caches)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--memory-gib", type=float, help="free memory per device (default: not limited)")
    p.add_argument("--link-gbps", type=float, help="device-to-device bandwidth in GB/s (default 200)")
    p.add_argument("--device-name", help="use the cached profile of this device name (see measure_profile)")
    p.add_argument("--timeline", default=DEFAULT_TIMELINE, help=f"Gantt PNG to write (default {DEFAULT_TIMELINE})")
    p.add_argument("--no-timeline", action="store_true", help="do not write the timeline")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p


def _report(r: SimulationResult) -> str:
    speeds = ", ".join(f"x{s:g}" for s in r.speeds)
    lines = [
        f"{r.segments} segments, layout {r.layout} ({r.chain} chain), {r.config}; costs: {r.costs}",
        f"devices          {len(r.speeds)} ({speeds})",
        f"policy           {r.policy}",
        f"makespan         {r.makespan:8.2f} s",
        f"one device       {r.single_device:8.2f} s   speedup {r.speedup:.2f}x",
        f"lower bound      {r.bounds.value:8.2f} s   (critical path {r.bounds.critical_path:.2f} s, "
        f"work / speeds {r.bounds.work:.2f} s)",
        f"efficiency       {r.efficiency:8.3f}     (lower bound / makespan)",
        f"round-robin      {r.round_robin:8.2f} s   (makespan {100 * abs(r.vs_round_robin):.1f}% "
        f"{'below' if r.vs_round_robin >= 0 else 'above'} round-robin's)",
    ]
    if r.timeline:
        lines.append(f"timeline         {r.timeline}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = simulate(
            args.segments, args.devices, _parse_speeds(args.speeds) if args.speeds else None,
            config=args.config, policy=args.policy, chain=args.chain, layout=args.layout, height=args.height,
            width=args.width, steps=args.steps, guidance=args.guidance, dtype=args.dtype, memory_gib=args.memory_gib,
            link_gbps=args.link_gbps, device_name=args.device_name,
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
