"""UniPC (Zhao et al. 2023): the unified predictor UniP and corrector UniC with B(h) = bh1 / bh2,
on any forward SDE through alpha, sigma and lambda; UniC also runs on top of other predictors."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .._utils import is_collection, is_int
from .base import ModelOutput, OneCallStepper, Problem, Solver, linear_combination
from .exp_integrator import ExpIntegrator, Outputs, ThresholdingOptions, phi, push
from .registry import get_solver, register

if TYPE_CHECKING:
    from typing_extensions import Unpack

VARIANTS = ("bh1", "bh2")

#: one step's UniP / UniC coefficients ``(c_x, c_0, r, w_p, w_c)`` (see :meth:`UniPC.step_table`)
StepCoefficients = tuple[float, float, list[float], list[float], list[float]]


class UniPCState(NamedTuple):
    """State of :class:`UniPC`: the recent outputs, the first grid point of finite lambda
    (``start``), every step's coefficients (``table``), the predicted state the corrector starts
    from (``x_base``), the predictor's term the next corrector reuses (``shared``: ``(s, c_x x)``,
    consumed by it) and the state of another predictor (``inner``)."""

    outputs: Outputs
    start: int
    table: dict[int, StepCoefficients]
    inner: Any = None
    x_base: Tensor | None = None
    shared: tuple[int, Tensor] | None = None


def _b_weights(variant: str, hh: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``B(h)`` and ``b_q = q! hh phi_{q+1}(hh) / B(h)`` for q = 1..n (first axis); ``hh`` a
    number or one per step."""
    B = hh if variant == "bh1" else torch.expm1(hh)
    return B, torch.stack([math.factorial(q) * hh * phi(q + 1, hh) / B for q in range(1, n + 1)])


def _rho(rks: list[Tensor], b: Tensor, order: int, corrector: bool) -> Tensor:
    """``rho`` with ``R rho = b`` on the nodes ``rks`` (and r = 1 for the corrector), one row
    per step (``rks[k]``, ``b[q]`` one entry per step); 1/2 for the second-order predictor and
    the first-order corrector (as in the paper and diffusers)."""
    n = order if corrector else order - 1
    steps = b.shape[1]
    if n == 0:
        return torch.zeros(steps, 0, dtype=torch.float64)
    if (not corrector and order == 2) or (corrector and order == 1):
        return torch.full((steps, n), 0.5, dtype=torch.float64)
    r = torch.stack(rks + ([torch.ones(steps, dtype=torch.float64)] if corrector else []), -1)
    R = torch.stack([r ** q for q in range(n)], 1)          # R[step, q, k] = r_k^q
    return torch.linalg.solve(R, b[:n].T)


@register("unipc_bh1", variant="bh1")
@register("unipc_bh2", variant="bh2")
@register("unic_dpmpp_2m", order=2, predictor="dpmpp_2m")
class UniPC(ExpIntegrator, OneCallStepper):
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
                 final_to_zero: bool = False,
                 **thresholding_options: Unpack[ThresholdingOptions]) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"order={order!r} is invalid: expected 1, 2 or 3")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is invalid: expected one of {VARIANTS}")
        super().__init__(predict_x0, lower_order_final, final_to_zero, **thresholding_options)
        self.max_order, self.variant, self.corrector = order, variant, bool(corrector)
        steps = list(disable_corrector) if is_collection(disable_corrector) else None
        if steps is None or not all(is_int(i) and i >= 0 for i in steps):
            raise ValueError(f"disable_corrector={disable_corrector!r} is invalid: expected a "
                             "collection of step indices (integers >= 0), e.g. (0, 1)")
        self.disable_corrector = frozenset(int(i) for i in steps)
        self.predictor: OneCallStepper | None = None
        if predictor is not None:
            pr = get_solver(predictor)
            if not isinstance(pr, OneCallStepper) or pr.stochastic or pr.nfe_per_step != 1:
                raise ValueError(f"predictor={pr.name!r} is invalid: UniC needs a deterministic "
                                 "fixed-grid predictor with 1 NFE per step that takes the model "
                                 "output UniC computed (a OneCallStepper: e.g. 'dpmpp_2m', "
                                 "'dpmpp_3m', 'deis_tab3', 'ipndm', 'ddim', 'edm_euler')")
            self.predictor, self.default_grid = pr, pr.default_grid
        base = order if self.predictor is None else (self.predictor.order or 1)
        self.order = base + 1 if self.corrector else base

    def grid_for(self, sde: Any) -> str:
        """UniC on another predictor uses that predictor's grid rule (e.g. DEIS's)."""
        return super().grid_for(sde) if self.predictor is None else self.predictor.grid_for(sde)

    def grid_rule(self) -> str:
        return super().grid_rule() if self.predictor is None else self.predictor.grid_rule()

    def init(self, p: Problem, x: Tensor) -> UniPCState:
        self.check(p)
        start = self.start_index(p)
        inner = None if self.predictor is None else self.predictor.init(p, x)
        return UniPCState((), start, self.step_table(p, start), inner)

    def step_table(self, p: Problem, start: int) -> dict[int, StepCoefficients]:
        """UniP's and UniC's coefficients of every step ``s -> s + 1`` (at the order
        :meth:`step_order` gives it), computed once per grid, vectorised over the steps of each
        order: ``(c_x, c_0, r, w_p, w_c)`` with ``r`` the nodes ``r_k`` of the previous points,
        ``w_p`` / ``w_c`` the predictor's / corrector's ``c_t B rho_k`` (plain numbers, bit
        for bit those of the one-step formulas that tests/test_step_overhead.py keeps)."""
        last = p.steps - 1 if self.final_to_zero else p.steps
        by_order: dict[int, list[int]] = {}
        for s in range(start, last):
            by_order.setdefault(self.step_order(p, s, self.max_order, start), []).append(s)
        table: dict[int, StepCoefficients] = {}
        for o, idx in by_order.items():
            steps = torch.tensor(idx)
            h = p.lam[steps + 1] - p.lam[steps]
            hh = self.k * h
            base = self.coefficients(p, steps, (h * phi(1, hh)).reshape(1, -1))
            rks = [(p.lam[steps - j] - p.lam[steps]) / h for j in range(1, o)]
            B, b = _b_weights(self.variant, hh, o)
            cB = (p.alpha[steps + 1] if self.prediction == "x0" else p.sigma[steps + 1]) * B
            w = [(cB[:, None] * _rho(rks, b, o, corrector)).tolist()
                 for corrector in (False, True)]
            r = torch.stack(rks, 1).tolist() if rks else [[]] * len(idx)
            for n, i in enumerate(idx):
                table[i] = (base[n][0], base[n][1][0], r[n], w[0][n], w[1][n])
        return table

    def _update(self, x: Tensor, st: UniPCState, s: int, c: StepCoefficients,
                m_t: Tensor | None, keep: bool = False, out: Tensor | None = None
                ) -> tuple[Tensor, tuple[int, Tensor] | None]:
        """UniP (``m_t`` None) or UniC from grid point ``s`` to ``s + 1`` with step ``s``'s
        coefficients ``c`` from :meth:`step_table`: ``x~ = c_x x + c_0 m_s - sum_k w_k D_k``
        (``D_k = (m_{s-k} - m_s) / r_k``, and ``m_t - m_s`` for the corrector's node r = 1),
        evaluated as the one linear combination it is, ``c_x x + (c_0 + sum_k w_k / r_k) m_s -
        sum_k (w_k / r_k) m_{s-k}`` (one pass per term, the first allocating the result; the
        differences ``D_k`` are never formed). The corrector from ``s`` shares ``c_x x`` with
        the predictor from ``s``: with ``keep`` the predictor returns it for it (the same
        numbers) as the second item, ``(s, c_x x)`` (else None); the corrector consumes
        ``st.shared``. ``out``: the buffer of the result (:meth:`Problem.take_spare`)."""
        c_x, c_0, rks, w_p, w_c = c
        shared = st.shared
        if shared is not None and shared[0] == s and m_t is not None:
            base = shared[1]
        else:
            base = x * c_x
        w, ms = (w_p, list(st.outputs[1:len(rks) + 1])) if m_t is None else \
            (w_c, list(st.outputs[1:len(rks) + 1]) + [m_t])
        coefs = [-wk / rk for wk, rk in zip(w, rks)] + ([-w[-1]] if m_t is not None else [])
        y = linear_combination(1.0, base, [c_0 - sum(coefs), *coefs],   # m_s: the newest output
                               [st.outputs[0], *ms], out)
        return y, ((s, base) if keep and m_t is None else None)

    def _correct_first(self, p: Problem, x: Tensor, outputs: Outputs, m: Tensor) -> Tensor:
        """UniC for the step from alpha = 0 (grid point 0) to grid point 1. In ``u = e^lambda =
        alpha / sigma`` the data-prediction update reads ``x_1 = (sigma_1 / sigma_0) x_0 +
        sigma_1 int_0^{u_1} x0 du`` (a node at u = 0 is fine where lambda = -inf is not): the
        trapezoid rule through the outputs at u = 0 and u_1, ``alpha_1 (m_0 + m_1) / 2``, has
        local error O(alpha_1^3), one order above the first-order predictor."""
        return self.combine(p, x, 0, 1, torch.full((2,), 0.5, dtype=torch.float64),
                            [outputs[0], m])

    def step(self, p: Problem, i: int, x: Tensor, st: UniPCState,
             given: ModelOutput | None = None) -> tuple[Tensor, UniPCState]:
        start, last = st.start, self.final_to_zero and i == p.steps - 1
        # alpha = 0: only the data prediction is defined there; an x0 network (x0, denoiser)
        # under UniP: its output is what UniPC integrates, no conversion
        if i < start or (self.prediction == "x0" and self.predictor is None and not last
                         and (p.linear_form if given is None else given.kind) == "x0"):
            kind, eps = "x0", None
            m = self.evaluate(p, x, p.times[i], p.alpha[i], p.sigma[i], given)[0]
        else:
            kind, eps = "eps", p.predict_at(i, x, "eps", given)
            m = self.convert(p, x, eps, p.alpha[i], p.sigma[i])
        if self.corrector and i > 0 and (i - 1) not in self.disable_corrector:
            assert st.x_base is not None
            if i - 1 < start:
                x = self._correct_first(p, st.x_base, st.outputs, m)
            else:
                x = self._update(st.x_base, st, i - 1, st.table[i - 1], m,
                                 out=p.take_spare(x))[0]
        st = UniPCState(push(st.outputs, m, self.max_order + 1), start, st.table, st.inner, x)
        if last:
            return self.to_zero(p, i, x, eps, m), st
        if self.predictor is None:
            if i < start:
                return self.first_step(p, x, m), st
            keep = self.corrector and i not in self.disable_corrector and i + 1 < p.steps
            x_next, shared = self._update(x, st, i, st.table[i], None, keep,
                                          out=p.take_spare(x))
            return x_next, UniPCState(st.outputs, start, st.table, None, x, shared)
        out = ModelOutput(i, kind, eps if eps is not None else m)
        x_next, inner = self.predictor.step(p, i, x, st.inner, out)
        return x_next, UniPCState(st.outputs, start, st.table, inner, x)
