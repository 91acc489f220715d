"""Sampling: the timestep facts of DESIGN.md ("Sampler facts"), the few-step math against a float64 hand
computation, UniPC / Euler on toy problems with a known answer, guidance, defaults, and bad input."""

import math

import numpy as np
import pytest
import torch

from mmpl_fast.sampling import (
    CACHE_TIMESTEP,
    SAMPLERS,
    EulerSampler,
    FewStepSampler,
    FewStepSchedule,
    UniPCSampler,
    default_sampling,
    few_step_list,
    guide,
    lookup_sigma,
    make_sampler,
    training_table,
    warp_sigma,
)

# The authors' MMPL code, 8 steps: int(1000 * warp(linspace(0.999, 0, 9)[:-1], 5)).
MMPL_UNIPC_8 = [999, 972, 937, 892, 833, 749, 624, 416]
# What diffusers' default flow sigmas (starting at 1.0) give for the same 8 steps.
DIFFUSERS_DEFAULT_8 = [999, 972, 937, 893, 833, 750, 625, 418]


def hand_table(shift=5.0, total=1000):
    """Self-Forcing's FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True), set_timesteps(T, training=True),
    written out in float32 scalar steps."""
    base = torch.linspace(1.0, 0.0, total + 1, dtype=torch.float32)[:-1]
    num = base * torch.tensor(shift, dtype=torch.float32)
    den = torch.tensor(1.0, dtype=torch.float32) + torch.tensor(shift - 1, dtype=torch.float32) * base
    sig = num / den
    return sig * torch.tensor(float(total), dtype=torch.float32), sig


def run_loop(sampler, x, velocity, noise=None):
    """The engine's loop: fresh run, one model call per timestep, noise drawn lazily."""
    run = sampler.start()
    for i, _t in enumerate(run.timesteps.tolist()):
        v = velocity(x, float(run.sigmas[i]))
        x = run.step(i, x, v, (lambda i=i: noise(i + 1)) if noise is not None else None)
    return run.final(x)


# ----------------------------------------------------------------------------------------- warp
def test_warp_sigma():
    assert warp_sigma(0.0, 5.0) == 0.0 and warp_sigma(1.0, 5.0) == 1.0
    assert warp_sigma(0.5, 5.0) == pytest.approx(2.5 / 3.0)
    assert warp_sigma(0.25, 1.0) == 0.25
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.allclose(warp_sigma(t, 5.0), 5 * t / (1 + 4 * t))
    assert warp_sigma(torch.tensor([0.5], dtype=torch.float32), 3.0).dtype == torch.float32
    assert np.allclose(warp_sigma(np.array([0.5]), 5.0), [2.5 / 3])


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf")])
def test_warp_sigma_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        warp_sigma(0.5, shift)


# ------------------------------------------------------------------------------------- few-step facts
def test_few_step_timesteps_are_warped_float32():
    sched = FewStepSchedule()
    assert sched.steps == (1000, 750, 500, 250) and sched.shift == 5.0
    assert sched.timesteps.dtype == torch.float32
    expected = torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0], dtype=torch.float32)
    assert torch.equal(sched.timesteps, expected)
    assert sched.timesteps.tolist() == pytest.approx([1000, 937.5, 833.33, 625], abs=5e-3)
    assert torch.equal(make_sampler("few-step", 4).model_timesteps, expected)


def test_training_table_is_self_forcing():
    t, s = training_table(5.0, 1000)
    ht, hs = hand_table()
    assert t.shape == (1000,) and t.dtype == s.dtype == torch.float32
    assert torch.equal(t, ht) and torch.equal(s, hs)
    assert t[0].item() == 1000.0 and s[-1].item() > 0
    # step s of the few-step list is entry 1000 - s of the table
    assert torch.equal(FewStepSchedule().timesteps, ht[[0, 250, 500, 750]])


def test_few_step_sigmas_are_nearest_table_entries_in_float64():
    sched = FewStepSchedule()
    assert sched.sigmas.dtype == torch.float64
    _, hs = hand_table()
    assert torch.equal(sched.sigmas, hs[[0, 250, 500, 750]].double())
    assert sched.sigmas.tolist() == pytest.approx([1.0, 0.9375, 2.5 / 3, 0.625], abs=1e-7)


def test_lookup_sigma_nearest():
    ht, hs = hand_table()
    for t in (999.3, 937.49, 900.0, 626.1, 1.0, 0.4):
        idx = min(range(1000), key=lambda k: (abs(float(ht[k]) - t), k))
        assert lookup_sigma(t).item() == float(hs[idx])
    per_row = lookup_sigma(torch.tensor([[1000.0, 625.0], [937.5, 625.0]]))
    assert per_row.shape == (2, 2) and per_row.dtype == torch.float64
    assert per_row[0, 1].item() == 0.625


def test_few_step_list():
    assert few_step_list(4) == (1000, 750, 500, 250)
    assert few_step_list(1) == (1000,)
    assert few_step_list(2) == (1000, 500)
    assert make_sampler("few-step", 2).schedule.steps == (1000, 500)
    assert make_sampler("few-step", (1000, 757, 522)).schedule.steps == (1000, 757, 522)
    assert make_sampler("few-step").schedule.steps == (1000, 750, 500, 250)


def test_cache_timestep_is_zero():
    assert CACHE_TIMESTEP == 0.0


# -------------------------------------------------------------------------------------- few-step math
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_step_update_matches_float64_hand_computation(dtype):
    sched = FewStepSchedule()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 6, 6, generator=g).to(dtype)
    v = torch.randn(2, 3, 4, 6, 6, generator=g).to(dtype)
    noise = torch.randn(2, 3, 4, 6, 6, generator=g).to(dtype)
    _, hs = hand_table()
    for i in range(3):
        sigma = float(hs[[0, 250, 500, 750][i]])  # float32 table value, used in float64
        sigma_next = hs[[0, 250, 500, 750][i + 1]]  # float32
        x0, x_next = sched.denoise(x, v, i, noise)
        x0_hand = (x.double() - sigma * v.double()).to(dtype)
        x_next_hand = ((1 - sigma_next) * x0_hand.float() + sigma_next * noise.float()).to(dtype)
        assert x0.dtype == x_next.dtype == dtype
        torch.testing.assert_close(x0, x0_hand, rtol=0, atol=0)
        torch.testing.assert_close(x_next, x_next_hand, rtol=0, atol=0)
    # the last step gives x0 only
    x0, x_next = sched.denoise(x, v, 3, noise)
    assert x_next is None
    torch.testing.assert_close(x0, (x.double() - 0.625 * v.double()).to(dtype), rtol=0, atol=0)


def test_few_step_run_follows_the_schedule_and_returns_last_x0():
    smp = make_sampler("few-step", 4)
    g = torch.Generator().manual_seed(2)
    shape = (1, 3, 2, 4, 4)
    noises = {k: torch.randn(shape, generator=g) for k in range(5)}
    vs = [torch.randn(shape, generator=g) for _ in range(4)]
    drawn = []

    def noise(k):
        drawn.append(k)
        return noises[k]

    run = smp.start()
    x = noises[0]
    xs = [x]
    for i, _t in enumerate(run.timesteps.tolist()):
        x = run.step(i, x, vs[i], lambda i=i: noise(i + 1))
        xs.append(x)
    assert drawn == [1, 2, 3]  # no noise drawn after the last step
    sig = FewStepSchedule().sigmas.tolist() + [0.0]
    for i in range(3):
        x0 = (xs[i].double() - sig[i] * vs[i].double()).float()
        torch.testing.assert_close(xs[i + 1], (1 - sig[i + 1]) * x0 + sig[i + 1] * noises[i + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(run.final(x), (xs[3].double() - 0.625 * vs[3].double()).float(), rtol=0, atol=0)
    assert run.done and torch.equal(run.x0, x)


def point_mass_velocity(x0):
    """Exact velocity when the data is the single point x0: v = (x_t - x0) / sigma."""
    return lambda x, s: ((x.double() - x0.double()) / s).to(x.dtype)


@pytest.mark.parametrize("kind, steps", [("few-step", 4), ("unipc", 8), ("unipc", 1), ("euler", 6)])
def test_point_mass_is_recovered(kind, steps):
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2, 3, 4, 4, 4, generator=g)
    noises = [torch.randn(2, 3, 4, 4, 4, generator=g) for _ in range(steps + 1)]
    smp = make_sampler(kind, steps)
    out = run_loop(smp, noises[0], point_mass_velocity(target), lambda k: noises[k])
    torch.testing.assert_close(out, target, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ UniPC facts
def test_unipc_8_step_model_timesteps_are_the_reference():
    smp = make_sampler("unipc", 8, shift=5.0)
    assert isinstance(smp, UniPCSampler)
    assert smp.model_timesteps.dtype == torch.float32
    assert [int(t) for t in smp.model_timesteps.tolist()] == MMPL_UNIPC_8
    assert smp.model_timesteps.tolist() == [float(t) for t in MMPL_UNIPC_8]  # integers, as the model sees them
    assert smp.start().scheduler.timesteps.tolist() == MMPL_UNIPC_8
    # by hand: int(1000 * warp(linspace(0.999, 0, 9)[:-1], 5)), truncated
    base = np.linspace(0.999, 0.0, 9)[:-1]
    assert [int(t) for t in (5 * base / (1 + 4 * base)) * 1000] == MMPL_UNIPC_8


def test_unipc_differs_from_diffusers_default_sigmas():
    from diffusers import UniPCMultistepScheduler

    default = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    default.set_timesteps(8)
    assert default.timesteps.tolist() == DIFFUSERS_DEFAULT_8
    ours = [int(t) for t in make_sampler("unipc", 8).model_timesteps.tolist()]
    assert ours != DIFFUSERS_DEFAULT_8
    assert [a - b for a, b in zip(DIFFUSERS_DEFAULT_8, ours)] == [0, 0, 0, 1, 0, 1, 1, 2]


def test_unipc_solver_uses_float_sigmas_and_reference_config():
    smp = make_sampler("unipc", 8)
    base = np.linspace(0.999, 0.0, 9)[:-1]
    warped = (5 * base / (1 + 4 * base)).astype(np.float32)
    assert smp.sigmas.tolist() == pytest.approx([*warped.tolist(), 0.0], abs=0, rel=0)
    sched = smp.start().scheduler
    assert sched.sigmas.tolist() == [*warped.tolist(), 0.0]
    cfg = sched.config
    assert cfg.prediction_type == "flow_prediction" and cfg.use_flow_sigmas
    assert cfg.solver_order == 2 and cfg.solver_type == "bh2" and cfg.predict_x0
    assert cfg.lower_order_final and cfg.final_sigmas_type == "zero" and list(cfg.disable_corrector) == []
    # float sigmas differ from the int timesteps the model gets
    assert smp.sigmas[3].item() * 1000 != int(smp.model_timesteps[3].item())


def test_unipc_fresh_per_stage():
    smp = make_sampler("unipc", 6)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 3, 4, 4, generator=g)
    vel = gaussian_velocity(0.3, 0.8)
    a = run_loop(smp, x, vel)
    b = run_loop(smp, x, vel)
    assert torch.equal(a, b)
    r1, r2 = smp.start(), smp.start()
    assert r1.scheduler is not r2.scheduler


# --------------------------------------------------------------------------------------- toy problem
def gaussian_velocity(mu, tau):
    """Exact velocity for data ~ N(mu, tau^2) per element: v = (x - E[x0 | x_s]) / s."""

    def vel(x, s):
        xd = x.double()
        post = mu + (1 - s) * tau**2 / ((1 - s) ** 2 * tau**2 + s**2) * (xd - (1 - s) * mu)
        return ((xd - post) / s).to(x.dtype)

    return vel


def ode_endpoint(noise, mu, tau, s0):
    """Exact probability-flow ODE solution from noise at sigma s0 to sigma 0 for N(mu, tau^2) data."""
    scale = math.sqrt((1 - s0) ** 2 * tau**2 + s0**2)
    return mu + tau / scale * (noise.double() - (1 - s0) * mu)


def ode_error(kind, steps, shift, noise, mu=0.7, tau=0.5):
    smp = make_sampler(kind, steps, shift)
    out = run_loop(smp, noise, gaussian_velocity(mu, tau))
    return (out.double() - ode_endpoint(noise, mu, tau, float(smp.sigmas[0]))).abs().max().item()


def test_unipc_and_euler_converge_on_gaussian_ode():
    noise = torch.randn(4, 3, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    # UniPC is second order: doubling the steps divides the error by about 4; Euler by about 2.
    u50, u100 = ode_error("unipc", 50, 1.0, noise), ode_error("unipc", 100, 1.0, noise)
    e50, e100 = ode_error("euler", 50, 1.0, noise), ode_error("euler", 100, 1.0, noise)
    assert u50 < 5e-3 and u100 < 1e-3 and u100 < u50 / 3
    assert e100 < e50 / 1.7 and e100 < 0.05
    assert u50 < e50 / 10
    # the released setting: 50 UniPC steps with shift 5
    assert ode_error("unipc", 50, 5.0, noise) < 1e-2


def test_euler_is_diffusers_flow_match_euler():
    smp = make_sampler("euler", 4, shift=3.0)
    assert isinstance(smp, EulerSampler)
    base = np.linspace(1.0, 0.0, 5)[:-1].astype(np.float32)
    warped = 3 * base / (1 + 2 * base)
    assert smp.sigmas.tolist() == pytest.approx([*warped.tolist(), 0.0], rel=1e-7)
    assert smp.model_timesteps.tolist() == pytest.approx((warped * 1000).tolist(), rel=1e-7)
    # one step is x + (sigma' - sigma) v
    x = torch.randn(1, 2, 3, 4, 4)
    v = torch.randn(1, 2, 3, 4, 4)
    run = smp.start()
    out = run.step(0, x, v)
    s0, s1 = smp.sigmas[0].item(), smp.sigmas[1].item()
    torch.testing.assert_close(out, x + (s1 - s0) * v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run.x0, x - s0 * v)


def test_multistep_keeps_dtype_and_low_rank_inputs():
    for kind in ("unipc", "euler"):
        smp = make_sampler(kind, 3)
        run = smp.start()
        x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
        assert run.step(0, x, torch.randn_like(x)).dtype == torch.bfloat16
        out = run_loop(smp, torch.randn(16), point_mass_velocity(torch.ones(16)))
        assert out.shape == (16,)


# ------------------------------------------------------------------------------------------- guidance
def test_guide_is_cfg():
    g = torch.Generator().manual_seed(6)
    u, c = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    torch.testing.assert_close(guide(u, c, 5.0), u + 5.0 * (c - u))
    torch.testing.assert_close(guide(u, c, 1.0), c)
    torch.testing.assert_close(guide(u, c, 0.0), u)
    with pytest.raises(ValueError, match="guidance"):
        guide(u, c, -1.0)
    with pytest.raises(TypeError, match="guidance"):
        guide(u, c, "5")


@pytest.mark.parametrize("kind", SAMPLERS)
def test_step_with_uncond_equals_step_with_guided_velocity(kind):
    g = torch.Generator().manual_seed(7)
    x, c, u, n = (torch.randn(1, 2, 3, 4, 4, generator=g) for _ in range(4))
    smp = make_sampler(kind, 4)
    a = smp.start().step(0, x, c, n, v_uncond=u, guidance=4.0)
    b = smp.start().step(0, x, u + 4.0 * (c - u), n)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------- defaults
def test_default_sampling():
    few = {"sampler": "few-step", "steps": 4, "shift": 5.0, "guidance": 1.0}
    multi = {"sampler": "unipc", "steps": 50, "shift": 5.0, "guidance": 5.0}
    for kind in ("self_forcing", "causvid", "tiny", "random"):
        assert default_sampling(kind) == few
    for kind in ("mmpl", "wan"):
        assert default_sampling(kind) == multi
    d = default_sampling("mmpl")
    d["steps"] = 1  # a fresh dict each call
    assert default_sampling("mmpl")["steps"] == 50
    smp = make_sampler(d["sampler"], 50, shift=d["shift"])
    assert smp.num_steps == 50 and smp.model_timesteps[0].item() == 999.0
    with pytest.raises(ValueError, match="unknown checkpoint kind 'sd15'"):
        default_sampling("sd15")
    with pytest.raises(TypeError):
        default_sampling(None)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (("ddim", 4), {}, ValueError, "unknown sampler 'ddim'"),
        ((3, 4), {}, TypeError, "kind"),
        (("unipc", 0), {}, ValueError, "steps"),
        (("unipc", -2), {}, ValueError, "steps"),
        (("euler", 0), {}, ValueError, "steps"),
        (("few-step", 0), {}, ValueError, "steps"),
        (("few-step", 2000), {}, ValueError, "steps"),
        (("unipc", 4.5), {}, TypeError, "steps"),
        (("unipc", True), {}, TypeError, "steps"),
        (("unipc", 8), {"shift": 0.0}, ValueError, "shift"),
        (("few-step", 4), {"shift": -5.0}, ValueError, "shift"),
        (("euler", 4), {"shift": float("nan")}, ValueError, "shift"),
        (("unipc", 4), {"shift": "5"}, TypeError, "shift"),
        (("few-step", (750, 1000)), {}, ValueError, "strictly decreasing"),
        (("few-step", (1000, 0)), {}, ValueError, r"in 1..1000"),
        (("few-step", ()), {}, ValueError, "at least one step"),
        (("few-step", (1000, 500.0)), {}, TypeError, "ints"),
        (("unipc", 8), {"num_train_timesteps": 0}, ValueError, "num_train_timesteps"),
    ],
)
def test_make_sampler_bad_args(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_sampler(*args, **kwargs)


def test_run_misuse():
    smp = make_sampler("few-step", 2)
    x = torch.randn(1, 2, 3, 4, 4)
    run = smp.start()
    with pytest.raises(ValueError, match="expected step 0, got step 1"):
        run.step(1, x, x, x)
    with pytest.raises(ValueError, match="re-noises"):
        run.step(0, x, x)  # the few-step rule needs noise before the last step
    with pytest.raises(ValueError, match="final: the run has taken 0 of 2 steps"):
        run.final(x)
    with pytest.raises(ValueError, match="v: expected x's shape"):
        run.step(0, x, x[:, :1], x)
    with pytest.raises(TypeError, match="v: expected a tensor"):
        run.step(0, x, 1.0, x)
    with pytest.raises(TypeError, match="i: expected an int"):
        run.step(0.0, x, x, x)
    with pytest.raises(ValueError, match="guidance"):
        run.step(0, x, x, x, guidance=-2.0)
    run.step(0, x, x, x)
    run.step(1, x, x)
    with pytest.raises(ValueError, match="no more steps"):
        run.step(2, x, x)
    with pytest.raises(ValueError, match="step_index"):
        FewStepSchedule().denoise(x, x, 4)
    u = make_sampler("unipc", 2).start()
    with pytest.raises(ValueError, match="expected step 0"):
        u.step(1, x, x)


def test_sampler_classes_and_repr():
    assert isinstance(make_sampler("few-step", 4), FewStepSampler)
    assert repr(make_sampler("unipc", 8)) == "UniPCSampler(steps=8, shift=5.0)"
    assert make_sampler("few-step", 4).steps == 4 and make_sampler("euler", 7).num_steps == 7
    assert FewStepSchedule() == FewStepSchedule((1000, 750, 500, 250), 5.0, 1000)
