"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024).

The linear interpolant ``x_t = (1 - t) x0 + t eps`` on ``[t_min, 1]``: ``alpha = 1 - t``,
``sigma = t``. It reaches ``T = 1`` exactly, where ``alpha = 0``, the half-logSNR
``lambda = log((1 - t)/t)`` is ``-inf``, ``sigma_tilde = t / (1 - t)`` is ``inf`` and the prior
``N(0, I)`` is exact (no clipping of T as :class:`~sdekit.sde.vp.CosineVPSDE` needs).

Closed forms: ``f = d log alpha/dt = -1/(1 - t)``, ``g^2 = d sigma^2/dt - 2 f sigma^2 =
2 t / (1 - t)`` (both infinite at t = 1: the SDE's coefficients blow up where alpha vanishes, the
marginals do not), ``alpha' = -1``, ``sigma' = 1``, ``t(lambda) = 1 / (1 + e^lambda)``
(= sigmoid(-lambda)) and ``t(sigma_tilde) = sigma_tilde / (1 + sigma_tilde)``.

Which solvers start at t = 1 is a property of the solver (``Solver.starts_at_alpha_zero``):
data-prediction exponential integrators take the first step in closed form; methods written in
``x / alpha``, in the SDE's f and g, or in the noise prediction cannot, and say so.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._utils import is_real, require
from .base import ForwardSDE


class FlowSDE(ForwardSDE):
    """Rectified flow ``alpha = 1 - t``, ``sigma = t`` on ``[t_min, T]`` with ``0 < t_min < T
    <= 1`` (default ``T = 1``, the exact prior N(0, I)). The network of a flow-matching model
    predicts the velocity ``u = alpha' x0 + sigma' eps = eps - x0`` (``prediction='flow'``)."""

    def __init__(self, t_min: float = 1e-3, T: float = 1.0) -> None:
        require(is_real(t_min) and t_min > 0, "t_min", t_min,
                "a number > 0 (sigma(0) = 0: lambda(0) = +inf; finish at sigma = 0 with "
                "final_to_zero=True or denoise=True)")
        require(is_real(T) and T <= 1, "T", T, "a number <= 1 (alpha = 1 - t < 0 beyond t = 1)")
        super().__init__(t_min, T)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-t)

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def alpha(self, t: Any) -> Tensor:
        """``1 - t`` exactly (not through exp(log))."""
        return self._eval(lambda u: 1 - u, t)

    def sigma(self, t: Any) -> Tensor:
        """``t`` exactly."""
        return self._eval(lambda u: u, t)

    def _lambda(self, t: Tensor) -> Tensor:
        return torch.log1p(-t) - torch.log(t)

    def _f(self, t: Tensor) -> Tensor:
        return -1 / (1 - t)

    def _g2(self, t: Tensor) -> Tensor:
        return 2 * t / (1 - t)

    def _alpha_dot(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def _sigma_dot(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-lam)

    @property
    def prior_std(self) -> float:
        """``sqrt(alpha_T^2 + sigma_T^2)``: exactly 1 at ``T = 1`` (the prior N(0, I))."""
        return float((1 - self.T) ** 2 + self.T ** 2) ** 0.5

    def __repr__(self) -> str:
        return f"FlowSDE(t_min={self.t_min:g}, T={self.T:g})"
