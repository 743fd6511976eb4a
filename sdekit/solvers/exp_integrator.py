"""Shared machinery of the exponential-integrator solvers (DPM-Solver, DPM-Solver++, DEIS, UniPC).

Every one of them integrates the probability-flow ODE in the half-logSNR ``lambda``, where its
linear part is exact (Lu et al. 2022, Eq. 3.4 and 2022b, Eq. 8):

* noise prediction: ``x_t = (alpha_t/alpha_s) x_s - alpha_t int e^{-lambda} eps dlambda``
* data prediction:  ``x_t = (sigma_t/sigma_s) x_s + sigma_t int e^{lambda} x0 dlambda``

(integrals over ``[lambda_s, lambda_t]``), and approximates the model output under the integral by
the Lagrange polynomial through the outputs already computed (previous steps, or earlier stages of a
singlestep block). With ``tau = lambda - lambda_s`` and nodes ``lambda_s + r_j h`` the weight of
output ``j`` over ``[lambda_s, lambda_s + c h]`` is
``|k| int_0^{ch} e^{k (ch - tau)} l_j(tau / h) dtau``, which :func:`ei_weights` evaluates in closed
form with the phi functions (``k = +1`` eps, ``-1`` x0, ``-2`` the x0 term of SDE-DPM-Solver++).
Only ``alpha``, ``sigma`` and ``lambda`` of the forward SDE enter, so the solvers run unchanged on
VP, sub-VP, VE, EDM, discrete, flow and custom schedules.

From a grid point where alpha = 0 (lambda = -inf: flow matching at t = 1) the data-prediction
forms start in closed form: the first step is ``x_1 = (sigma_1/sigma_0) x + alpha_1 x0`` (the
update with ``e^{-h} = 0``), the model output there is no Lagrange node for later steps (the
multistep warm-up restarts at grid point 1), and solvers of order >= 3 correct that first step
by the trapezoid rule in ``u = e^lambda`` once the output at grid point 1 is known (see
:meth:`ExpIntegrator.correct_first`; UniPC's corrector does the same, :meth:`UniPC._correct_first`).
The noise-prediction forms (DPM-Solver, DEIS) cannot start there: their update scales x by
``alpha_t / alpha_s``; they raise and ask for ``t_start < T`` or a data-prediction solver. The
adaptive DPM-Solver steps in lambda and cannot start there either.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch
from torch import Tensor

from .._utils import is_number
from ..dynamics.parameterization import Coeffs, to_eps, to_x0
from .base import (  # noqa: F401 (last_lambda_step_ratio re-exported)
    ModelOutput,
    Problem,
    Solver,
    last_lambda_step_ratio,
    linear_combination,
    unshared,
)

F64 = torch.float64
_SERIES_TERMS = 24


def phi(k: int, z: Any) -> Tensor:
    """``phi_k(z) = sum_{n>=0} z^n / (n + k)!`` (``phi_0 = e^z``, ``phi_1 = (e^z - 1)/z``,
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``), float64, elementwise; the Taylor series for
    ``|z| < 1`` avoids the cancellation of the recursion near 0. A scalar (a number or a 0-d
    CPU tensor) is evaluated with Python floats, the same float64 operations in the same order
    at a fraction of the cost of 0-d tensor ops (a solver step computes several)."""
    if isinstance(z, (int, float)) or (isinstance(z, Tensor) and z.ndim == 0
                                       and z.device.type == "cpu" and not z.requires_grad):
        return torch.tensor(_phi_scalar(k, float(z)), dtype=F64)
    z = torch.as_tensor(z, dtype=F64)
    small = z.abs() < 1
    zs = torch.where(small, z, torch.zeros_like(z))
    series = torch.full_like(z, 1.0 / math.factorial(_SERIES_TERMS + k))
    for n in range(_SERIES_TERMS - 1, -1, -1):          # Horner
        series = series * zs + 1.0 / math.factorial(n + k)
    zl = torch.where(small, torch.ones_like(z), z)
    rec = torch.exp(zl) if k == 0 else torch.expm1(zl) / zl
    for j in range(1, k):
        rec = (rec - 1.0 / math.factorial(j)) / zl
    return torch.where(small, series, rec)


def _phi_scalar(k: int, z: float) -> float:
    """:func:`phi` for one float64 number: the same series / recursion, the same operations
    (equal, bit for bit, to the 0-d tensor evaluation)."""
    if abs(z) < 1:
        series = 1.0 / math.factorial(_SERIES_TERMS + k)
        for n in range(_SERIES_TERMS - 1, -1, -1):
            series = series * z + 1.0 / math.factorial(n + k)
        return series
    zt = torch.tensor(z, dtype=F64)   # torch's exp / expm1, bit for bit the tensor path's
    rec = float(torch.exp(zt)) if k == 0 else float(torch.expm1(zt)) / z
    for j in range(1, k):
        rec = (rec - 1.0 / math.factorial(j)) / z
    return rec


def lagrange_coefficients(r: Any) -> Tensor:
    """``A`` with ``l_j(u) = sum_k A[j, k] u^k`` the Lagrange basis through the nodes ``r``."""
    r = torch.as_tensor(r, dtype=F64).reshape(-1)
    V = r[:, None] ** torch.arange(r.numel(), dtype=F64)
    return torch.linalg.inv(V).T


def ei_weights(r: Any, c: float, h: Any, k: float) -> Tensor:
    """Exponential-integrator weights ``W_j = |k| int_0^{ch} e^{k (ch - tau)} l_j(tau/h) dtau``
    of the outputs at the normalised nodes ``r`` (``r_0 = 0`` the current point, negative for
    previous steps, in (0, 1] for stages); ``h`` may be a tensor (one step size per sample), the
    result then has shape ``(len(r), *h.shape)``. Exact: with ``H = ch``,
    ``int_0^H e^{k(H - tau)} (tau/h)^m dtau = m! c^m H phi_{m+1}(kH)``."""
    A = lagrange_coefficients(r)
    H = c * torch.as_tensor(h, dtype=F64)
    mom = torch.stack([abs(k) * math.factorial(m) * c ** m * H * phi(m + 1, k * H)
                       for m in range(A.shape[0])])
    return torch.tensordot(A, mom, dims=1)


def ei_weights_per_step(R: Tensor, h: Tensor, k: float) -> Tensor:
    """:func:`ei_weights` (``c = 1``) of many steps at once: ``R[n]`` the nodes and ``h[n]`` the
    step of step ``n``; shape ``(R.shape[1], n_steps)``. Each step's weights are the numbers
    :func:`ei_weights` gives (the last contraction runs per step: a batched one rounds
    differently)."""
    V = R[:, :, None] ** torch.arange(R.shape[1], dtype=F64)
    A = torch.linalg.inv(V).mT
    H = torch.as_tensor(h, dtype=F64)
    mom = torch.stack([abs(k) * math.factorial(m) * H * phi(m + 1, k * H)
                       for m in range(R.shape[1])])
    return torch.stack([torch.tensordot(A[n], mom[:, n], dims=1) for n in range(R.shape[0])], 1)


def gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the n-point Gauss-Legendre rule on [-1, 1] (float64)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(x), torch.from_numpy(w)


def lagrange_eval(nodes: Tensor, u: Tensor) -> Tensor:
    """``l_j(u)`` for the Lagrange basis through ``nodes`` (last axis; leading axes, one basis
    per row, broadcast against ``u``'s): shape ``(nodes.shape[-1], *u.shape)``."""
    out = []
    n = nodes.shape[-1]
    for j in range(n):
        lj = torch.ones_like(u)
        for m in range(n):
            if m != j:
                lj = lj * (u - nodes[..., m, None]) / (nodes[..., j, None] - nodes[..., m, None])
        out.append(lj)
    return torch.stack(out)


def dynamic_threshold(x0: Tensor, ratio: float, lo: float, hi: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per sample
    ``s = clamp(quantile(|x0|, ratio), lo, hi)``, then ``clamp(x0, -s, s) / s``. ``lo = 1`` and
    ``hi = inf`` is Imagen's and dpm-solver's rule; ``hi = 1`` diffusers' default."""
    flat = x0.detach().abs().reshape(x0.shape[0], -1).to(F64)
    s = torch.quantile(flat, ratio, dim=1).clamp(min=lo, max=hi).to(x0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def block_plan(steps: int, order: int, lower_order_at: str) -> list[tuple[int, int]]:
    """The singlestep "fast" schedule (Lu et al. 2022, Sec. 3.4): the grid's intervals grouped
    into consecutive blocks of ``order`` intervals (one model call each, so NFE = steps) plus at
    most one shorter block, put where the trajectory is smoothest (``"start"``) or, as in
    DPM-Solver's own schedule, at the end (``"end"``: for order 3 and steps divisible by 3 that
    is the paper's ``[3, ..., 3, 2, 1]``). Returns ``(first_step, size)`` pairs."""
    q, rem = divmod(steps, order)
    if lower_order_at == "start":
        sizes = ([rem] if rem else []) + [order] * q
    elif lower_order_at == "end":
        if order == 3 and rem == 0 and q > 1:
            sizes = [3] * (q - 1) + [2, 1]
        else:
            sizes = [order] * q + ([rem] if rem else [])
    else:
        raise ValueError(f"lower_order_at={lower_order_at!r} is invalid: expected 'start' or 'end'")
    plan, i0 = [], 0
    for k in sizes:
        plan.append((i0, k))
        i0 += k
    return plan


#: the last model outputs of a multistep solver, newest first: ``outputs[j]`` is that of the step
#: ``j`` steps back (every step adds one). A tuple: a state handed to a step is never changed, and
#: the next is cheap to build (the states are NamedTuples for the same reason: a frozen dataclass
#: costs several times as much per step)
Outputs = tuple[Tensor, ...]


def push(outputs: Outputs, m: Tensor, keep: int) -> Outputs:
    """``outputs`` with ``m`` added as the newest, the last ``keep`` kept."""
    return (m,) + outputs[:keep - 1]


KINDS = {"eps": 1.0, "x0": -1.0}


class ThresholdingOptions(TypedDict, total=False):
    """The thresholding options of :class:`ExpIntegrator` (keyword-only there: their defaults and
    checks), which a subclass takes as ``**thresholding_options: Unpack[ThresholdingOptions]``
    and passes on: the registry counts them among its options (see
    :func:`sdekit.solvers.registry.option_parameters`)."""

    thresholding: bool
    threshold_ratio: float
    threshold_min: float
    threshold_max: float


class ExpIntegrator(Solver):
    """Options shared by the exponential-integrator solvers.

    Args:
        predict_x0: integrate the data prediction x0 (DPM-Solver++, UniPC default) instead
            of the noise prediction eps (DPM-Solver, DEIS). (Not ``prediction``: that argument
            of :func:`sdekit.sample` names the network's output type.)
        lower_order_final: drop the order of the last steps to ``min(order, steps_left)`` (the
            guard of DPM-Solver++, diffusers and k-diffusion against instability at few steps);
            ``None`` (default) turns it on where the grid's last step in lambda is more than
            ``auto_lower_order_ratio`` (2) times the step before it or, for data prediction
            (``predict_x0=True``), longer than ``auto_lower_order_step`` (1.4) (see
            :meth:`lof`).
        final_to_zero: take the last interval to sigma = 0 at first order: the last step
            returns the clean-data estimate ``(x - sigma eps) / alpha`` of its model call (the
            data prediction itself for ``"x0"``) instead of ``x(t_end)``; no extra model call.
        thresholding: dynamic thresholding of the data prediction (``"x0"`` only), see
            :func:`dynamic_threshold` (``threshold_ratio``, ``threshold_min``, ``threshold_max``);
            keyword-only, taken by the subclasses as :class:`ThresholdingOptions`.
    """

    family = "exponential-integrator"
    default_grid = "logsnr"
    kind_options: ClassVar[tuple[str, ...]] = ("eps", "x0")
    #: lower_order_final=None: on where the last lambda step exceeds this many times the one before
    auto_lower_order_ratio = 2.0
    #: ... or, for data prediction, exceeds this length in lambda
    auto_lower_order_step = 1.4

    def __init__(self, predict_x0: bool = True, lower_order_final: bool | None = None,
                 final_to_zero: bool = False, *, thresholding: bool = False,
                 threshold_ratio: float = 0.995, threshold_min: float = 1.0,
                 threshold_max: float = math.inf) -> None:
        prediction = "x0" if predict_x0 else "eps"
        if prediction not in self.kind_options:
            raise ValueError(f"predict_x0={predict_x0!r} is invalid for {type(self).__name__}: "
                             f"it integrates {self.kind_options} predictions only")
        if lower_order_final not in (None, True, False):
            raise ValueError(f"lower_order_final={lower_order_final!r} is invalid: expected "
                             "True, False or None (automatic)")
        if thresholding and not predict_x0:
            raise ValueError("thresholding=True needs a data-prediction solver: use "
                             "predict_x0=True (DPM-Solver++, UniPC)")
        if not (is_number(threshold_ratio) and 0 < threshold_ratio <= 1):
            raise ValueError(f"threshold_ratio={threshold_ratio!r} is invalid: expected a "
                             "number in (0, 1]")
        if not (is_number(threshold_min) and is_number(threshold_max)
                and 0 < threshold_min <= threshold_max):
            raise ValueError(f"threshold_min={threshold_min!r}, threshold_max={threshold_max!r} "
                             "are invalid: expected 0 < threshold_min <= threshold_max")
        self.prediction = prediction
        self.k = KINDS[prediction]
        # data prediction starts in closed form at alpha = 0 (see first_step); noise prediction
        # cannot: its update scales x by alpha_t / alpha_s = inf
        self.starts_at_alpha_zero = prediction == "x0"
        self.lower_order_final = lower_order_final
        self.final_to_zero = bool(final_to_zero)
        self.threshold = ((float(threshold_ratio), float(threshold_min), float(threshold_max))
                          if thresholding else None)

    # ------------------------------------------------------------------ helpers
    def check(self, p: Problem) -> None:
        """Clear errors instead of NaN: every grid point needs a finite half-logSNR (but the
        first, lambda = -inf where alpha = 0, for the solvers that start there)."""
        bad = ~torch.isfinite(p.lam)
        if self.starts_at_alpha_zero and float(p.alpha[0]) == 0.0:
            bad[0] = False
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"the half-logSNR lambda is {p.lam[i].item()} at grid time "
                f"t={p.times[i].item():.6g}"
                f" (alpha={p.alpha[i].item():.3g}, sigma={p.sigma[i].item():.3g}): exponential "
                "integrators need 0 < sigma and 0 < alpha at every grid point; end the grid at "
                "t_end > 0 (and use final_to_zero=True to finish at sigma = 0)")

    def lof(self, p: Problem) -> bool:
        """Whether the last steps lower their order. Automatic (``lower_order_final=None``): where
        the grid's last lambda step is more than ``auto_lower_order_ratio`` times the one before
        (:func:`last_lambda_step_ratio`), the final multistep update would extrapolate its old
        nodes over a much longer interval than they span (every solver); and, for the
        data-prediction solvers only, where the last step is longer than
        ``auto_lower_order_step``. Both are properties of the grid's last step, not of the step
        count: a uniform-in-t grid on VP ends 4-6x longer than the step before at any step count
        (dpmpp_3m at 10 steps sent 61% of a mixture's samples to the wrong mode under the old
        rule, on below 10 steps only); a logsnr grid's steps are equal, long at 5 steps (lambda
        steps 1.7-3: on for data prediction) and short at 10 (0.85-1.06 on VP, VE, EDM, flow:
        off).

        Why the step criterion is for data prediction only: at the low-noise end the data
        prediction x0 has settled, so a low-order last step over a long interval loses little
        and the old nodes' extrapolation is the risk; the noise prediction ``eps = (x - alpha
        x0) / sigma`` still changes fast there, and the higher-order terms carry that change.
        On long last steps of non-uniform grids (Karras, quadratic: lambda steps 1.5-2 at 10
        steps, ratio 1.2-1.9) the step criterion made the noise-prediction solvers 1.5-7.6x
        worse (dpm_solver_3m on Karras at 10 NFE under VP: 7.6x on a Gaussian) while the
        data-prediction ones mostly gained (0.25-0.6x on quadratic grids). Measured by
        benchmarks/grid_cells.py (benchmarks/results/grid_cells.md: 2556 cells, every
        lower-order-final solver x six named grids x six processes x NFE 5, 10, 20 on a Gaussian and
        a mixture, run with it on and off), RMS of the automatic choice over the better of the two:
        geometric mean 1.06, worst 5.1x, 70 cells over 2x (mixture: 1.01, 2.6x, 2 cells); with the
        step criterion for every solver 1.08, 7.6x, 92; on below 10 steps (the first rule) 1.16,
        36x, 191. Dropping the ratio criterion for noise prediction too would give 1.03 overall but
        14 mixture cells over 2x (up to 4x, samples in the wrong mode) instead of 2."""
        if self.lower_order_final is None:
            last = p.schedule.last_lambda_step
            if last is None:
                return False
            step, ratio = last
            if ratio > self.auto_lower_order_ratio:
                return True
            return self.prediction == "x0" and step > self.auto_lower_order_step
        return self.lower_order_final

    def step_order(self, p: Problem, i: int, order: int, start: int = 0) -> int:
        """Warm-up (order <= i - start + 1) and, with lower_order_final (:meth:`lof`), order <=
        steps - i. ``start`` is the first grid point of finite lambda (see
        :meth:`start_index`)."""
        o = min(order, i - start + 1)
        return min(o, p.steps - i) if self.lof(p) else o

    @staticmethod
    def start_index(p: Problem) -> int:
        """1 when the grid starts at alpha = 0 (lambda = -inf), else 0. The output there is the
        first step's only node: a Lagrange node at lambda = -inf cannot be interpolated, so the
        multistep warm-up restarts at grid point 1."""
        return 0 if bool(torch.isfinite(p.lam[0])) else 1

    def first_step(self, p: Problem, x: Tensor, m: Tensor) -> Tensor:
        """The exact first-order data-prediction step from grid point 0, where alpha = 0, to
        grid point 1: ``x_1 = (sigma_1 / sigma_0) x + alpha_1 (1 - e^{-h}) x0`` with ``e^{-h} =
        0`` (h = lambda_1 - lambda_0 = inf). Local error O(alpha_1^2): enough for a method of
        order <= 2; above, :meth:`correct_first` raises it (see :attr:`start_order`)."""
        return self.combine(p, x, 0, 1, torch.ones(1, dtype=F64), [m])

    @property
    def start_order(self) -> int:
        """Order of the step from alpha = 0. A method of global order p needs a start of local
        error O(h^p): the first-order :meth:`first_step` (O(alpha_1^2)) serves p <= 2 (and is
        the step diffusers' flow-sigma schedulers take); p >= 3 corrects it to second order with
        :meth:`correct_first` (O(alpha_1^3), no extra model call)."""
        return 2 if (self.order or 1) >= 3 else 1

    def correct_first(self, p: Problem, x: Tensor, m0: Tensor, m1: Tensor) -> Tensor:
        """The step from alpha = 0 to grid point 1 at second order, once the output ``m1`` at
        grid point 1 is known (``x`` the state :meth:`first_step` gave, ``m1`` taken there,
        ``m0`` the output at alpha = 0). In ``u = e^lambda = alpha / sigma`` the data-prediction
        update reads ``x_1 = (sigma_1 / sigma_0) x_0 + sigma_1 int_0^{u_1} x0 du`` (a node at u
        = 0 is fine where lambda = -inf is not): the trapezoid rule, ``alpha_1 (m0 + m1) / 2``,
        is :meth:`first_step` plus ``alpha_1 (m1 - m0) / 2``. Local error O(alpha_1^3); ``m1``
        stays the node of the later steps (its offset O(alpha_1^2) enters them times h)."""
        return x + float(p.alpha[1]) / 2 * (m1 - m0)

    def evaluate(self, p: Problem, x: Tensor, t: Any, a: Any, s: Any,
                 given: ModelOutput | None = None) -> tuple[Tensor, Tensor | None]:
        """One model call at ``(x, t)``: ``(m, eps)`` with ``m`` the output this solver
        integrates (eps, or the possibly thresholded x0); ``a``, ``s`` are alpha and sigma at t.
        When the network already outputs what the solver integrates no conversion is made, and
        ``eps`` is None for an x0 network (``to_zero`` then uses ``m``). ``given``: the output of
        a call already made at ``(x, t)`` (see :class:`~sdekit.solvers.base.ModelOutput`)."""
        c = Coeffs(a, s)
        if torch.as_tensor(a).numel() == 1 and float(a) == 0.0:
            # alpha = 0: only the data prediction is defined (Solver.check_start vetted the model)
            out = p.predict(x, t, "x0", c) if given is None else given.as_kind(p, "x0", x)
            return (dynamic_threshold(out, *self.threshold) if self.threshold else out), None
        if given is None:
            kind = p.linear_form
            out = p.predict(x, t, kind, c)
        else:
            kind, out = given.kind, given.value
        if kind == self.prediction == "x0":
            return (dynamic_threshold(out, *self.threshold) if self.threshold else out), None
        if kind == "eps" and self.prediction == "x0" and given is None and unshared(out):
            # the network's own eps, seen by nothing else: x0 is computed into it, and the
            # step's x0 (m) then stands for that call, as for an x0 network (eps None)
            return self.data_estimate(p, x, out, a, s, into_eps=True), None
        eps = out if kind == "eps" else to_eps(kind, out, x, p.bcast(a, x), p.bcast(s, x))
        return self.convert(p, x, eps, a, s), eps

    def convert(self, p: Problem, x: Tensor, eps: Tensor, a: Any, s: Any) -> Tensor:
        """The output this solver integrates, from the eps of a call at ``x``."""
        return eps if self.prediction == "eps" else self.data_estimate(p, x, eps, a, s)

    def data_estimate(self, p: Problem, x: Tensor, eps: Tensor, a: Any, s: Any,
                      into_eps: bool = False) -> Tensor:
        """x0 from eps at ``x`` (plain numbers for grid scalars: one fused pass), thresholded if
        enabled; with ``into_eps`` (grid scalars) written into ``eps``'s memory, the same
        arithmetic as :func:`~sdekit.dynamics.to_x0` (``(x - sigma eps) / alpha``)."""
        if torch.as_tensor(s).numel() == 1 and torch.as_tensor(a).numel() == 1:
            if into_eps:
                x0 = torch.add(x, eps, alpha=-float(s), out=eps).mul_(1 / float(a))
            else:
                x0 = to_x0("eps", eps, x, float(a), float(s))
        else:
            x0 = to_x0("eps", eps, x, p.bcast(a, x), p.bcast(s, x))
        return dynamic_threshold(x0, *self.threshold) if self.threshold else x0

    def to_zero(self, p: Problem, i: int, x: Tensor, eps: Tensor | None, m: Tensor) -> Tensor:
        """The first-order step from grid point ``i`` to sigma = 0: the data estimate of the
        step's model call, taken at ``x`` (for UniPC the corrected state); with ``eps`` None
        (an x0 network under an x0 solver, see :meth:`evaluate`) it is that call's ``m``."""
        if eps is None:
            return m
        return self.data_estimate(p, x, eps, p.alpha[i], p.sigma[i])

    def block_stage(self, p: Problem, x_s: Tensor, outputs: Outputs, i0: int, k: int, i: int
                    ) -> Tensor:
        """A singlestep block of ``k`` grid intervals from grid point ``i0`` (state ``x_s``):
        the state at grid point ``i + 1`` from the outputs at the block's points ``i0..i``
        (``outputs``, newest first: that of point ``i`` first)
        (exact weights of their Lagrange interpolant in lambda)."""
        h = p.lam[i0 + k] - p.lam[i0]
        r = torch.stack([(p.lam[q] - p.lam[i0]) / h for q in range(i0, i + 1)])
        W = ei_weights(r, float((p.lam[i + 1] - p.lam[i0]) / h), h, self.k)
        ms = [outputs[i - q] for q in range(i0, i + 1)]
        return self.combine(p, x_s, i0, i + 1, W, ms)

    def coefficients(self, p: Problem, steps: Tensor, W: Tensor) -> list[tuple[float, list[float]]]:
        """:meth:`combine`'s coefficients for the grid steps ``steps`` (``i -> i + 1``, from the
        point ``i``) with weights ``W[j, n]`` of step ``steps[n]``, all at once as plain numbers:
        ``(c_x, [c_j])`` with ``x_{i+1} = c_x x + sum_j c_j m_j`` (elementwise the same
        arithmetic as :meth:`combine`, so the same numbers)."""
        a_s, s_s, a_t, s_t = p.alpha[steps], p.sigma[steps], p.alpha[steps + 1], p.sigma[steps + 1]
        sign, c_m = (-1.0, s_t) if self.prediction == "eps" else (1.0, a_t)
        c_x = a_t / a_s if self.prediction == "eps" else s_t / s_s
        coefs = torch.stack([sign * c_m * w for w in W], 1)
        return list(zip(c_x.tolist(), coefs.tolist()))

    @staticmethod
    def apply(x: Tensor, c: tuple[float, list[float]], ms: list[Tensor],
              out: Tensor | None = None) -> Tensor:
        """``c_x x + sum_j c_j m_j`` for coefficients from :meth:`coefficients`
        (:func:`~sdekit.solvers.base.linear_combination`, into ``out`` if given)."""
        return linear_combination(c[0], x, c[1], ms, out)

    def combine(self, p: Problem, x: Tensor, i0: Any, t_idx: Any, W: Tensor, ms: list[Tensor],
                a_t: Any = None, s_t: Any = None, a_s: Any = None, s_s: Any = None) -> Tensor:
        """``x_t`` from ``x`` at grid point ``i0`` and the weighted outputs (see module doc);
        ``i0`` / ``t_idx`` are grid indices, or None with ``a_s``/``s_s`` / ``a_t``/``s_t``
        given."""
        a_s = p.alpha[i0] if a_s is None else a_s
        s_s = p.sigma[i0] if s_s is None else s_s
        if t_idx is not None:
            a_t, s_t = p.alpha[t_idx], p.sigma[t_idx]
        sign, c_m = (-1.0, s_t) if self.prediction == "eps" else (1.0, a_t)
        c_x = a_t / a_s if self.prediction == "eps" else s_t / s_s
        coefs = [sign * c_m * w for w in W]
        if all(torch.as_tensor(c).numel() == 1 for c in [c_x] + coefs):
            out = x * float(c_x)  # grid scalars: one tensor pass per term
            for c, m in zip(coefs, ms):
                out = out.add_(m, alpha=float(c))
            return out
        out = p.bcast(c_x, x) * x  # per-sample coefficients (adaptive steps)
        for c, m in zip(coefs, ms):
            out = out + p.bcast(c, x) * m
        return out


__all__ = [
    "ExpIntegrator",
    "Outputs",
    "ThresholdingOptions",
    "push",
    "block_plan",
    "dynamic_threshold",
    "ei_weights",
    "ei_weights_per_step",
    "gauss_legendre",
    "lagrange_coefficients",
    "lagrange_eval",
    "phi",
]
