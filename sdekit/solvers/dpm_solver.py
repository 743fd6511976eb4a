"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction): multistep, singlestep
("fast" order schedule), adaptive, and the SDE variants; all on any forward SDE through alpha,
sigma and lambda (see :mod:`sdekit.solvers.exp_integrator`)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor

from .._utils import is_int, is_number
from .base import AdaptiveSolver, FixedGridSolver, ModelOutput, OneCallStepper, Problem
from .exp_integrator import (
    ExpIntegrator,
    Outputs,
    ThresholdingOptions,
    block_plan,
    ei_weights,
    ei_weights_per_step,
    phi,
    push,
)
from .registry import register

if TYPE_CHECKING:
    from typing_extensions import Unpack

SOLVER_TYPES = ("lagrange", "midpoint")


def _check_order(order: int, allowed: tuple[int, ...]) -> None:
    if order not in allowed:
        raise ValueError(f"order={order!r} is invalid: expected one of {allowed}")


def _solver_type(solver_type: str | None, order: int) -> str:
    """``None``: the papers' update where it keeps the declared order (``'midpoint'``, the
    published 2M/2S form, at order <= 2) and the exact Lagrange weights at order 3."""
    if solver_type is None:
        return "midpoint" if order <= 2 else "lagrange"
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type={solver_type!r} is invalid: expected one of "
                         f"{SOLVER_TYPES} or None")
    return solver_type



class MultistepState(NamedTuple):
    """State of :class:`DPMSolverMultistep`: the recent outputs, the first grid point of finite
    lambda (``start``), whether the first three steps form one singlestep block, that block's
    starting state ``x_s`` and the per-grid update coefficients (``table``)."""

    outputs: Outputs
    start: int
    singlestep_start: bool
    table: dict[int, tuple[float, list[float]]]
    x_s: Tensor | None = None


class SinglestepState(NamedTuple):
    """State of :class:`DPMSolverSinglestep`: the block's outputs, ``start``, the block of each
    grid interval (``block[i] = (first_step, size)``) and the state ``x_s`` the block started
    from."""

    outputs: Outputs
    start: int
    block: dict[int, tuple[int, int]]
    x_s: Tensor | None = None


class SDEState(NamedTuple):
    """State of :class:`SDEDPMSolverPP`: the recent outputs and ``start``."""

    outputs: Outputs
    start: int

def reference_weights(r: list[Tensor], h: Tensor, k: float) -> Tensor:
    """Weights of the published multistep formulas (``solver_type='midpoint'``): DPM-Solver++(2M)
    (Lu et al. 2022b, Alg. 2) ``h phi_1 [m0 + (m0 - m1) / (2 r0)]`` and the reference code's
    third-order update ``h [phi_1 m0 + phi_2 D1 + phi_3 D2]``. The latter integrates only half of
    the quadratic term of the Lagrange interpolant, so its local error is O(h^3) and it converges
    at order 2 (the default ``'lagrange'`` weights are exact for the interpolant: order 3)."""
    z = k * h
    if len(r) == 1:
        return (h * abs(k) * phi(1, z)).reshape(1, *h.shape)
    r0 = -r[1]
    if len(r) == 2:
        return h * phi(1, z) * torch.stack([1 + 0.5 / r0, -0.5 / r0])
    r1 = r[1] - r[2]
    D10 = torch.stack([1 / r0, -1 / r0, torch.zeros_like(r0)])
    D11 = torch.stack([torch.zeros_like(r1), 1 / r1, -1 / r1])
    D1 = D10 + r0 / (r0 + r1) * (D10 - D11)
    D2 = (D10 - D11) / (r0 + r1)
    e0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).reshape(3, *[1] * h.ndim)
    return h * (phi(1, z) * e0 + phi(2, z) * D1 + phi(3, z) * D2)


@register("dpm_solver_1", order=1, predict_x0=False)
@register("dpm_solver_2m", order=2, predict_x0=False)
@register("dpm_solver_3m", order=3, predict_x0=False)
@register("dpmpp_1", order=1, predict_x0=True)
@register("dpmpp_2m", order=2, predict_x0=True)
@register("dpmpp_3m", order=3, predict_x0=True)
class DPMSolverMultistep(ExpIntegrator, OneCallStepper):
    """Multistep DPM-Solver (``predict_x0=False``; Lu et al. 2022, Eq. 3.7 and App. B) and
    DPM-Solver++ (``predict_x0=True``; Lu et al. 2022b, Alg. 2, Eq. 9): the model outputs of
    the last ``order`` steps interpolated in lambda, integrated against the exponential
    weights. Order 1, 2 or 3 (order 1 = DDIM), 1 NFE per step, ODE. The first steps warm up at
    orders 1, 2, ... (and with ``lower_order_final`` the last ones step down).
    ``solver_type``: ``'midpoint'`` (default at order 2) is the published 2M update
    ``h phi_1 [m0 + (m0 - m1) / (2 r0)]`` (DPM-Solver++ Alg. 2, diffusers' default);
    ``'lagrange'`` (default at order 3) integrates the Lagrange interpolant exactly (at order 2
    this is diffusers' ``'heun'``); ``'midpoint'`` at order 3 is the reference code's 3M update,
    which converges at order 2 only (see :func:`reference_weights`). ``warmup``: at order 3
    ``'singlestep'`` takes the first three steps as one third-order singlestep block (its stages
    are grid points 1 and 2, no extra NFE); ``'lower_order'`` starts at orders 1, 2 as the
    reference implementations do, whose first-order first step leaves an O(h^2) term in the
    global error (small where eps barely moves at t = T, but it shows below ~1e-7 on VE); the
    default (None, ``'auto'``) takes the singlestep block where its steps are even in lambda
    (:meth:`even_start`) and the lower-order warm-up elsewhere."""

    paper = ("Lu et al. 2022, DPM-Solver, Eq. 3.7; Lu et al. 2022b, DPM-Solver++, Alg. 2 "
             "(multistep)")

    def __init__(self, order: int = 2, predict_x0: bool = True, solver_type: str | None = None,
                 warmup: str | None = None, lower_order_final: bool | None = None,
                 final_to_zero: bool = False,
                 **thresholding_options: Unpack[ThresholdingOptions]) -> None:
        _check_order(order, (1, 2, 3))
        solver_type = _solver_type(solver_type, order)
        super().__init__(predict_x0, lower_order_final, final_to_zero, **thresholding_options)
        if warmup not in (None, "auto", "singlestep", "lower_order"):
            raise ValueError(f"warmup={warmup!r} is invalid: expected 'singlestep', "
                             "'lower_order', 'auto' or None")
        self.solver_type = solver_type
        self.warmup = warmup or ("auto" if order == 3 else "lower_order")
        if self.warmup == "singlestep" and order != 3:
            raise ValueError(f"warmup='singlestep' is for order 3, got order={order}")
        self.order = 2 if (order == 3 and solver_type == "midpoint") else order
        self.max_order = order

    def init(self, p: Problem, x: Tensor) -> MultistepState:
        self.check(p)
        start = self.start_index(p)
        usable = p.steps - start - (1 if self.final_to_zero else 0)
        singlestep_start = usable >= 3 and (
            self.warmup == "singlestep"
            or (self.warmup == "auto" and self.even_start(p.lam[start:start + 4])))
        return MultistepState((), start, singlestep_start,
                              self.step_table(p, start, singlestep_start))

    def step_table(self, p: Problem, i0: int, singlestep_start: bool
                   ) -> dict[int, tuple[float, list[float]]]:
        """The coefficients of every multistep update (step ``i`` -> :meth:`combine`'s
        ``(c_x, [c_j])``), computed once per grid, vectorised over the steps of each order;
        ``i0`` is the first grid point of finite lambda."""
        first = i0 + 3 if singlestep_start else i0
        last = p.steps - 1 if self.final_to_zero else p.steps
        by_order: dict[int, list[int]] = {}
        for i in range(first, last):
            by_order.setdefault(self.step_order(p, i, self.max_order, i0), []).append(i)
        table: dict[int, tuple[float, list[float]]] = {}
        for o, idx in by_order.items():
            steps = torch.tensor(idx)
            h = p.lam[steps + 1] - p.lam[steps]
            r = [(p.lam[steps - j] - p.lam[steps]) / h for j in range(o)]
            if self.solver_type == "midpoint" and o > 1:
                W = reference_weights(r, h, self.k)
            else:
                W = ei_weights_per_step(torch.stack(r, 1), h, self.k)
            table.update(zip(idx, self.coefficients(p, steps, W)))
        return table

    #: the automatic warm-up takes the singlestep block only where the block's first three
    #: lambda steps are within this ratio of each other (see :meth:`even_start`)
    SINGLESTEP_MAX_RATIO: ClassVar[float] = 1.5

    @classmethod
    def even_start(cls, lam: Tensor) -> bool:
        """Whether the singlestep warm-up block over ``lam[0] .. lam[3]`` is well conditioned:
        its stages (grid points 1 and 2) sit near DPM-Solver-3's ``r1 = 1/3, r2 = 2/3`` of the
        block when its three lambda steps are within ``SINGLESTEP_MAX_RATIO`` of each other.
        Where they are not (a schedule whose lambda is steep near T, e.g. cosine, on a uniform or
        quadratic grid: ratios 5-19), the block's noise-prediction weights blow up (measured
        RMS 1e1 to 1e6 on 64-d Gaussians at 5-20 NFE, against 5e-3 to 8e-2 with the lower-order
        warm-up), so the lower-order warm-up is used."""
        h = lam[1:] - lam[:-1]
        return bool((h.max() / h.min()) <= cls.SINGLESTEP_MAX_RATIO)

    def step(self, p: Problem, i: int, x: Tensor, st: MultistepState,
             given: ModelOutput | None = None) -> tuple[Tensor, MultistepState]:
        m, eps = self.evaluate(p, x, p.times[i], p.alpha[i], p.sigma[i], given)
        i0 = st.start
        st = MultistepState(push(st.outputs, m, self.max_order), i0, st.singlestep_start, st.table,
                            st.x_s)
        if self.final_to_zero and i == p.steps - 1:
            return self.to_zero(p, i, x, eps, m), st
        if i < i0:  # from alpha = 0
            return self.first_step(p, x, m), st
        if i == i0 > 0 and self.start_order == 2:  # that step at second order (order 3)
            x = self.correct_first(p, x, st.outputs[1], m)   # outputs: (m at i0, m at 0)
        if i < i0 + 3 and st.singlestep_start:
            # the first three steps (of finite lambda) as one third-order singlestep block
            # whose stages are grid points i0 + 1, i0 + 2, from the state x_s at grid point i0
            x_s = x if i == i0 else st.x_s
            assert x_s is not None
            st = MultistepState(st.outputs, i0, True, st.table, x_s)
            return self.block_stage(p, x_s, st.outputs, i0, 3, i), st
        c = st.table[i]
        return self.apply(x, c, list(st.outputs[:len(c[1])]), p.take_spare(x)), st


@register("dpm_solver_2", order=2, predict_x0=False)
@register("dpm_solver_3", order=3, predict_x0=False)
@register("dpmpp_2s", order=2, predict_x0=True)
class DPMSolverSinglestep(ExpIntegrator, OneCallStepper):
    """Singlestep DPM-Solver-2/3 (Lu et al. 2022, Alg. 1 and 2; ``predict_x0=True``:
    DPM-Solver++(2S), Lu et al. 2022b, Alg. 1) with the "fast" order schedule (Sec. 3.4) that
    spends exactly the budget: the grid's intervals are grouped into blocks of ``order``
    intervals whose inner grid points are the intermediate stages, so every interval costs one
    model call (NFE = steps; on a logSNR grid the stages sit at r = 1/2 or 1/3, 2/3 as in the
    paper). One shorter block takes up the remainder, at the start by default
    (``lower_order_at='end'`` puts it last, as DPM-Solver's and diffusers' schedules do).
    Order 2 or 3, 1 NFE per step (per interval), ODE. ``solver_type``: ``'midpoint'`` (default
    at order 2) is Alg. 1's ``(1 / 2r)`` update; ``'lagrange'`` (default at order 3) integrates
    the Lagrange interpolant of the block's stages exactly, third order for any stage positions
    (Alg. 2's update, ``'midpoint'`` at order 3, needs r2 = 2/3: a block uniform in lambda)."""

    paper = ("Lu et al. 2022, DPM-Solver, Alg. 1-2 and Sec. 3.4 (DPM-Solver-fast); Lu et al. "
             "2022b, DPM-Solver++, Alg. 1 (2S)")
    order: int   # always declared (from the option)

    def __init__(self, order: int = 3, predict_x0: bool = False, solver_type: str | None = None,
                 lower_order_at: str = "start", final_to_zero: bool = False,
                 **thresholding_options: Unpack[ThresholdingOptions]) -> None:
        _check_order(order, (1, 2, 3))
        solver_type = _solver_type(solver_type, order)
        super().__init__(predict_x0, False, final_to_zero, **thresholding_options)
        block_plan(order, order, lower_order_at)  # validates lower_order_at
        self.order, self.solver_type, self.lower_order_at = order, solver_type, lower_order_at

    def init(self, p: Problem, x: Tensor) -> SinglestepState:
        self.check(p)
        start = self.start_index(p)
        n = p.steps - start - (1 if self.final_to_zero else 0)
        block = {start + i0 + j: (start + i0, k)
                 for i0, k in block_plan(n, self.order, self.lower_order_at) for j in range(k)}
        return SinglestepState((), start, block)

    def step(self, p: Problem, i: int, x: Tensor, st: SinglestepState,
             given: ModelOutput | None = None) -> tuple[Tensor, SinglestepState]:
        m, eps = self.evaluate(p, x, p.times[i], p.alpha[i], p.sigma[i], given)
        if self.final_to_zero and i == p.steps - 1:
            return self.to_zero(p, i, x, eps, m), st
        if i < st.start:  # from alpha = 0
            return self.first_step(p, x, m), st
        i0, k = st.block[i]
        x_s = x if i == i0 else st.x_s
        assert x_s is not None
        outputs = push(st.outputs, m, self.order)
        st = SinglestepState(outputs, st.start, st.block, x_s)
        if self.solver_type != "midpoint" or i != i0 + k - 1 or k == 1:
            return self.block_stage(p, x_s, outputs, i0, k, i), st
        # the papers' final updates: Alg. 1 (k = 2), Alg. 2 (k = 3: linear through 0 and r2)
        h = p.lam[i0 + k] - p.lam[i0]
        r = [(p.lam[q] - p.lam[i0]) / h for q in range(i0, i + 1)]
        if k == 2:
            W = h * abs(self.k) * phi(1, self.k * h) * torch.stack([1 - 0.5 / r[1], 0.5 / r[1]])
            ms = [outputs[i - i0], outputs[i - i0 - 1]]
        else:
            W = ei_weights(torch.stack([r[0], r[2]]), 1.0, h, self.k)
            ms = [outputs[i - i0], outputs[i - i0 - 2]]
        return self.combine(p, x_s, i0, i + 1, W, ms), st


@register("dpm_solver_adaptive", order=3, predict_x0=False)
@register("dpmpp_adaptive", order=3, predict_x0=True)
class DPMSolverAdaptive(ExpIntegrator, AdaptiveSolver):
    """Adaptive DPM-Solver-12 (``order=2``) and -23 (``order=3``; Lu et al. 2022, Alg. 4 and
    App. C): each step compares the singlestep solutions of orders ``order - 1`` and ``order``
    (they share their model calls), accepts when the scaled error
    ``E = RMS((x_hi - x_lo) / max(atol, rtol max(|x_lo|, |x_prev|))) <= 1`` and proposes
    ``h <- min(theta h E^(-1/order), h_max, lambda_end - lambda)``. Step sizes are per sample
    (one model call serves every sample that needs it), so a sample's result does not depend on
    its batch. NFE is measured (2 or 3 per attempt, fewer after a rejection). ODE.

    Three departures from Alg. 4 (written for VP and image data) make the error follow the
    tolerance on every forward SDE. Figures: RMS error of 64 samples of 4-d Gaussian data
    against the exact flow, noise prediction, before -> after.

    * ``h_max`` (1.0 in lambda) caps a step. The embedded estimate ``x_hi - x_lo`` is
      asymptotic in h; over a long step both solutions inherit the same inaccurate first stage
      (a DDIM step of h/3) and go wrong together (sub-VP, h = 5.9: they differed by 0.015 while
      both were 0.41 from the exact flow). Uncapped, the step grows ~300-fold over the
      high-noise start, where eps barely moves (E ~ 1e-8), and such steps were accepted: at the
      default rtol 0.15 on cosine, 0.22 on sub-VP, 0.18 on the squared-cosine DDPM table, 0.96
      on VE, 2.3 on EDM, and 1 sample of 256 of a 2-d mixture ended in another mode (also at
      rtol 1e-3). One unit of lambda is half the width of the transition of any data direction
      (its denoiser coefficient is sigmoid(2 lambda + log variance)), so no step jumps one. Now
      7e-4 on every SDE at the default rtol, for 15-48 NFE (it was 15-60).
    * Errors are measured in the VP-equivalent state ``x / sqrt(alpha^2 + sigma^2)``, where the
      paper's tolerances apply. The updates are equivariant under that scaling, so VE and EDM
      take the steps of a VP schedule with the same lambda range; measured in ``x``, the
      tolerance ``rtol |x_prev|`` is rtol sigma_max at the start of VE (with the cap alone VE
      and EDM needed 5-10% more NFE for twice the error at rtol <= 1e-3).
    * ``atol=None`` (default) keeps the paper's ratio ``atol = 0.156 rtol`` (0.0078 at the
      default rtol 0.05), so tightening rtol tightens the error. With atol fixed at 0.0078 the
      error stopped falling below rtol 1e-2 (VP: 4.6e-3, 2.4e-2, 2.4e-2 at rtol 1e-2, 1e-3,
      1e-4; now 6e-4, 5e-5, 1.1e-5).

    ``h_max=math.inf, atol=0.0078`` gives Alg. 4's step control on VP (per-sample E)."""

    evaluates_subsets = True   # only the samples still stepping are evaluated
    paper = "Lu et al. 2022, DPM-Solver, Alg. 4 (adaptive step size) and App. C"
    order: int   # always declared (from the option)

    #: the paper's defaults (atol for image data in [-1, 1])
    ATOL_PER_RTOL: ClassVar[float] = 0.0078 / 0.05

    def __init__(self, order: int = 3, predict_x0: bool = False, rtol: float = 0.05,
                 atol: float | None = None, h_init: float = 0.05, h_max: float = 1.0,
                 theta: float = 0.9, max_iters: int = 10_000,
                 **thresholding_options: Unpack[ThresholdingOptions]) -> None:
        _check_order(order, (2, 3))
        if atol is None and isinstance(rtol, (int, float)):
            atol = self.ATOL_PER_RTOL * rtol
        for name, v in (("rtol", rtol), ("atol", atol), ("h_init", h_init)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} is invalid: expected a finite number > 0")
        if not (is_number(theta) and 0 < theta <= 1):
            raise ValueError(f"theta={theta!r} is invalid: expected a number in (0, 1]")
        if not (isinstance(h_max, (int, float)) and h_max > 0):
            raise ValueError(f"h_max={h_max!r} is invalid: expected a number > 0 (math.inf: "
                             "no cap)")
        if not (is_int(max_iters) and max_iters >= 1):
            raise ValueError(f"max_iters={max_iters!r} is invalid: expected an integer >= 1")
        super().__init__(predict_x0, False, False, **thresholding_options)
        self.order, self.rtol, self.atol = order, float(rtol), float(atol)
        self.h_init, self.theta, self.max_iters = float(h_init), float(theta), int(max_iters)
        self.h_max = float(h_max)
        self.r = [0.0, 0.5] if order == 2 else [0.0, 1 / 3, 2 / 3]
        self.starts_at_alpha_zero = False  # its step sizes are in lambda, infinite at alpha = 0

    def _at(self, p: Problem, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = p.sde.t_of_lambda(lam)
        return t, p.sde.alpha(t), p.sde.sigma(t)

    def integrate(self, p: Problem, x: Tensor) -> Tensor:
        self.check(p)
        B = x.shape[0]
        lam_end = p.lam[-1]
        tol = 1e-10 * (1 + abs(float(lam_end - p.lam[0])))
        lam = p.lam[0].expand(B).clone()
        h = torch.full((B,), min(self.h_init, self.h_max),
                       dtype=torch.float64).clamp(max=lam_end - p.lam[0])
        x = x.clone()
        m_s = torch.empty_like(x)
        fresh = torch.zeros(B, dtype=torch.bool)
        done = torch.zeros(B, dtype=torch.bool)
        for _ in range(self.max_iters):
            idx = (~done).nonzero().flatten()
            if idx.numel() == 0:
                return x
            stale = idx[~fresh[idx]]
            if stale.numel():
                t, a, s = self._at(p, lam[stale])
                m_s[stale] = self.evaluate(p, x[stale], t, a, s)[0]
                fresh[stale] = True
            xa, la, ha = x[idx], lam[idx], h[idx]
            _, a_s, s_s = self._at(p, la)
            ms = [m_s[idx]]
            for q in range(1, self.order):
                t_q, a_q, s_q = self._at(p, la + self.r[q] * ha)
                W = ei_weights(self.r[:q], self.r[q], ha, self.k)
                u = self.combine(p, xa, None, None, W, ms, a_q, s_q, a_s, s_s)
                ms.append(self.evaluate(p, u, t_q, a_q, s_q)[0])
            _, a_t, s_t = self._at(p, la + ha)
            hi = self.combine(p, xa, None, None, ei_weights(self.r, 1.0, ha, self.k), ms,
                              a_t, s_t, a_s, s_s)
            lo = self.combine(p, xa, None, None, ei_weights(self.r[:-1], 1.0, ha, self.k),
                              ms[:-1], a_t, s_t, a_s, s_s)
            # errors in the VP-equivalent state x / sqrt(alpha^2 + sigma^2) (see the class doc)
            c_s = p.bcast(torch.sqrt(a_s ** 2 + s_s ** 2), xa)
            c_t = p.bcast(torch.sqrt(a_t ** 2 + s_t ** 2), xa)
            delta = torch.clamp(self.rtol * torch.maximum(lo.abs() / c_t, xa.abs() / c_s),
                                min=self.atol)
            E = ((hi - lo) / (c_t * delta)).double().pow(2).flatten(1).mean(1).sqrt()
            acc = E <= 1
            ia = idx[acc]
            x[ia] = hi[acc]
            lam[ia] = torch.where(la[acc] + ha[acc] >= lam_end - tol, lam_end, la[acc] + ha[acc])
            fresh[ia] = False
            h_new = self.theta * ha * E.clamp_min(1e-12) ** (-1.0 / self.order)
            h[idx] = torch.minimum(h_new.clamp(max=self.h_max), lam_end - lam[idx])
            done = lam >= lam_end - tol
            if bool((h[~done] < tol).any()):
                raise RuntimeError(f"{self.name}: the step size underflowed (rtol={self.rtol}, "
                                   f"atol={self.atol}); loosen the tolerances")
        raise RuntimeError(f"{self.name}: no convergence within max_iters={self.max_iters} "
                           "iterations; loosen rtol/atol or raise max_iters")


@register("dpmpp_sde_1", order=1)
@register("dpmpp_2m_sde", order=2)
class SDEDPMSolverPP(ExpIntegrator, FixedGridSolver):
    """SDE-DPM-Solver++ (Lu et al. 2022b, Sec. 5 and App. on SDE solvers; diffusers'
    ``sde-dpmsolver++``): the reverse-time SDE in data prediction,
    ``x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t sum_j W_j x0_j + sigma_t sqrt(1 - e^{-2h}) z``
    with ``W`` the exact weights of the kernel ``2 e^{-2(lambda_t - lambda)}`` (order 1: the
    first-order update; order 2: 2M, ``solver_type='midpoint'`` as diffusers (the default) or
    ``'lagrange'``). ``z`` is the normalised Brownian increment over the step. Ito SDE; 1 NFE
    per step; strong order 1 here (additive noise)."""

    stochastic = True
    strong_order = 1.0
    paper = "Lu et al. 2022b, DPM-Solver++, Sec. 5 (SDE-DPM-Solver++(2M))"
    order: int   # always declared (from the option)

    def __init__(self, order: int = 2, solver_type: str | None = None,
                 lower_order_final: bool | None = None, final_to_zero: bool = False,
                 **thresholding_options: Unpack[ThresholdingOptions]) -> None:
        _check_order(order, (1, 2))
        solver_type = _solver_type(solver_type, order)
        super().__init__(True, lower_order_final, final_to_zero, **thresholding_options)
        self.order, self.solver_type = order, solver_type

    def init(self, p: Problem, x: Tensor) -> SDEState:
        self.check(p)
        return SDEState((), self.start_index(p))

    def step(self, p: Problem, i: int, x: Tensor, st: SDEState) -> tuple[Tensor, SDEState]:
        m, eps = self.evaluate(p, x, p.times[i], p.alpha[i], p.sigma[i])
        outputs = push(st.outputs, m, self.order)
        st = SDEState(outputs, st.start)
        if self.final_to_zero and i == p.steps - 1:
            return self.to_zero(p, i, x, eps, m), st
        if i < st.start:
            # from alpha = 0 (h = inf): e^{-h} = 0, the kernel's weight 1 - e^{-2h} = 1, so the
            # step is the exact posterior draw x_1 = alpha_1 x0 + sigma_1 z
            z = p.noise.increment(p.times[i], p.times[i + 1], x)
            return p.lin(float(p.alpha[i + 1]), m, float(p.sigma[i + 1]), z), st
        o = self.step_order(p, i, self.order, st.start)
        h = p.lam[i + 1] - p.lam[i]
        r = torch.stack([(p.lam[i - j] - p.lam[i]) / h for j in range(o)])
        if o == 2 and self.solver_type == "midpoint":
            W = -torch.expm1(-2 * h) * torch.stack([1 - 0.5 / r[1], 0.5 / r[1]])
        else:
            W = ei_weights(r, 1.0, h, -2.0)
        out = self.combine(p, x, i, i + 1, W, list(outputs[:o]))
        out = out - p.bcast(p.sigma[i + 1] / p.sigma[i] * -torch.expm1(-h), x) * x
        z = p.noise.increment(p.times[i], p.times[i + 1], x)
        return out + p.bcast(p.sigma[i + 1] * torch.sqrt(-torch.expm1(-2 * h)), x) * z, st
