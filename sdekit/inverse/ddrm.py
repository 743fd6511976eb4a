"""DDRM: Denoising Diffusion Restoration Models (Kawar et al. 2022) for ``y = H x + sigma_y z``
with ``H = U diag(s) V^T`` (an :class:`~sdekit.inverse.operators.SVDOperator`).

DDRM is its own update rule, written here as a :class:`~sdekit.solvers.base.FixedGridSolver` that
:func:`sdekit.sample` drives on any forward SDE and any grid. It works in the VE-equivalent
variables ``x_tilde = x / alpha`` with noise level ``sigma_tilde = sigma / alpha`` and in the
spectral coordinates ``x_bar = V^T x_tilde``, ``y_bar = diag(s)^-1 U^T y``. For a step from
``sigma_tilde`` (``st``) to ``st'`` with ``x0_bar = V^T x0_hat(x_t)`` and ``eps`` standard normal
(Kawar et al. 2022, Eq. 7-8), per coordinate ``i``:

* not observed (``s_i = 0``): ``x0_bar + sqrt(1 - eta^2) st' (x_bar - x0_bar) / st + eta st' eps``;
* observed, ``st' < sigma_y / s_i``: ``x0_bar + sqrt(1 - eta^2) st' (y_bar - x0_bar) /
  (sigma_y / s_i) + eta st' eps``;
* observed, ``st' >= sigma_y / s_i``: ``(1 - eta_b) x0_bar + eta_b y_bar + sqrt(st'^2 -
  (sigma_y / s_i)^2 eta_b^2) eps``.

The initial state is DDRM's ``q(x_T | y)``: ``x_bar = y_bar + sqrt(st_T^2 - (sigma_y / s_i)^2) eps``
for observed coordinates (0 under the root where ``sigma_y / s_i > st_T``), ``st_T eps`` for the
others.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import compute_dtype, is_real, require
from ..dynamics.parameterization import DiffusionModel, as_model
from ..integrate import Solution, sample
from ..noise import SeededNoise
from ..sde.base import ForwardSDE
from ..solvers.base import FixedGridSolver, Problem
from .methods import _START, _base_seeds, _check_measurement, _streams
from .operators import SVDOperator


class DDRMSolver(FixedGridSolver):
    """DDRM's update (Kawar et al. 2022, Eq. 7-8); 1 NFE per step; stochastic for ``eta > 0``
    or ``eta_b`` and ``sigma_y`` giving noise. Not registered: it needs the measurement (build it
    through :func:`ddrm`)."""

    name = "ddrm"
    family = "ddrm"
    paper = "Kawar et al. 2022, Denoising Diffusion Restoration Models, Eq. 7-8"
    default_grid = "uniform"
    stochastic = True

    def __init__(self, operator: SVDOperator, y: Tensor, sigma_y: float = 0.0,
                 eta: float = 0.85, eta_b: float = 1.0) -> None:
        self.op, self.sigma_y, self.eta, self.eta_b = operator, float(sigma_y), eta, eta_b
        s = operator.s
        pos = s > 0
        self.ratio = torch.where(pos, self.sigma_y / torch.where(pos, s, torch.ones_like(s)),
                                 torch.full_like(s, float("inf")))  # sigma_y / s_i
        yb = operator.Ut(y.double())
        self.y_bar = torch.where(pos, yb / torch.where(pos, s, torch.ones_like(s)),
                                 torch.zeros_like(yb))

    def _pad(self, v: Tensor, fill: float) -> Tensor:
        return torch.cat([v, v.new_full(v.shape[:-1] + (self.op.dim - self.op.rank,), fill)], -1)

    def initial(self, st_T: float, noise: SeededNoise, like: Tensor) -> Tensor:
        """DDRM's ``x_tilde_T`` (flat ``(B, D)``), drawn from ``noise``."""
        eps = noise.randn(like)
        ratio = self._pad(self.ratio, float("inf")).to(like)
        obs = torch.isfinite(ratio)
        yb = self._pad(self.y_bar, 0.0).to(like).expand_as(like)
        sd = torch.where(obs, (st_T ** 2 - torch.where(obs, ratio, 0) ** 2).clamp_min(0).sqrt(),
                         torch.full_like(ratio, st_T))
        return self.op.V(torch.where(obs, yb, 0) + sd * eps)

    def init(self, p: Problem, x: Tensor) -> Any:
        return (p.sigma / p.alpha).tolist()

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        st, st1 = state[i], state[i + 1]
        a0, a1 = float(p.alpha[i]), float(p.alpha[i + 1])
        flat = x.reshape(x.shape[0], -1)
        x0b = self.op.Vt(p.predict(x, p.times[i], "x0").reshape(x.shape[0], -1))
        xb = self.op.Vt(flat / a0)
        eps = p.noise.increment(p.times[i], p.times[i + 1], flat)
        ratio = self._pad(self.ratio, float("inf")).to(flat)
        yb = self._pad(self.y_bar, 0.0).to(flat)
        obs = torch.isfinite(ratio)
        r = torch.where(obs, ratio, torch.ones_like(ratio))
        c = (1 - self.eta ** 2) ** 0.5 * st1
        unobs = x0b + c * (xb - x0b) / st + self.eta * st1 * eps
        low = x0b + c * (yb - x0b) / r.clamp_min(torch.finfo(r.dtype).tiny) + self.eta * st1 * eps
        high = ((1 - self.eta_b) * x0b + self.eta_b * yb
                + (st1 ** 2 - (r * self.eta_b) ** 2).clamp_min(0).sqrt() * eps)
        new = torch.where(~obs, unobs, torch.where(st1 < ratio, low, high))
        return (a1 * self.op.V(new)).reshape(x.shape), state


def ddrm(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor], y: Tensor,
         operator: SVDOperator, *, sigma_y: float = 0.0, eta: float = 0.85, eta_b: float = 1.0,
         steps: int | None = None, seed: int = 0, seeds: Sequence[int] | None = None,
         prediction: str = "eps", **sample_options: Any) -> Solution:
    """DDRM posterior sampling for ``y = H x + sigma_y z`` (Kawar et al. 2022; see the module
    docstring), driven by :func:`sdekit.sample` (``steps`` on the ``uniform`` grid by default;
    ``grid``, ``t_start``, ``t_end`` and the other options of ``sample`` apply).

    Args:
        y: the measurement ``(batch, *operator.obs_shape)``.
        operator: an :class:`SVDOperator` (:class:`Inpainting`, :class:`SuperResolution`,
            :class:`Denoising`, :class:`MatrixOperator`).
        sigma_y: the measurement noise's standard deviation (>= 0).
        eta, eta_b: DDRM's noise parameters in [0, 1] (paper's defaults 0.85 and 1).
    """
    _check_measurement(y, operator, ": DDRM needs the operator's SVD")
    require(is_real(sigma_y) and sigma_y >= 0, "sigma_y", sigma_y, "a finite number >= 0")
    for k, v in (("eta", eta), ("eta_b", eta_b)):
        require(is_real(v) and 0 <= v <= 1, k, v, "a number in [0, 1]")
    for k in ("x_init", "shape", "solver", "noise"):
        require(k not in sample_options, k, sample_options.get(k), "not given: ddrm sets it")
    dm = as_model(model, sde, prediction)
    slv = DDRMSolver(operator, y, sigma_y, float(eta), float(eta_b))
    base = _base_seeds(seed, seeds, y.shape[0])
    t_start, grid = sample_options.get("t_start"), sample_options.get("grid")
    if grid is not None and not isinstance(grid, str):   # an explicit grid starts at grid[0]
        t_start = float(torch.as_tensor(grid, dtype=torch.float64).flatten()[0])
    t0 = torch.tensor(sde.T if t_start is None else float(t_start), dtype=torch.float64)
    a_T = float(sde.alpha(t0))
    require(a_T > 0, "t_start", t_start, f"a time where alpha > 0 (alpha({float(t0):g}) = 0: "
            "DDRM works in x / alpha)")
    with torch.no_grad():
        like = torch.empty((y.shape[0], operator.dim), dtype=compute_dtype(y.dtype),
                           device=y.device)
        xt = slv.initial(float(sde.sigma(t0)) / a_T, SeededNoise(_streams(base, _START)), like)
        x_init = (a_T * xt).reshape((y.shape[0],) + tuple(operator.event_shape)).to(y.dtype)
    return sample(sde, dm, x_init, solver=slv, steps=steps, seeds=_streams(base, 0),
                  **sample_options)


__all__ = ["DDRMSolver", "ddrm"]
