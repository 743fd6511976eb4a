"""DEIS (Zhang & Chen 2023): Adams-Bashforth exponential integrators with the noise prediction
interpolated in t (tAB), in rho = sigma/alpha (rhoAB) or in log rho, Runge-Kutta in rho
(rhoRK), and iPNDM. In the variables ``v = x / alpha`` and ``rho = sigma / alpha`` the
probability-flow ODE of any forward SDE reads ``dv/drho = eps`` (DEIS, Eq. 13)."""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..sde.base import ForwardSDE
from .base import FixedGridSolver, ModelOutput, OneCallStepper, Problem, lambda_step_ratios
from .exp_integrator import (
    ExpIntegrator,
    Outputs,
    ei_weights_per_step,
    gauss_legendre,
    lagrange_eval,
    push,
)
from .ode import TABLES, ButcherTable
from .registry import register

INTERPS = ("t", "rho", "logrho")


class DEISState(NamedTuple):
    """State of :class:`DEISMultistep`: the recent eps outputs and every step's update
    coefficients ``(c_x, [c_j])`` (``table[i]``)."""

    outputs: Outputs
    table: dict[int, tuple[float, list[float]]]


class IPNDMState(NamedTuple):
    """State of :class:`IPNDM`: the recent eps outputs and every step's ``(alpha_i, [d a_j],
    alpha_{i+1})`` (``table[i]``, see :meth:`IPNDM.step_table`)."""

    outputs: Outputs
    table: list[tuple[float, list[float], float]]


@register("deis_tab1", ab_order=1)
@register("deis_tab2", ab_order=2)
@register("deis_tab3", ab_order=3)
@register("deis_rhoab", ab_order=3, interp="rho")
class DEISMultistep(ExpIntegrator, OneCallStepper):
    """DEIS-AB (Zhang & Chen 2023, Eq. 14-15): ``x_{i+1} = (alpha_{i+1}/alpha_i) x_i -
    alpha_{i+1} sum_j C_ij eps_{i-j}`` with ``C_ij = int_{rho_{i+1}}^{rho_i} l_j(u(rho)) drho``,
    ``l_j`` the Lagrange basis of degree ``ab_order`` (r) through the last r + 1 steps in the
    variable ``u``: ``interp='t'`` (tAB), ``'rho'`` (rhoAB, the AB method on ``dv/drho = eps``)
    or ``'logrho'`` (diffusers' DEISMultistepScheduler, = multistep DPM-Solver with exact
    Lagrange weights). The integrals are Gauss-Legendre sums in rho (``quad_points`` nodes;
    exact for rhoAB, closed form for logrho), tabulated at ``init``. The update is of order
    r + 1 (tAB1..3, the paper's naming: 2..4; ``ab_order=0`` is DDIM), but the first r steps
    warm up at orders 0..r-1 as in the paper, and their O(h^2), O(h^3) terms cap the global
    order: declared min(r + 1, 3); tAB3/rhoAB3 measure 3.2-3.6 for 16-512 steps on Gaussian
    and mixture data. 1 NFE per step, ODE.

    Default grid: quadratic in t, DEIS's default time schedule (``ts_order=2``), where its first
    step is at most ``FIRST_STEP_RATIO`` (4) times its mean step in lambda (100 steps), else
    logsnr (see :meth:`grid_for`). The quadratic grid is made for schedules whose lambda is
    smooth in t at T (linear VP, VE, DDPM: first step 1.4-2x the mean). Where lambda(t) is
    singular at T (cosine VP: lambda -> -inf as t -> 1; the squared-cosine DDPM table, whose last
    beta is 0.999) its first steps are huge in lambda (cosine, n = 512: 0.53, 0.34, 0.25 against
    a median of 0.011; 15x and 43x the mean at 100 steps, growing with n), and the warm-up's
    first-order first step leaves an O(h^2) error there that dominates: tAB2, tAB3 and rhoAB
    measured order 2.0-2.3 on cosine at 32-4096 steps (errors 1.5e-7 at 4096). On logsnr they
    measure 2.8-3.7 over 32-256 steps and tAB2 3.0, rhoAB 3.4 over 512-4096 (errors ~1e-10).
    The warm-up's O(h^2) term is still there on every grid, only small: it caps tAB3 at slope
    2.5 over 512-4096 logsnr steps on cosine (below 5e-10) and 2.7 on VE (see the order test's
    limits). (A singlestep warm-up was tried: slope 3 on the cosine quadratic grid, but
    extrapolating over those first steps made the errors 3-7x larger and rhoAB diverge at 32
    steps.)"""

    family = "deis"
    kind_options: ClassVar[tuple[str, ...]] = ("eps",)
    default_grid = "quadratic"
    FIRST_STEP_RATIO: ClassVar[float] = 4.0
    paper = ("Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential "
             "Integrator, Eq. 14-15")

    def __init__(self, ab_order: int = 3, interp: str = "t", lower_order_final: bool | None = None,
                 final_to_zero: bool = False, quad_points: int = 20) -> None:
        if ab_order not in (0, 1, 2, 3):
            raise ValueError(f"ab_order={ab_order!r} is invalid: expected 0, 1, 2 or 3")
        if interp not in INTERPS:
            raise ValueError(f"interp={interp!r} is invalid: expected one of {INTERPS}")
        if not (isinstance(quad_points, int) and quad_points >= 2):
            raise ValueError(f"quad_points={quad_points!r} is invalid: expected an integer >= 2")
        super().__init__(False, lower_order_final, final_to_zero)
        self.ab_order, self.interp, self.quad_points = ab_order, interp, quad_points
        self.order = min(ab_order + 1, 3)

    def grid_for(self, sde: ForwardSDE) -> str:
        try:
            first = float(lambda_step_ratios(sde, self.default_grid)[0])
        except ValueError:
            return "logsnr"
        return self.default_grid if first <= self.FIRST_STEP_RATIO else "logsnr"

    def grid_rule(self) -> str:
        return (f"{self.default_grid}; logsnr where its first step > {self.FIRST_STEP_RATIO:g}x "
                "the mean lambda step")

    #: largest amplification ``sum |W_ij| / |sum W_ij|`` of an extrapolation step (see
    #: :meth:`coefficients`); equal steps give 1.7-4 (tAB2) and 4-8 (tAB3), every tested
    #: healthy grid stays below 16
    MAX_AMPLIFICATION: ClassVar[float] = 20.0

    # the base method (combine's coefficients from weights) is called as ExpIntegrator.coefficients
    def coefficients(self, p: Problem) -> list[Tensor]:  # type: ignore[override]
        """``W[i][j]``: the weight of ``eps_{i-j}`` in step ``i`` in the exponential-integrator
        form ``x_{i+1} = (alpha_{i+1}/alpha_i) x_i - sigma_{i+1} sum_j W_ij eps_{i-j}``, i.e.
        ``W_ij = e^{lambda_{i+1}} C_ij`` (float64).

        A step's order is lowered until its amplification ``sum |W_ij| / |sum W_ij|`` (the
        factor by which the weights can magnify errors in the eps history; 1 for DDIM) is at
        most ``MAX_AMPLIFICATION``. Extrapolating a polynomial in t from nodes packed close
        together far beyond them blows up: a logsnr or Karras grid on the squared-cosine DDPM
        table puts its first points within a sliver of t near T, where tAB3's amplification
        reaches 700-7400 at 10 steps (RMS 0.5 and 28 on 64-d Gaussians, against 0.012 on the
        quadratic grid). Computed once per grid, vectorised over the steps of each order: the
        numbers of the one-step formulas, bit for bit for ``'rho'`` and ``'logrho'``; for
        ``'t'`` within a few ulp, as ``t(rho)`` at all steps' nodes at once rounds each
        transcendental by SIMD or scalar code depending on its position (see
        tests/test_step_overhead.py)."""
        rho = torch.exp(-p.lam)
        gx, gw = gauss_legendre(self.quad_points)
        steps = torch.arange(p.steps)
        half = (rho[steps] - rho[steps + 1]) / 2
        u = rho[steps + 1, None] + half[:, None] * (gx + 1)      # Gauss nodes in rho, per step
        if self.interp == "t":
            u = p.sde.t_of_sigma_tilde(u)
        order = [self.step_order(p, i, self.ab_order + 1) for i in range(p.steps)]
        out: list[Tensor] = [torch.empty(0)] * p.steps
        for o in range(self.ab_order + 1, 0, -1):
            idx = torch.tensor([i for i in range(p.steps) if order[i] == o], dtype=torch.long)
            if not idx.numel():
                continue
            w = self._weights(p, idx, o, rho, u[idx], half[idx], gw)
            amp = w.abs().sum(1) / w.sum(1).abs()
            for n, i in enumerate(idx.tolist()):
                if o == 1 or float(amp[n]) <= self.MAX_AMPLIFICATION:
                    out[i] = w[n]
                else:
                    order[i] = o - 1
        return out

    def _weights(self, p: Problem, idx: Tensor, o: int, rho: Tensor, u: Tensor, half: Tensor,
                 gw: Tensor) -> Tensor:
        """The weights of the steps ``idx`` at order ``o`` (see :meth:`coefficients`), one row
        per step; ``u``, ``half``: the steps' Gauss nodes in the interpolation variable and
        half-lengths in rho."""
        if self.interp == "logrho":
            h = p.lam[idx + 1] - p.lam[idx]
            r = torch.stack([(p.lam[idx - j] - p.lam[idx]) / h for j in range(o)], 1)
            return ei_weights_per_step(r, h, 1.0).T
        back = idx[:, None] - torch.arange(o)                # j = 0 is step i
        nodes = (p.times if self.interp == "t" else rho)[back]
        ell = lagrange_eval(nodes, u)                        # (o, steps, quad_points)
        return ((ell * gw).sum(-1) * half * torch.exp(p.lam[idx + 1])).T

    def init(self, p: Problem, x: Tensor) -> DEISState:
        self.check(p)
        W = self.coefficients(p)
        # combine's (c_x, [c_j]) per step (the base method)
        table: dict[int, tuple[float, list[float]]] = {}
        for n in {w.numel() for w in W}:
            idx = [i for i, w in enumerate(W) if w.numel() == n]
            table.update(zip(idx, ExpIntegrator.coefficients(
                self, p, torch.tensor(idx), torch.stack([W[i] for i in idx], 1))))
        return DEISState((), table)

    def step(self, p: Problem, i: int, x: Tensor, st: DEISState,
             given: ModelOutput | None = None) -> tuple[Tensor, DEISState]:
        m, eps = self.evaluate(p, x, p.times[i], p.alpha[i], p.sigma[i], given)
        st = DEISState(push(st.outputs, m, self.ab_order + 1), st.table)
        if self.final_to_zero and i == p.steps - 1:
            return self.to_zero(p, i, x, eps, m), st
        c = st.table[i]
        return self.apply(x, c, list(st.outputs[:len(c[1])]), p.take_spare(x)), st


RK_TABLES = {
    "1euler": TABLES["euler"], "2heun": TABLES["heun"], "4rk": TABLES["rk4"],
    "3kutta": (ButcherTable([[0, 0, 0], [0.5, 0, 0], [-1, 2, 0]], [1 / 6, 2 / 3, 1 / 6],
                            [0, 0.5, 1]), 3),
    "3ral": (ButcherTable([[0, 0, 0], [0.5, 0, 0], [0, 0.75, 0]], [2 / 9, 1 / 3, 4 / 9],
                          [0, 0.5, 0.75]), 3),
    "3heun": (ButcherTable([[0, 0, 0], [1 / 3, 0, 0], [0, 2 / 3, 0]], [0.25, 0, 0.75],
                           [0, 1 / 3, 2 / 3]), 3),
    "3vdh": (ButcherTable([[0, 0, 0], [8 / 15, 0, 0], [0.25, 5 / 12, 0]], [0.25, 0, 0.75],
                          [0, 8 / 15, 2 / 3]), 3),
    "3ssprk": (ButcherTable([[0, 0, 0], [1, 0, 0], [0.25, 0.25, 0]], [1 / 6, 1 / 6, 2 / 3],
                            [0, 1, 0.5]), 3),
}


@register("deis_rhork", method="3kutta")
class DEISRhoRK(FixedGridSolver):
    """rhoRK-DEIS (Zhang & Chen 2023, Sec. 4, Eq. 13): an explicit Runge-Kutta method (``method``
    one of 1euler, 2heun, 3kutta (default), 3ral, 3heun, 3vdh, 3ssprk, 4rk) on
    ``dv/drho = eps(alpha v, t(rho))`` between the grid's points. Order and NFE per step = the
    table's (3kutta: 3 and 3). ODE."""

    family = "deis"
    default_grid = "logsnr"      # geometric steps in rho
    paper = ("Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential "
             "Integrator, Eq. 13")

    def __init__(self, method: str = "3kutta") -> None:
        if method not in RK_TABLES:
            raise ValueError(f"method={method!r} is invalid: expected one of {sorted(RK_TABLES)}")
        self.method = method
        self.table, self.order = RK_TABLES[method]
        self.nfe_per_step = self.table.stages

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        A, b, c = self.table.A, self.table.b, self.table.c
        rho0, rho1 = torch.exp(-p.lam[i]), torch.exp(-p.lam[i + 1])
        d = rho1 - rho0
        v = x / p.bcast(p.alpha[i], x)
        ks: list[Tensor] = []
        for j in range(self.table.stages):
            vj = v
            for q in range(j):
                if A[j, q] != 0:
                    vj = vj + p.bcast(d * A[j, q], x) * ks[q]
            if j == 0 or c[j] == 0:
                t, a = p.times[i], p.alpha[i]
            elif c[j] == 1:
                t, a = p.times[i + 1], p.alpha[i + 1]
            else:
                t = p.sde.t_of_sigma_tilde(rho0 + c[j] * d)
                a = p.sde.alpha(t)
            ks.append(p.predict(vj * p.bcast(a, x), t, "eps"))
        for j in range(self.table.stages):
            v = v + p.bcast(d * b[j], x) * ks[j]
        return v * p.bcast(p.alpha[i + 1], x), state


IPNDM_COEFFS = ([1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12],
                [55 / 24, -59 / 24, 37 / 24, -9 / 24])


@register("ipndm")
class IPNDM(OneCallStepper):
    """iPNDM (Zhang & Chen 2023, App. on iPNDM; improved PNDM of Liu et al. 2022): the
    fixed-coefficient Adams-Bashforth rule ``v_{i+1} = v_i + (rho_{i+1} - rho_i) sum_j a_j
    eps_{i-j}`` in ``v = x/alpha``, ``rho = sigma/alpha`` with a = [1], [3, -1]/2,
    [23, -16, 5]/12, [55, -59, 37, -9]/24 as history builds up (``max_order``). The weights
    assume equal steps, so the declared order is 2 on smoothly varying grids; 1 NFE per step.
    ODE."""

    family = "deis"
    default_grid = "quadratic"
    order = 2
    paper = "Zhang & Chen 2023, DEIS, App. (iPNDM); Liu et al. 2022, PNDM"

    def __init__(self, max_order: int = 4) -> None:
        if max_order not in (1, 2, 3, 4):
            raise ValueError(f"max_order={max_order!r} is invalid: expected 1, 2, 3 or 4")
        self.max_order = max_order
        self.order = min(2, max_order)

    def init(self, p: Problem, x: Tensor) -> IPNDMState:
        return IPNDMState((), self.step_table(p))

    def step_table(self, p: Problem) -> list[tuple[float, list[float], float]]:
        """Every step's ``(alpha_i, [d a_j], alpha_{i+1})`` (``d = rho_{i+1} - rho_i``) as plain
        numbers, once per grid (``rho = e^{-lambda}`` point by point, as the step used to)."""
        rho = [torch.exp(-lam) for lam in p.lam]
        alpha = p.alpha.tolist()
        return [(alpha[i], [float((rho[i + 1] - rho[i]) * aj)
                            for aj in IPNDM_COEFFS[min(self.max_order, i + 1) - 1]], alpha[i + 1])
                for i in range(p.steps)]

    def step(self, p: Problem, i: int, x: Tensor, st: IPNDMState,
             given: ModelOutput | None = None) -> tuple[Tensor, IPNDMState]:
        st = IPNDMState(push(st.outputs, p.predict_at(i, x, "eps", given), self.max_order),
                        st.table)
        a_s, w, a_t = st.table[i]
        v = x / a_s
        for j, wj in enumerate(w):
            v = v.add_(st.outputs[j] * wj)
        return v.mul_(a_t), st
