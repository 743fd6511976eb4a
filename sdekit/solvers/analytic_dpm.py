"""Analytic-DPM: the optimal reverse variance of ancestral / DDIM-type sampling (Bao et al. 2022,
"Analytic-DPM", Theorems 1-2), on any forward SDE and any grid.

One step ``t -> s`` (``s < t``) of the family the ``ddim`` / ``ancestral`` solvers sample from
(Song et al. 2021's non-Markovian posteriors, the paper's ``q_lambda``), written with sdekit's
continuous ``x_t = alpha_t x0 + sigma_t eps``:

    q(x_s | x_t, x0) = N(alpha_s x0 + sqrt(sigma_s^2 - lambda^2) (x_t - alpha_t x0) / sigma_t,
                         lambda^2 I),

which keeps every marginal for any ``0 <= lambda^2 <= sigma_s^2`` (``lambda^2 = eta^2 beta_tilde``;
``beta_tilde = sigma_s^2 (1 - exp(-2 (lambda_s - lambda_t)))`` is the DDPM posterior variance
for ``eta = 1``). The reverse step ``p(x_s | x_t) = N(mu(x_t, x0_hat), v I)`` with the model's
``x0_hat = E[x0 | x_t]`` has the optimal (KL-minimising) variance

    v* = lambda^2 + k^2 E tr Cov[x0 | x_t] / d,
    k = alpha_s - sqrt(sigma_s^2 - lambda^2) alpha_t / sigma_t,

and, as ``x0 = (x_t - sigma_t eps) / alpha_t`` and ``E tr Cov[eps | x_t] = d - E |E[eps | x_t]|^2``,

    v* = lambda^2 + (sigma_t alpha_s / alpha_t - sqrt(sigma_s^2 - lambda^2))^2 (1 - Gamma_t),
    Gamma_t = E |eps_hat(x_t, t)|^2 / d.

For consecutive DDPM steps (VP: ``alpha_t^2 = alpha_bar_n``, ``sigma_t^2 = beta_bar_n``) this is
the paper's Theorem 1, ``lambda_n^2 + (sqrt(beta_bar_n / alpha_n) - sqrt(beta_bar_{n-1} -
lambda_n^2))^2 (1 - beta_bar_n Gamma_n)`` (its Gamma_n is the mean squared *score*, ours the mean
squared eps prediction, ``beta_bar_n`` times it), and for skipped steps its generalisation to any
sub-sequence of times. Gamma is estimated by Monte Carlo from data noised to time t
(:func:`estimate_moments`). The clipping bounds (Theorem 2): ``0 <= E tr Cov[x0 | x_t] / d <=
sigma_t^2 / alpha_t^2`` (so ``lambda^2 <= v*``), and for data in ``[lo, hi]^d`` also ``<= ((hi -
lo) / 2)^2``; the estimate is clipped to them. The *diagonal* extension estimates ``Gamma`` per
coordinate (``E eps_hat_j^2``) and gives a per-coordinate variance by the same formula.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..dynamics.parameterization import DiffusionModel
from ..sde.base import ForwardSDE


@dataclass
class MomentTable:
    """``Gamma_t = E |eps_hat(x_t, t)|^2 / d`` at ``times`` (float64), from ``n`` data samples:
    ``gamma`` of shape ``(len(times),)``, or ``(len(times), *state_shape)`` per coordinate
    (``diagonal``); ``stderr`` the Monte-Carlo standard error of the scalar estimate."""

    times: Tensor
    gamma: Tensor
    n: int
    stderr: Tensor | None = None

    @property
    def diagonal(self) -> bool:
        return self.gamma.ndim > 1

    def at(self, times: Tensor) -> Tensor:
        """The rows of ``gamma`` at ``times`` (each must be a table time, to 1e-9 relative)."""
        rows = []
        for t in times.tolist():
            hit = (self.times - t).abs() <= 1e-9 * max(1.0, abs(t))
            if not bool(hit.any()):
                raise ValueError(f"moments: the table has no entry at the step time t={t:.9g} "
                                 f"(its times run {float(self.times.min()):.6g}.."
                                 f"{float(self.times.max()):.6g}, {self.times.numel()} entries): "
                                 "estimate it on the sampling grid, e.g. estimate_moments(sde, "
                                 "model, data, make_grid(sde, grid, steps))")
            rows.append(self.gamma[int(hit.nonzero()[0, 0])])
        return torch.stack(rows)


def _check_gamma(gamma: Tensor, what: str) -> Tensor:
    if not gamma.is_floating_point() or not bool(torch.isfinite(gamma).all()):
        raise ValueError(f"{what} must be finite numbers, got {gamma.tolist()!r}")
    if bool((gamma < 0).any()):
        raise ValueError(f"{what} has negative entries ({float(gamma.min()):.6g}): Gamma = E "
                         "|eps_hat|^2 / d is a mean square, >= 0")
    return gamma


def as_moment_table(moments: Any) -> MomentTable | Tensor:
    """Validate a ``moments`` option: a :class:`MomentTable`, or one Gamma per step (a 1-D
    sequence, or ``(steps, *state_shape)`` for the diagonal form) aligned with the steps' start
    times."""
    if isinstance(moments, MomentTable):
        _check_gamma(moments.gamma.double(), "moments.gamma")
        return moments
    try:
        g = torch.as_tensor(moments, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"moments={moments!r} is invalid: expected a MomentTable (from "
                         "estimate_moments) or one Gamma value per step") from None
    if g.ndim == 0 or g.shape[0] == 0:
        raise ValueError(f"moments={moments!r} is invalid: expected one Gamma value per step "
                         "(a non-empty sequence) or a MomentTable")
    return _check_gamma(g, "moments")


def gamma_per_step(moments: MomentTable | Tensor, times: Tensor, state_shape: Sequence[int]
                   ) -> Tensor:
    """Gamma at the start time of every step of the grid ``times`` (``(steps,)`` or ``(steps,
    *state_shape)``); a ValueError when the table does not fit the grid or the state."""
    steps = times.numel() - 1
    if isinstance(moments, MomentTable):
        g = moments.at(times[:-1]).double()
    else:
        g = moments
        if g.shape[0] != steps:
            raise ValueError(f"moments has {g.shape[0]} entries but the grid has {steps} steps: "
                             "give one Gamma per step (at each step's start time) or a "
                             "MomentTable covering the grid's times")
    if g.ndim > 1 and tuple(g.shape[1:]) != tuple(state_shape):
        raise ValueError(f"moments: per-coordinate Gamma of shape {tuple(g.shape[1:])} does not "
                         f"match the state shape {tuple(state_shape)}")
    return g


def analytic_variance(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float,
                      lam2: float, gamma: Tensor | float,
                      data_range: tuple[float, float] | None = None) -> Tensor:
    """The optimal variance ``v*`` of one reverse step ``t -> s`` (module docstring), clipped to
    the bounds of Theorem 2. ``lam2``: the family's ``lambda^2`` (the posterior variance the mean
    is built with); ``gamma``: ``E |eps_hat|^2 / d`` at ``t`` (a scalar, or per coordinate).
    At ``alpha_t = 0`` (flow matching's t = 1) Gamma carries no information on x0 and the
    data-range bound is used (required there)."""
    g = torch.as_tensor(gamma, dtype=torch.float64)
    d = math.sqrt(max(sigma_s * sigma_s - lam2, 0.0))
    k = alpha_s - (d * alpha_t / sigma_t)
    cap = math.inf if data_range is None else ((data_range[1] - data_range[0]) / 2) ** 2
    if alpha_t == 0.0:
        if data_range is None:
            raise ValueError("variance='analytic' at alpha_t = 0 (the start of a flow-matching "
                             "process): E tr Cov[x0 | x_t] is the data's variance there, which "
                             "Gamma does not give; pass data_range=(lo, hi) for its bound")
        var_x0 = torch.full_like(g, cap)
    else:
        r2 = (sigma_t / alpha_t) ** 2
        var_x0 = (r2 * (1.0 - g)).clamp(0.0, min(r2, cap))
    return lam2 + k * k * var_x0


def check_model_and_batch(model: Any, x: Any, name: str, what: str) -> None:
    """The refusals of the estimators from model statistics (:func:`estimate_moments`,
    DPM-Solver-v3's ``estimate_ems``): ``model`` a :class:`DiffusionModel`, ``x`` (argument
    ``name``) a finite Tensor of at least 2 ``what``."""
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model must be a DiffusionModel (sdekit.as_model / sdekit.models.wrap), "
                        f"got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} of shape {shape} is invalid: expected a Tensor of at least 2 "
                         f"{what}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


@torch.no_grad()
def estimate_moments(sde: ForwardSDE, model: DiffusionModel, data: Tensor, times: Any, *,
                     diagonal: bool = False, batch_size: int = 1000, seed: int = 0
                     ) -> MomentTable:
    """Monte-Carlo estimate of ``Gamma_t = E |eps_hat(x_t, t)|^2 / d`` at each of ``times``,
    from the data samples ``data`` (``(n, *state_shape)``, in the model's space) noised to
    ``x_t = alpha_t x0 + sigma_t z`` with fresh normals (seeded); one model call per batch and
    time (``n / batch_size * len(times)`` NFE). ``diagonal``: per-coordinate ``E eps_hat_j^2``.
    Pass the sampling grid as ``times`` (e.g. ``make_grid(sde, "uniform", steps)``; the last
    time, where no step starts, may be included)."""
    check_model_and_batch(model, data, "data", "samples, (n, *state_shape)")
    ts = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if ts.numel() == 0 or not bool(torch.isfinite(ts).all()):
        raise ValueError(f"times={ts.tolist()!r} is invalid: expected finite times")
    lo, hi = float(sde.t_min), float(sde.T)
    bad = [t for t in ts.tolist() if not lo - 1e-12 <= t <= hi + 1e-12]
    if bad:
        raise ValueError(f"times {bad[:3]} are outside the SDE's range [{lo:g}, {hi:g}]")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1")
    g = torch.Generator().manual_seed(seed)
    n, D = data.shape[0], data[0].numel()
    gam, err = [], []
    for t in ts.tolist():
        a, s = float(sde.alpha(torch.tensor(t))), float(sde.sigma(torch.tensor(t)))
        total = torch.zeros(data.shape[1:], dtype=torch.float64)
        per = []
        for i in range(0, n, batch_size):
            x0 = data[i:i + batch_size]
            z = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(x0.dtype)
            e = model.eps(a * x0 + s * z, t).double() ** 2
            total += e.sum(0)
            per.append(e.reshape(e.shape[0], -1).mean(1))
        per_t = torch.cat(per)
        gam.append(total / n if diagonal else total.sum() / (n * D))
        err.append(per_t.std() / math.sqrt(n))
    return MomentTable(ts, torch.stack(gam), n, torch.stack(err))


__all__ = ["MomentTable", "estimate_moments", "analytic_variance", "as_moment_table",
           "gamma_per_step"]
