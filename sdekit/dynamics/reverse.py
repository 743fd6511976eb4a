"""Reverse-time dynamics built from a forward SDE and any score model: the one place of the
reverse-time SDE's and the probability-flow ODE's drift and diffusion. The samplers use them too
(Euler-Maruyama, torchsde and the Runge-Kutta / dopri5 solves of the probability-flow ODE),
handing in the noise prediction of their own counted model call."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .._utils import append_dims
from ..sde.base import ForwardSDE
from .parameterization import DiffusionModel, as_model


def reverse_drift(sde: ForwardSDE, x: Tensor, t: Any, eps: Tensor,
                  weight: float = 1.0) -> Tensor:
    """``f(t) x - weight g(t)^2 score``, written with the noise prediction: ``score = -eps /
    sigma`` is folded into the coefficient ``weight g^2 / sigma`` (float64, on the time), so the
    state sees one multiply-add. Weight 1 is the reverse-time SDE's drift (Song et al. 2021,
    Eq. 6), 1/2 the probability-flow ODE's (Eq. 13)."""
    coef = append_dims((weight * sde.g2(t) / sde.sigma(t)).to(x), x.ndim)
    return sde.drift(x, t) + coef * eps


class _ReverseDynamics:
    """``dx = [f(t) x - weight g(t)^2 score(x, t)] dt (+ g(t) dw_bar)`` (drift:
    :func:`reverse_drift`)."""

    weight = 1.0

    def __init__(self, sde: ForwardSDE, model: DiffusionModel | Any = None,
                 prediction: str = "score") -> None:
        self.sde = sde
        self.model = None if model is None else as_model(model, sde, prediction)

    def _eps(self, x: Tensor, t: Any, eps: Tensor | None) -> Tensor:
        if eps is not None:
            return eps
        if self.model is None:
            raise ValueError(f"{type(self).__name__} was built without a model: pass the noise "
                             "prediction eps, or build it with a model")
        return self.model.eps(x, t)

    def drift(self, x: Tensor, t: Any, eps: Tensor | None = None) -> Tensor:
        """The drift at ``(x, t)``: from ``eps``, the noise prediction of a model call at
        ``(x, t)`` (a solver's counted call), or else from this object's model."""
        return reverse_drift(self.sde, x, t, self._eps(x, t, eps), self.weight)


class ReverseSDE(_ReverseDynamics):
    """The reverse-time SDE ``dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar``
    (Anderson 1982; Song et al. 2021, Eq. 6), integrated from t = T down to t_min."""

    weight = 1.0

    def diffusion(self, t: Any) -> Tensor:
        return self.sde.g(t)


class ProbabilityFlowODE(_ReverseDynamics):
    """The probability-flow ODE ``dx/dt = f(t) x - g(t)^2 score(x, t) / 2`` (Song et al. 2021,
    Eq. 13): the deterministic flow with the same marginals as the forward SDE."""

    weight = 0.5

    def drift_lambda(self, x: Tensor, t: Any, eps: Tensor | None = None) -> Tensor:
        """The same ODE with the half-logSNR lambda as the independent variable (``t`` the time
        of that lambda): ``dx/dlambda = (d log alpha/dlambda) x - sigma eps`` with
        ``d log alpha/dlambda = -2 sigma^2 f / g^2`` (``= sigma^2`` for every VP-type process;
        ``dt/dlambda = -2 sigma^2 / g^2``). In lambda the right-hand side is smooth even where
        f(t) is not (DDPM-discrete tables are piecewise linear in t), so Runge-Kutta methods
        keep their order on every forward SDE. ``eps`` as in :meth:`drift`."""
        eps = self._eps(x, t, eps)
        sde = self.sde
        s = sde.sigma(t)
        k = -2 * s * s * sde.f(t) / sde.g2(t)
        return append_dims(k.to(x), x.ndim) * x - append_dims(s.to(x), x.ndim) * eps
