"""UniPC (Zhao et al. 2023): the unified predictor UniP and corrector UniC with B(h) = bh1 / bh2,
on any forward SDE through alpha, sigma and lambda; UniC also runs on top of other predictors."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ..dynamics.parameterization import from_eps
from .base import Problem, Solver
from .exp_integrator import ExpIntegrator, History, phi
from .registry import get_solver, register

VARIANTS = ("bh1", "bh2")


class _Reuse:
    """The problem as a predictor sees it inside UniPC: its model call at grid point ``i``
    returns the output already computed there (at the uncorrected state), so UniC costs no NFE.
    ``kind`` is that output's type: ``"eps"``, or ``"x0"`` at a point where alpha = 0."""

    def __init__(self, p: Problem, i: int, out: Tensor, kind: str = "eps") -> None:
        self.__dict__.update(_p=p, _i=i, _out=out, _kind=kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)

    def predict(self, x: Tensor, t: Any, kind: str = "eps") -> Tensor:
        p, i = self._p, self._i
        if self._out is None or float(torch.as_tensor(t)) != float(p.times[i]):
            return p.predict(x, t, kind)
        out, self.__dict__["_out"] = self._out, None
        if kind == self._kind:
            return out
        a, s = p.bcast(p.alpha[i], x), p.bcast(p.sigma[i], x)
        eps = out if self._kind == "eps" else (x - a * out) / s
        return from_eps(kind, eps, x, a, s)

    def predict_native(self, x: Tensor, t: Any) -> tuple[str, Tensor]:
        kind = self._kind
        return kind, self.predict(x, t, kind)  # through the reuse above


@register("unipc_bh1", variant="bh1")
@register("unipc_bh2", variant="bh2")
@register("unic_dpmpp_2m", order=2, predictor="dpmpp_2m")
class UniPC(ExpIntegrator):
    """UniPC (Zhao et al. 2023, Alg. 2 (UniC) and 3 (UniP), the B(h) variants of Eq. 21 and
    App. C): with ``r_k = (lambda_{s_k} - lambda_s) / h``, ``D_k = (m_{s_k} - m_s) / r_k`` and
    ``b_q = q! hh phi_{q+1}(hh) / B(h)`` (``hh = -h`` for data prediction, ``h`` for noise
    prediction; ``B = hh`` for ``bh1``, ``e^hh - 1`` for ``bh2``), the predictor is
    ``x~_t = x_t^DDIM - c_t B sum_k rho_k D_k`` with ``R rho = b`` on the previous points
    (rho = 1/2 at order 2) and ``c_t = alpha_t`` (x0) or ``sigma_t`` (eps); the corrector adds the
    new model output ``m_t`` (taken at x~_t) as the node r = 1. ``m_t`` is reused by the next
    step, so UniC costs no extra NFE (it is skipped after the last step, and after the steps in
    ``disable_corrector``). UniP-p is order p; UniPC-p is order p + 1 (Thm. 3.3); 1 NFE per step.
    ODE. ``predictor``: any registered 1-NFE fixed-grid ODE solver replaces UniP ("solver_p +
    UniC"); it sees the eps of the call at the uncorrected state."""

    family = "unipc"
    paper = "Zhao et al. 2023, UniPC, Alg. 2-3 and Eq. 21 (B(h) variants)"

    def __init__(self, order: int = 2, variant: str = "bh2", predict_x0: bool = True,
                 corrector: bool = True, predictor: str | Solver | None = None,
                 disable_corrector: Iterable[int] = (), lower_order_final: bool | None = None,
                 final_to_zero: bool = False, thresholding: bool = False,
                 threshold_ratio: float = 0.995, threshold_min: float = 1.0,
                 threshold_max: float = math.inf) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"order={order!r} is invalid: expected 1, 2 or 3")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is invalid: expected one of {VARIANTS}")
        super().__init__(predict_x0, lower_order_final, final_to_zero, thresholding,
                         threshold_ratio, threshold_min, threshold_max)
        self.max_order, self.variant, self.corrector = order, variant, bool(corrector)
        self.disable_corrector = frozenset(int(i) for i in disable_corrector)
        self.predictor = None if predictor is None else get_solver(predictor)
        if self.predictor is not None:
            pr = self.predictor
            if pr.adaptive or pr.stochastic or pr.nfe_per_step != 1:
                raise ValueError(f"predictor={pr.name!r} is invalid: UniC needs a deterministic "
                                 "fixed-grid predictor with 1 NFE per step")
            self.default_grid = pr.default_grid
        base = order if self.predictor is None else (self.predictor.order or 1)
        self.order = base + 1 if self.corrector else base

    def grid_for(self, sde: Any) -> str:
        """UniC on another predictor uses that predictor's grid rule (e.g. DEIS's)."""
        return super().grid_for(sde) if self.predictor is None else self.predictor.grid_for(sde)

    def grid_rule(self) -> str:
        return super().grid_rule() if self.predictor is None else self.predictor.grid_rule()

    def init(self, p: Problem, x: Tensor) -> History:
        self.check(p)
        st = History(keep=self.max_order + 1)
        st.extra["start"] = self.start_index(p)
        if self.predictor is not None:
            st.extra["inner"] = self.predictor.init(p, x)
        return st

    def _rho_b(self, hh: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``B(h)`` and ``b_q = q! hh phi_{q+1}(hh) / B(h)`` for q = 1..n."""
        B = hh if self.variant == "bh1" else torch.expm1(hh)
        return B, torch.stack([math.factorial(q) * hh * phi(q + 1, hh) / B
                               for q in range(1, n + 1)])

    def _update(self, p: Problem, s: int, x: Tensor, st: History, order: int,
                m_t: Tensor | None) -> Tensor:
        """UniP (``m_t`` None) or UniC from grid point ``s`` to ``s + 1``, of order ``order``."""
        h = p.lam[s + 1] - p.lam[s]
        hh = self.k * h
        m0 = st.m[s]
        out = self.combine(p, x, s, s + 1, (h * phi(1, hh)).reshape(1), [m0])
        rks = [(p.lam[s - j] - p.lam[s]) / h for j in range(1, order)]
        D = [(st.m[s - j] - m0) / p.bcast(rk, m0) for j, rk in zip(range(1, order), rks)]
        B, b = self._rho_b(hh, order)
        if m_t is not None:
            rks.append(torch.ones((), dtype=torch.float64))
            D.append(m_t - m0)
            n = order
        else:
            n = order - 1
        if n == 0:
            return out
        if (m_t is None and order == 2) or (m_t is not None and order == 1):
            rho = torch.full((n,), 0.5, dtype=torch.float64)
        else:
            R = torch.stack([torch.stack(rks) ** q for q in range(n)])
            rho = torch.linalg.solve(R, b[:n])
        c = p.alpha[s + 1] if self.prediction == "x0" else p.sigma[s + 1]
        for rk, d in zip(rho, D):
            out = out - p.bcast(c * B * rk, x) * d
        return out

    def _correct_first(self, p: Problem, x: Tensor, st: History, m: Tensor) -> Tensor:
        """UniC for the step from alpha = 0 (grid point 0) to grid point 1. In ``u = e^lambda =
        alpha / sigma`` the data-prediction update reads ``x_1 = (sigma_1 / sigma_0) x_0 +
        sigma_1 int_0^{u_1} x0 du`` (a node at u = 0 is fine where lambda = -inf is not): the
        trapezoid rule through the outputs at u = 0 and u_1, ``alpha_1 (m_0 + m_1) / 2``, has
        local error O(alpha_1^3), one order above the first-order predictor."""
        return self.combine(p, x, 0, 1, torch.full((2,), 0.5, dtype=torch.float64),
                            [st.m[0], m])

    def step(self, p: Problem, i: int, x: Tensor, st: History) -> tuple[Tensor, History]:
        start = st.extra["start"]
        if i < start:  # alpha = 0: only the data prediction is defined there
            kind, eps = "x0", None
            m = self.evaluate(p, x, p.times[i], p.alpha[i], p.sigma[i])[0]
        else:
            kind, eps = "eps", p.predict(x, p.times[i], "eps")
            m = self.convert(p, x, eps, p.alpha[i], p.sigma[i])
        if self.corrector and i > 0 and (i - 1) not in self.disable_corrector:
            if i - 1 < start:
                x = self._correct_first(p, st.extra["x_base"], st, m)
            else:
                x = self._update(p, i - 1, st.extra["x_base"], st, st.extra["order"], m)
        st.add(i, m)
        if self.final_to_zero and i == p.steps - 1:
            return self.to_zero(p, i, x, eps, m), st
        o = self.step_order(p, i, self.max_order, start)
        st.extra.update(x_base=x, order=o)
        if self.predictor is None:
            if i < start:
                return self.first_step(p, x, m), st
            return self._update(p, i, x, st, o, None), st
        out = eps if kind == "eps" else m
        x_next, st.extra["inner"] = self.predictor.step(_Reuse(p, i, out, kind), i, x,
                                                        st.extra["inner"])
        return x_next, st
