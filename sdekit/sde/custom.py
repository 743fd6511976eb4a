"""A forward SDE from user functions alpha(t) and sigma(t)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._utils import require_finite_positive
from .base import ForwardSDE

_CHECK_POINTS = 257


class CustomSDE(ForwardSDE):
    """Any schedule given as differentiable torch functions ``alpha(t)`` and ``sigma(t)``.

    ``f = d log alpha / dt`` and ``g^2 = d sigma^2/dt - 2 f sigma^2`` are derived by autograd,
    and ``t(lambda)`` by bisection, so the schedule is a first-class forward SDE for every solver.
    On construction the schedule is checked on a grid: alpha and sigma must be finite and > 0,
    lambda strictly decreasing and g^2 >= 0.
    """

    def __init__(self, alpha: Callable[[Tensor], Tensor], sigma: Callable[[Tensor], Tensor],
                 t_min: float, T: float, prior_std: float | None = None,
                 name: str = "custom") -> None:
        if not callable(alpha) or not callable(sigma):
            raise TypeError("alpha and sigma must be callables mapping a float64 tensor of times "
                            "to a tensor of the same shape")
        if prior_std is not None:
            require_finite_positive("prior_std", prior_std)
        super().__init__(t_min, T)
        self._alpha_fn, self._sigma_fn = alpha, sigma
        self._prior_std = prior_std
        self.name = name
        t = torch.linspace(self.t_min, self.T, _CHECK_POINTS, dtype=torch.float64)
        for label, fn in (("alpha", alpha), ("sigma", sigma)):
            v = torch.as_tensor(fn(t), dtype=torch.float64)
            if v.shape != t.shape:
                raise ValueError(f"{label}(t) must return the shape of t {tuple(t.shape)}, got "
                                 f"{tuple(v.shape)}")
            bad = ~torch.isfinite(v) | (v <= 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"{label}(t={t[i].item():.6g}) = {v[i].item()!r}: expected a "
                                 f"finite value > 0 on [t_min, T]")
        lam = self._lambda(t)
        if not bool((lam[1:] < lam[:-1]).all()):
            i = int((lam[1:] >= lam[:-1]).nonzero()[0])
            raise ValueError(f"lambda(t) = log alpha - log sigma must be strictly decreasing, but "
                             f"it does not decrease between t={t[i].item():.6g} and "
                             f"t={t[i + 1].item():.6g}")
        g2 = self._g2(t)
        if bool((g2 < -1e-10 * (1 + g2.abs().max())).any()):
            i = int((g2 < 0).nonzero()[0])
            raise ValueError(f"g^2(t={t[i].item():.6g}) = {g2[i].item():.6g} < 0: this alpha, "
                             "sigma pair is not the marginal of any forward SDE")

    def _log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(self._alpha_fn(t))

    def _log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(self._sigma_fn(t))

    @property
    def prior_std(self) -> float:
        return self._prior_std if self._prior_std is not None else super().prior_std

    def __repr__(self) -> str:
        return f"CustomSDE({self.name!r}, t_min={self.t_min:g}, T={self.T:g})"
