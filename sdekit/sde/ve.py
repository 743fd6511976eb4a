"""Variance-exploding processes: geometric VE (Song et al. 2021) and EDM (Karras et al. 2022)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils import require, require_finite_positive
from .base import ForwardSDE


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    """``0 < sigma_min < sigma_max``, both finite (the VE and EDM noise ranges)."""
    require_finite_positive("sigma_min", sigma_min)
    require_finite_positive("sigma_max", sigma_max)
    require(sigma_max > sigma_min, "sigma_max", sigma_max, f"sigma_max > sigma_min ({sigma_min})")


class VESDE(ForwardSDE):
    """VE SDE with geometric noise: ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``, ``alpha = 1``,
    ``f = 0``, ``g = sigma(t) sqrt(2 log(sigma_max/sigma_min))`` (Song et al. 2021, Eq. 30).

    The marginal std is taken as sigma(t), as in score-SDE, so the "data" at t = 0 carries noise of
    std sigma_min. The prior is ``N(0, sigma_max^2 I)``.
    """

    unit_alpha = True

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0,
                 T: float = 1.0) -> None:
        _check_sigma_range(sigma_min, sigma_max)
        super().__init__(t_min, T)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return 0 * t  # zero, but keeps the autograd graph

    def _log_sigma(self, t: Tensor) -> Tensor:
        return math.log(self.sigma_min) + t * self._log_ratio

    def _f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: Tensor) -> Tensor:
        return torch.exp(2 * self._log_sigma(t)) * 2 * self._log_ratio

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        return (-lam - math.log(self.sigma_min)) / self._log_ratio

    @property
    def prior_std(self) -> float:
        return float(torch.exp(self._log_sigma(torch.tensor(self.T, dtype=torch.float64))))

    def __repr__(self) -> str:
        return (f"VESDE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, "
                f"t_min={self.t_min:g}, T={self.T:g})")


class EDMSDE(ForwardSDE):
    """EDM process (Karras et al. 2022, Table 1): ``sigma(t) = t``, ``alpha = 1``, ``f = 0``,
    ``g = sqrt(2 t)``, on ``[sigma_min, sigma_max]`` (0.002 and 80 by default). ``sigma_data`` is
    recorded for EDM preconditioning. Prior ``N(0, sigma_max^2 I)``."""

    unit_alpha = True

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5) -> None:
        _check_sigma_range(sigma_min, sigma_max)
        require_finite_positive("sigma_data", sigma_data)
        super().__init__(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)

    def _log_alpha(self, t: Tensor) -> Tensor:
        return 0 * t

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def _f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: Tensor) -> Tensor:
        return 2 * t

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def __repr__(self) -> str:
        return (f"EDMSDE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, "
                f"sigma_data={self.sigma_data:g})")
