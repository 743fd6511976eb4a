"""Variance-preserving processes: linear VP, cosine VP and sub-VP (Song et al. 2021; Nichol &
Dhariwal 2021)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import is_real, require
from .base import ForwardSDE


def _t_from_neg_log_alpha(m: Tensor, b0: float, b1: float) -> Tensor:
    """Solve ``(b1-b0)/4 t^2 + b0/2 t = m`` for t >= 0 (rationalised: no cancellation)."""
    return 2 * m / (b0 / 2 + torch.sqrt(b0 * b0 / 4 + (b1 - b0) * m))


def _check_betas(beta_min: float, beta_max: float) -> None:
    require(is_real(beta_min) and beta_min >= 0, "beta_min", beta_min, "a finite number >= 0")
    require(is_real(beta_max) and beta_max > 0, "beta_max", beta_max, "a finite number > 0")
    require(beta_max >= beta_min, "beta_max", beta_max, f"beta_max >= beta_min ({beta_min})")


class VPSDE(ForwardSDE):
    """Linear VP SDE: ``beta(t) = beta_min + t (beta_max - beta_min)``, ``f = -beta/2``,
    ``g = sqrt(beta)``, ``log alpha = -t^2 (beta_max - beta_min)/4 - t beta_min/2``,
    ``sigma = sqrt(1 - alpha^2)``. Song et al. 2021, Eq. 11 and 29. Closed-form t(lambda)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3,
                 T: float = 1.0) -> None:
        _check_betas(beta_min, beta_max)
        require(is_real(t_min) and t_min > 0, "t_min", t_min,
                "t_min > 0 (sigma(0) = 0 for a VP process)")
        super().__init__(t_min, T)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2 * self._log_alpha(t)))

    def _f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def _g2(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  -log alpha = softplus(-2 lambda) / 2
        return _t_from_neg_log_alpha(0.5 * F.softplus(-2 * lam), self.beta_min, self.beta_max)

    @property
    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return (f"VPSDE(beta_min={self.beta_min:g}, beta_max={self.beta_max:g}, "
                f"t_min={self.t_min:g}, T={self.T:g})")


class SubVPSDE(VPSDE):
    """sub-VP SDE (Song et al. 2021, Eq. 17): the VP mean, ``sigma = 1 - alpha^2`` and
    ``g^2 = beta(t) (1 - alpha^4)``; closed-form t(lambda)."""

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(-torch.expm1(2 * self._log_alpha(t)))

    def _g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(4 * self._log_alpha(t))

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        # alpha / (1 - alpha^2) = e^lambda  =>  alpha = 2 / (u + sqrt(u^2 + 4)), u = e^-lambda
        u = torch.exp(-lam)
        m = torch.log1p(0.5 * (u + u * u / (torch.sqrt(u * u + 4) + 2)))  # -log alpha
        return _t_from_neg_log_alpha(m, self.beta_min, self.beta_max)

    def __repr__(self) -> str:
        return super().__repr__().replace("VPSDE", "SubVPSDE", 1)


class CosineVPSDE(ForwardSDE):
    """Cosine VP schedule (Nichol & Dhariwal 2021, Eq. 17):
    ``alpha^2 = cos^2(pi/2 (t+s)/(1+s)) / cos^2(pi/2 s/(1+s))``, ``sigma = sqrt(1 - alpha^2)``.

    ``T`` defaults to 0.9946 (as in DPM-Solver), which clips the schedule where lambda would
    plunge towards -infinity (lambda(T) is about -5.1 there). Closed-form t(lambda).
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, T: float = 0.9946) -> None:
        require(is_real(s) and s > 0, "s", s, "a finite number > 0")
        require(is_real(T) and T < 1.0, "T", T, "T < 1 (alpha(1) = 0 for the cosine schedule)")
        require(is_real(t_min) and t_min > 0, "t_min", t_min,
                "t_min > 0 (sigma(0) = 0 for a VP process)")
        super().__init__(t_min, T)
        self.s = float(s)
        self._theta_s = math.pi / 2 * self.s / (1 + self.s)

    def _theta(self, t: Tensor) -> Tensor:
        return math.pi / 2 * (t + self.s) / (1 + self.s)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(torch.cos(self._theta(t))) - math.log(math.cos(self._theta_s))

    def _log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2 * self._log_alpha(t)))

    def _f(self, t: Tensor) -> Tensor:
        return -math.pi / (2 * (1 + self.s)) * torch.tan(self._theta(t))

    def _g2(self, t: Tensor) -> Tensor:
        return -2 * self._f(t)

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        a2, s2 = torch.sigmoid(2 * lam), torch.sigmoid(-2 * lam)  # alpha^2, sigma^2
        c2 = math.cos(self._theta_s) ** 2
        theta = torch.atan2(torch.sqrt(s2 * c2 + (1 - c2)), torch.sqrt(a2 * c2))
        return theta * 2 * (1 + self.s) / math.pi - self.s

    @property
    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"CosineVPSDE(s={self.s:g}, t_min={self.t_min:g}, T={self.T:g})"
