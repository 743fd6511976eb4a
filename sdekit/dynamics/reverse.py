"""Reverse-time dynamics built from a forward SDE and any score model."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .._utils import append_dims
from ..sde.base import ForwardSDE
from .parameterization import DiffusionModel, as_model


def reverse_drift(sde: ForwardSDE, x: Tensor, t: Any, eps: Tensor,
                  weight: float = 1.0) -> Tensor:
    """``f(t) x - weight g(t)^2 score``, written with the noise prediction
    (``score = -eps / sigma``): weight 1 is the reverse-time SDE's drift (Song et al. 2021,
    Eq. 6), 1/2 the probability-flow ODE's (Eq. 13)."""
    coef = append_dims((weight * sde.g2(t) / sde.sigma(t)).to(x), x.ndim)
    return sde.drift(x, t) + coef * eps


class ReverseSDE:
    """The reverse-time SDE ``dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar``
    (Anderson 1982; Song et al. 2021, Eq. 6), integrated from t = T down to t_min."""

    def __init__(self, sde: ForwardSDE, model: DiffusionModel | Any, prediction: str = "score"):
        self.sde = sde
        self.model = as_model(model, sde, prediction)

    def drift(self, x: Tensor, t: Any) -> Tensor:
        return reverse_drift(self.sde, x, t, self.model.eps(x, t))

    def diffusion(self, t: Any) -> Tensor:
        return self.sde.g(t)


class ProbabilityFlowODE:
    """The probability-flow ODE ``dx/dt = f(t) x - g(t)^2 score(x, t) / 2`` (Song et al. 2021,
    Eq. 13): the deterministic flow with the same marginals as the forward SDE."""

    def __init__(self, sde: ForwardSDE, model: DiffusionModel | Any, prediction: str = "score"):
        self.sde = sde
        self.model = as_model(model, sde, prediction)

    def drift(self, x: Tensor, t: Any) -> Tensor:
        return reverse_drift(self.sde, x, t, self.model.eps(x, t), 0.5)
