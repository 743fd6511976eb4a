"""Deterministic samplers of the probability-flow ODE: explicit Runge-Kutta tables, adaptive
torchdiffeq solves, DDIM (with eta) and EDM Heun (with stochastic churn)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._utils import is_number
from ..dynamics.parameterization import Coeffs, to_eps
from ..dynamics.reverse import ProbabilityFlowODE
from .base import AdaptiveSolver, FixedGridSolver, ModelOutput, OneCallStepper, Problem
from .registry import register


def pf_ode_lambda(p: Problem, x: Tensor, lam: Any) -> Tensor:
    """The probability-flow ODE in the half-logSNR lambda,
    :meth:`~sdekit.dynamics.ProbabilityFlowODE.drift_lambda`, from one counted model call."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    t = p.sde.t_of_lambda(lam)
    return ProbabilityFlowODE(p.sde).drift_lambda(x, t, p.predict(x, t, "eps"))


class ButcherTable:
    """An explicit Runge-Kutta table, stored in float64 and validated (rows of A sum to c,
    weights sum to 1, A strictly lower triangular)."""

    def __init__(self, A: list[list[float]], b: list[float], c: list[float]) -> None:
        self.A = torch.tensor(A, dtype=torch.float64)
        self.b = torch.tensor(b, dtype=torch.float64)
        self.c = torch.tensor(c, dtype=torch.float64)
        s = self.b.numel()
        if self.A.shape != (s, s) or self.c.numel() != s:
            raise ValueError(f"Butcher table shapes disagree: A {tuple(self.A.shape)}, b ({s},), "
                             f"c ({self.c.numel()},)")
        if not torch.allclose(self.A.sum(1), self.c, atol=1e-14):
            raise ValueError("Butcher table rows of A must sum to c")
        if abs(float(self.b.sum()) - 1) > 1e-14:
            raise ValueError("Butcher table weights b must sum to 1")
        if bool(torch.triu(self.A).ne(0).any()):
            raise ValueError("Butcher table A must be strictly lower triangular (explicit method)")

    @property
    def stages(self) -> int:
        return self.b.numel()


TABLES = {
    "euler": (ButcherTable([[0.0]], [1.0], [0.0]), 1),
    "heun": (ButcherTable([[0, 0], [1, 0]], [0.5, 0.5], [0, 1]), 2),
    "rk4": (ButcherTable([[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 0]],
                         [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0, 0.5, 0.5, 1]), 4),
}


@register("euler", method="euler")
@register("heun", method="heun")
@register("rk4", method="rk4")
class ExplicitRK(FixedGridSolver):
    """Explicit Runge-Kutta on the probability-flow ODE, stepping in lambda between the grid's
    times (see :func:`pf_ode_lambda`). Euler: order 1, 1 NFE/step; Heun: order 2, 2 NFE/step;
    classic RK4: order 4, 4 NFE/step. ODE. Song et al. 2021, Eq. 13, integrated with the
    textbook tables (Butcher 2008)."""

    family = "runge-kutta"
    default_grid = "logsnr"
    paper = "Song et al. 2021, Score-Based Generative Modeling through SDEs, Eq. 13"

    def __init__(self, method: str = "euler") -> None:
        if not isinstance(method, str) or method not in TABLES:
            raise ValueError(f"method={method!r} is invalid: expected one of {sorted(TABLES)}")
        self.table, self.order = TABLES[method]
        self.nfe_per_step = self.table.stages

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        t0 = p.lam[i]
        h = p.lam[i + 1] - t0
        A, b, c = self.table.A, self.table.b, self.table.c
        ks: list[Tensor] = []
        for j in range(self.table.stages):
            xj = x
            for m in range(j):
                if A[j, m] != 0:
                    xj = xj + float(h * A[j, m]) * ks[m]
            ks.append(pf_ode_lambda(p, xj, t0 + c[j] * h))
        return x + sum(float(h * b[j]) * ks[j] for j in range(len(ks))), state


@register("dopri5", method="dopri5")
class TorchDiffEq(AdaptiveSolver):
    """Adaptive solve of the probability-flow ODE in lambda (see :func:`pf_ode_lambda`) through
    torchdiffeq (``method`` any of
    torchdiffeq's: dopri5, bosh3, adaptive_heun, dopri8, ...; ``rtol``, ``atol``). NFE is
    measured by the call counter. ODE. From a start where alpha = 0 (flow matching at t = 1)
    it integrates the same ODE in t, ``dx/dt = u(x, t)`` with the velocity (flow prediction;
    a flow, v or x0 network). Dormand & Prince 1980 (dopri5); Chen et al. 2018.

    torchdiffeq takes one step size for the whole batch, so a sample's result depends on its
    batch to within the tolerance (``batch_invariant = "tolerance"``). The error norm is the
    largest per-sample RMS of the scaled error (torchdiffeq's default is the RMS over the whole
    batch), so every sample's local error is held to the tolerance whatever its batch holds."""

    family = "adaptive"
    batch_invariant = "tolerance"
    paper = "Dormand & Prince 1980; torchdiffeq (Chen et al. 2018)"
    # from alpha = 0 (flow matching at t = 1) it integrates dx/dt = u(x, t), the velocity
    # (flow prediction), in t: finite there, where lambda is not
    starts_at_alpha_zero = True

    def __init__(self, method: str = "dopri5", rtol: float = 1e-5,
                 atol: float | None = None) -> None:
        """``atol`` defaults to ``rtol`` (the states are of unit scale), so that tightening
        ``rtol`` alone tightens the solve."""
        from torchdiffeq._impl.odeint import SOLVERS
        if not isinstance(method, str) or method not in SOLVERS:
            raise ValueError(f"method={method!r} is invalid: expected one of {sorted(SOLVERS)}")
        atol = rtol if atol is None else atol
        for k, v in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{k}={v!r} is invalid: expected a number > 0")
        self.method, self.rtol, self.atol = method, rtol, atol
        self.order = {"dopri5": 5, "dopri8": 8, "bosh3": 3, "adaptive_heun": 2,
                      "fehlberg2": 2}.get(method)

    def integrate(self, p: Problem, x: Tensor) -> Tensor:
        from torchdiffeq import odeint

        if float(p.alpha[0]) == 0.0:  # lambda = -inf at the start: integrate in t
            t_lo, t_hi = p.sde.t_min, p.sde.T

            def velocity(t: Tensor, y: Tensor) -> Tensor:
                return p.predict(y, t.double().clamp(t_lo, t_hi), "flow")

            ts = torch.stack([p.times[0], p.times[-1]]).to(dtype=x.dtype, device=x.device)
            return odeint(velocity, x, ts, method=self.method, rtol=self.rtol,
                          atol=self.atol)[-1]
        lo, hi = p.sde.lambda_min, p.sde.lambda_max

        def func(lam: Tensor, y: Tensor) -> Tensor:
            return pf_ode_lambda(p, y, lam.double().clamp(lo, hi))

        ts = torch.stack([p.lam[0], p.lam[-1]]).to(dtype=x.dtype, device=x.device)
        return odeint(func, x, ts, method=self.method, rtol=self.rtol, atol=self.atol,
                      options={"norm": _per_sample_rms_max})[-1]


def _per_sample_rms_max(y: Tensor) -> Tensor:
    """The largest per-sample RMS of ``y`` (samples along dim 0)."""
    return y.pow(2).flatten(1).mean(1).sqrt().max()


#: noise variances of the ddim / ancestral solvers (see :class:`DDIM`)
VARIANCES = ("beta_tilde", "beta", "analytic")


@register("ddim", eta=0.0)
@register("ancestral", eta=1.0)
class DDIM(OneCallStepper):
    """DDIM (Song, Meng & Ermon 2021, Eq. 12) on any forward SDE:
    ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z`` with
    ``c = eta sigma_s sqrt(1 - exp(-2 (lambda_s - lambda_t)))``. Order 1, 1 NFE per step.
    ``eta = 0``: deterministic (= DPM-Solver-1); ``eta = 1``: ancestral sampling from the
    posterior ``q(x_s | x_t, x0_hat)`` (DDPM for VP, SMLD for VE; registered as ``ancestral``),
    an Ito-SDE sampler of strong order 1 here (additive noise). Starts at alpha = 0 (flow
    matching's t = 1) from the x0 prediction there: ``x_s = alpha_s x0 + (d / sigma_t) x + c z``
    (a flow, v or x0 network; an eps network carries no x0 at alpha = 0).

    ``variance`` sets the variance of the added noise (the mean is always the one above, built
    with ``c^2 = eta^2 beta_tilde``): ``'beta_tilde'`` (default) ``c^2``; ``'beta'`` (``eta = 1``
    only) DDPM's forward-step variance ``sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2`` (beta_n
    for VP); ``'analytic'`` the optimal variance of Analytic-DPM (Bao et al. 2022, Thm. 1 on any
    grid and SDE; see :mod:`sdekit.solvers.analytic_dpm`) from ``moments``: a
    :class:`~sdekit.solvers.analytic_dpm.MomentTable` from
    :func:`~sdekit.solvers.analytic_dpm.estimate_moments` (looked up at the step times) or one
    Gamma per step (scalars, or per coordinate for the diagonal form), clipped to the bounds of
    its Thm. 2 (with ``data_range=(lo, hi)`` also the data-range bound)."""

    family = "ddim"
    paper = "Song, Meng & Ermon 2021, Denoising Diffusion Implicit Models, Eq. 12"
    order = 1
    starts_at_alpha_zero = True  # from alpha = 0: x_s = alpha_s x0 + d x / sigma_0 + c z

    def __init__(self, eta: float = 0.0, variance: str = "beta_tilde", moments: Any = None,
                 data_range: Any = None) -> None:
        from .analytic_dpm import as_moment_table
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta={eta!r} is invalid: expected a number >= 0")
        if variance not in VARIANCES:
            raise ValueError(f"variance={variance!r} is invalid: expected one of {VARIANCES}")
        if variance == "beta" and eta != 1:
            raise ValueError(f"variance='beta' pairs DDPM's beta with its posterior mean, so it "
                             f"needs eta=1 (the ancestral sampler), not eta={eta!r}")
        if (variance == "analytic") != (moments is not None):
            raise ValueError("variance='analytic' needs moments= (a MomentTable from "
                             "sdekit.estimate_moments(sde, model, data, "
                             "times), or one Gamma per step), and moments= is used only with "
                             f"variance='analytic' (got variance={variance!r}, moments "
                             f"{'given' if moments is not None else 'missing'})")
        if data_range is not None:
            try:
                lo, hi = (float(v) for v in data_range)
            except (TypeError, ValueError):
                lo = hi = math.nan
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"data_range={data_range!r} is invalid: expected (lo, hi) "
                                 "with finite lo < hi")
            data_range = (lo, hi)
        self.eta, self.variance, self.data_range = float(eta), variance, data_range
        self.moments = None if moments is None else as_moment_table(moments)
        self.stochastic = self.eta > 0 or variance == "analytic"
        self.strong_order = 1.0 if self.stochastic else None
        self.default_grid = "uniform" if self.stochastic else "logsnr"

    def init(self, p: Problem, x: Tensor) -> tuple[list[float], list[float], list[float],
                                                 list[float] | list[float | Tensor]]:
        """alpha, sigma, the noise weight ``c`` of the mean and the standard deviation of the
        added noise (a number, or a tensor per coordinate) of every step, once per grid."""
        from .analytic_dpm import analytic_variance, gamma_per_step
        h = p.lam[1:] - p.lam[:-1]
        root = torch.sqrt(-torch.expm1(-2 * h)).tolist()
        alpha, sigma = p.alpha.tolist(), p.sigma.tolist()
        c = [self.eta * sigma[i + 1] * root[i] for i in range(p.steps)]
        if self.variance == "beta_tilde":
            return alpha, sigma, c, c
        if self.variance == "beta":
            std = [math.sqrt(max(sigma[i] ** 2 - (alpha[i] / alpha[i + 1] * sigma[i + 1]) ** 2,
                                 0.0)) for i in range(p.steps)]
            return alpha, sigma, c, std
        assert self.moments is not None   # variance='analytic' (checked in __init__)
        gam = gamma_per_step(self.moments, p.times, x.shape[1:])
        std_analytic: list[float | Tensor] = []
        for i in range(p.steps):
            v = analytic_variance(alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], c[i] ** 2,
                                  gam[i], self.data_range).sqrt()
            std_analytic.append(float(v) if v.ndim == 0 else v.to(x))
        return alpha, sigma, c, std_analytic

    def step(self, p: Problem, i: int, x: Tensor, state: Any,
             given: ModelOutput | None = None) -> tuple[Tensor, Any]:
        alpha, sigma, cs, stds = state
        a0, s0 = alpha[i], sigma[i]
        a1, s1 = alpha[i + 1], sigma[i + 1]
        c, std = cs[i], stds[i]
        d = s1 if c == 0 else math.sqrt(max(s1 * s1 - c * c, 0.0))   # eps weight of the mean
        if a0 == 0.0:  # alpha = 0 (flow matching at t = 1): only x0 is defined there
            kind, m = "x0", p.predict_at(i, x, "x0", given)
        else:
            kind, m = p.predict_linear_at(i, x, given)
        # x_s = a1 x0 + d eps with x = a0 x0 + s0 eps, written in the network's own output
        if kind == "eps":
            out = p.lin(a1 / a0, x, d - a1 * s0 / a0, m, p.take_spare(x))
        else:
            out = p.lin(d / s0, x, a1 - d * a0 / s0, m, p.take_spare(x))
        if isinstance(std, Tensor):
            out = out.addcmul_(p.noise.increment(p.times[i], p.times[i + 1], x), std)
        elif std > 0:
            out = out.add_(p.noise.increment(p.times[i], p.times[i + 1], x), alpha=std)
        return out, state


@register("edm_heun")
@register("edm_euler", heun=False)
@register("edm_heun_sde", S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)
class EDMHeun(OneCallStepper):
    """EDM sampler (Karras et al. 2022, Algorithm 1; Algorithm 2 with ``S_churn > 0``) on any
    forward SDE, run in the VE-equivalent variables ``x / alpha`` and ``sigma_tilde = sigma /
    alpha``. Heun: order 2, 2 NFE per step (``heun=False``: Euler, order 1, 1 NFE). With churn it
    is stochastic; ``sigma_hat`` is capped at sigma_tilde(T) so the model is never queried
    outside the process's time range. ``edm_heun_sde`` registers Algorithm 2 with the paper's
    ImageNet-64 settings (S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003; Table 5)."""

    family = "edm"
    default_grid = "karras"
    paper = "Karras et al. 2022, Elucidating the Design Space of Diffusion Models, Alg. 1-2"

    def __init__(self, heun: bool = True, S_churn: float = 0.0, S_tmin: float = 0.0,
                 S_tmax: float = float("inf"), S_noise: float = 1.0) -> None:
        for k, v in (("S_churn", S_churn), ("S_tmin", S_tmin), ("S_noise", S_noise)):
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{k}={v!r} is invalid: expected a finite number >= 0")
        if not (is_number(S_tmax) and S_tmax >= S_tmin):
            raise ValueError(f"S_tmax={S_tmax!r} is invalid: expected S_tmax >= S_tmin ({S_tmin})")
        self.heun, self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = (
            bool(heun), float(S_churn), float(S_tmin), float(S_tmax), float(S_noise))
        self.order = 2 if self.heun else 1
        self.nfe_per_step = 2 if self.heun else 1
        self.stochastic = self.S_churn > 0

    def init(self, p: Problem, x: Tensor) -> tuple[list[float], list[float]]:
        """sigma_tilde and alpha at the grid points, once per grid, as plain numbers."""
        return torch.exp(-p.lam).tolist(), p.alpha.tolist()

    def step(self, p: Problem, i: int, x: Tensor, state: Any,
             given: ModelOutput | None = None) -> tuple[Tensor, Any]:
        """``given``: the output of the model call at ``(x, times[i])`` (the first call of a
        step without churn), see :class:`~sdekit.solvers.base.OneCallStepper`."""
        sig, alpha = state
        s_cur, s_next = sig[i], sig[i + 1]
        t_hat, s_hat, a_hat = p.times[i], s_cur, alpha[i]
        a_cur = alpha[i]
        xt = x if a_cur == 1.0 else x / a_cur
        churn = self.stochastic and self.S_tmin <= s_cur <= self.S_tmax
        if churn:
            gamma = min(self.S_churn / p.steps, math.sqrt(2) - 1)
            s_hat = min(s_cur * (1 + gamma), float(p.sde.sigma_tilde(p.sde.T)))
            t_hat = p.sde.t_of_sigma_tilde(torch.tensor(s_hat, dtype=torch.float64))
            a_hat = float(p.sde.alpha(t_hat))
            z = p.noise.randn(x)
            xt = xt + math.sqrt(s_hat ** 2 - s_cur ** 2) * self.S_noise * z
        if given is None or churn:
            d = self._slope(p, xt, t_hat, s_hat, a_hat, p.coeffs(i) if s_hat == s_cur
                            else Coeffs(a_hat, float(p.sde.sigma(t_hat))))
        else:
            d = self._tilde_eps(given.kind, given.value, xt, s_hat)
        xn = torch.add(xt, d, alpha=s_next - s_hat)
        a_next = alpha[i + 1]
        if self.heun:
            d2 = self._slope(p, xn, p.times[i + 1], s_next, a_next, p.coeffs(i + 1))
            xn = torch.add(xt, d.add_(d2), alpha=0.5 * (s_next - s_hat))
        return (xn if a_next == 1.0 else xn * a_next), state

    @staticmethod
    def _slope(p: Problem, xt: Tensor, t: Any, s: float, a: float, c: Coeffs) -> Tensor:
        """``d = (x_tilde - x0) / sigma_tilde``, which is exactly eps for eps networks (``a``:
        alpha at t, ``c`` alpha and sigma there for the model call)."""
        kind = p.linear_form
        return EDMHeun._tilde_eps(kind, p.predict(xt if a == 1.0 else xt * a, t, kind, c), xt, s)

    @staticmethod
    def _tilde_eps(kind: str, m: Tensor, xt: Tensor, s: float) -> Tensor:
        """The slope from a model output ``m`` of ``kind`` (eps or x0): eps as it is, x0 converted
        in the VE-equivalent variables (alpha 1, sigma ``s`` = sigma_tilde)."""
        return m if kind == "eps" else to_eps(kind, m, xt, 1.0, s)
