"""SDEdit, inpainting (replacement, RePaint) and diffusion posterior sampling, all driven through
:func:`sdekit.sample`, so each runs with any fixed-grid registered solver on any forward SDE.

* :func:`sdedit` (Meng et al. 2022): noise a given image to ``t0`` with the forward marginal
  ``x_t0 = alpha(t0) x0 + sigma(t0) z`` and solve back from ``t_start = t0``.
* :func:`inpaint`: after every solver step to time ``t`` the known region is replaced by the
  observation noised to ``t`` with the forward marginal (Song et al. 2021, App. I.2, the
  "replacement" method; :func:`replacement` does the same for the observed spectral
  coordinates of any noise-free linear measurement with an SVD, e.g. super-resolution); with
  ``resample = r > 1`` RePaint's resampling (Lugmayr et al. 2022, Alg. 1 with jumps): the grid is
  cut into blocks of ``jump`` steps, each block is solved, noised back to its start with the forward
  transition ``x_a = (alpha_a / alpha_b) x_b + sqrt(sigma_a^2 - (alpha_a / alpha_b)^2 sigma_b^2) z``
  and solved again, ``r`` times in all.
* :func:`dps` (Chung et al. 2023, Alg. 1): after each step ``x_{i+1} -= zeta_i grad_{x_i}
  ||y - A(x0_hat(x_i))||^2`` with ``zeta_i = zeta / ||y - A(x0_hat(x_i))||`` per sample; the
  gradient goes through the network's x0 prediction by autograd at the step's first model call
  (no extra NFE), so ``A`` may be any differentiable, also non-linear, map.

Per-sample seeds: every random draw (initial state, solver noise, replacement noise, RePaint's
re-noising) comes from its own stream of each sample's seed, so a result does not depend on the
batch it is computed in.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import append_dims, check_seed, compute_dtype, is_real, require
from ..dynamics.parameterization import DiffusionModel, as_model, convert
from ..grids import make_grid
from ..integrate import DEFAULT_STEPS, Solution, check_projectable, configure, sample
from ..noise import SeededNoise, sample_seeds
from ..sde.base import ForwardSDE
from ..solvers.base import Solver, for_problem
from ..solvers.registry import get_solver
from .operators import SVDOperator, _as_bool_mask

# the streams of each sample's seed (see _streams)
_SOLVER, _START, _KNOWN, _RENOISE, _SEGMENT = 0, 1, 2, 3, 100


def _streams(seeds: Sequence[int], k: int) -> list[int]:
    """Per-sample seeds of stream ``k`` (a function of ``(seed_i, k)`` only)."""
    return [int(np.random.SeedSequence([int(s), k]).generate_state(1, np.uint64)[0]) >> 1
            for s in seeds]


def _base_seeds(seed: Any, seeds: Sequence[int] | None, n: int) -> list[int]:
    if seeds is None:
        check_seed("seed", seed)
        return sample_seeds(seed, n)
    seeds = list(seeds)
    require(len(seeds) == n, "seeds", f"(a list of {len(seeds)} seeds)",
            f"one seed per sample ({n})")
    for s in seeds:
        check_seed("seeds", s)
    return seeds


def _check_state(name: str, x: Any) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"{name} is invalid: expected a floating-point tensor of shape "
                         f"(batch, *event_shape), got {getattr(x, 'shape', type(x).__name__)}")
    require(bool(torch.isfinite(x).all()), name, "(a tensor with NaN or Inf)", "finite values")


def _check_measurement(y: Any, operator: Any, why: str = "") -> None:
    """``y`` a finite measurement ``(batch, *operator.obs_shape)`` of an :class:`SVDOperator`
    (``why``: what needs the SVD, appended to the error)."""
    _check_state("y", y)
    require(isinstance(operator, SVDOperator), "operator", type(operator).__name__,
            "an sdekit.inverse SVDOperator (Inpainting, SuperResolution, Denoising, "
            "MatrixOperator)" + why)
    if tuple(y.shape[1:]) != tuple(operator.obs_shape):
        raise ValueError(f"shape mismatch: y has shape {tuple(y.shape)} but {operator!r} "
                         f"measures (batch, *{tuple(operator.obs_shape)})")


def _coef(sde: ForwardSDE, t: float, like: Tensor) -> tuple[Tensor, Tensor]:
    tt = torch.tensor(float(t), dtype=torch.float64)
    return (append_dims(sde.alpha(tt), like.ndim).to(like),
            append_dims(sde.sigma(tt), like.ndim).to(like))


def _grid(sde: ForwardSDE, slv: Solver, grid: Any, steps: int | None, t_start: Any, t_end: Any,
          grid_options: dict[str, Any] | None) -> Tensor:
    if grid is None or isinstance(grid, str):
        steps = DEFAULT_STEPS if steps is None else steps
    times = make_grid(sde, slv.grid_for(sde) if grid is None else grid, steps, t_start, t_end,
                      **(grid_options or {}))
    if times.numel() - 1 < slv.min_steps:
        raise ValueError(f"steps={times.numel() - 1} is too few for solver {slv.name!r}: it "
                         f"needs at least {slv.min_steps}")
    return times


# --------------------------------------------------------------------------------- SDEdit
def sdedit(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor], x0: Tensor,
           t0: float, *, solver: str | Solver | None = None, steps: int | None = None,
           seed: int = 0, seeds: Sequence[int] | None = None, prediction: str = "eps",
           **sample_options: Any) -> Solution:
    """SDEdit (Meng et al. 2022): perturb ``x0`` to time ``t0`` with the forward marginal and
    solve the reverse SDE / probability-flow ODE back to ``t_min`` with ``solver``.

    Args:
        sde, model: the forward process and the model (as in :func:`sdekit.sample`).
        x0: the images to edit, ``(batch, *event_shape)``.
        t0: the time to noise to, ``t_min < t0 <= T``: small ``t0`` returns ``x0`` (almost)
            unchanged, ``t0 = T`` forgets it and samples the model's law.
        solver: as in :func:`sdekit.sample`, whose rule picks it where it is None (default):
            with no ``grid`` either, the option-free :func:`sdekit.solvers.default_config`.
        steps: steps from ``t0`` down to ``t_min`` (default 20) on the solver's grid.
        seed, seeds: per-sample seeds of the perturbation and of the solver's noise.
        sample_options: passed to :func:`sdekit.sample` (``grid``, ``denoise``, solver options..).

    Returns the :class:`sdekit.Solution` of the solve (measured NFE).
    """
    _check_state("x0", x0)
    require(is_real(t0) and sde.t_min < t0 <= sde.T, "t0", t0,
            f"a time in (t_min, T] = ({sde.t_min:g}, {sde.T:g}]")
    for k in ("t_start", "x_init", "shape", "noise"):
        require(k not in sample_options, k, sample_options.get(k), "not given: sdedit sets it")
    base = _base_seeds(seed, seeds, x0.shape[0])
    with torch.no_grad():
        x = x0.to(compute_dtype(x0.dtype))
        z = SeededNoise(_streams(base, _START)).randn(x)
        a, s = _coef(sde, t0, x)
        x_t0 = (a * x + s * z).to(x0.dtype)
    return sample(sde, model, x_t0, solver=solver, steps=steps, t_start=float(t0),
                  seeds=_streams(base, _SOLVER), prediction=prediction, **sample_options)


# ----------------------------------------------------------------------------- inpainting
def _check_mask(mask: Any, y: Tensor) -> Tensor:
    require(isinstance(mask, Tensor), "mask", type(mask).__name__,
            "a boolean tensor (True = known) of the state's event shape")
    if tuple(mask.shape) not in (tuple(y.shape[1:]), tuple(y.shape)):
        raise ValueError(f"shape mismatch: mask has shape {tuple(mask.shape)} but the state y has "
                         f"shape {tuple(y.shape)}: expected {tuple(y.shape[1:])} (one mask for "
                         f"all samples) or {tuple(y.shape)} (one per sample)")
    m = _as_bool_mask(mask).to(y.device)
    return m.expand(y.shape) if m.shape != y.shape else m


def inpaint(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor], y: Tensor,
            mask: Tensor, *, resample: int = 1, jump: int = 1,
            solver: str | Solver | None = None, steps: int | None = None,
            grid: str | Tensor | Sequence[float] | None = None,
            t_start: float | None = None, t_end: float | None = None,
            grid_options: dict[str, Any] | None = None, seed: int = 0,
            seeds: Sequence[int] | None = None, prediction: str = "eps",
            **solver_options: Any) -> Solution:
    """Inpainting with a known mask by replacement, optionally with RePaint's resampling.

    Args:
        y: the observed images ``(batch, *event_shape)``; only the entries where ``mask`` is
            True are used.
        mask: boolean (or 0/1) tensor, True where ``y`` is known; shape ``event_shape`` or
            ``y.shape``.
        resample: RePaint's ``r``: each block of ``jump`` steps is solved ``r`` times, noised
            back to its start in between (``r = 1``: plain replacement, one solve of the grid).
        jump: RePaint's jump length in steps (used when ``resample > 1``).
        solver, steps, grid, t_start, t_end, grid_options, solver_options: as in
            :func:`sdekit.sample` (a fixed-grid solver; a multistep solver restarts its history
            at each RePaint block), with its rule where ``solver`` is None (default; with no
            ``grid`` either, the option-free :func:`sdekit.solvers.default_config`). The NFE
            is about ``resample * steps * nfe_per_step``.
        seed, seeds: per-sample seeds.

    Returns a :class:`sdekit.Solution` whose ``x`` equals ``y`` on the known region and whose
    ``nfe`` is the measured total.
    """
    _check_state("y", y)
    m = _check_mask(mask, y)
    y_c = y.detach().to(compute_dtype(y.dtype))

    def replace(x: Tensor, a: Tensor, s: Tensor, noise: SeededNoise) -> Tensor:
        return torch.where(m, a * y_c.to(x) + s * noise.randn(x), x)

    return _replacement(sde, model, tuple(y.shape), y.dtype, y.device, replace,
                        lambda x: torch.where(m, y_c.to(x), x), resample, jump, solver, steps,
                        grid, t_start, t_end, grid_options, seed, seeds, prediction,
                        solver_options)


def replacement(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor], y: Tensor,
                operator: SVDOperator, *, resample: int = 1, jump: int = 1,
                solver: str | Solver | None = None, steps: int | None = None,
                grid: str | Tensor | Sequence[float] | None = None,
                t_start: float | None = None, t_end: float | None = None,
                grid_options: dict[str, Any] | None = None, seed: int = 0,
                seeds: Sequence[int] | None = None, prediction: str = "eps",
                **solver_options: Any) -> Solution:
    """Replacement (and RePaint) for a noise-free linear measurement ``y = H x`` with an SVD:
    after every step the observed spectral coordinates ``(V^T x)_i = alpha y_bar_i + sigma z``
    (``y_bar = diag(s)^-1 U^T y``) are replaced, the rest kept; the result is consistent with
    ``y`` (``H x = y``). For :class:`Inpainting` this is :func:`inpaint`; for
    :class:`SuperResolution` the block means are replaced. Arguments as in :func:`inpaint`,
    with ``y`` the measurement ``(batch, *operator.obs_shape)``."""
    _check_measurement(y, operator)
    require(bool((operator.s > 0).all()), "operator", operator,
            "an operator without zero singular values (its observed directions are replaced)")
    m = operator.rank
    yb = (operator.Ut(y.detach().double()) / operator.s).to(compute_dtype(y.dtype))

    def replace(x: Tensor, a: Tensor | None, s: Tensor | None, noise: SeededNoise | None
                ) -> Tensor:
        """The observed coordinates of ``x`` set to ``y_bar`` (with noise: to ``a y_bar + s z``,
        the forward process's marginal at the current time)."""
        xb = operator.Vt(x.reshape(x.shape[0], -1))
        if noise is None:
            obs = yb.to(xb)
        else:
            assert a is not None and s is not None  # given with the noise
            obs = a.reshape(-1, 1) * yb.to(xb) + s.reshape(-1, 1) * noise.randn(xb[:, :m])
        return operator.V(torch.cat([obs, xb[:, m:]], 1)).reshape(x.shape)

    shape = (y.shape[0],) + tuple(operator.event_shape)
    return _replacement(sde, model, shape, y.dtype, y.device, replace,
                        lambda x: replace(x, None, None, None), resample, jump, solver, steps,
                        grid, t_start, t_end, grid_options, seed, seeds, prediction,
                        solver_options)


def _replacement(sde: ForwardSDE, model: Any, shape: tuple[int, ...], dtype: torch.dtype,
                 device: Any, replace: Callable[..., Tensor], final: Callable[[Tensor], Tensor],
                 resample: Any, jump: Any, solver: Any, steps: Any, grid: Any, t_start: Any,
                 t_end: Any, grid_options: Any, seed: Any, seeds: Any, prediction: str,
                 solver_options: dict[str, Any]) -> Solution:
    """The loop shared by :func:`inpaint` and :func:`replacement`: ``replace(x, alpha, sigma,
    noise)`` puts the measurement, noised to the current time, into the state after each step;
    ``final`` puts it in exactly at the end."""
    for k, v in (("resample", resample), ("jump", jump)):
        require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, k, v, "an integer >= 1")
    dm = as_model(model, sde, prediction)
    solver, solver_options, grid, grid_options = configure(sde, solver, steps, grid,
                                                           grid_options, solver_options)
    slv = for_problem(get_solver(solver, **solver_options), sde, dm, shape)
    check_projectable(slv, final)
    times = _grid(sde, slv, grid, steps, t_start, t_end, grid_options)
    n_steps = times.numel() - 1
    if resample > 1:
        require(slv.min_steps <= jump <= n_steps, "jump", jump,
                f"an integer in [{slv.min_steps}, steps={n_steps}] (solver {slv.name!r} needs "
                f"at least {slv.min_steps} steps per block)")
    base = _base_seeds(seed, seeds, shape[0])
    known_noise = SeededNoise(_streams(base, _KNOWN))
    renoise = SeededNoise(_streams(base, _RENOISE))

    def at(x: Tensor, t: float) -> Tensor:
        a, s = _coef(sde, t, x)
        return replace(x, a, s, known_noise)

    with torch.no_grad():
        scale = sde.prior_std if t_start is None and not _explicit(grid) else \
            sde.marginal_std(times[0])
        z = torch.empty(shape, dtype=compute_dtype(dtype), device=device)
        x = at(scale * SeededNoise(_streams(base, _START)).randn(z), float(times[0]))
        blk = jump if resample > 1 else n_steps
        edges = list(range(0, n_steps, blk)) + [n_steps]
        if len(edges) > 2 and edges[-1] - edges[-2] < slv.min_steps:
            edges.pop(-2)   # a last block too short for the solver joins the one before
        nfe, seg = 0, 0
        for a_i, b_i in itertools.pairwise(edges):
            for r in range(resample):
                sol = sample(sde, dm, x.to(dtype), solver=slv, grid=times[a_i:b_i + 1],
                             seeds=_streams(base, _SEGMENT + seg),
                             project=lambda i, t, x: at(x, t))
                nfe, seg, x = nfe + sol.nfe, seg + 1, sol.x.to(z.dtype)
                if r < resample - 1:   # jump back to the block's start
                    x = _renoise(sde, x, float(times[b_i]), float(times[a_i]), renoise)
        x = final(x)
    return Solution(x=x.to(dtype), nfe=nfe, steps=n_steps * resample, times=times,
                    solver=slv.name)


def _explicit(grid: Any) -> bool:
    return grid is not None and not isinstance(grid, str)


def _renoise(sde: ForwardSDE, x: Tensor, t_from: float, t_to: float, noise: SeededNoise
             ) -> Tensor:
    """The forward transition from ``t_from`` to a later ``t_to``: ``x_to = (alpha_to /
    alpha_from) x + sqrt(sigma_to^2 - (alpha_to / alpha_from)^2 sigma_from^2) z``."""
    a0, s0 = _coef(sde, t_from, x)
    a1, s1 = _coef(sde, t_to, x)
    r = a1 / a0
    return r * x + (s1 * s1 - r * r * s0 * s0).clamp_min(0).sqrt() * noise.randn(x)


# ------------------------------------------------------------- diffusion posterior sampling
class _DPSModel(DiffusionModel):
    """The model with DPS's measurement gradient taken at the first call after each re-arm: that
    call runs with autograd on its input, forms ``x0_hat``, the residual ``y - A(x0_hat)`` and
    ``grad_x ||y - A(x0_hat)||^2`` (kept for the step's correction); its output is detached.
    The network calls are the base model's (same counter)."""

    def __init__(self, base: DiffusionModel, y: Tensor, operator: Callable[[Tensor], Tensor]
                 ) -> None:
        self.__dict__.update(base.__dict__)   # net (and its NFE counter), sde, prediction, memo
        self.base, self.y, self.operator = base, y, operator
        self.armed = True
        self.grad: Tensor | None = None
        self.res_norm: Tensor | None = None

    def predict(self, x: Tensor, t: Any, kind: str, input_dtype: torch.dtype | None = None,
                coeffs: Any = None) -> Tensor:
        if not self.armed:
            return self.base.predict(x, t, kind, input_dtype, coeffs)
        self.armed = False
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = self.base.predict(xg, t, kind, input_dtype, coeffs)
            dots = kind == "flow"
            x0 = convert(kind, "x0", out, xg, *self.base._coeffs(xg, t, dots))
            r = (self.y.to(x0) - self.operator(x0)).reshape(x.shape[0], -1)
            loss = (r * r).sum(1)
            (g,) = torch.autograd.grad(loss.sum(), xg)
        self.grad, self.res_norm = g.detach(), loss.detach().sqrt()
        return out.detach()

    def correct(self, x: Tensor, zeta: float) -> Tensor:
        """``x - zeta / ||r|| grad ||r||^2`` per sample, then re-arm for the next step."""
        if self.grad is None or self.res_norm is None:
            raise RuntimeError("DPS: no model call was made during the step")
        step = zeta / self.res_norm.clamp_min(torch.finfo(self.res_norm.dtype).tiny)
        x = x - append_dims(step, x.ndim).to(x) * self.grad.to(x)
        self.armed, self.grad = True, None
        return x


def dps(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor], y: Tensor,
        operator: Callable[[Tensor], Tensor], *, zeta: float = 1.0,
        # not sample()'s rule: DPS is the paper's correction of a DDPM (ancestral) step, and its
        # zeta (once per step) was tuned for that sampler
        shape: Sequence[int] | None = None, solver: str | Solver = "ancestral",
        steps: int | None = None, seed: int = 0, seeds: Sequence[int] | None = None,
        prediction: str = "eps", **sample_options: Any) -> Solution:
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1) for ``y = A(x) + noise``.

    After every solver step from ``x_i`` the state is moved by ``-zeta_i grad_{x_i}
    ||y - A(x0_hat(x_i))||^2`` with ``zeta_i = zeta / ||y - A(x0_hat(x_i))||`` (per sample; the
    paper's normalisation, App. C.2), the gradient taken through the network by autograd at the
    first model call of the step (for single-call solvers the call at ``x_i``; no extra NFE).

    Args:
        y: the measurement, ``(batch, *obs_shape)``.
        operator: ``A``, a differentiable map ``(batch, *event_shape) -> (batch, *obs_shape)``:
            an :class:`SVDOperator` or any (non-linear) callable.
        zeta: the step size ``zeta'`` (> 0). As in the paper it acts once per step, so its
            best value depends on the number of steps.
        shape: the state's shape ``(batch, *event_shape)``; default ``(batch,
            *operator.event_shape)`` for an operator that declares it.
        solver: a fixed-grid solver (default ``ancestral``, the paper's DDPM sampler).
        sample_options: passed to :func:`sdekit.sample`.
    """
    _check_state("y", y)
    require(is_real(zeta) and zeta > 0, "zeta", zeta, "a finite number > 0")
    require(callable(operator), "operator", type(operator).__name__,
            "a callable A(x) -> y (e.g. an sdekit.inverse SVDOperator)")
    if shape is None:
        ev = getattr(operator, "event_shape", None)
        require(ev is not None, "shape", shape, "the state's shape (batch, *event_shape): the "
                "operator does not declare its event_shape")
        assert ev is not None  # required just above
        shape = (y.shape[0],) + tuple(ev)
    shape = tuple(shape)
    require(len(shape) >= 2 and shape[0] == y.shape[0] and all(
        isinstance(d, int) and d >= 1 for d in shape), "shape", shape,
        f"(batch, *event_shape) of integers >= 1 with batch = y's batch ({y.shape[0]})")
    for k in ("x_init", "project", "grad"):
        require(k not in sample_options, k, sample_options.get(k), "not given: dps sets it")
    with torch.no_grad():
        probe = operator(torch.zeros((1,) + shape[1:], dtype=compute_dtype(y.dtype),
                                     device=y.device))
    if not isinstance(probe, Tensor) or tuple(probe.shape[1:]) != tuple(y.shape[1:]):
        got = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(f"shape mismatch: the operator maps a state of shape (1, *{shape[1:]}) "
                         f"to {got} but y has shape {tuple(y.shape)}: expected "
                         f"(batch, *{tuple(y.shape[1:])})")
    dm = _DPSModel(as_model(model, sde, prediction), y.detach(), operator)
    base = _base_seeds(seed, seeds, y.shape[0])
    return sample(sde, dm, shape=shape, solver=solver, steps=steps, seeds=base,
                  project=lambda i, t, x: dm.correct(x, float(zeta)), dtype=y.dtype,
                  device=y.device, **sample_options)


__all__ = ["dps", "inpaint", "replacement", "sdedit"]
