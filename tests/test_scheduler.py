"""Scheduler: task DAG, cost model and profile cache, telemetry fallback, policies, pre-flight, simulator (CPU)."""

from __future__ import annotations

import bisect
import json
import math
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from mmpl_fast.layouts import custom
from mmpl_fast.scheduler import (
    HOST,
    CostModel,
    Device,
    Hardware,
    InsufficientMemoryError,
    Profile,
    ProfileCache,
    Telemetry,
    Workload,
    adaptive,
    build_dag,
    cp_first,
    lower_bound,
    plan,
    preflight,
    round_robin,
    schedule,
    simulate,
    simulated_devices,
    task_signature,
)
from mmpl_fast.scheduler.listsched import ListScheduler
from mmpl_fast.scheduler.memory import estimate_memory
from mmpl_fast.scheduler.placement import Unit, pack_key
from mmpl_fast.scheduler.simulate import main as cli_main

COSTS = CostModel()  # Wan2.1-1.3B, 480x832, 4 steps, FLOP/byte estimate for an H100


def _edges(dag, kind=None):
    return {(dag.tasks[e.src].name, dag.tasks[e.dst].name, e.frames) for e in dag.edges if kind in (None, e.kind)}


# --- DAG -----------------------------------------------------------------------------------------------------------


def test_dag_shape_mmpl_terminal():
    dag = build_dag("mmpl", 3, "terminal")
    kinds = [t.kind for t in dag.tasks]
    assert kinds.count("start") == 1 and kinds.count("reencode") == 2
    assert kinds.count("plan") == 3 and kinds.count("populate") == 6
    assert kinds.count("decode") == 3 and kinds.count("write") == 3
    dag.topological_order()  # construction order is topological
    # stage edges follow the pages each stage reads
    stage = _edges(dag, "stage")
    assert ("s1.plan", "s1.populate2", (2, 3, 10, 11, 12)) in stage
    assert ("s1.plan", "s1.populate3", (2, 3, 10, 11, 12, 19, 20)) in stage
    assert ("s1.populate2", "s1.populate3", (4, 5, 6, 7, 8, 9)) in stage
    assert not any(src == "s1.plan" and dst == "s1.populate2" and 19 in fr for src, dst, fr in stage)
    # the chain: frame 0 and the terminal keyframes of s start s + 1
    assert _edges(dag, "chain") == {
        ("s0.start", "s1.reencode", (0,)),
        ("s0.plan", "s1.reencode", (19, 20)),
        ("s1.reencode", "s2.reencode", (0,)),
        ("s1.plan", "s2.reencode", (19, 20)),
    }
    # decode reads every kept frame; writes go in order
    assert {(s, d) for s, d, _ in _edges(dag, "decode") if d == "s2.decode"} == {
        ("s2.reencode", "s2.decode"), ("s2.plan", "s2.decode"), ("s2.populate2", "s2.decode"),
        ("s2.populate3", "s2.decode"),
    }  # fmt: skip
    assert ("s1.write", "s2.write", ()) in _edges(dag, "order")
    assert {t.name for t in dag.chain_tasks} == {"s0.start", "s0.plan", "s1.reencode", "s1.plan", "s2.reencode",
                                                 "s2.plan"}  # fmt: skip
    assert dag.task(1, "reencode").given == (0, 1) and dag.task(0, "start").given == ()
    assert dag.task(1, "plan").cache_pass and not dag.task(1, "populate", 3).cache_pass
    assert dag.tasks[-1].on_host and not dag.task(0, "decode").on_host


def test_dag_shape_mmpl_middle():
    dag = build_dag("mmpl", 2, "middle", prune=False)
    assert _edges(dag, "chain") == {("s0.start", "s1.reencode", (0,)), ("s0.plan", "s1.reencode", (11, 12))}
    assert dag.kept == tuple(range(13))
    # the second populate stage produces no kept frame: decode does not wait for it
    assert not dag.has_edge(dag.task(0, "populate", 3), dag.task(0, "decode"))
    assert dag.task(0, "populate", 2).cache_pass  # stage 3 reads frames 4..9
    pruned = build_dag("mmpl", 2, "middle")  # what the pipeline runs
    assert [t.name for t in pruned.segment_tasks(0)] == ["s0.start", "s0.plan", "s0.populate2", "s0.decode", "s0.write"]
    assert not pruned.task(0, "populate", 2).cache_pass  # nothing that runs reads its frames
    assert _edges(pruned, "chain") == _edges(dag, "chain")
    # with the terminal chain every stage makes kept frames: nothing to prune
    assert len(build_dag("mmpl", 2)) == len(build_dag("mmpl", 2, prune=False))


def test_dag_shape_depends_on_chain_mode_when_handoffs_come_from_different_stages():
    # a layout whose middle keyframes are planned before the terminal ones
    lay = custom(
        "two-plans", 21,
        [((0, 1), ()), ((10, 11, 12), (0, 1)), ((19, 20), (0, 1, 10, 11, 12)),
         (tuple(range(2, 10)), (0, 1, 10, 11, 12)), (tuple(range(13, 19)), (0, 1, 10, 11, 12, 19, 20))],
        handoff={"terminal": (19, 20), "middle": (10, 11, 12)}, start_frames=2,
    )  # fmt: skip
    term, mid = build_dag(lay, 2, "terminal"), build_dag(lay, 2, "middle")
    assert {s for s, d, _ in _edges(term, "chain")} == {"s0.start", "s0.block2"}
    assert {s for s, d, _ in _edges(mid, "chain")} == {"s0.start", "s0.block1"}
    assert {t.name for t in mid.chain_tasks if t.segment == 0} == {"s0.start", "s0.block1"}
    assert {t.name for t in term.chain_tasks if t.segment == 0} == {"s0.start", "s0.block1", "s0.block2"}


def test_dag_shape_ar_layout_is_all_chain():
    dag = build_dag("ar", 2)
    seg0 = [t for t in dag.segment_tasks(0) if t.is_stage]
    assert len(seg0) == 7 and all(t.chain for t in seg0)
    assert {s for s, d, _ in _edges(dag, "chain")} == {"s0.start", "s0.block6"}


def test_dag_rejects_bad_input():
    with pytest.raises(ValueError, match="num_segments"):
        build_dag("mmpl", 0)
    with pytest.raises(ValueError, match="chain"):
        build_dag("mmpl", 2, "sideways")
    with pytest.raises(ValueError, match="middle"):
        build_dag("mmpl-no-mid", 2, "middle")
    assert len(build_dag("mmpl-no-mid", 1, "middle").tasks) == 6  # one segment needs no handoff


# --- cost model and profile cache -------------------------------------------------------------------------------


def test_estimate_at_wan_1_3b_geometry():
    dag = build_dag("mmpl", 2)
    c = {t.name: COSTS.cost(t) for t in dag.tasks}
    assert COSTS.workload.tokens_per_frame == 1560
    # the quick model's shape: plan ~0.7, populate ~0.75 + ~0.8, re-encode ~0.2-0.3, decode ~1-1.4 (H100 units)
    assert 0.5 < c["s1.plan"] < 1.0
    assert c["s1.plan"] < c["s1.populate2"] < c["s1.populate3"] < 1.2  # more pages read, more attention
    assert 0.1 < c["s1.reencode"] < 0.5 and 0.8 < c["s1.decode"] < 2.0
    assert c["s0.start"] < c["s1.reencode"]
    per_segment = sum(c[n] for n in ("s1.reencode", "s1.plan", "s1.populate2", "s1.populate3", "s1.decode"))
    chain = c["s1.reencode"] + c["s1.plan"]
    assert 3 < per_segment / chain < 5  # about four devices keep up with the chain
    t = dag.task(1, "populate", 2)
    assert COSTS.cost(t) < COSTS.cost(t, 2) < 2 * COSTS.cost(t)  # batching only saves launch overhead
    guided = CostModel(Workload(guidance=5.0))
    assert guided.cost(t) == pytest.approx(2 * COSTS.cost(t), rel=0.05)
    assert COSTS.source(t) == "estimate"


def test_profile_cache_roundtrip_ema_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPL_FAST_CACHE_DIR", str(tmp_path))
    cache = ProfileCache()
    assert cache.directory == tmp_path / "profiles"
    w = Workload()
    t = build_dag("mmpl", 2).task(1, "plan")
    versions = {"mmpl_fast": "x", "torch": "y"}
    prof = Profile.for_device("NVIDIA H100 80GB HBM3", "wan2.1-t2v-1.3b", "bfloat16", versions)
    prof.record(w, task_signature(t), 1.0)
    assert prof.record(w, task_signature(t), 2.0, alpha=0.25) == pytest.approx(1.25)
    path = cache.save(prof)
    assert path.exists() and not list(path.parent.glob(".tmp-*"))
    again = cache.load("NVIDIA H100 80GB HBM3", "wan2.1-t2v-1.3b", "bfloat16", versions)
    assert again.get(w, task_signature(t)) == pytest.approx(1.25)
    assert cache.load("NVIDIA H100 80GB HBM3", "wan2.1-t2v-1.3b", "bfloat16", {"torch": "z"}).entries == {}
    assert cache.load("NVIDIA H200", "wan2.1-t2v-1.3b", "bfloat16", versions).entries == {}
    model = CostModel(w, profile=again)
    assert model.cost(t) == pytest.approx(1.25) and model.source(t) == "profile"
    # measured during a run on a half-speed device: stored as speed-1 seconds, moved by the EMA
    model.observe(t, 4.0, device_speed=0.5)
    assert model.cost(t) == pytest.approx(0.75 * 1.25 + 0.25 * 2.0)
    with pytest.raises(ValueError, match="seconds"):
        prof.record(w, task_signature(t), -1.0)


def test_measure_profile_once_then_cached(tmp_path, monkeypatch):
    from mmpl_fast.scheduler import profiling

    calls = []
    real = profiling._timed

    def counting(fn, sync, warmup, repeat):
        calls.append(1)
        return real(fn, sync, 0, 1)

    monkeypatch.setattr(profiling, "_timed", counting)
    cache = ProfileCache(tmp_path)
    dag = build_dag("mmpl", 2)
    w = Workload("tiny", height=32, width=32, dtype="float32")
    prof = profiling.measure_profile(dag, w, cache=cache)
    stage_shapes = {task_signature(t) for t in dag.tasks if t.is_stage}
    assert len(calls) == len(stage_shapes) and len(prof.entries) == len(stage_shapes)
    assert profiling.measure_profile(dag, w, cache=cache).entries == prof.entries
    assert len(calls) == len(stage_shapes)  # second call read the cache
    model = CostModel(w, profile=prof)
    assert model.source(dag.task(1, "plan")) == "profile" and model.source(dag.task(1, "decode")) == "estimate"


# --- telemetry ----------------------------------------------------------------------------------------------------


def test_telemetry_unavailable_without_nvml_never_crashes():
    tel = Telemetry(interval=0.1)  # this machine has no NVIDIA driver
    assert not tel.available and tel.status.startswith("unavailable")
    assert tel.read() == [] and tel.latest() == [] and tel.devices() == []
    with tel:
        time.sleep(0.05)
    tel.close()
    dag = build_dag("mmpl", 3)
    sched = plan(dag, COSTS, telemetry=tel)  # falls back to the cost model and the devices torch sees
    sched.check(COSTS)

    class Broken:
        def nvmlInit(self):
            raise OSError("driver/library version mismatch")

    broken = Telemetry(nvml=Broken())
    assert broken.status == "unavailable: OSError: driver/library version mismatch"


class FakeNVML:
    """Three GPUs: physical 0, 1, 2; GPU 1 does not report power."""

    NVML_CLOCK_SM = 1

    def __init__(self):
        self.reads = 0
        self.lock = threading.Lock()

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 3

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("h", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{'abc'[h[1]] * 8}-0000"

    def nvmlDeviceGetMemoryInfo(self, h):
        with self.lock:
            self.reads += 1
        gib = 1024**3
        return SimpleNamespace(free=(70 - h[1]) * gib, used=(10 + h[1]) * gib, total=80 * gib)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50 + h[1], memory=10)

    def nvmlDeviceGetClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetPowerUsage(self, h):
        if h[1] == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 350_000


def test_telemetry_maps_cuda_visible_devices_to_nvml_indices():
    nv = FakeNVML()
    assert Telemetry(nvml=nv, visible=None).mapping == [(0, 0), (1, 1), (2, 2)]
    assert Telemetry(nvml=nv, visible="2,0").mapping == [(0, 2), (1, 0)]
    assert Telemetry(nvml=nv, visible="GPU-bbbb").mapping == [(0, 1)]  # UUID prefix
    assert Telemetry(nvml=nv, visible="1,7,0").mapping == [(0, 1)]  # CUDA stops at the first invalid entry
    empty = Telemetry(nvml=nv, visible="")
    assert not empty.available and "no visible GPU" in empty.status
    tel = Telemetry(nvml=nv, visible="2,1")
    stats = tel.read()
    assert [s.nvml_index for s in stats] == [2, 1]
    assert stats[0].memory_free == 68 * 1024**3 and stats[0].sm_clock_mhz == 1980 and stats[0].power_w == 350.0
    assert stats[1].power_w is None and stats[1].utilization == 51  # unsupported field -> None, no crash
    devs = tel.devices(speeds=[1.0, 0.5])
    assert devs[0].name == "cuda:0 (NVIDIA H100 80GB HBM3)" and devs[0].memory_bytes == 68 * 1024**3
    assert devs[1].speed == 0.5


def test_telemetry_polls_at_most_10hz_from_a_side_thread():
    nv = FakeNVML()
    with pytest.raises(ValueError, match="interval"):
        Telemetry(nvml=nv, interval=0.01)
    tel = Telemetry(nvml=nv, visible="0", interval=0.1)
    with tel:
        time.sleep(0.45)
        assert tel.latest()[0].memory_total == 80 * 1024**3
    # one read at start, then at most one per 0.1 s
    assert 2 <= nv.reads <= 7
    before = nv.reads
    time.sleep(0.25)
    assert nv.reads == before  # stopped


# --- policies -----------------------------------------------------------------------------------------------------


def _brute_force(dag, costs, devices):
    """Optimal makespan by enumerating every task order and device choice (earliest start with insertion)."""
    n, tasks = len(dag.tasks), dag.tasks
    delay = {(e.src, e.dst): costs.transfer_seconds(e) for e in dag.edges}
    fastest = max(d.speed for d in devices)
    after = [0.0] * n  # shortest time that must follow each task (prunes without losing the optimum)
    for t in reversed(tasks):
        after[t.index] = max(
            (after[e.dst] + costs.cost(tasks[e.dst]) / (1.0 if tasks[e.dst].on_host else fastest)
             for e in dag.succs[t.index]), default=0.0,
        )  # fmt: skip
    best = [math.inf]
    end, where = [0.0] * n, [None] * n
    lanes = {d: [] for d in [HOST, *range(len(devices))]}

    def earliest(spans, ready, dur):
        for t in sorted([ready] + [b for _, b in spans if b > ready]):
            j = bisect.bisect_right(spans, (t, math.inf))
            if (j == 0 or spans[j - 1][1] <= t + 1e-12) and (j == len(spans) or spans[j][0] >= t + dur - 1e-12):
                return t

    def rec(done, makespan):
        if makespan >= best[0]:
            return
        if done == n:
            best[0] = makespan
            return
        for t in tasks:
            i = t.index
            if where[i] is not None or any(where[e.src] is None for e in dag.preds[i]):
                continue
            for d in [HOST] if t.on_host else range(len(devices)):
                ready = max(
                    (end[e.src] + (delay[e.src, i] if where[e.src] not in (d, HOST) and d != HOST else 0.0)
                     for e in dag.preds[i]), default=0.0,
                )  # fmt: skip
                dur = costs.cost(t) / (1.0 if d == HOST else devices[d].speed)
                s = earliest(lanes[d], ready, dur)
                if s + dur + after[i] >= best[0]:
                    continue
                bisect.insort(lanes[d], (s, s + dur))
                where[i], end[i] = d, s + dur
                rec(done + 1, max(makespan, s + dur))
                where[i] = None
                lanes[d].remove((s, s + dur))

    rec(0, 0.0)
    return best[0]


@pytest.mark.parametrize(
    "layout,segments,decode,speeds",
    [("mmpl", 2, False, [1, 1]), ("mmpl", 2, False, [1, 0.5]), ("mmpl", 3, False, [1, 1]),
     ("mmpl", 2, True, [1, 1]), ("mmpl", 2, True, [1, 0.5]), ("ar7", 2, False, [1, 1, 0.5])],
)  # fmt: skip
def test_adaptive_matches_brute_force_on_small_dags(layout, segments, decode, speeds):
    dag = build_dag(layout, segments, decode=decode, write=decode)
    devs = simulated_devices(len(speeds), speeds)
    sched = adaptive(dag, COSTS, devs)
    sched.check(COSTS)
    best = _brute_force(dag, COSTS, devs)  # the optimum with one task per launch
    assert sched.makespan <= best + 1e-9
    if sched.makespan < best - 1e-9:  # only packing two tasks into one launch (batch or streams) can beat it
        assert any(len(g) > 1 for g in sched.launches())


@pytest.mark.parametrize("policy", ["adaptive", "round-robin", "cp-first"])
@pytest.mark.parametrize("chain", ["terminal", "middle"])
def test_schedules_never_violate_dependencies(policy, chain):
    for segments, speeds in [(5, [1, 0.5, 1]), (9, [1, 1, 1, 1, 0.25]), (4, [2.0])]:
        dag = build_dag("mmpl", segments, chain)
        sched = schedule(dag, COSTS, simulated_devices(len(speeds), speeds), policy)
        sched.check(COSTS)  # raises on a violated edge (plus transfer), overlap, or a task placed twice
        for launch in sched.launches():
            p, v = launch[0], speeds[launch[0].device]
            if p.device == HOST:
                continue
            if len({q.stream for q in launch}) > 1:  # streams: the launch takes the streams' cost, each member
                tasks = [q.task for q in launch]  # ends when its share of the device has done its work
                assert max(q.end for q in launch) - p.start == pytest.approx(COSTS.streams_cost(tasks) / v)
                for q, e in zip(launch, COSTS.streams_ends(tasks)):
                    assert q.duration == pytest.approx(e / v, rel=1e-9) and q.duration >= COSTS.cost(q.task) / v
                continue
            # a launch takes its cost (batched: the batch's cost) over the device's speed
            cost = COSTS.cost(p.task, len(launch)) if len(launch) > 1 else COSTS.cost(p.task)
            assert all(q.duration == pytest.approx(cost / v, rel=1e-9) for q in launch)
        by = {p.task.index: p for p in sched.placements}
        assert all(by[e.src].end <= by[e.dst].start + 1e-9 for e in dag.edges)


def test_heterogeneous_speeds_keep_the_chain_on_fast_devices():
    dag = build_dag("mmpl", 12)
    devs = simulated_devices(4, [1, 1, 1, 0.5])
    sched = adaptive(dag, COSTS, devs)
    assert all(sched.placement(t).device != 3 for t in dag.chain_tasks)
    assert sched.busy()[3] > 0  # the slow device still works (on tasks with slack)
    rr = round_robin(dag, COSTS, devs)
    assert sched.makespan < 0.7 * rr.makespan  # round-robin puts every fourth chain step on the slow device


def test_targets_12_segments_4_devices():
    dag = build_dag("mmpl", 12)
    for speeds in ([1, 1, 1, 1], [1, 1, 1, 0.5]):
        devs = simulated_devices(4, speeds)
        sched = adaptive(dag, COSTS, devs)
        assert lower_bound(dag, COSTS, devs).value / sched.makespan >= 0.95, speeds


def test_two_devices_beat_round_robin_but_5_percent_is_out_of_reach():
    """12 segments on 2 devices: adaptive is faster than round-robin, but no schedule can be 5% faster: device
    work W must run on two devices, one of which idles until the first plan exists (nothing else is ready), and
    the last write follows the last device task; that bound is within 5% of round-robin."""
    dag = build_dag("mmpl", 12)
    devs = simulated_devices(2)
    rr, ad = round_robin(dag, COSTS, devs), adaptive(dag, COSTS, devs)
    assert ad.makespan < rr.makespan
    work = sum(COSTS.cost(t) for t in dag.tasks if not t.on_host)
    first_plan = COSTS.cost(dag.task(0, "start")) + COSTS.cost(dag.task(0, "plan"))
    bound = (work + first_plan) / 2 + COSTS.cost(dag.task(11, "write"))
    assert bound > 0.95 * rr.makespan
    assert ad.makespan >= bound - 1e-9


def test_adaptive_never_slower_than_round_robin_grid():
    """2..24 segments on 1..8 devices, equal speeds and one half-speed device, both chain modes.

    Round-robin is one of adaptive's candidates and every later step only accepts shorter schedules, so this
    holds for any search budget; the sweep uses budget 0 (candidates and forward-backward improvement) to stay
    fast, and a coarser sweep below runs the default budget."""
    for chain in ("terminal", "middle"):
        for segments in range(2, 25):
            dag = build_dag("mmpl", segments, chain)
            for n in range(1, 9):
                for speeds in ([1.0] * n, [1.0] * (n - 1) + [0.5]):
                    devs = simulated_devices(n, speeds)
                    ad = adaptive(dag, COSTS, devs, budget=0)
                    rr = round_robin(dag, COSTS, devs)
                    assert ad.makespan <= rr.makespan + 1e-9, (chain, segments, speeds)
                    if n == 1:
                        assert ad.makespan <= rr.makespan + 1e-9


def test_adaptive_default_budget_never_slower_than_round_robin():
    for chain in ("terminal", "middle"):
        for segments in (2, 7, 16):
            dag = build_dag("mmpl", segments, chain)
            for speeds in ([1.0, 1.0], [1.0, 1.0, 0.5], [1.0] * 5 + [0.5]):
                devs = simulated_devices(len(speeds), speeds)
                ad = adaptive(dag, COSTS, devs)
                ad.check(COSTS)
                assert ad.makespan <= round_robin(dag, COSTS, devs).makespan + 1e-9


def test_plain_critical_path_first_is_not_better_than_adaptive():
    dag = build_dag("mmpl", 12)
    for speeds in ([1, 1], [1, 1, 1, 0.5]):
        devs = simulated_devices(len(speeds), speeds)
        assert adaptive(dag, COSTS, devs).makespan <= cp_first(dag, COSTS, devs).makespan + 1e-9


def _batch_friendly_costs(dag) -> CostModel:
    """A profile where launching two populate stages together costs 1.1x one launch."""
    w = Workload()
    prof = Profile.for_device("sim", w.config, w.dtype, {})
    for t in dag.tasks:
        prof.record(w, task_signature(t), COSTS.cost(t))
        if t.kind == "populate":
            for b in range(2, 5):
                prof.record(w, task_signature(t, b), COSTS.cost(t) * (1 + 0.1 * (b - 1)))
    return CostModel(w, profile=prof)


def test_measured_batches_scale_to_other_batch_sizes():
    """A profile that measured a task only batched (or only alone) gives every batch size from that measurement,
    scaled by the estimate's batching ratio, never the estimate of another device mixed with measured seconds."""
    dag = build_dag("mmpl", 2)
    w = Workload()
    t = dag.task(0, "populate", 2)
    prof = Profile.for_device("sim", w.config, w.dtype, {})
    prof.record(w, task_signature(t, 2), 10.0)
    costs = CostModel(w, profile=prof)
    est = CostModel(w)
    assert costs.cost(t, 1) == pytest.approx(10.0 * est.cost(t, 1) / est.cost(t, 2))
    assert costs.cost(t, 3) == pytest.approx(10.0 * est.cost(t, 3) / est.cost(t, 2))
    assert costs.cost(t, 2) == 10.0 and costs.cost(dag.task(0, "plan")) == est.cost(dag.task(0, "plan"))


def test_packing_batches_populate_tasks_when_memory_allows():
    dag = build_dag("mmpl", 6)
    costs = _batch_friendly_costs(dag)
    devs = simulated_devices(1)
    packed = adaptive(dag, costs, devs, [None], budget=60)
    packed.check(costs)
    batches = [g for g in packed.launches() if len(g) > 1]
    assert batches and all(len({p.task.stage for p in g}) == 1 for g in batches)
    assert packed.makespan < round_robin(dag, costs, devs).makespan
    # with room for one segment only, nothing is batched and the schedule never holds two segments
    tight = adaptive(dag, costs, devs, [1], budget=60)
    tight.check(costs)
    assert tight.peak_resident() == [1] and all(len(g) == 1 for g in tight.launches())
    two = adaptive(dag, costs, simulated_devices(2), [2, 2], budget=60)
    two.check(costs)
    assert max(two.peak_resident()) <= 2


def test_streams_unit_is_timed_and_checked():
    dag = build_dag("mmpl", 2)
    ls = ListScheduler(dag, COSTS, simulated_devices(1), [None])
    a, b = dag.task(0, "populate", 3).index, dag.task(1, "populate", 2).index
    units = [Unit((t.index,)) for t in dag.tasks if t.index not in (a, b)] + [Unit((a, b), "streams")]
    sched = ls.run(units, [0.0] * len(units))
    sched.check(COSTS)
    pa, pb = sched.placement(a), sched.placement(b)
    assert pa.batch == pb.batch and {pa.stream, pb.stream} == {0, 1} and pa.start == pb.start
    assert ls.unit_cost(units[-1]) < COSTS.cost(dag.tasks[a]) + COSTS.cost(dag.tasks[b])


def _no_batch_gain(dag, workload, hardware) -> CostModel:
    """A profile where a batch of b stage tasks costs b single launches (batching saves nothing)."""
    base = CostModel(workload, hardware)
    prof = Profile.for_device("sim", workload.config, workload.dtype, {})
    for t in dag.tasks:
        prof.record(workload, task_signature(t), base.cost(t))
        if t.is_stage:
            for b in range(2, 5):
                prof.record(workload, task_signature(t, b), b * base.cost(t))
    return CostModel(workload, hardware, prof)


def _packed(sched):
    """(streams launches, batched launches) of a schedule."""
    multi = [g for g in sched.launches() if len(g) > 1]
    streams = [g for g in multi if len({p.stream for p in g}) > 1]
    return streams, [g for g in multi if len({p.stream for p in g}) == 1]


def test_policy_picks_streams_for_stages_that_cannot_share_a_batch():
    """Small shapes, where kernel launches cost as much as the work: a populate stage of one segment and the
    re-encode of the next cannot share one batched call, and batching saves nothing here; on two streams they
    hide each other's launch gaps. Without launch costs there is nothing to hide, and no streams."""
    dag = build_dag("mmpl", 3, decode=False, write=False)
    w = Workload("tiny", height=64, width=64)
    costs = _no_batch_gain(dag, w, Hardware(launch_seconds=5e-6))
    sched = adaptive(dag, costs, simulated_devices(1))
    sched.check(costs)
    streams, batches = _packed(sched)
    assert streams and not batches
    assert any(len({pack_key(p.task) for p in g}) > 1 for g in streams)  # different stages on one launch
    assert sched.makespan < round_robin(dag, costs, simulated_devices(1)).makespan
    flat = _no_batch_gain(dag, w, Hardware(launch_seconds=0.0))
    assert _packed(adaptive(dag, flat, simulated_devices(1))) == ([], [])
    # a CPU has no streams (the executor runs stream groups one after the other there)
    assert _packed(adaptive(dag, costs, [Device("cpu")]))[0] == []
    assert _packed(adaptive(dag, costs, [Device("cpu", streams=True)]))[0]


def test_policy_picks_streams_when_a_batch_does_not_fit_in_memory():
    """Populate stages that batch well: batched when the batch's workspace fits; when only the stacked text K/V
    of the batched call does not, on streams (same stages included); when not even two calls' activations fit,
    neither."""
    dag = build_dag("mmpl", 6)
    costs = _batch_friendly_costs(dag)
    act, cross = costs.activation_bytes(dag.task(0, "populate", 3)), costs.cross_bytes()
    runs = {}
    for name, ws in (("room", None), ("no batch", 2 * act + cross), ("nothing", 2 * act - 1)):
        sched = adaptive(dag, costs, simulated_devices(1), [None], budget=60, workspace=[ws])
        sched.check(costs)
        runs[name] = (sched.makespan, *_packed(sched))
    assert runs["room"][2] and not runs["room"][1]  # batches, no streams
    assert runs["no batch"][1] and not runs["no batch"][2]  # streams only
    assert any(len({pack_key(p.task) for p in g}) == 1 for g in runs["no batch"][1])  # a would-be batch on streams
    for g in runs["no batch"][1]:
        assert costs.launch_workspace([p.task for p in g], "streams") <= 2 * act + cross
    assert runs["nothing"][1:] == ([], [])
    assert runs["room"][0] < runs["no batch"][0] < runs["nothing"][0]


def test_lower_bound_is_speed_weighted():
    dag = build_dag("mmpl", 12)
    equal = lower_bound(dag, COSTS, simulated_devices(4))
    mixed = lower_bound(dag, COSTS, simulated_devices(4, [1, 1, 1, 0.5]))
    assert mixed.critical_path == pytest.approx(equal.critical_path)  # at the fastest speed
    assert mixed.work == pytest.approx(equal.work * 4 / 3.5)  # work over the sum of speeds
    assert lower_bound(dag, COSTS, simulated_devices(4, [2, 2, 2, 2])).critical_path < equal.critical_path


# --- pre-flight ---------------------------------------------------------------------------------------------------


def test_preflight_refuses_what_cannot_fit_and_says_what_would():
    dag = build_dag("mmpl", 12)
    costs = CostModel(Workload("wan2.1-t2v-14b", guidance=5.0))
    with pytest.raises(InsufficientMemoryError) as err:
        preflight(
            dag, costs, [Device("cuda:0", memory_bytes=79 * 1024**3), Device("cuda:1", memory_bytes=40 * 1024**3)]
        )
    msg = str(err.value)
    assert "wan2.1-t2v-14b" in msg and "79.0 GiB on cuda:0" in msg and "What would fit" in msg
    assert "without classifier-free guidance" in msg and "smaller video" in msg
    assert isinstance(err.value, ValueError)


def test_preflight_capacity_and_left_out_devices():
    dag = build_dag("mmpl", 12)
    gib = 1024**3
    fixed, seg = estimate_memory(COSTS, dag).fixed, COSTS.segment_bytes(dag.layout.num_frames)
    devs = [Device("big", memory_bytes=fixed + 3 * seg + gib // 2), Device("small", memory_bytes=fixed),
            Device("unknown")]  # fmt: skip
    mem = preflight(dag, COSTS, devs)
    assert mem.capacity == (3, 0, None) and mem.usable == [0, 2]
    assert "small left out" in mem.notes[0]
    sched = schedule(dag, COSTS, mem.usable_devices(), "adaptive", mem.usable_capacity())
    sched.check(COSTS)
    assert sched.peak_resident()[0] <= 3
    with pytest.raises(InsufficientMemoryError):
        plan(dag, COSTS, [Device("small", memory_bytes=fixed)])


# --- simulator ----------------------------------------------------------------------------------------------------


def test_simulate_figures_and_json_cli(tmp_path, capsys):
    r = simulate(12, 4, [1, 1, 1, 0.5])
    assert r.efficiency >= 0.95 and r.makespan <= r.round_robin
    assert r.speedup == pytest.approx(r.single_device / r.makespan)
    png = tmp_path / "gantt.png"
    assert cli_main(["--segments", "6", "--devices", "2", "--json", "--timeline", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["segments"] == 6 and out["devices"] == 2 and png.exists() and png.stat().st_size > 1000
    for key in ("makespan_s", "speedup", "lower_bound_s", "efficiency", "round_robin_s", "single_device_s"):
        assert key in out
    assert out["efficiency"] == pytest.approx(out["lower_bound_s"] / out["makespan_s"], rel=1e-3)
    assert cli_main(["--segments", "4", "--devices", "2", "--no-timeline"]) == 0
    assert "speedup" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [(["--speeds", "1,1"], "speeds"), (["--segments", "0"], "segments"), (["--policy", "fifo"], "policy"),
     (["--chain", "x"], "chain"), (["--speeds", "1,a,1,1"], "--speeds"),
     (["--config", "wan2.1-t2v-14b", "--guidance", "5", "--memory-gib", "60"], "What would fit")],
)  # fmt: skip
def test_cli_rejects_bad_input_naming_it(argv, needle, capsys, tmp_path):
    assert cli_main([*argv, "--no-timeline"]) == 2
    assert needle in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mmpl_fast.scheduler", "--segments", "3", "--devices", "2", "--json", "--no-timeline"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["segments"] == 3


def test_scheduler_functions_stay_short():
    """No function of the scheduler package (and its CLI module) is longer than 80 lines (issue 13)."""
    import ast
    from pathlib import Path

    import mmpl_fast.scheduler

    root = Path(mmpl_fast.scheduler.__file__).parent
    long = []
    for path in [*sorted(root.glob("*.py")), root.parent / "schedule.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
