"""Flow matching / linear interpolants (Lipman et al. 2023; Liu et al. 2023; Albergo &
Vanden-Eijnden 2023; Esser et al. 2024).

A linear interpolant ``x_t = alpha(t) x0 + sigma(t) eps`` on ``[t_min, 1]`` with alpha
decreasing from 1 to ``alpha(1) = 0`` *exactly* and sigma increasing from 0 to ``sigma(1) = 1``:
at ``T = 1`` the half-logSNR ``lambda = log(alpha/sigma)`` is ``-inf``, ``sigma_tilde =
sigma/alpha`` is ``inf`` and the prior ``N(0, I)`` is exact (no clipping of T as
:class:`~sdekit.sde.vp.CosineVPSDE` needs). :class:`LinearInterpolantSDE` derives every
coefficient from closed-form ``alpha, sigma, alpha', sigma'`` and a closed-form ``t(lambda)``:

* ``f = d log alpha/dt = alpha'/alpha``;
* ``g^2 = d sigma^2/dt - 2 f sigma^2 = 2 sigma (alpha sigma' - alpha' sigma) / alpha``
  (``>= 0`` for decreasing alpha, increasing sigma);

both infinite at t = 1: the SDE's coefficients blow up where alpha vanishes, the marginals do
not. Two members:

* :class:`FlowSDE`, rectified flow ``alpha = 1 - t``, ``sigma = t``: ``f = -1/(1 - t)``,
  ``g^2 = 2 t / (1 - t)``, ``t(lambda) = 1 / (1 + e^lambda) = sigmoid(-lambda)``;
* :class:`TrigFlowSDE`, the trigonometric interpolant ``alpha = cos(pi t/2)``, ``sigma =
  sin(pi t/2)`` (Albergo & Vanden-Eijnden 2023, Sec. 3; variance preserving, the cosine schedule
  without its offset, reaching t = 1): ``f = -(pi/2) tan(pi t/2)``, ``g^2 = pi tan(pi t/2)``,
  ``t(lambda) = (2/pi) atan(e^-lambda)``.

Which solvers start at t = 1 is a property of the solver (``Solver.starts_at_alpha_zero``):
data-prediction exponential integrators take the first step in closed form; methods written in
``x / alpha``, in the SDE's f and g, or in the noise prediction cannot, and say so.
"""
from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

from .._utils import is_real, require
from .base import ForwardSDE


class LinearInterpolantSDE(ForwardSDE):
    """A linear interpolant ``x_t = alpha(t) x0 + sigma(t) eps`` on ``[t_min, T]`` with ``0 <
    t_min < T <= 1`` and ``alpha(1) = 0``, ``sigma(1) = 1`` exactly (default ``T = 1``, the exact
    prior N(0, I)). Subclasses give ``alpha``, ``sigma`` and their derivatives in closed form
    (``_a``, ``_s``, ``_alpha_dot``, ``_sigma_dot``) and ``_t_of_lambda``; f and g^2 follow (see
    the module doc). The network of a flow-matching model predicts the velocity ``u = alpha' x0
    + sigma' eps`` (``prediction='flow'``)."""

    def __init__(self, t_min: float = 1e-3, T: float = 1.0) -> None:
        require(is_real(t_min) and t_min > 0, "t_min", t_min,
                "a number > 0 (sigma(0) = 0: lambda(0) = +inf; finish at sigma = 0 with "
                "final_to_zero=True or denoise=True)")
        require(is_real(T) and T <= 1, "T", T, "a number <= 1 (alpha(1) = 0: alpha < 0 beyond)")
        super().__init__(t_min, T)

    @abc.abstractmethod
    def _a(self, t: Tensor) -> Tensor:
        """alpha(t) (float64, exactly 0 at t = 1)."""

    @abc.abstractmethod
    def _s(self, t: Tensor) -> Tensor:
        """sigma(t) (float64, exactly 1 at t = 1)."""

    @abc.abstractmethod
    def _alpha_dot(self, t: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _sigma_dot(self, t: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _t_of_lambda(self, lam: Tensor) -> Tensor: ...

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(self._a(t))

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(self._s(t))

    def alpha(self, t: Any) -> Tensor:
        """alpha(t) in closed form (exactly 0 at t = 1, not through exp(log))."""
        return self._eval(self._a, t)

    def sigma(self, t: Any) -> Tensor:
        """sigma(t) in closed form."""
        return self._eval(self._s, t)

    def _f(self, t: Tensor) -> Tensor:
        return self._alpha_dot(t) / self._a(t)

    def _g2(self, t: Tensor) -> Tensor:
        a, s = self._a(t), self._s(t)
        return 2 * s * (a * self._sigma_dot(t) - self._alpha_dot(t) * s) / a

    @property
    def prior_std(self) -> float:
        """``sqrt(alpha_T^2 + sigma_T^2)``: exactly 1 at ``T = 1`` (the prior N(0, I))."""
        t = torch.tensor(self.T, dtype=torch.float64)
        return math.hypot(float(self._a(t)), float(self._s(t)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, T={self.T:g})"


class FlowSDE(LinearInterpolantSDE):
    """Rectified flow ``alpha = 1 - t``, ``sigma = t`` on ``[t_min, T]`` with ``0 < t_min < T
    <= 1`` (default ``T = 1``, the exact prior N(0, I)). The network of a flow-matching model
    predicts the velocity ``u = alpha' x0 + sigma' eps = eps - x0`` (``prediction='flow'``).
    ``f = -1/(1 - t)``, ``g^2 = 2 t / (1 - t)``, ``t(lambda) = sigmoid(-lambda)``,
    ``t(sigma_tilde) = sigma_tilde / (1 + sigma_tilde)``."""

    def _a(self, t: Tensor) -> Tensor:
        return 1 - t

    def _s(self, t: Tensor) -> Tensor:
        return t

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-t)

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


class TrigFlowSDE(LinearInterpolantSDE):
    """The trigonometric interpolant ``alpha = cos(pi t/2)``, ``sigma = sin(pi t/2)`` on
    ``[t_min, T]``, ``0 < t_min < T <= 1`` (Albergo & Vanden-Eijnden 2023): variance preserving
    (``alpha^2 + sigma^2 = 1``) and reaching ``alpha = 0`` at ``T = 1`` (cos(pi/2) is rounded to
    exactly 0 there). ``lambda = -log tan(pi t/2)``, ``f = -(pi/2) tan(pi t/2)``, ``g^2 = -2 f``,
    ``t(lambda) = (2/pi) atan(e^-lambda)``; the flow velocity is ``u = (pi/2) (cos(pi t/2) eps -
    sin(pi t/2) x0)``."""

    _W = math.pi / 2

    def _a(self, t: Tensor) -> Tensor:
        return torch.where(t == 1, torch.zeros_like(t), torch.cos(self._W * t))

    def _s(self, t: Tensor) -> Tensor:
        return torch.sin(self._W * t)

    def _lambda(self, t: Tensor) -> Tensor:
        return -self._tan(t).log()

    def _tan(self, t: Tensor) -> Tensor:
        """tan(pi t/2), ``inf`` at t = 1 (where float64 pi/2 would give 1.6e16)."""
        return torch.tan(self._W * t).where(t < 1, torch.full_like(t, math.inf))

    def _f(self, t: Tensor) -> Tensor:
        return -self._W * self._tan(t)

    def _g2(self, t: Tensor) -> Tensor:
        return 2 * self._W * self._tan(t)

    def _alpha_dot(self, t: Tensor) -> Tensor:
        return -self._W * self._s(t)

    def _sigma_dot(self, t: Tensor) -> Tensor:
        return self._W * self._a(t)

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.atan(torch.exp(-lam)) / self._W
