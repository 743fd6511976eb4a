"""Reverse-time dynamics built from a forward SDE and any score model."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .._utils import append_dims
from ..sde.base import ForwardSDE
from .parameterization import DiffusionModel, as_model


class ReverseSDE:
    """The reverse-time SDE ``dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar``
    (Anderson 1982; Song et al. 2021, Eq. 6), integrated from t = T down to t_min."""

    def __init__(self, sde: ForwardSDE, model: DiffusionModel | Any, prediction: str = "score"):
        self.sde = sde
        self.model = as_model(model, sde, prediction)

    def drift(self, x: Tensor, t: Any) -> Tensor:
        g2 = append_dims(self.sde.g2(t).to(x), x.ndim)
        return self.sde.drift(x, t) - g2 * self.model.score(x, t)

    def diffusion(self, t: Any) -> Tensor:
        return self.sde.g(t)


class ProbabilityFlowODE:
    """The probability-flow ODE ``dx/dt = f(t) x - g(t)^2 score(x, t) / 2`` (Song et al. 2021,
    Eq. 13): the deterministic flow with the same marginals as the forward SDE."""

    def __init__(self, sde: ForwardSDE, model: DiffusionModel | Any, prediction: str = "score"):
        self.sde = sde
        self.model = as_model(model, sde, prediction)

    def drift(self, x: Tensor, t: Any) -> Tensor:
        g2 = append_dims(self.sde.g2(t).to(x), x.ndim)
        return self.sde.drift(x, t) - 0.5 * g2 * self.model.score(x, t)
