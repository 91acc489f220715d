"""Sampling: timestep schedules and per-stage update rules, as plain objects an engine loops over.

Flow matching throughout: ``x_t = (1 - sigma) x0 + sigma noise``, the model predicts the velocity
``v = noise - x0``, so ``x0 = x_t - sigma v``. Timesteps are ``1000 * sigma`` (``num_train_timesteps``).

How an engine runs one stage (a fresh run per stage; no state crosses stages)::

    run = sampler.start()
    x = noise(0)
    for i, t in enumerate(run.timesteps.tolist()):      # what the model receives, float32 values
        v = model(x, t)                                  # with guidance: v = guide(v_uncond, v_cond, g)
        x = run.step(i, x, v, lambda: noise(i + 1))      # noise is drawn only if the rule needs it
    clean = run.final(x)                                 # then one model pass at CACHE_TIMESTEP (t = 0)

Samplers (`make_sampler`):

``"few-step"`` (Self-Forcing / CausVid weights), `FewStepSchedule`:
    * steps ``(1000, 750, 500, 250)`` index a 1000-entry training table: Self-Forcing's
      ``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True)``,
      i.e. ``sigma_k = warp(linspace(1, 0, 1001)[:-1][k], 5)`` and ``t_k = 1000 sigma_k``, all in float32;
      step s is entry ``1000 - s``, giving the warped timesteps ``[1000, 937.5, 833.33, 625]`` (float32);
    * ``x0 = x_t - sigma v`` in float64, sigma looked up at the table's nearest training timestep;
    * next ``x = (1 - sigma') x0 + sigma' noise`` in float32 (fresh noise every step);
    * a block's result is the x0 of its last step (t = 625); the engine then runs it once more at t = 0.

``"unipc"`` (MMPL / Wan released weights), diffusers' `UniPCMultistepScheduler`, a fresh one per stage:
    flow prediction, order 2, bh2, x0-predicting, lower order at the final step, corrector on, final sigma 0;
    sigmas set explicitly: ``linspace(0.999, 0, N + 1)[:-1]`` warped by the shift (0.999 = 1 - 1/1000, as
    the authors' solver); the model receives ``int(1000 sigma)`` (truncated: 999, 972, 937, 892, 833, 749,
    624, 416 for 8 steps; diffusers' default flow sigmas start at 1.0 and give 893, 750, 625, 418 there), the
    solver uses the float sigmas and evaluates the model at the predicted (uncorrected) sample.

``"euler"``: diffusers' `FlowMatchEulerDiscreteScheduler` (not rewritten) with sigmas
    ``linspace(1, 0, N + 1)[:-1]`` warped by the shift; the model receives ``1000 sigma`` (float32).

The diffusers solvers run in float32 (inputs are upcast, outputs cast back to x's dtype), as the released
Wan / MMPL code keeps float32 latents. Classifier-free guidance: ``v = u + g (c - u)`` (`guide`, through
`mmpl_fast.kernels.cfg_combine`), each branch with its own KV cache (the engine's business).

Layer: imports only `mmpl_fast.kernels` (and diffusers, lazily, for the multistep solvers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .kernels import cfg_combine, denoise_update

SAMPLERS = ("few-step", "unipc", "euler")
#: Timestep of the extra model pass that writes a finished stage's clean keys/values into the cache.
CACHE_TIMESTEP = 0.0
#: Self-Forcing's 4-step list (before warping).
SELF_FORCING_STEPS = (1000, 750, 500, 250)

_FEW_STEP = {"sampler": "few-step", "steps": 4, "shift": 5.0, "guidance": 1.0}
_MULTISTEP = {"sampler": "unipc", "steps": 50, "shift": 5.0, "guidance": 5.0}
# The embedded model (trained on the procedural world by flow matching, not distilled): a multistep solver,
# with the shift it was trained with (3: its 8x8 latents need less than Wan's 5) and moderate guidance.
_WORLD = {"sampler": "unipc", "steps": 20, "shift": 3.0, "guidance": 3.0}
#: Sampling defaults per checkpoint kind: few-step distilled weights (and the tiny / random test models) use
#: Self-Forcing's 4 steps without guidance; the MMPL released weights (and plain Wan) 50 UniPC steps, shift 5,
#: guidance 5.
DEFAULTS: dict[str, dict] = {
    "self_forcing": _FEW_STEP,
    "causvid": _FEW_STEP,
    "tiny": _FEW_STEP,
    "random": _FEW_STEP,
    "mmpl": _MULTISTEP,
    "wan": _MULTISTEP,
    "world": _WORLD,
}

Noise = torch.Tensor | Callable[[], torch.Tensor] | None


# ------------------------------------------------------------------------------------------- checks
def _check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real):
        raise TypeError(f"shift: expected a positive number, got {type(shift).__name__}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift: expected a finite number > 0, got {shift!r}")
    return float(shift)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _check_guidance(guidance) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"guidance: expected a number >= 0, got {type(guidance).__name__}")
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance: expected a finite number >= 0, got {guidance!r}")
    return float(guidance)


def _check_pair(x, v) -> None:
    for name, t in (("x", x), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if x.shape != v.shape:
        raise ValueError(f"v: expected x's shape {tuple(x.shape)}, got {tuple(v.shape)}")


# ------------------------------------------------------------------------------------ schedule math
def warp_sigma(sigma, shift: float):
    """The timestep shift ``shift * s / (1 + (shift - 1) * s)`` (float, numpy array or tensor; dtype kept).

    Maps 0 -> 0 and 1 -> 1; shift > 1 spends more steps at high noise.
    """
    shift = _check_shift(shift)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real | np.ndarray | torch.Tensor):
        raise TypeError(f"sigma: expected a float, array or tensor, got {type(sigma).__name__}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_table(shift: float = 5.0, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-Forcing's training table: ``(timesteps, sigmas)``, float32 ``[num_train_timesteps]`` on the CPU.

    ``sigmas = warp(linspace(1, 0, T + 1)[:-1], shift)`` and ``timesteps = T * sigmas``, computed in float32
    in the reference's order (``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` with
    ``set_timesteps(T, training=True)``). Entry k is the few-step list's step ``T - k``.
    """
    shift = _check_shift(shift)
    n = _check_positive_int("num_train_timesteps", num_train_timesteps)
    base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
    sigmas = shift * base / (1 + (shift - 1) * base)
    return sigmas * n, sigmas


def lookup_sigma(timestep, shift: float = 5.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigma (float64) at the training timestep nearest to each `timestep` (a float or a tensor of any shape).

    This is how Self-Forcing converts its velocity to x0: ``argmin |table_t - t|`` in float64, first index on
    ties.
    """
    table_t, table_s = training_table(shift, num_train_timesteps)
    t = torch.as_tensor(timestep, dtype=torch.float64).cpu()
    idx = torch.argmin((table_t.double().reshape(1, -1) - t.reshape(-1, 1)).abs(), dim=1)
    return table_s.double()[idx].reshape(t.shape)


def few_step_list(steps: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """Evenly spaced integer steps ``round(T (1 - i / N))``: N = 4 gives Self-Forcing's (1000, 750, 500, 250)."""
    n = _check_positive_int("steps", steps)
    total = _check_positive_int("num_train_timesteps", num_train_timesteps)
    if n > total:
        raise ValueError(f"steps: at most num_train_timesteps={total} few-step steps, got {n}")
    return tuple(round(total * (1 - i / n)) for i in range(n))


@dataclass(frozen=True)
class FewStepSchedule:
    """Self-Forcing's few-step schedule and update (see the module docstring for the facts).

    Args:
        steps: decreasing integer steps in ``1..num_train_timesteps`` (before warping); entry ``T - s`` of the
            training table gives step s's timestep and sigma.
        shift: timestep shift of the training table.
        num_train_timesteps: T, the training table's length.

    Attributes:
        timesteps: float32 ``[len(steps)]``, what the model receives (``[1000, 937.5, 833.33, 625]`` by default).
        sigmas: float64 ``[len(steps)]``, sigma of each step, looked up at the nearest training timestep.
    """

    steps: tuple[int, ...] = SELF_FORCING_STEPS
    shift: float = 5.0
    num_train_timesteps: int = 1000
    timesteps: torch.Tensor = field(init=False, repr=False, compare=False)
    sigmas: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        total = _check_positive_int("num_train_timesteps", self.num_train_timesteps)
        shift = _check_shift(self.shift)
        if isinstance(self.steps, (str, bytes)) or not isinstance(self.steps, Sequence):
            raise TypeError(f"steps: expected a sequence of ints, got {type(self.steps).__name__}")
        steps = tuple(self.steps)
        if not steps:
            raise ValueError("steps: expected at least one step")
        for s in steps:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise TypeError(f"steps: expected ints, got {s!r}")
            if not 1 <= s <= total:
                raise ValueError(f"steps: every step must be in 1..{total}, got {s}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps: must be strictly decreasing, got {steps}")
        steps = tuple(int(s) for s in steps)
        table_t, _ = training_table(shift, total)
        timesteps = table_t[[total - s for s in steps]].clone()
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "sigmas", lookup_sigma(timesteps, shift, total))

    def __len__(self) -> int:
        return len(self.steps)

    def sigma_at(self, timestep) -> torch.Tensor:
        """Sigma (float64) at the nearest training timestep (float or tensor)."""
        return lookup_sigma(timestep, self.shift, self.num_train_timesteps)

    def denoise(
        self,
        x_t: torch.Tensor,
        v: torch.Tensor,
        step_index: int,
        noise: torch.Tensor | None = None,
        *,
        v_uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One few-step update: ``(x0, x_next)``.

        ``x0 = x_t - sigma_i v`` (float64, stored in x_t's dtype); ``x_next = (1 - sigma_{i+1}) x0 + sigma_{i+1}
        noise`` (float32) when `noise` is given and step `step_index` is not the last, else None. With
        `v_uncond`, v is the guided ``v_uncond + guidance (v - v_uncond)`` (fused in the kernel).
        """
        _check_pair(x_t, v)
        i = self._index(step_index)
        guidance = _check_guidance(guidance)
        sigma = float(self.sigmas[i])
        last = i == len(self.steps) - 1
        if noise is None or last:
            return denoise_update(x_t, v, sigma, v_uncond=v_uncond, guidance=guidance)
        return denoise_update(x_t, v, sigma, float(self.sigmas[i + 1]), noise, v_uncond=v_uncond, guidance=guidance)

    def _index(self, step_index) -> int:
        if isinstance(step_index, bool) or not isinstance(step_index, numbers.Integral):
            raise TypeError(f"step_index: expected an int, got {type(step_index).__name__}")
        if not 0 <= step_index < len(self.steps):
            raise ValueError(f"step_index: expected 0..{len(self.steps) - 1}, got {step_index}")
        return int(step_index)


def guide(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance ``v_uncond + guidance * (v_cond - v_uncond)`` (kernels' `cfg_combine`, float32)."""
    return cfg_combine(v_uncond, v_cond, _check_guidance(guidance))


# ------------------------------------------------------------------------------------------ samplers
class SamplerRun:
    """The state of one stage's denoising (fresh per stage). Built by `Sampler.start`.

    Attributes:
        timesteps: float32 ``[num_steps]``: what the model receives at each step.
        sigmas: float64 ``[num_steps + 1]``: the noise level of the sample at each step, then 0.
        x0: the latest clean estimate (None before the first step).
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.timesteps = sampler.model_timesteps.clone()
        self.sigmas = sampler.sigmas.clone()
        self._x0: torch.Tensor | None = None
        self._next = 0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def x0(self) -> torch.Tensor | None:
        """The latest clean estimate ``x - sigma v`` (None before the first step)."""
        return self._x0

    @property
    def done(self) -> bool:
        """True once every step has been taken."""
        return self._next == self.num_steps

    def step(
        self,
        i: int,
        x: torch.Tensor,
        v: torch.Tensor,
        noise: Noise = None,
        *,
        v_uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Step `i` (steps are taken in order, once): from x at ``timesteps[i]`` and the model's velocity v.

        Args:
            i: the step index; must be the next one.
            x, v: the sample and the model's velocity at it, equal shapes ``[B, F, ...]``.
            noise: fresh noise for rules that re-noise (few-step): a tensor of x's shape, or a zero-argument
                callable returning one (called only when needed); None is fine for the others.
            v_uncond, guidance: optional classifier-free guidance applied here, ``v_uncond + g (v - v_uncond)``
                (an engine may instead combine itself with `guide`).

        Returns:
            the sample for step ``i + 1``; after the last step, the stage's clean latents (x's dtype).
        """
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"i: expected an int step index, got {type(i).__name__}")
        if self.done or i != self._next:
            expected = "no more steps (call sampler.start() for a new stage)" if self.done else f"step {self._next}"
            raise ValueError(f"i: expected {expected}, got step {i}")
        _check_pair(x, v)
        if v_uncond is not None:
            v = guide(v_uncond, v, guidance)
        else:
            _check_guidance(guidance)
        out = self._step(int(i), x, v, noise)
        self._next += 1
        return out

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's clean latents from the last step's output (x itself: every rule here ends at sigma 0)."""
        if not self.done:
            raise ValueError(f"final: the run has taken {self._next} of {self.num_steps} steps")
        return x

    def _step(self, i: int, x: torch.Tensor, v: torch.Tensor, noise: Noise) -> torch.Tensor:
        raise NotImplementedError


class Sampler:
    """A timestep schedule plus an update rule. `start` gives a fresh `SamplerRun` for each stage.

    Attributes:
        kind: one of `SAMPLERS`.
        num_steps: model calls per stage (the t = 0 cache pass not counted).
        shift: the timestep shift.
        model_timesteps: float32 ``[num_steps]``: what the model receives per step.
        sigmas: float64 ``[num_steps + 1]``: the sample's noise level before each step, then 0.
    """

    kind: str = ""

    def __init__(self, shift: float, model_timesteps: torch.Tensor, sigmas: torch.Tensor):
        self.shift = shift
        self.model_timesteps = model_timesteps.to(torch.float32)
        self.sigmas = sigmas.to(torch.float64)

    @property
    def num_steps(self) -> int:
        return len(self.model_timesteps)

    @property
    def steps(self) -> int:
        return self.num_steps

    def start(self, device: torch.device | str | None = None) -> SamplerRun:
        """A fresh run for one stage; `device`: where its samples live (tables a step reads are kept there)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.num_steps}, shift={self.shift})"


class _FewStepRun(SamplerRun):
    sampler: FewStepSampler

    def _step(self, i, x, v, noise):
        schedule = self.sampler.schedule
        if i == len(schedule) - 1:
            x0, _ = schedule.denoise(x, v, i)
            self._x0 = x0
            return x0
        n = noise() if callable(noise) else noise
        if not isinstance(n, torch.Tensor):
            raise ValueError(f"noise: the few-step sampler re-noises after step {i}: pass a tensor or a callable")
        x0, x_next = schedule.denoise(x, v, i, n)
        self._x0 = x0
        return x_next


class FewStepSampler(Sampler):
    """Self-Forcing's few-step sampler over a `FewStepSchedule` (the block's result is its last x0)."""

    kind = "few-step"

    def __init__(self, steps: Sequence[int] = SELF_FORCING_STEPS, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.schedule = FewStepSchedule(tuple(steps), shift, num_train_timesteps)
        sigmas = torch.cat([self.schedule.sigmas, torch.zeros(1, dtype=torch.float64)])
        super().__init__(self.schedule.shift, self.schedule.timesteps, sigmas)

    def denoise(self, x_t, v, step_index, noise=None, **kwargs):
        """`FewStepSchedule.denoise`: ``(x0, x_next | None)`` for one step, stateless."""
        return self.schedule.denoise(x_t, v, step_index, noise, **kwargs)

    def start(self, device: torch.device | str | None = None) -> SamplerRun:
        return _FewStepRun(self)

    def __repr__(self) -> str:
        return f"FewStepSampler(steps={self.schedule.steps}, shift={self.shift})"


class _DiffusersRun(SamplerRun):
    """A run driving one fresh diffusers scheduler (float32)."""

    def __init__(self, sampler: _DiffusersSampler, device: torch.device | str | None = None):
        super().__init__(sampler)
        self.scheduler = sampler._fresh()
        if device is not None and sampler.sigmas_on_device:
            # UniPC copies sigma entries to the sample's device several times per step, each a blocking
            # host-to-device copy (a host sync on a GPU); with the table there already they copy nothing.
            self.scheduler.sigmas = self.scheduler.sigmas.to(device)
        self._last: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def x0(self) -> torch.Tensor | None:
        """``x - sigma v`` of the latest step (float32; computed on access)."""
        if self._last is None:
            return None
        x, v, sigma = self._last
        return x.float() - sigma * v.float()

    def _step(self, i, x, v, noise):
        sched = self.scheduler
        shape = x.shape
        xf, vf = x.float(), v.float()
        if x.dim() < 2:  # diffusers' UniPC stacks its history on dim 1: give it a batch dim
            xf, vf = xf.reshape(1, -1), vf.reshape(1, -1)
        out = sched.step(vf, sched.timesteps[i], xf, return_dict=False)[0]
        self._last = (x, v, float(self.sigmas[i]))
        return out.reshape(shape).to(x.dtype)


class _DiffusersSampler(Sampler):
    sigmas_on_device = False  # does a run keep the scheduler's sigma table on the samples' device?

    def __init__(self, steps: int, shift: float, num_train_timesteps: int):
        self.num_train_timesteps = _check_positive_int("num_train_timesteps", num_train_timesteps)
        steps = _check_positive_int("steps", steps)
        shift = _check_shift(shift)
        self._steps, self.shift = steps, shift
        probe = self._fresh()
        super().__init__(shift, probe.timesteps.to(torch.float32), probe.sigmas.to(torch.float64))

    def _base_sigmas(self) -> np.ndarray:
        raise NotImplementedError

    def _make(self):
        raise NotImplementedError

    def _fresh(self):
        sched = self._make()
        sched.set_timesteps(sigmas=self._base_sigmas(), device="cpu")
        sched.set_begin_index(0)
        return sched

    def start(self, device: torch.device | str | None = None) -> SamplerRun:
        return _DiffusersRun(self, device)


class UniPCSampler(_DiffusersSampler):
    """MMPL's multistep sampler: diffusers' `UniPCMultistepScheduler` for flow matching, fresh per stage.

    Order 2, bh2, x0-predicting, lower order at the final step, corrector on, final sigma 0; sigmas
    ``warp(linspace(0.999, 0, N + 1)[:-1], shift)``; the model receives ``int(1000 sigma)``.
    """

    kind = "unipc"
    sigmas_on_device = True

    def __init__(self, steps: int = 50, shift: float = 5.0, num_train_timesteps: int = 1000):
        super().__init__(steps, shift, num_train_timesteps)

    def _base_sigmas(self) -> np.ndarray:
        # The authors' solver: sigma_max = 1 - 1/T (0.999), sigma_min = 0; diffusers applies flow_shift to these.
        sigma_max = 1.0 - 1.0 / self.num_train_timesteps
        return np.linspace(sigma_max, 0.0, self._steps + 1)[:-1].copy()

    def _make(self):
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(
            num_train_timesteps=self.num_train_timesteps,
            solver_order=2,
            prediction_type="flow_prediction",
            predict_x0=True,
            solver_type="bh2",
            lower_order_final=True,
            disable_corrector=[],
            use_flow_sigmas=True,
            flow_shift=self.shift,
            final_sigmas_type="zero",
        )


class EulerSampler(_DiffusersSampler):
    """Flow-matching Euler through diffusers' `FlowMatchEulerDiscreteScheduler`, sigmas
    ``warp(linspace(1, 0, N + 1)[:-1], shift)``, the model receiving ``1000 sigma``."""

    kind = "euler"

    def __init__(self, steps: int = 50, shift: float = 5.0, num_train_timesteps: int = 1000):
        super().__init__(steps, shift, num_train_timesteps)

    def _base_sigmas(self) -> np.ndarray:
        return np.linspace(1.0, 0.0, self._steps + 1)[:-1].copy()

    def _make(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)


# ----------------------------------------------------------------------------------------- factories
def make_sampler(
    kind: str, steps: int | Sequence[int] | None = None, shift: float = 5.0, *, num_train_timesteps: int = 1000
) -> Sampler:
    """A sampler by name.

    Args:
        kind: ``"few-step"`` (Self-Forcing), ``"unipc"`` (MMPL / Wan) or ``"euler"``.
        steps: model calls per stage (default 4 for few-step, 50 otherwise). For few-step, an int N gives the
            evenly spaced list ``round(1000 (1 - i / N))`` (4 -> 1000, 750, 500, 250), or pass the list itself.
        shift: timestep shift (> 0).
        num_train_timesteps: T, timesteps = T * sigma.
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind: expected one of {', '.join(SAMPLERS)}, got {type(kind).__name__}")
    if kind not in SAMPLERS:
        raise ValueError(f"kind: unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
    _check_shift(shift)
    if kind == "few-step":
        if steps is None:
            steps = SELF_FORCING_STEPS
        elif not isinstance(steps, Sequence):
            steps = few_step_list(steps, num_train_timesteps)
        return FewStepSampler(steps, shift, num_train_timesteps)
    if steps is None:
        steps = 50
    return (UniPCSampler if kind == "unipc" else EulerSampler)(steps, shift, num_train_timesteps)


def default_sampling(kind: str) -> dict:
    """Sampling defaults for a checkpoint kind: ``{"sampler", "steps", "shift", "guidance"}`` (a fresh dict).

    ``self_forcing`` / ``causvid`` / ``tiny`` / ``random``: few-step, 4 steps, shift 5, guidance 1 (none);
    ``mmpl`` / ``wan``: UniPC, 50 steps, shift 5, guidance 5; ``world`` (the embedded model): UniPC, 20 steps,
    shift 3, guidance 3.
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind: expected a checkpoint kind ({', '.join(DEFAULTS)}), got {type(kind).__name__}")
    if kind not in DEFAULTS:
        raise ValueError(f"kind: unknown checkpoint kind {kind!r}; choose one of {', '.join(DEFAULTS)}")
    return dict(DEFAULTS[kind])


__all__ = [
    "CACHE_TIMESTEP",
    "DEFAULTS",
    "SAMPLERS",
    "SELF_FORCING_STEPS",
    "EulerSampler",
    "FewStepSampler",
    "FewStepSchedule",
    "Sampler",
    "SamplerRun",
    "UniPCSampler",
    "default_sampling",
    "few_step_list",
    "guide",
    "lookup_sigma",
    "make_sampler",
    "training_table",
    "warp_sigma",
]
