"""Denoising score matching on any :class:`~sdekit.sde.ForwardSDE` (Vincent 2011; Song et al.
2021), with the weightings of the field.

With ``x_t = alpha(t) x0 + sigma(t) eps`` the network's output (eps, x0, v or an EDM-preconditioned
denoiser) is converted to ``eps_hat`` by the same adapters the samplers use, and:

* ``eps``: DDPM's simple loss (Ho et al. 2020, Eq. 14): ``|eps_hat - eps|^2`` with weight 1 and
  ``t ~ U[t_min, T]`` (uniform over the integer timesteps for :class:`DiscreteDDPM`).
* ``likelihood``: the score-matching loss weighted by ``g(t)^2`` (Song, Durkan et al. 2021, Thm 1),
  ``int g^2 |s_theta - grad log p_t|^2 dt``. Since ``g^2 / sigma^2 = -2 dlambda/dt`` it equals
  ``2 int |eps_hat - eps|^2 dlambda``: importance sampling ``lambda ~ U[lambda_min, lambda_max]``
  makes every per-sample weight constant. We return that estimator divided by
  ``2 (lambda_max - lambda_min)`` (``importance=False``: ``t ~ U`` with weight
  ``g^2 / sigma^2 (T - t_min) / (2 (lambda_max - lambda_min))``, the same expectation).
* ``edm``: Karras et al. 2022, Eq. 8 and Table 1: ``sigma_tilde = sigma / alpha`` log-normal with
  ``P_mean = -1.2, P_std = 1.2`` (clamped to the SDE's range), weight
  ``(sigma^2 + sd^2) / (sigma sd)^2`` on ``|x0_hat - x0|^2``.
* ``flow``: conditional flow matching (Lipman et al. 2023, Eq. 9 with the interpolant's
  conditional velocity; rectified flow, Liu et al. 2023): ``|u_hat - (alpha' x0 + sigma' eps)|^2``
  with weight 1 (``eps - x0`` for :class:`~sdekit.sde.FlowSDE`), ``u_hat`` the network's output
  converted to the flow kind; ``t`` logit-normal, ``t = sigmoid(m + s z)`` with ``m = 0, s = 1``
  (SD3, Esser et al. 2024, Sec. 3.1, Eq. 19; ``t_sampling='logit_normal'``) or uniform
  (``'uniform'``), clamped to ``[t_min, T]``.

All losses are averaged over the data dimensions (so their scale does not grow with image size).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._utils import append_dims, is_real, require
from ..dynamics.parameterization import (
    PREDICTIONS,
    TIME_INPUTS,
    convert,
    network_input,
    network_time_input,
    prediction_kind,
    time_cond,
)
from ..sde.base import ForwardSDE
from ..sde.discrete import DiscreteDDPM

LOSSES = ("eps", "likelihood", "edm", "flow")
T_SAMPLINGS = ("logit_normal", "uniform")


def _noised(sde: ForwardSDE, x0: Tensor, t: Tensor, noise: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, alpha, sigma)`` with ``x_t = alpha(t) x0 + sigma(t) noise`` (coefficients
    broadcastable against x0, in its dtype)."""
    a = append_dims(sde.alpha(t).to(x0), x0.ndim)
    s = append_dims(sde.sigma(t).to(x0), x0.ndim)
    return a * x0 + s * noise, a, s


class DSMLoss:
    """Denoising score-matching loss for a network ``net(x, cond, y)``.

    Args:
        sde: the forward process.
        kind: ``eps``, ``likelihood`` or ``edm`` (see the module docstring).
        prediction: the network's output, a kind of the model contract
            (:data:`~sdekit.dynamics.PREDICTIONS`: ``eps``, ``x0``, ``v``, ``score``, ``denoiser``,
            ``flow``; a denoiser is called as ``net(x / alpha, sigma_tilde)`` and returns x0).
        time_input: the conditioning passed to non-denoiser networks, one of
            :data:`~sdekit.dynamics.TIME_INPUTS` (:func:`~sdekit.dynamics.time_cond`):
            ``lambda`` (sdekit's networks), ``t``, ``model_time``, ``sigma_tilde``, ``t1000``.
        importance: for ``likelihood``: sample lambda uniformly (True) or t uniformly (False).
        p_mean, p_std, sigma_data: EDM's noise distribution and data scale.
        t_sampling, logit_mean, logit_std: for ``flow``: ``logit_normal`` (default; ``t =
            sigmoid(logit_mean + logit_std z)``) or ``uniform`` t.
    """

    def __init__(self, sde: ForwardSDE, kind: str = "eps", prediction: str = "eps",
                 time_input: str = "lambda", importance: bool = True, p_mean: float = -1.2,
                 p_std: float = 1.2, sigma_data: float = 0.5, t_sampling: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        require(kind in LOSSES, "loss", kind, f"one of {LOSSES}")
        require(t_sampling in T_SAMPLINGS, "t_sampling", t_sampling, f"one of {T_SAMPLINGS}")
        require(is_real(logit_mean), "logit_mean", logit_mean, "a finite number")
        require(is_real(logit_std) and logit_std > 0, "logit_std", logit_std, "a number > 0")
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, float(logit_mean), \
            float(logit_std)
        require(prediction in PREDICTIONS, "prediction", prediction, f"one of {PREDICTIONS}")
        require(time_input in TIME_INPUTS, "time_input", time_input, f"one of {TIME_INPUTS}")
        require(sigma_data > 0, "sigma_data", sigma_data, "a number > 0")
        self.sde, self.kind, self.prediction = sde, kind, prediction
        self.time_input = network_time_input(prediction, time_input)
        self.importance = bool(importance)
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)
        self._lam_lo, self._lam_hi = sde.lambda_min, sde.lambda_max

    # -------------------------------------------------------------------- time sampling
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training times (float64, shape ``(n,)``) drawn from this loss's proposal."""
        sde = self.sde
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.kind == "edm":
            z = torch.randn(n, generator=generator, dtype=torch.float64)
            lo, hi = math.exp(-self._lam_hi), math.exp(-self._lam_lo)
            s = torch.exp(self.p_mean + self.p_std * z).clamp(lo, hi)
            return sde.t_of_sigma_tilde(s)
        if self.kind == "flow":
            if self.t_sampling == "logit_normal":
                z = torch.randn(n, generator=generator, dtype=torch.float64)
                return torch.sigmoid(self.logit_mean + self.logit_std * z).clamp(sde.t_min, sde.T)
            return sde.t_min + u * (sde.T - sde.t_min)
        if self.kind == "likelihood" and self.importance:
            return sde.t_of_lambda(self._lam_lo + u * (self._lam_hi - self._lam_lo))
        if isinstance(sde, DiscreteDDPM):
            k = torch.clamp((u * sde.N).long(), max=sde.N - 1)
            return sde.timestep_to_t(k)
        return sde.t_min + u * (sde.T - sde.t_min)

    def weight(self, t: Tensor) -> Tensor:
        """Per-sample weight (float64) applied to the squared error at time ``t``."""
        if self.kind in ("eps", "flow") or (self.kind == "likelihood" and self.importance):
            return torch.ones_like(t)
        if self.kind == "likelihood":
            sde = self.sde
            return (sde.g2(t) / sde.sigma(t) ** 2 * (sde.T - sde.t_min)
                    / (2 * (self._lam_hi - self._lam_lo)))
        s = self.sde.sigma_tilde(t)
        sd = self.sigma_data
        return (s * s + sd * sd) / (s * sd) ** 2

    # ---------------------------------------------------------------------------- loss
    def per_sample(self, net: Callable[..., Tensor], x0: Tensor, t: Tensor, noise: Tensor,
                   y: Tensor | None = None) -> Tensor:
        """The weighted squared error for each sample at given times and noise (shape ``(B,)``)."""
        if noise.shape != x0.shape:
            raise ValueError(f"shape mismatch: noise has shape {tuple(noise.shape)} but x0 has "
                             f"shape {tuple(x0.shape)}")
        sde = self.sde
        t = torch.as_tensor(t, dtype=torch.float64, device=x0.device)
        xt, a, s = _noised(sde, x0, t, noise)
        inp = network_input(self.prediction, xt, a)
        cond = time_cond(sde, self.time_input, t).to(x0.dtype)
        args: tuple[Any, ...] = (inp, cond) if y is None else (inp, cond, y)
        out = net(*args)
        if out.shape != x0.shape:
            raise ValueError(f"shape mismatch: the network returned shape {tuple(out.shape)} for "
                             f"an input of shape {tuple(x0.shape)}")
        w = self.weight(t).to(x0.dtype)
        # the loss compares the network's output, converted by the model contract, with the
        # kind's regression target: eps (eps, likelihood), x0 (edm), the velocity (flow)
        kind = {"flow": "flow", "edm": "x0"}.get(self.kind, "eps")
        c: tuple[Tensor, ...] = (a, s)
        if prediction_kind(kind).needs_dots or prediction_kind(self.prediction).needs_dots:
            c += (append_dims(sde.alpha_dot(t).to(x0), x0.ndim),
                  append_dims(sde.sigma_dot(t).to(x0), x0.ndim))
        target = {"flow": lambda: c[2] * x0 + c[3] * noise, "x0": lambda: x0,
                  "eps": lambda: noise}[kind]()
        hat = convert(self.prediction, kind, out, xt, *c)
        dims = tuple(range(1, x0.ndim))
        return w * (hat - target).pow(2).mean(dims)

    def __call__(self, net: Callable[..., Tensor], x0: Tensor, y: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """A Monte-Carlo estimate of the loss on a batch (mean over the batch)."""
        t = self.sample_t(x0.shape[0], generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return self.per_sample(net, x0, t, noise, y).mean()

    def __repr__(self) -> str:
        return f"DSMLoss(kind={self.kind!r}, prediction={self.prediction!r}, sde={self.sde!r})"


def checkpoint_loss(sde: ForwardSDE, net: Any, settings: Any) -> DSMLoss:
    """The denoising loss ``net`` is trained with under a training config ``settings`` (a
    :class:`~sdekit.training.trainer.TrainConfig` or a checkpoint's config dict): its loss kind,
    time sampling and the network's prediction, time input and data scale."""
    get = settings.get if isinstance(settings, dict) else lambda k, d=None: getattr(settings, k)
    return DSMLoss(sde, str(get("loss")), prediction=net.prediction, time_input=net.time_input,
                   importance=get("importance", True), sigma_data=net.sigma_data,
                   t_sampling=get("t_sampling", "logit_normal"),
                   logit_mean=get("logit_mean", 0.0), logit_std=get("logit_std", 1.0))


class ClassifierLoss:
    """Cross-entropy of a noise-conditional classifier ``net(x_t, cond) -> logits`` on noised
    data ``x_t = alpha x0 + sigma eps`` (Dhariwal & Nichol 2021, Sec. 4: the classifier is
    trained on the diffusion's noisy marginals), with ``t`` drawn as the ``eps`` loss draws it
    (uniform in ``[t_min, T]``; uniform over the integer timesteps for :class:`DiscreteDDPM`)
    and ``cond`` the time input ``time_input`` (``lambda`` for sdekit's classifier)."""

    kind = "classifier"

    def __init__(self, sde: ForwardSDE, time_input: str = "lambda") -> None:
        require(time_input in TIME_INPUTS, "time_input", time_input, f"one of {TIME_INPUTS}")
        self.sde, self.time_input = sde, time_input
        self._times = DSMLoss(sde, "eps")

    def per_sample(self, net: Callable[..., Tensor], x0: Tensor, t: Tensor, noise: Tensor,
                   y: Tensor | None) -> Tensor:
        """The cross-entropy of each sample at given times and noise (shape ``(B,)``)."""
        if y is None:
            raise ValueError("the classifier loss needs class labels y")
        t = torch.as_tensor(t, dtype=torch.float64, device=x0.device)
        xt = _noised(self.sde, x0, t, noise)[0]
        cond = time_cond(self.sde, self.time_input, t).to(x0.dtype)
        logits = net(xt, cond)
        if logits.ndim != 2 or logits.shape[0] != x0.shape[0]:
            raise ValueError(f"shape mismatch: the classifier returned shape "
                             f"{tuple(logits.shape)}: expected (batch, num_classes)")
        return torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")

    def __call__(self, net: Callable[..., Tensor], x0: Tensor, y: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        t = self._times.sample_t(x0.shape[0], generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return self.per_sample(net, x0, t, noise, y).mean()

    def __repr__(self) -> str:
        return f"ClassifierLoss(sde={self.sde!r})"
