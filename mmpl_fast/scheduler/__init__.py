"""Scheduling a video: task DAG, cost model, telemetry, placement policies, simulator and timeline.

Typical use::

    from mmpl_fast.scheduler import build_dag, CostModel, Workload, Telemetry, plan

    dag = build_dag("mmpl", num_segments=12, chain="terminal")
    costs = CostModel(Workload("wan2.1-t2v-1.3b", steps=4))
    with Telemetry() as tel:                       # "unavailable" without NVML: cost model only
        schedule = plan(dag, costs, telemetry=tel)  # pre-flight memory check, then the adaptive policy
    for launch in schedule.launches():             # what an executor issues, in start order
        ...                                        # (task, device, stream, batch, start, end) each

Modules: `dag` (tasks and edges), `costs` (profile cache and FLOP/byte estimate, split and streams pricing),
`split` (one task across several devices: the `Split` descriptor and what each device holds), `profiling`
(measure a profile), `telemetry` (NVML), `placement` (devices, placements, schedules, lower bounds),
`listsched` (list scheduling and dispatch), `search` (improving list schedules: local search, packing),
`policy` (round-robin, cp-first, adaptive), `widen` (the adaptive policy's widening step), `memory` (the
memory estimator and the pre-flight check), `simulate` (simulator, memory plan and CLI: ``python -m
mmpl_fast.schedule``), `timeline` (Gantt PNG), `execute` (run a schedule for real: one thread per local
device, edges' data moved between devices or torch.distributed ranks).

Splitting tasks across devices is opt-in (``schedule(..., split="auto")``): the default schedules have no
widened placements, which is what `execute` runs today. The contract for running widened placements is in
`split`'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

from .costs import CostModel, Hardware, Profile, ProfileCache, Workload, cache_dir, task_signature
from .dag import CHAIN_MODES, Edge, Task, TaskDAG, build_dag
from .memory import InsufficientMemoryError, MemoryBreakdown, MemoryPlan, estimate_memory, preflight
from .placement import HOST, Bounds, Device, Placement, Schedule, Unit, lower_bound, simulated_devices
from .policy import POLICIES, SPLIT_MODES, adaptive, cp_first, round_robin, schedule
from .simulate import SimulationResult, memory_report, simulate
from .split import Split
from .telemetry import DeviceStats, Telemetry
from .timeline import plot_timeline


def plan(
    dag: TaskDAG,
    costs: CostModel,
    devices: Sequence[Device] | None = None,
    *,
    telemetry: Telemetry | None = None,
    policy: str = "adaptive",
    **kwargs,
) -> Schedule:
    """Pre-flight check, then `schedule` on the devices that fit.

    Devices: `devices` if given, else one per GPU that `telemetry` sees (free memory from NVML), else one per
    CUDA device torch sees with unknown memory, else a single ``cpu`` device. Without telemetry (or when it
    is unavailable) the schedule rests on the cost model alone. Call it before the model is loaded: the
    fixed part of the memory check already counts the weights.

    Raises:
        InsufficientMemoryError: nothing fits (the message says what would).
    """
    if devices is None:
        devices = telemetry.devices() if telemetry is not None and telemetry.available else []
        if not devices:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            devices = [Device(f"cuda:{i}") for i in range(n)] or [Device("cpu")]
    memory = preflight(dag, costs, devices)
    if policy == "adaptive":
        kwargs.setdefault("workspace", memory.usable_workspace())
    return schedule(dag, costs, memory.usable_devices(), policy, memory.usable_capacity(), **kwargs)


__all__ = [
    "CHAIN_MODES", "HOST", "POLICIES", "SPLIT_MODES", "Bounds", "CostModel", "Device", "DeviceStats", "Edge",
    "Hardware", "InsufficientMemoryError", "MemoryBreakdown", "MemoryPlan", "Placement", "Profile", "ProfileCache",
    "Schedule", "SimulationResult", "Split", "Task", "TaskDAG", "Telemetry", "Unit", "Workload", "adaptive",
    "build_dag", "cache_dir", "cp_first", "estimate_memory", "lower_bound", "memory_report", "plan",
    "plot_timeline", "preflight", "round_robin", "schedule", "simulate", "simulated_devices", "task_signature",
]  # fmt: skip
