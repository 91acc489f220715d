"""Moldable tasks: the `Split` descriptor, its pricing (compute / k, all-to-alls, KV moves), widened schedules, the
never-worse guarantee of ``split="auto"`` over every cell, the simulated targets, and the CLI / timeline."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from mmpl_fast.scheduler import (
    HOST,
    CostModel,
    Hardware,
    Placement,
    Profile,
    Schedule,
    Split,
    Workload,
    adaptive,
    build_dag,
    lower_bound,
    plot_timeline,
    schedule,
    simulate,
    simulated_devices,
)
from mmpl_fast.scheduler.simulate import main as cli_main
from mmpl_fast.scheduler.split import head_ranges, head_slots, holdings, move_cells, needs

COSTS = CostModel()  # Wan2.1-1.3B, 480x832, 4 steps, FLOP/byte estimate for an H100, NVLink
GUIDED = CostModel(Workload(guidance=5.0))


# --- the descriptor -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heads,ways,slots,sizes",
    [(12, 2, 6, [6, 6]), (12, 4, 3, [3] * 4), (12, 5, 3, [3, 3, 2, 2, 2]), (12, 8, 2, [2, 2, 2, 2, 1, 1, 1, 1]),
     (40, 2, 20, [20, 20]), (40, 4, 10, [10] * 4), (40, 5, 8, [8] * 5), (40, 8, 5, [5] * 8), (40, 3, 14, [14, 13, 13])],
)  # fmt: skip
def test_wan_heads_divide_with_padding_where_they_do_not(heads, ways, slots, sizes):
    assert head_slots(heads, ways) == slots
    ranges = head_ranges(heads, ways)
    assert [hi - lo for lo, hi in ranges] == sizes
    assert ranges[0][0] == 0 and ranges[-1][1] == heads and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_split_descriptor_validates_and_describes():
    s = Split(heads=2, branches=2, kv="gather")
    assert s.ways == 4 and s.kind == "heads+branch" and Split(3).kind == "heads" and Split(1, 2).kind == "branch"
    assert s.shard(3, 12, 2) == ((1,), (6, 12)) and Split(2).shard(1, 12, 2) == ((0, 1), (6, 12))
    assert s.to_dict() == {"kind": "heads+branch", "ways": 4, "heads": 2, "branches": 2, "kv": "gather"}
    for bad, needle in [(dict(heads=0), "heads"), (dict(branches=3), "branches"), (dict(kv="x"), "kv"),
                        (dict(heads=1), ">= 2")]:  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            Split(**bad)
    dag = build_dag("mmpl", 1)
    t = dag.task(0, "plan")
    with pytest.raises(ValueError, match="stage task"):
        COSTS.check_split(dag.task(0, "decode"), Split(2))
    with pytest.raises(ValueError, match="guidance"):
        COSTS.split_cost(t, Split(1, 2))
    with pytest.raises(ValueError, match="distinct devices"):
        Placement(t, 0, 0, 0, 0.0, 1.0, (0, 0), Split(2))
    with pytest.raises(ValueError, match="home"):
        Placement(t, 1, 0, 0, 0.0, 1.0, (0, 1), Split(2))


# --- pricing --------------------------------------------------------------------------------------------------------


def test_split_cost_divides_compute_and_adds_collectives():
    dag = build_dag("mmpl", 2)
    plan, reencode = dag.task(1, "plan"), dag.task(1, "reencode")
    one = COSTS.cost(plan)
    costs = {k: COSTS.split_cost(plan, Split(k)) for k in (2, 4, 8)}
    assert one / 2 < costs[2] < one and costs[2] > costs[4] > costs[8]  # compute / k plus the all-to-alls
    launches = COSTS.launch_overhead(plan)  # every device launches every kernel: not divided
    expected = (one - launches) / 2 + launches + COSTS.split_comm_seconds(plan, Split(2))
    assert costs[2] == pytest.approx(expected, rel=1e-6)
    # 12 heads on 8 devices pad to 16: attention does not get faster from 6 to 8 devices, the linear layers do
    assert COSTS.split_cost(plan, Split(6)) > costs[8]
    pcie = CostModel(hardware=Hardware.linked("pcie"))
    assert pcie.split_cost(plan, Split(4)) > costs[4]  # slower links, dearer all-to-alls
    # the re-encode's VAE part stays on one device: splitting it saves only its cache prefill
    assert COSTS.split_cost(reencode, Split(8)) > 0.9 * COSTS.cost(reencode)
    # gathering the written KV pages on the home device costs their bytes over the link
    gather = COSTS.split_cost(plan, Split(4, kv="gather")) - costs[4]
    written = len(plan.frames) * COSTS.workload.page_bytes() * 3 / 4
    assert gather == pytest.approx(written / COSTS.hardware.link_bandwidth + COSTS.hardware.collective_latency)
    # guidance: the branches on two devices cost about half, the velocities meet once per step
    branch = GUIDED.split_cost(plan, Split(1, 2))
    assert GUIDED.cost(plan) / 2 < branch < 0.51 * GUIDED.cost(plan)
    assert [sp.ways for sp in GUIDED.split_options(plan, 4)] == [2, 3, 4]


def test_profile_link_figures_replace_the_hardware_ones():
    dag = build_dag("mmpl", 1)
    plan = dag.task(0, "plan")
    w = COSTS.workload
    prof = Profile.for_device("gpu", w.config, w.dtype, {})
    prof.record_link("link_bandwidth", 20e9)
    prof.record_link("collective_latency", 1e-4)
    measured = CostModel(w, profile=prof)
    assert measured.link("link_bandwidth") == 20e9 and measured.link("link_latency") == COSTS.hardware.link_latency
    assert measured.split_cost(plan, Split(2)) > COSTS.split_cost(plan, Split(2))
    with pytest.raises(ValueError, match="key"):
        prof.record_link("bandwidth", 1.0)


def test_kv_moves_per_head_and_branch_cell():
    dag = build_dag("mmpl", 1)
    e = next(e for e in dag.edges if e.kind == "stage" and len(e.frames) == 5)  # plan -> populate2
    full = COSTS.transfer_seconds(e)
    one, four = ((1,), None), ((0, 1, 2, 3), Split(4))
    assert COSTS.move_seconds(e, ((0,), None), one) == full and COSTS.move_seconds(e, one, one) == 0.0
    assert COSTS.move_seconds(e, four, four) == 0.0  # kept head-split, read split the same way: in place
    lat, bw = COSTS.hardware.link_latency, COSTS.hardware.link_bandwidth
    # head-split pages read by one device of the split: it holds a quarter, receives three quarters
    assert COSTS.move_seconds(e, four, one) == pytest.approx(lat + 0.75 * COSTS.edge_bytes(e) / bw)
    # gathered on the home device: read there for free, elsewhere in full
    gathered = ((0, 1, 2, 3), Split(4, kv="gather"))
    assert COSTS.move_seconds(e, gathered, ((0,), None)) == 0.0 and COSTS.move_seconds(e, gathered, one) == full
    # whole pages on one device read 2-way split by two others: each receives half, the sender sends all
    assert COSTS.move_seconds(e, ((0,), None), ((1, 2), Split(2))) == full
    assert move_cells(holdings((0, 1), Split(2), 12, 1), needs((0, 1, 2, 3), Split(4), 12, 1)) == (3, 6, 3)
    latent = next(e for e in dag.edges if e.kind == "decode")
    assert COSTS.move_seconds(latent, four, ((3,), None)) == 0.0  # latents are on every device of a split


# --- widened schedules ----------------------------------------------------------------------------------------------


def test_widened_schedule_is_valid_and_explicit():
    dag = build_dag("mmpl", 6)
    devs = simulated_devices(4)
    wide = adaptive(dag, COSTS, devs, split="auto", budget=0)
    wide.check(COSTS)
    assert wide.has_splits and wide.makespan < adaptive(dag, COSTS, devs, budget=0).makespan
    for p in wide.placements:
        if p.split is not None:
            assert p.task.is_stage and p.devices[0] == p.device and len(p.devices) == p.split.ways
            assert p.duration == pytest.approx(COSTS.split_cost(p.task, p.split))
            for d in p.devices:  # every device of it is busy then, and lists it
                assert any(q is p for q in wide.by_device()[d]) and any(g[0] is p for g in wide.launches_on(d))
    rows = wide.to_dict()["placements"]
    assert any("split" in r and len(r["devices"]) == r["split"]["ways"] for r in rows)
    assert lower_bound(dag, COSTS, devs, widen=True).critical_path < lower_bound(dag, COSTS, devs).critical_path


def test_unsplit_schedules_look_as_before():
    """Without ``split="auto"`` (the default every executor gets) nothing is widened and the JSON is unchanged."""
    dag = build_dag("mmpl", 6)
    sched = schedule(dag, COSTS, simulated_devices(4))
    assert not sched.has_splits and all(p.devices == () and p.split is None for p in sched.placements)
    keys = {"task", "segment", "kind", "stage", "device", "stream", "batch", "start", "end"}
    assert all(set(r) == keys for r in sched.to_dict()["placements"])
    with pytest.raises(ValueError, match="split"):
        adaptive(dag, COSTS, simulated_devices(2), split="always")


def test_check_rejects_bad_widened_placements():
    dag = build_dag("mmpl", 3)
    wide = adaptive(dag, COSTS, simulated_devices(4), split="auto", budget=0)
    wide.check(COSTS)
    p = next(p for p in wide.placements if p.split is not None and p.split.ways % 2 == 0)

    def swapped(new: Placement):
        return Schedule(dag, wide.devices, tuple(new if q.task == new.task else q for q in wide.placements), "x")

    with pytest.raises(ValueError, match="guidance"):  # a branch split without guidance
        swapped(replace(p, split=Split(p.split.ways // 2, 2))).check(COSTS)
    q = next(q for q in wide.placements if q.device != HOST and q.split is None)
    with pytest.raises(ValueError, match="overlap|before|mixes"):  # another launch on one of its devices meanwhile
        swapped(replace(q, device=p.devices[-1], start=p.start, end=p.end)).check(COSTS)


def test_split_auto_never_worse_on_any_cell():
    """Every cell of 2..24 segments x 1..8 devices: adaptive with ``split="auto"`` is never longer than with
    ``"off"`` (today's plan). Both with budget 0 (candidates and forward-backward) to stay fast; the unsplit
    schedule is one of auto's candidates, so this holds for any budget."""
    t0 = time.perf_counter()
    gains = {}
    for segments in range(2, 25):
        dag = build_dag("mmpl", segments)
        for n in range(1, 9):
            devs = simulated_devices(n)
            off = adaptive(dag, COSTS, devs, budget=0)
            auto = adaptive(dag, COSTS, devs, budget=0, split="auto")
            assert auto.makespan <= off.makespan + 1e-9, (segments, n)
            assert auto.has_splits == (auto.makespan < off.makespan - 1e-9)
            gains[segments, n] = off.makespan / auto.makespan
    assert gains[12, 8] > 1.5 and gains[24, 8] > 1.5 and all(gains[s, 1] == 1.0 for s in range(2, 25))
    print(f"split grid: {time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("segments,devices,target", [(12, 8, 5.0), (12, 4, 3.5)])
def test_simulated_targets(segments, devices, target):
    """Issue 14's simulated targets at the CLI's default budget (24 segments on 8 devices: benchmarks/)."""
    r = simulate(segments, devices)
    assert r.speedup >= target and r.makespan < r.unsplit.makespan
    assert r.schedule.chain_end() < r.unsplit.chain_end()


# --- CLI and timeline -----------------------------------------------------------------------------------------------


def test_cli_reports_split_figures_and_draws_widened_tasks(tmp_path, capsys):
    png = tmp_path / "wide.png"
    assert cli_main(["--segments", "6", "--devices", "4", "--json", "--timeline", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "auto" and out["widened_tasks"] > 0 and png.stat().st_size > 1000
    assert out["makespan_s"] < out["makespan_unsplit_s"] and out["speedup"] > out["speedup_unsplit"]
    assert out["chain_s"] < out["chain_unsplit_s"] and out["first_segment_s"] > 0
    assert cli_main(["--segments", "6", "--devices", "4", "--json", "--split", "off", "--no-timeline"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["widened_tasks"] == 0 and off["makespan_s"] == off["makespan_unsplit_s"] == out["makespan_unsplit_s"]
    assert off["first_segment_s"] == off["first_segment_unsplit_s"]
    assert cli_main(["--split", "maybe", "--no-timeline"]) == 2 and "split" in capsys.readouterr().err
    assert cli_main(["--link", "ib", "--no-timeline"]) == 2 and "link" in capsys.readouterr().err


def test_timeline_bar_spans_a_widened_tasks_devices(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.add_patch
    monkeypatch.setattr(matplotlib.axes.Axes, "add_patch", lambda ax, p: drawn.append(p) or real(ax, p))
    dag = build_dag("mmpl", 3)
    wide = adaptive(dag, COSTS, simulated_devices(4), split="auto", budget=0)
    plot_timeline(wide, tmp_path / "t.png")
    p = next(p for p in wide.placements if p.split is not None and max(p.devices) - min(p.devices) == p.split.ways - 1)
    tall = [r for r in drawn if abs(r.get_x() - p.start) < 1e-12 and r.get_height() > 1]
    assert tall and tall[0].get_height() == pytest.approx(p.split.ways - 1 + 0.7)


def test_executor_refuses_a_widened_schedule():
    """Real runs execute unsplit schedules only (for now): a widened one is refused before any work."""
    from mmpl_fast.scheduler.execute import Executor

    dag = build_dag("mmpl", 3)
    wide = adaptive(dag, COSTS, simulated_devices(4), split="auto", budget=0)
    assert wide.has_splits

    class NoWork:
        def __getattr__(self, name):
            raise AssertionError(f"work touched: {name}")

    with pytest.raises(NotImplementedError, match="split='off'"):
        Executor(wide, NoWork())
    Executor(adaptive(dag, COSTS, simulated_devices(4)), NoWork())  # an unsplit one is accepted
