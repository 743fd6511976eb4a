"""DPM-Solver-v3 (Zheng, Lu, Chen and Zhu 2023, NeurIPS, "DPM-Solver-v3: Improved Diffusion ODE
Solver with Empirical Model Statistics"): the probability-flow ODE in the half-logSNR lambda,
re-parameterised per dimension by three *empirical model statistics* (EMS) ``l``, ``s``, ``b``
estimated from the model.

With ``N = sigma eps - l x`` the ODE ``dx/dlambda = (dlog alpha/dlambda) x - sigma eps`` is
``dx/dlambda = (dlog alpha/dlambda - l) x - N``, solved exactly in its linear part:

    x_t = (alpha_t / alpha_s) A x_s - alpha_t A int_{lambda_s}^{lambda_t} E (B + g) dlambda,

with ``f = N / alpha``, ``L(u) = int_{lambda_s}^u l``, ``S(u) = int_{lambda_s}^u s``,
``A = e^{-L(lambda_t)}``, ``E(u) = e^{L(u) + S(u)}``, ``B(u) = int_{lambda_s}^u e^{-S(r)} b(r) dr``
and the re-parameterised model ``g = e^{-S} f - B``. The EMS make
the first-order error small: ``l = E[diag(sigma d eps / dx)]`` minimises ``E |grad_x N|_F^2``, and
``(s, b)`` minimise ``E |f' - s f - b|^2`` (``f'`` the total derivative along the ODE), i.e. per
dimension ``s = Cov(f', f) / Var(f)``, ``b = E f' - s E f``. The step expands ``g`` in
``lambda - lambda_s`` with derivatives from the previous steps' ``g`` values (multistep
predictor) and integrates the terms against ``E`` numerically (Gauss-Legendre on
every interval of the EMS's fine lambda grid: the EMS are piecewise linear in lambda, ``L`` and
``S`` then exact). Special cases: ``l = 1, s = b = 0`` is DPM-Solver++ (``g = -x0``), ``l = 0,
s = -1, b = 0`` is DPM-Solver (``g = e^{-lambda_s} eps``), both with the exact weights of the
Lagrange interpolant (``solver_type='lagrange'`` of the ``dpmpp_*m`` / ``dpm_solver_*m``
solvers).

``pseudo_order`` (the paper's technique for few steps, as read here): the k-th derivative is
taken from the k x k Taylor system of the k nearest points only (not corrected by farther
ones): more stable at few steps, global order 2 whatever ``order`` (>= 2). The corrector (the
paper's predictor-corrector, as in UniC) re-takes the last step with the model output at its
end point (the next step's call, no extra NFE), one order higher.

EMS come from :func:`estimate_ems` (a saveable :class:`EMS`); without them the registered
``dpm_solver_v3`` runs the named statistics ``ems="data_prediction"`` (DPM-Solver++'s
parameterisation; see the class docstring).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..sde.base import ForwardSDE
from .analytic_dpm import check_model_and_batch
from .base import ModelOutput, OneCallStepper, Problem
from .exp_integrator import ExpIntegrator, Outputs, gauss_legendre, push
from .registry import register

F64 = torch.float64
EMS_FORMAT = "sdekit-ems/1"
#: named statistics: (l, s, b) constants (the paper's special cases)
PRESETS = {"data_prediction": (1.0, 0.0, 0.0), "noise_prediction": (0.0, -1.0, 0.0)}
_GL = 8            # Gauss-Legendre nodes per piece
_MAX_PIECE = 0.25  # longest piece (in lambda) a quadrature rule covers


@dataclass(frozen=True)
class EMS:
    """Empirical model statistics on a fine, increasing half-logSNR grid ``lam`` (``(N + 1,)``):
    ``l``, ``s``, ``b`` of shape ``(N + 1, *state_shape)`` (``(N + 1,)`` for statistics shared
    by every dimension), linear in lambda between grid points; ``times`` the forward process's
    times of the ``lam`` points and ``sde`` its repr (None: valid on any process, e.g. a named
    preset): a solve checks that its process has the same half-logSNR at ``times``; ``n`` the
    calibration samples, ``nfe`` the model calls the estimate cost. :meth:`save` / :meth:`load`
    keep them in a small verified file."""

    lam: Tensor
    l: Tensor  # noqa: E741 (the paper's name)
    s: Tensor
    b: Tensor
    times: Tensor | None = None
    sde: str | None = None
    n: int = 0
    nfe: int = 0

    def __post_init__(self) -> None:
        lam = self.lam
        if not (isinstance(lam, Tensor) and lam.ndim == 1 and lam.numel() >= 2):
            raise ValueError("EMS.lam must be a 1-D tensor of at least 2 half-logSNR values")
        if not (bool(torch.isfinite(lam).all()) and bool((lam.diff() > 0).all())):
            raise ValueError("EMS.lam must be finite and strictly increasing")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if not isinstance(v, Tensor) or v.ndim < 1 or v.shape[0] != lam.numel():
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"EMS.{name} of shape {got} is invalid: expected "
                                 f"({lam.numel()}, *state_shape), one row per EMS.lam point")
            if v.shape != self.l.shape:
                raise ValueError(f"EMS.{name} has shape {tuple(v.shape)} but EMS.l has "
                                 f"{tuple(self.l.shape)}: l, s and b must have the same shape")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"EMS.{name} contains NaN or Inf")
        if self.times is not None and tuple(self.times.shape) != tuple(lam.shape):
            raise ValueError(f"EMS.times of shape {tuple(self.times.shape)} is invalid: expected "
                             f"{tuple(lam.shape)}, the time of every EMS.lam point")

    def check_sde(self, sde: ForwardSDE) -> None:
        """Raise where ``sde`` does not have the half-logSNR the EMS were estimated with."""
        if self.times is None:
            return
        lam = sde.lambda_(self.times.double()).double()
        if not torch.allclose(lam, self.lam.double(), rtol=1e-9, atol=1e-9):
            raise ValueError(f"ems were estimated on {self.sde} but sampling uses {sde!r} (its "
                             "half-logSNR differs at the EMS times): estimate them on this "
                             "forward process (estimate_ems(sde, model, x_cal))")

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    @classmethod
    def preset(cls, name: str, lam_lo: float, lam_hi: float) -> EMS:
        """The named constant statistics ``name`` (:data:`PRESETS`) over ``[lam_lo, lam_hi]``."""
        if name not in PRESETS:
            raise ValueError(f"ems={name!r} is invalid: expected an EMS (sdekit.estimate_ems), "
                             f"the path of a saved one, or one of {sorted(PRESETS)}")
        lam = torch.tensor([lam_lo, lam_hi], dtype=F64)
        l_, s_, b_ = (torch.full((2,), v, dtype=F64) for v in PRESETS[name])
        return cls(lam, l_, s_, b_)

    def save(self, path: str | os.PathLike) -> str:
        from .._io import save_verified
        return save_verified(path, {"format": EMS_FORMAT, "lam": self.lam, "l": self.l,
                                    "s": self.s, "b": self.b, "times": self.times,
                                    "sde": self.sde, "n": self.n, "nfe": self.nfe})

    @classmethod
    def load(cls, path: str | os.PathLike) -> EMS:
        from .._io import load_verified
        d = load_verified(path, "EMS file")
        if not isinstance(d, dict) or d.get("format") != EMS_FORMAT:
            raise ValueError(f"{str(path)!r} is not an EMS file (format {EMS_FORMAT!r})")
        return cls(d["lam"], d["l"], d["s"], d["b"], d["times"], d["sde"], d["n"], d["nfe"])


def as_ems(ems: Any, lam_lo: float, lam_hi: float) -> EMS:
    """An ``ems`` option as an :class:`EMS`: itself, a preset name or the path of a saved one."""
    if isinstance(ems, EMS):
        return ems
    if isinstance(ems, str) and ems in PRESETS:
        return EMS.preset(ems, lam_lo, lam_hi)
    if isinstance(ems, (str, os.PathLike)):
        if not os.path.exists(ems):
            raise ValueError(f"ems={str(ems)!r} is invalid: not a preset ({sorted(PRESETS)}) "
                             "and no such file; compute EMS with sdekit.estimate_ems(sde, "
                             "model, x_cal) of sdekit.solvers.dpm_solver_v3 and pass them (or "
                             "EMS.save them and pass the path)")
        return EMS.load(ems)
    raise ValueError(f"ems={ems!r} is invalid: expected an EMS (sdekit.estimate_ems), the path "
                     f"of a saved one, or one of {sorted(PRESETS)}")


class _PiecewiseLinear:
    """Values ``v`` (``(N + 1, D)``) linear in lambda between the points ``lam``: the value and
    the exact antiderivative (from ``lam[0]``) anywhere in ``[lam[0], lam[-1]]``."""

    def __init__(self, lam: Tensor, v: Tensor) -> None:
        self.lam, self.v = lam, v
        d = lam.diff()[:, None]
        self.cum = torch.cat([torch.zeros_like(v[:1]), torch.cumsum(d * (v[1:] + v[:-1]) / 2, 0)])
        self.slope = (v[1:] - v[:-1]) / d

    def _seg(self, u: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.searchsorted(self.lam, u.contiguous(), right=True) - 1
        k = k.clamp(0, self.lam.numel() - 2)
        return k, (u - self.lam[k])[..., None]

    def value(self, u: Tensor) -> Tensor:
        k, du = self._seg(u)
        return self.v[k] + self.slope[k] * du

    def integral(self, u: Tensor) -> Tensor:
        k, du = self._seg(u)
        return self.cum[k] + self.v[k] * du + self.slope[k] * du * du / 2


class _Stats:
    """The EMS of one solve as piecewise-linear functions, flattened to ``D`` dimensions."""

    def __init__(self, ems: EMS) -> None:
        flat = [getattr(ems, n).double().reshape(ems.lam.numel(), -1) for n in ("l", "s", "b")]
        self.lam = ems.lam.double()
        self.l, self.s, self.b = (_PiecewiseLinear(self.lam, v) for v in flat)
        self.shape = ems.state_shape


def _pieces(lam: Tensor, lo: float, hi: float, extra: list[float]) -> Tensor:
    """Breakpoints over ``[lo, hi]``: the EMS grid points inside, ``extra`` and the ends, every
    piece then split to at most ``_MAX_PIECE``."""
    inner = lam[(lam > lo) & (lam < hi)].tolist()
    pts = sorted({lo, hi, *[e for e in extra if lo <= e <= hi], *inner})
    out = [pts[0]]
    for a, b in zip(pts[:-1], pts[1:]):
        k = max(1, math.ceil((b - a) / _MAX_PIECE))
        out.extend(a + (b - a) * j / k for j in range(1, k + 1))
    return torch.tensor(out, dtype=F64)


def _taylor_map(delta: list[float], pseudo: bool) -> Tensor:
    """``T`` with ``G_m = sum_j T[m, j] g_j``: the derivative estimates (``G_0 = g_0``) of
    ``g`` at the anchor from its values at the offsets ``delta`` (``delta[0] = 0``), by the
    Taylor system ``g_j = sum_m delta_j^m / m! G_m``: solved whole (the Lagrange interpolant) or,
    with ``pseudo``, derivative m from the first m + 1 points only."""
    K = len(delta)
    d = torch.tensor(delta, dtype=F64)
    V = torch.stack([d ** m / math.factorial(m) for m in range(K)], 1)
    if not pseudo:
        return torch.linalg.inv(V)
    T = torch.zeros(K, K, dtype=F64)
    for m in range(K):
        T[m, :m + 1] = torch.linalg.inv(V[:m + 1, :m + 1])[m]
    return T


def step_coefficients(st: _Stats, lam_s: float, lam_t: float, nodes: list[float],
                      a_s: float, a_t: float, pseudo: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(c_x, c_0, [c_j])`` (per dimension, ``(D,)``) of the update ``x_t = c_x x_s + c_0 +
    sum_j c_j f_j`` from ``lambda_s`` to ``lambda_t`` with ``f`` known at the lambdas ``nodes``
    (``nodes[0] = lambda_s``; previous points, and for the corrector ``lambda_t``)."""
    lo, hi = min([lam_s, *nodes]), max([lam_t, *nodes])
    P = _pieces(st.lam, lo, hi, [lam_s, lam_t, *nodes])
    xi, wi = gauss_legendre(_GL)
    a, b = P[:-1, None], P[1:, None]
    u = (a + b) / 2 + (b - a) / 2 * xi                 # (pieces, Q)
    w = (b - a) / 2 * wi
    at_s = torch.tensor([lam_s], dtype=F64)
    L0, S0 = st.l.integral(at_s), st.s.integral(at_s)

    def S(v: Tensor) -> Tensor:
        return st.s.integral(v.reshape(-1)).reshape(*v.shape, -1) - S0

    def L(v: Tensor) -> Tensor:
        return st.l.integral(v.reshape(-1)).reshape(*v.shape, -1) - L0

    def beta(v: Tensor) -> Tensor:                       # e^{-S} b
        return torch.exp(-S(v)) * st.b.value(v.reshape(-1)).reshape(*v.shape, -1)

    # B at the breakpoints: cumulative piece integrals, anchored at lambda_s (a breakpoint)
    piece = (w[..., None] * beta(u)).sum(1)              # (pieces, D)
    cum = torch.cat([torch.zeros_like(piece[:1]), torch.cumsum(piece, 0)])
    k_s = int(torch.argmin((P - lam_s).abs()))
    B_at = cum - cum[k_s]

    def B_of(x: float) -> Tensor:
        return B_at[int(torch.argmin((P - x).abs()))]

    inside = (P[:-1] >= lam_s - 1e-15) & (P[1:] <= lam_t + 1e-15)
    ua, uu, uw = a[inside], u[inside], w[inside]
    # B at the quadrature nodes of [lambda_s, lambda_t]: from the piece's start, a rule per node
    sub_u = ua[..., None] + (uu - ua)[..., None] * (xi + 1) / 2           # (p, Q, Q)
    sub_w = (uu - ua)[..., None] / 2 * wi
    B_u = B_at[:-1][inside][:, None] + (sub_w[..., None] * beta(sub_u)).sum(2)   # (p, Q, D)
    E_u = torch.exp(L(uu) + S(uu))                                           # (p, Q, D)
    C_B = (uw[..., None] * E_u * B_u).sum((0, 1))
    tau = (uu - lam_s)[..., None]
    M = torch.stack([(uw[..., None] * E_u * tau ** m).sum((0, 1)) / math.factorial(m)
                     for m in range(len(nodes))])                             # (K, D)
    A = torch.exp(-L(torch.tensor([lam_t], dtype=F64))[0])
    W = _taylor_map([x - lam_s for x in nodes], pseudo).T @ M                 # (K, D)
    e = [torch.exp(-S(torch.tensor([x], dtype=F64))[0]) for x in nodes]
    Bn = [B_of(x) for x in nodes]
    c_x = a_t / a_s * A
    c_0 = -a_t * A * (C_B - sum(W[j] * Bn[j] for j in range(len(nodes))))
    return c_x, c_0, [-a_t * A * W[j] * e[j] for j in range(len(nodes))]


class V3State(NamedTuple):
    """State of :class:`DPMSolverV3`: the recent ``f`` values (newest first), ``start``, the
    per-step predictor and corrector coefficients, ``l`` at each grid point, and the state at
    the previous grid point (the corrector re-takes that step)."""

    outputs: Outputs
    start: int
    pred: dict[int, tuple[Tensor, Tensor, list[Tensor], list[int]]]
    corr: dict[int, tuple[Tensor, Tensor, list[Tensor], list[int]]]
    l_at: list[Tensor]
    x_prev: Tensor | None = None


@register("dpm_solver_v3", order=2, corrector=True)
class DPMSolverV3(ExpIntegrator, OneCallStepper):
    """DPM-Solver-v3 (Zheng et al. 2023): the multistep predictor on the EMS parameterisation
    (module docstring) with its corrector (default; ``corrector=False`` for the predictor alone)
    and optionally the pseudo-order. Order ``order`` (1-3, default 2; the corrector adds one, to
    3 at most; ``pseudo_order`` caps it at 2), 1 NFE per step, ODE; the first steps warm up at
    orders 1, 2, ... (and ``lower_order_final`` steps down as for DPM-Solver++). Default order 2
    with the corrector: of the variants it was the most accurate on the VP Gaussian and mixture
    at NFE 5 and 10 in 7 of 8 cells (benchmarks/results/dpm_solver_v3.md).

    ``ems``: an :class:`EMS` from :func:`estimate_ems` (estimated on the same forward process,
    covering the grid's lambda range, of the state's shape or shared by every dimension), the
    path of a saved one, or a named preset: ``"data_prediction"`` (l = 1, s = b = 0:
    DPM-Solver++'s parameterisation, the registered default) or ``"noise_prediction"`` (l = 0,
    s = -1, b = 0: DPM-Solver's). Without ``ems`` the solver therefore runs DPM-Solver++(2M)
    with exact Lagrange weights and the same corrector (UniC-like); the paper's gains need the
    model's EMS (``estimate_ems``). Why a preset and not an error: every registered solver must
    run by name alone (the registry's contract, order and interop tests, ``sdekit bench`` and
    ``sdekit.tune.search`` sweep them so), ``for_problem`` is the hook of grid-free learned
    samplers only, and estimating EMS inside ``init`` would spend model calls the solve's NFE
    does not declare, on the very batch being sampled."""

    family = "exponential-integrator"
    paper = ("Zheng et al. 2023, DPM-Solver-v3 (NeurIPS): EMS parameterisation, multistep "
             "predictor-corrector, pseudo-order")

    def __init__(self, ems: Any = "data_prediction", order: int = 2, corrector: bool = True,
                 pseudo_order: bool = False, lower_order_final: bool | None = None) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"order={order!r} is invalid: expected 1, 2 or 3")
        for name, v in (("corrector", corrector), ("pseudo_order", pseudo_order)):
            if not isinstance(v, bool):
                raise ValueError(f"{name}={v!r} is invalid: expected True or False")
        super().__init__(True, lower_order_final)
        self.starts_at_alpha_zero = False   # f = (sigma eps - l x) / alpha: infinite at alpha = 0
        if not (isinstance(ems, EMS) or (isinstance(ems, str) and ems in PRESETS)):
            ems = as_ems(ems, 0.0, 1.0)   # a path is loaded now; anything else is refused
        self.ems = ems
        self.max_order, self.corrector, self.pseudo_order = order, corrector, pseudo_order
        # the corrector adds one order, to 3 at most: the warm-up's first step (order 1, then
        # corrected to local O(h^3)) bounds the global error at O(h^3) (order 3 + corrector
        # measured 3.5 on a Gaussian and 4.3 on a mixture over 32-256 steps: pre-asymptotic)
        o = min(order + 1, 3) if corrector else order
        self.order = min(o, 2) if pseudo_order and order >= 2 else o

    def _stats(self, p: Problem, x: Tensor) -> _Stats:
        lam = p.lam[torch.isfinite(p.lam)]
        lo, hi = float(lam.min()), float(lam.max())
        ems = as_ems(self.ems, lo, hi)
        ems.check_sde(p.sde)
        if ems.state_shape not in ((), tuple(x.shape[1:])):
            raise ValueError(f"ems of state shape {ems.state_shape} do not fit the state shape "
                             f"{tuple(x.shape[1:])}: estimate them on data of that shape")
        tol = 1e-9 * max(1.0, abs(lo), abs(hi))
        e_lo, e_hi = float(ems.lam[0]), float(ems.lam[-1])
        if lo < e_lo - tol or hi > e_hi + tol:
            raise ValueError(
                f"ems cover lambda in [{e_lo:.6g}, {e_hi:.6g}] but the grid spans [{lo:.6g}, "
                f"{hi:.6g}] (t from {float(p.times[0]):.6g} to {float(p.times[-1]):.6g}): "
                "estimate them over the grid's range (estimate_ems(..., t_start=, t_end=))")
        if lo < e_lo or hi > e_hi:   # a rounding outside: extend the end rows
            ems = EMS(torch.cat([ems.lam[:1].clamp(max=lo), ems.lam[1:-1],
                                 ems.lam[-1:].clamp(min=hi)]), ems.l, ems.s, ems.b)
        return _Stats(ems)

    def _coef(self, st: _Stats, p: Problem, s: int, t: int, nodes: list[int], like: Tensor
              ) -> tuple[Tensor, Tensor, list[Tensor], list[int]]:
        lam = p.lam.tolist()
        cx, c0, cs = step_coefficients(st, lam[s], lam[t], [lam[j] for j in nodes],
                                       float(p.alpha[s]), float(p.alpha[t]), self.pseudo_order)
        shape = st.shape
        cast = [c.reshape(shape).to(like) for c in (cx, c0, *cs)]
        return cast[0], cast[1], cast[2:], nodes

    def init(self, p: Problem, x: Tensor) -> V3State:
        self.check(p)
        st = self._stats(p, x)
        start = self.start_index(p)
        lam = p.lam[start:]
        l_at = [torch.zeros((), dtype=x.dtype)] * start + [
            v.reshape(st.shape).to(x) for v in st.l.value(lam)]
        pred, corr = {}, {}
        for i in range(start, p.steps):
            o = self.step_order(p, i, self.max_order, start)
            pred[i] = self._coef(st, p, i, i + 1, [i - j for j in range(o)], x)
            if self.corrector and i + 1 < p.steps:   # no model call at the last point
                nodes = [i, i + 1] + [i - j for j in range(1, o)]
                corr[i + 1] = self._coef(st, p, i, i + 1, nodes, x)
        return V3State((), start, pred, corr, l_at)

    def step(self, p: Problem, i: int, x: Tensor, st: V3State,
             given: ModelOutput | None = None) -> tuple[Tensor, V3State]:
        eps = p.predict_at(i, x, "eps", given)
        a, s = p.coeffs(i)[:2]
        f = (s * eps - st.l_at[i] * x) / a
        outputs = push(st.outputs, f, self.max_order + 1)
        if i in st.corr and st.x_prev is not None:   # re-take the last step with f at its end
            x = self._apply(st.x_prev, st.corr[i], outputs)
        nxt = self._apply(x, st.pred[i], outputs)
        return nxt, V3State(outputs, st.start, st.pred, st.corr, st.l_at, x)

    @staticmethod
    def _apply(x: Tensor, c: tuple[Tensor, Tensor, list[Tensor], list[int]], outputs: Outputs
               ) -> Tensor:
        """``c_x x + c_0 + sum_j c_j f_j``; ``outputs[0]`` is ``f`` at the newest node."""
        cx, c0, cs, nodes = c
        newest = max(nodes)
        out = cx * x + c0
        for cj, j in zip(cs, nodes):
            out = out + cj * outputs[newest - j]
        return out


@torch.no_grad()
def estimate_ems(sde: ForwardSDE, model: Any, x_cal: Tensor, n: int = 200, *,
                 t_start: float | None = None, t_end: float | None = None,
                 fd_step: float = 1e-3, seed: int = 0, source: str = "data",
                 teacher: str = "dpmpp_3m") -> EMS:
    """The EMS of ``model`` on ``n + 1`` half-logSNR points uniform from ``lambda(t_start)``
    (default the SDE's ``T``) to ``lambda(t_end)`` (default ``t_min``), from the calibration
    data ``x_cal`` (``(m, *state_shape)`` clean samples in the model's space, m >= 2) noised to
    each point as ``x = alpha x0 + sigma z`` (one seeded ``z`` per sample for every point);
    with ``source="prior"`` ``x_cal`` are instead states at ``t_start`` (e.g. calibration draws
    from the prior: no data needed), carried through the points by a ``teacher`` solve on them
    (the model's own marginals; ``n`` more calls).

    Per dimension (the paper's least-squares optima): ``l = sigma E[diag(d eps / dx)]`` by
    Hutchinson's estimator ``E[v * (J v)]`` (one seeded Rademacher ``v`` per sample) with the
    product ``J v`` by central finite differences of step ``fd_step * sqrt(alpha^2 + sigma^2)``
    (not autograd: any model, also one without gradients, works); then ``f = (sigma eps - l x) /
    alpha`` and its total derivative along the ODE ``f' = -l' x / alpha - (1 - l) e^{-lambda}
    eps - dx0/dlambda`` (``l'`` by finite differences on the grid, ``dx0/dlambda`` by central
    differences of step ``fd_step`` in lambda between DDIM moves of ``x``), and ``s = Cov(f', f)
    / Var(f)``, ``b = E f' - s E f`` (``s = 0`` where ``Var(f)`` vanishes). Cost: 5 model calls
    on the batch per point (recorded in ``EMS.nfe``)."""
    _check_ems_args(model, x_cal, n, source, fd_step)
    t0 = float(sde.T if t_start is None else t_start)
    t1 = float(sde.t_min if t_end is None else t_end)
    lam0, lam1 = (float(sde.lambda_(torch.tensor(t, dtype=F64))) for t in (t0, t1))
    if not (math.isfinite(lam0) and math.isfinite(lam1) and lam0 < lam1):
        raise ValueError(f"t_start={t0:g}, t_end={t1:g} are invalid: expected times with a "
                         f"finite half-logSNR, lambda(t_start)={lam0:g} < lambda(t_end)={lam1:g}"
                         " (on a flow process start below T, e.g. t_start=0.99)")
    g = torch.Generator().manual_seed(seed)
    x0 = x_cal.double()
    z = torch.randn(x0.shape, generator=g, dtype=F64).to(x0.device)   # seeded on the CPU
    v = (torch.randint(0, 2, x0.shape, generator=g).to(F64) * 2 - 1).to(x0.device)
    lam = torch.linspace(lam0, lam1, n + 1, dtype=F64)
    nfe0 = model.nfe
    traj = None
    times = sde.t_of_lambda(lam).double()
    times[0], times[-1] = t0, t1
    if source == "prior":   # the teacher's states at every point (lambda increasing = t falling)
        traj = _teacher_states(sde, model, x0, times, teacher)
    ls, moments = [], []
    for k, lm in enumerate(lam.tolist()):
        t, a, s = _coeffs(sde, lm)
        x = a * x0 + s * z if traj is None else traj[k]
        lk, mom = _point_statistics(sde, model, x, lm, v, fd_step)
        ls.append(lk)
        moments.append(mom)
    l_grid = torch.stack(ls)                                  # (N + 1, *shape)
    s_grid, b_grid = _fit_s_b(l_grid.reshape(n + 1, -1), lam, moments)
    shape = (n + 1, *x0.shape[1:])
    return EMS(lam, l_grid, s_grid.reshape(shape), b_grid.reshape(shape),
               times, repr(sde), int(x0.shape[0]), int(model.nfe - nfe0))


def _check_ems_args(model: Any, x_cal: Any, n: Any, source: Any, fd_step: Any) -> None:
    """:func:`estimate_ems`'s refusals, before any model call."""
    check_model_and_batch(model, x_cal, "x_cal", "calibration samples, (m, *state_shape)")
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"n={n!r} is invalid: expected an integer >= 1 (lambda intervals)")
    if source not in ("data", "prior"):
        raise ValueError(f"source={source!r} is invalid: expected 'data' (x_cal are clean "
                         "samples) or 'prior' (x_cal are states at t_start)")
    if not (isinstance(fd_step, (int, float)) and 0 < fd_step < 0.1):
        raise ValueError(f"fd_step={fd_step!r} is invalid: expected a number in (0, 0.1)")


def _coeffs(sde: ForwardSDE, lm: float) -> tuple[float, float, float]:
    """``(t, alpha, sigma)`` at half-logSNR ``lm``."""
    t = float(sde.t_of_lambda(torch.tensor(lm, dtype=F64)))
    tt = torch.tensor(t, dtype=F64)
    return t, float(sde.alpha(tt)), float(sde.sigma(tt))


def _point_statistics(sde: ForwardSDE, model: Any, x: Tensor, lm: float, v: Tensor,
                      fd_step: float) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """At one point of the grid (5 model calls): ``l`` (Hutchinson's ``sigma E[v * (J v)]``,
    ``J v`` by central differences) and the per-dimension mean and covariance of
    ``u = (x / alpha, x0, e^{-lambda} eps, dx0/dlambda)``, of which ``f`` and ``f'`` are linear
    combinations (:func:`_fit_s_b`); all on the CPU in float64."""
    t, a, s = _coeffs(sde, lm)
    eps = model.eps(x, t).double()
    dx = fd_step * math.sqrt(a * a + s * s)
    jv = (model.eps(x + dx * v, t).double() - model.eps(x - dx * v, t).double()) / (2 * dx)
    lp, lm_ = min(lm + fd_step, sde.lambda_max), max(lm - fd_step, sde.lambda_min)
    ends = []
    for l2 in (lp, lm_):
        t2, a2, s2 = _coeffs(sde, l2)
        x2 = a2 / a * x - s2 * math.expm1(l2 - lm) * eps   # DDIM move to lambda = l2
        ends.append(model.x0(x2, t2).double())
    dx0 = (ends[0] - ends[1]) / (lp - lm_)
    u = torch.stack([x / a, (x - s * eps) / a, math.exp(-lm) * eps, dx0])   # (4, m, ...)
    uf = u.reshape(4, u.shape[1], -1)
    mean = uf.mean(1)                                                       # (4, D)
    cen = uf - mean[:, None]
    cov = torch.einsum("amd,bmd->abd", cen, cen) / uf.shape[1]
    return (s * (v * jv).mean(0)).cpu(), (mean.cpu(), cov.cpu())


def _fit_s_b(l_flat: Tensor, lam: Tensor, moments: list[tuple[Tensor, Tensor]]
             ) -> tuple[Tensor, Tensor]:
    """Per point and dimension, the least-squares ``s = Cov(f', f) / Var(f)`` (0 where
    ``Var(f)`` vanishes) and ``b = E f' - s E f``, with ``l'`` by differences on the grid."""
    dl = torch.gradient(l_flat, spacing=(lam,), dim=0)[0]
    s_rows, b_rows = [], []
    for k, (mean, cov) in enumerate(moments):
        lk, dlk = l_flat[k], dl[k]
        one = torch.ones_like(lk)
        c_f = torch.stack([1 - lk, -one, 0 * one, 0 * one])        # f = c_f . u
        c_d = torch.stack([-dlk, 0 * one, -(1 - lk), -one])       # f' = c_d . u
        var = torch.einsum("ad,abd,bd->d", c_f, cov, c_f)
        covfd = torch.einsum("ad,abd,bd->d", c_d, cov, c_f)
        scale = torch.einsum("ad,ad->d", c_f, mean) ** 2 + torch.diagonal(cov).sum(-1)
        ok = var > 1e-12 * scale.clamp_min(1e-300)
        sk = torch.where(ok, covfd / torch.where(ok, var, one), torch.zeros_like(var))
        s_rows.append(sk)
        b_rows.append((c_d * mean).sum(0) - sk * (c_f * mean).sum(0))
    return torch.stack(s_rows), torch.stack(b_rows)


def _teacher_states(sde: ForwardSDE, model: Any, x: Tensor, times: Tensor, teacher: str
                    ) -> list[Tensor]:
    """The states of a ``teacher`` solve from ``x`` at every point of the grid ``times`` (the
    solver stepped over a :class:`Problem` directly: this layer sits below the driver)."""
    from .registry import get_solver
    slv = get_solver(teacher)
    if not isinstance(slv, OneCallStepper) or slv.stochastic:
        raise ValueError(f"teacher={teacher!r} is invalid: expected a deterministic one-call "
                         "fixed-grid solver, e.g. 'dpmpp_3m'")
    p = Problem(sde, model, times, solver_name=teacher)
    slv.check_start(p)
    out, st = [x], slv.init(p, x)
    for i in range(p.steps):
        x, st = slv.step(p, i, x, st)
        out.append(x)
    return out


__all__ = ["EMS", "DPMSolverV3", "estimate_ems", "step_coefficients", "PRESETS"]
