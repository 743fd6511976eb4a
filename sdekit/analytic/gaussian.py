"""Exact oracles: Gaussian and Gaussian-mixture data under any forward SDE.

For data ``N(mu, Sigma)`` with ``Sigma = U diag(d) U^T`` the marginal at time t is
``N(alpha mu, U diag(alpha^2 d + sigma^2) U^T)``; the score, eps and x0 (posterior mean)
predictions are linear in x, and the probability-flow ODE flow map from s to t is
``x_t = alpha_t mu + U diag(sqrt(c_t / c_s)) U^T (x_s - alpha_s mu)`` with
``c = alpha^2 d + sigma^2`` (per eigen-direction the PF-ODE reads ``dy/dt = (f + g^2 / 2c) y``
and ``d log sqrt(c)/dt`` equals the same factor).

Inputs may have any shape ``(B, *event_shape)``; times are scalars or one per sample. Internal
arithmetic is float64; results come back in the input's dtype.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..dynamics.parameterization import PREDICTIONS, DiffusionModel
from ..sde.base import ForwardSDE


def _vector(name: str, v: Any) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf: expected finite values")
    return t


def _sym_sqrt(S: Tensor) -> Tensor:
    d, U = torch.linalg.eigh(0.5 * (S + S.T))
    return (U * d.clamp_min(0).sqrt()) @ U.T


def frechet_distance(m1: Any, S1: Any, m2: Any, S2: Any) -> float:
    """Squared 2-Wasserstein (Frechet) distance between ``N(m1, S1)`` and ``N(m2, S2)``.

    The cross term ``tr (S2^1/2 S1 S2^1/2)^1/2`` is computed from the eigenvalues of the symmetric
    matrix ``S2^1/2 S1 S2^1/2`` (no non-symmetric matrix square root needed)."""
    m1, m2 = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (m1, m2))
    S1, S2 = (torch.as_tensor(v, dtype=torch.float64) for v in (S1, S2))
    D = m1.numel()
    for name, S in (("S1", S1), ("S2", S2)):
        if S.shape != (D, D) or m2.numel() != D:
            raise ValueError(f"shape mismatch: means have {m1.numel()} and {m2.numel()} values, "
                             f"{name} has shape {tuple(S.shape)}: expected ({D}, {D})")
    r = _sym_sqrt(S2)
    cross = torch.linalg.eigvalsh(r @ S1 @ r).clamp_min(0).sqrt().sum()
    fd = ((m1 - m2) ** 2).sum() + torch.trace(S1) + torch.trace(S2) - 2 * cross
    return float(fd.clamp_min(0))


def random_covariance(dim: int, eig_max: float, eig_min: float, generator: torch.Generator
                      ) -> Tensor:
    """A ``dim x dim`` covariance with eigenvalues log-spaced from ``eig_max`` down to
    ``eig_min`` in a random orthonormal basis (QR of a Gaussian matrix, signs fixed so the
    basis is Haar-distributed), drawn from ``generator``."""
    Q, R = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    eig = torch.logspace(math.log10(eig_max), math.log10(eig_min), dim, dtype=torch.float64)
    return (Q * eig) @ Q.T


class GaussianData:
    """Data distributed as ``N(mean, cov)`` (full covariance), pushed through ``sde``.

    Args:
        sde: the forward process.
        mean: shape ``(D,)``.
        cov: ``(D, D)`` symmetric positive semi-definite, or ``(D,)`` for a diagonal covariance.
        event_shape: the shape of one sample (default ``(D,)``); e.g. ``(1, 8, 8)`` for images.
    """

    def __init__(self, sde: ForwardSDE, mean: Any, cov: Any,
                 event_shape: Sequence[int] | None = None) -> None:
        self.sde = sde
        self.mean = _vector("mean", mean).reshape(-1)
        D = self.mean.numel()
        cov = _vector("cov", cov)
        if cov.ndim == 1:
            cov = torch.diag(cov)
        if cov.shape != (D, D):
            raise ValueError(f"shape mismatch: mean has shape ({D},) but cov has shape "
                             f"{tuple(cov.shape)}: expected ({D}, {D}) or ({D},)")
        if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
            raise ValueError("cov must be symmetric")
        d, U = torch.linalg.eigh(cov)
        if bool((d < -1e-10 * max(1.0, d.abs().max().item())).any()):
            raise ValueError(f"cov must be positive semi-definite; its smallest eigenvalue is "
                             f"{d.min().item():.3g}")
        self.eigvals, self.eigvecs, self.cov = d.clamp_min(0), U, cov
        self.dim = D
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape={self.event_shape} does not hold {D} values")

    @classmethod
    def random(cls, sde: ForwardSDE, dim: int = 64, eig_max: float = 1.0, eig_min: float = 1e-4,
               seed: int = 0, mean_scale: float = 0.0) -> GaussianData:
        """Covariance eigenvalues log-spaced from ``eig_max`` down to ``eig_min`` in a random
        orthonormal basis (the benchmark problem), mean ``mean_scale * N(0, I / dim)``."""
        g = torch.Generator().manual_seed(seed)
        cov = random_covariance(dim, eig_max, eig_min, g)
        mean = mean_scale * torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        return cls(sde, mean, cov)

    # ------------------------------------------------------------------ helpers
    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"shape mismatch: x has shape {tuple(x.shape)} but the data has "
                             f"event shape {self.event_shape}: expected (batch, *event_shape)")
        return x.reshape(x.shape[0], -1).double()

    def _ac(self, t: Any, batch: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
        """alpha (B,1), sigma (B,1) and eigen-variances c = alpha^2 d + sigma^2 (B, D)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        a = self.sde.alpha(t).double().reshape(-1, 1).expand(batch, 1).to(device)
        s = self.sde.sigma(t).double().reshape(-1, 1).expand(batch, 1).to(device)
        return a, s, a * a * self.eigvals.to(device) + s * s

    def _coords(self, x: Tensor, alpha: Tensor) -> Tensor:
        return (self._flat(x) - alpha * self.mean.to(x.device)) @ self.eigvecs.to(x.device)

    def _back(self, y: Tensor, like: Tensor) -> Tensor:
        return (y @ self.eigvecs.T.to(y.device)).reshape(like.shape).to(like.dtype)

    # --------------------------------------------------------------- public API
    def marginal_mean(self, t: Any) -> Tensor:
        """Mean ``alpha(t) mean`` of the marginal, flat: ``(D,)``, or ``(B, D)`` for ``t`` of shape
        ``(B,)``."""
        a = self.sde.alpha(t).double()
        return a[..., None] * self.mean

    def marginal_cov(self, t: Any) -> Tensor:
        """Covariance ``alpha^2 cov + sigma^2 I``: ``(D, D)``, or ``(B, D, D)`` for ``t`` of shape
        ``(B,)``."""
        a, s = (self.sde.alpha(t).double()[..., None, None],
                self.sde.sigma(t).double()[..., None, None])
        return a * a * self.cov + s * s * torch.eye(self.dim, dtype=torch.float64)

    def score(self, x: Tensor, t: Any) -> Tensor:
        """Exact ``grad_x log p_t(x)``."""
        a, _, c = self._ac(t, x.shape[0], x.device)
        return self._back(-self._coords(x, a) / c, x)

    def eps(self, x: Tensor, t: Any) -> Tensor:
        """Exact ``E[eps | x_t] = -sigma_t score``."""
        a, s, c = self._ac(t, x.shape[0], x.device)
        return self._back(s * self._coords(x, a) / c, x)

    def x0(self, x: Tensor, t: Any) -> Tensor:
        """Exact posterior mean ``E[x_0 | x_t]``."""
        a, _, c = self._ac(t, x.shape[0], x.device)
        y0 = a * self.eigvals.to(x.device) * self._coords(x, a) / c
        return (self._back(y0, x).reshape(x.shape[0], -1).double() + self.mean.to(x.device)
                ).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, t: Any) -> Tensor:
        """Exact ``log p_t(x)``, one value per sample (float64)."""
        a, _, c = self._ac(t, x.shape[0], x.device)
        y = self._coords(x, a)
        return -0.5 * ((y * y / c).sum(1) + torch.log(c).sum(1) + self.dim * math.log(2 * math.pi))

    def flow(self, x: Tensor, s: Any, t: Any) -> Tensor:
        """Exact probability-flow ODE map: the state at time ``t`` of the PF-ODE solution that
        passes through ``x`` at time ``s`` (either direction)."""
        a_s, _, c_s = self._ac(s, x.shape[0], x.device)
        a_t, _, c_t = self._ac(t, x.shape[0], x.device)
        y = self._coords(x, a_s) * torch.sqrt(c_t / c_s)
        out = self._back(y, x).reshape(x.shape[0], -1).double() + a_t * self.mean.to(x.device)
        return out.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Samples of the data law."""
        return self.marginal_sample(n, None, generator, dtype)

    def marginal_sample(self, n: int, t: Any, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact samples of the marginal at time ``t`` (the data law when ``t`` is None)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        if t is None:
            a, c = torch.ones(n, 1, dtype=torch.float64), self.eigvals.expand(n, -1)
        else:
            a, _, c = self._ac(t, n, "cpu")
        x = (z * torch.sqrt(c)) @ self.eigvecs.T + a * self.mean
        return x.reshape((n,) + self.event_shape).to(dtype)

    def model(self, prediction: str = "eps") -> DiffusionModel:
        """The exact predictor as a :class:`DiffusionModel` (counted like any network)."""
        if prediction not in PREDICTIONS or prediction == "denoiser":
            raise ValueError(f"prediction={prediction!r} is invalid: expected one of "
                             f"{[p for p in PREDICTIONS if p != 'denoiser']}")
        fn = {"eps": self.eps, "x0": self.x0, "score": self.score,
              "v": lambda x, t: self._v(x, t), "flow": self.flow_velocity}[prediction]
        return DiffusionModel(fn, self.sde, prediction, time_input="t")

    def flow_velocity(self, x: Tensor, t: Any) -> Tensor:
        """Exact velocity ``E[alpha' x0 + sigma' eps | x_t]`` (flow prediction; the PF-ODE's
        dx/dt), from x0 and eps computed directly (finite at alpha = 0)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        shape = (-1,) + (1,) * (x.ndim - 1)
        ad = self.sde.alpha_dot(t).double().reshape(-1, 1).expand(x.shape[0], 1).reshape(shape)
        sd = self.sde.sigma_dot(t).double().reshape(-1, 1).expand(x.shape[0], 1).reshape(shape)
        return (ad.to(x.device) * self.x0(x, t).double()
                + sd.to(x.device) * self.eps(x, t).double()).to(x.dtype)

    def _v(self, x: Tensor, t: Any) -> Tensor:
        a, s, _ = self._ac(t, x.shape[0], x.device)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (a.reshape(shape) * self.eps(x, t).double()
                - s.reshape(shape) * self.x0(x, t).double()).to(x.dtype)

    def __repr__(self) -> str:
        return f"GaussianData(dim={self.dim}, sde={self.sde!r})"


class GaussianMixtureData:
    """Data distributed as ``sum_k w_k N(mu_k, Sigma_k)``: exact score and posterior mean.

    Args:
        weights: ``(K,)`` positive (normalised here).
        means: ``(K, D)``.
        covs: ``(K, D, D)``, ``(K, D)`` diagonal, ``(K,)`` isotropic variances or a scalar.
    """

    def __init__(self, sde: ForwardSDE, weights: Any, means: Any, covs: Any,
                 event_shape: Sequence[int] | None = None) -> None:
        w = _vector("weights", weights).reshape(-1)
        mu = _vector("means", means)
        if mu.ndim != 2 or mu.shape[0] != w.numel():
            raise ValueError(f"shape mismatch: weights has shape {tuple(w.shape)} but means has "
                             f"shape {tuple(mu.shape)}: expected ({w.numel()}, D)")
        if bool((w <= 0).any()):
            raise ValueError("weights must all be > 0")
        K, D = mu.shape
        cv = _vector("covs", covs)
        if cv.ndim == 0:
            cv = cv.expand(K)
        if cv.ndim == 1:
            cv = cv.reshape(K, 1, 1) * torch.eye(D, dtype=torch.float64)
        elif cv.ndim == 2:
            cv = torch.diag_embed(cv)
        if cv.shape != (K, D, D):
            raise ValueError(f"shape mismatch: covs has shape {tuple(cv.shape)}: expected "
                             f"({K}, {D}, {D}), ({K}, {D}), ({K},) or a scalar")
        self.sde = sde
        self.weights = w / w.sum()
        self.components = [GaussianData(sde, mu[k], cv[k], event_shape) for k in range(K)]
        self.dim, self.event_shape = D, self.components[0].event_shape

    def _responsibilities(self, x: Tensor, t: Any) -> Tensor:
        lp = torch.stack([c.log_prob(x, t) for c in self.components], 1)
        return torch.softmax(lp + torch.log(self.weights.to(x.device)), 1)

    def _mix(self, x: Tensor, t: Any, what: str) -> Tensor:
        r = self._responsibilities(x, t)
        out = sum(r[:, k:k + 1] * getattr(c, what)(x, t).reshape(x.shape[0], -1).double()
                  for k, c in enumerate(self.components))
        return out.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, t: Any) -> Tensor:
        lp = torch.stack([c.log_prob(x, t) for c in self.components], 1)
        return torch.logsumexp(lp + torch.log(self.weights.to(x.device)), 1)

    def score(self, x: Tensor, t: Any) -> Tensor:
        return self._mix(x, t, "score")

    def x0(self, x: Tensor, t: Any) -> Tensor:
        """Exact posterior mean ``E[x_0 | x_t]``."""
        return self._mix(x, t, "x0")

    def eps(self, x: Tensor, t: Any) -> Tensor:
        s = self.sde.sigma(torch.as_tensor(t, dtype=torch.float64)).reshape(
            (-1,) + (1,) * (x.ndim - 1))
        return (-s * self.score(x, t).double()).to(x.dtype)

    def marginal_sample(self, n: int, t: Any, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        out = torch.empty((n,) + self.event_shape, dtype=dtype)
        for j, c in enumerate(self.components):
            idx = (k == j).nonzero().flatten()
            if idx.numel():
                tj = t if t is None or torch.as_tensor(t).ndim == 0 else torch.as_tensor(t)[idx]
                out[idx] = c.marginal_sample(idx.numel(), tj, generator, dtype)
        return out

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        return self.marginal_sample(n, None, generator, dtype)

    def flow_velocity(self, x: Tensor, t: Any) -> Tensor:
        """Exact velocity ``E[alpha' x0 + sigma' eps | x_t]`` (linear in x0 and eps, so the
        components' velocities mix with the same responsibilities)."""
        return self._mix(x, t, "flow_velocity")

    def model(self, prediction: str = "eps") -> DiffusionModel:
        if prediction not in ("eps", "x0", "score", "flow"):
            raise ValueError(f"prediction={prediction!r} is invalid: expected 'eps', 'x0', "
                             "'score' or 'flow'")
        fn = self.flow_velocity if prediction == "flow" else getattr(self, prediction)
        return DiffusionModel(fn, self.sde, prediction, time_input="t")

    def __repr__(self) -> str:
        return f"GaussianMixtureData(K={len(self.components)}, dim={self.dim}, sde={self.sde!r})"
