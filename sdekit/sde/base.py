"""The abstract forward process.

A :class:`ForwardSDE` describes ``dx = f(t) x dt + g(t) dw`` through its Gaussian marginal
``x_t = alpha(t) x_0 + sigma(t) eps``. Subclasses implement ``_log_alpha`` and ``_log_sigma``
(float64 in, float64 out); every other quantity has a generic default: ``f`` and ``g^2`` by
autograd (``f = d log alpha/dt``, ``g^2 = d sigma^2/dt - 2 f sigma^2``) and the inverse of the
half-logSNR ``lambda = log alpha - log sigma`` by bisection. Subclasses override them with
closed forms where they exist.

All public methods accept a float, a 0-d tensor or a tensor of times, compute in float64 and
return a tensor in the dtype of the input (float64 for Python numbers).
"""
from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims, as_tensor, is_real

_BISECTION_ITERS = 100


def _derivative(fn, t: Tensor) -> Tensor:
    """``d fn / dt`` by autograd (``+ 0 * tt`` keeps a graph for a constant ``fn``)."""
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        (d,) = torch.autograd.grad((fn(tt) + 0 * tt).sum(), tt)
    return d


class ForwardSDE(abc.ABC):
    """A linear forward SDE ``dx = f(t) x dt + g(t) dw`` on the time range ``[t_min, T]``.

    ``t_min`` is the smallest time the process is evaluated at (and the default end of sampling);
    ``T`` is the time of the prior.
    """

    t_min: float
    T: float
    #: alpha(t) = 1 at every t (variance exploding: VE, EDM); lets model calls skip x / alpha
    unit_alpha: ClassVar[bool] = False

    def __init__(self, t_min: float, T: float) -> None:
        if not (is_real(t_min) and is_real(T) and 0 <= t_min < T):
            raise ValueError(f"time range t_min={t_min!r}, T={T!r} is invalid: "
                             "expected finite numbers with 0 <= t_min < T")
        self.t_min = float(t_min)
        self.T = float(T)

    # ----------------------------------------------------------------- to implement
    @abc.abstractmethod
    def _log_alpha(self, t: Tensor) -> Tensor:
        """log alpha(t) for float64 ``t`` (must be differentiable with autograd)."""

    @abc.abstractmethod
    def _log_sigma(self, t: Tensor) -> Tensor:
        """log sigma(t) for float64 ``t`` (must be differentiable with autograd)."""

    # ------------------------------------------------------------ generic defaults
    # ``+ 0 * tt`` keeps a graph when a schedule is constant in t (e.g. a user's
    # ``alpha = torch.ones_like(t)``), whose derivative is then 0 instead of an autograd error.
    def _f(self, t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            (d,) = torch.autograd.grad((self._log_alpha(tt) + 0 * tt).sum(), tt)
        return d

    def _g2(self, t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            s2 = torch.exp(2 * self._log_sigma(tt)) + 0 * tt
            (ds2,) = torch.autograd.grad(s2.sum(), tt)
        return ds2 - 2 * self._f(t) * s2.detach()

    def _alpha_dot(self, t: Tensor) -> Tensor:
        return _derivative(lambda u: torch.exp(self._log_alpha(u)), t)

    def _sigma_dot(self, t: Tensor) -> Tensor:
        return _derivative(lambda u: torch.exp(self._log_sigma(u)), t)

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        """Invert lambda(t) by bisection (lambda is strictly decreasing in t)."""
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.T)
        for _ in range(_BISECTION_ITERS):
            mid = 0.5 * (lo + hi)
            above = self._lambda(mid) > lam  # lambda(mid) too large -> root is later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def _lambda(self, t: Tensor) -> Tensor:
        return self._log_alpha(t) - self._log_sigma(t)

    # ------------------------------------------------------------------ plumbing
    def _time(self, t: Any, name: str = "t") -> tuple[Tensor, torch.dtype]:
        tt = as_tensor(t)
        if not tt.is_floating_point():
            tt = tt.double()
        dtype = tt.dtype
        t64 = tt.double()
        tol = 1e-7 * (self.T - self.t_min) + 1e-12
        bad = torch.isnan(t64) | (t64 < self.t_min - tol) | (t64 > self.T + tol)
        if bool(bad.any()):
            val = t64[bad].flatten()[0].item()
            raise ValueError(f"{name}={val!r} is outside the time range of {self!r}: "
                             f"expected {self.t_min} <= {name} <= {self.T}")
        return t64.clamp(self.t_min, self.T), dtype

    def _eval(self, fn, t: Any) -> Tensor:
        t64, dtype = self._time(t)
        return fn(t64).to(dtype)

    # ------------------------------------------------------------------ public API
    def log_alpha(self, t: Any) -> Tensor:
        """log of the marginal mean coefficient alpha(t)."""
        return self._eval(self._log_alpha, t)

    def alpha(self, t: Any) -> Tensor:
        """Marginal mean coefficient: ``x_t = alpha(t) x_0 + sigma(t) eps``."""
        return self._eval(lambda u: torch.exp(self._log_alpha(u)), t)

    def log_sigma(self, t: Any) -> Tensor:
        return self._eval(self._log_sigma, t)

    def sigma(self, t: Any) -> Tensor:
        """Marginal noise standard deviation sigma(t)."""
        return self._eval(lambda u: torch.exp(self._log_sigma(u)), t)

    def lambda_(self, t: Any) -> Tensor:
        """Half-logSNR ``lambda(t) = log alpha(t) - log sigma(t)`` (strictly decreasing)."""
        return self._eval(self._lambda, t)

    def sigma_tilde(self, t: Any) -> Tensor:
        """VE-equivalent noise level ``sigma/alpha = exp(-lambda)`` (k-diffusion's / EDM's
        sigma)."""
        return self._eval(lambda u: torch.exp(-self._lambda(u)), t)

    @property
    def lambda_min(self) -> float:
        return float(self._lambda(torch.tensor(self.T, dtype=torch.float64)))

    @property
    def lambda_max(self) -> float:
        return float(self._lambda(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def alpha_zero_at_T(self) -> bool:
        """Whether the process starts where alpha = 0 (lambda(T) = -inf, an exact prior: the
        linear interpolants of flow matching at T = 1)."""
        return float(self.alpha(torch.tensor(self.T, dtype=torch.float64))) == 0.0

    def t_of_lambda(self, lam: Any) -> Tensor:
        """Inverse of :meth:`lambda_`: the time at which the half-logSNR equals ``lam``."""
        ll = as_tensor(lam)
        return self._t_of_lambda_checked(ll.double(), ll.dtype)

    def _t_of_lambda_checked(self, l64: Tensor, dtype: torch.dtype) -> Tensor:
        """Validate float64 lambdas that came from a tensor of ``dtype``, invert, cast back."""
        lo, hi = self.lambda_min, self.lambda_max
        # lambda_() rounds its output to the input's dtype, so a float32 lambda of t_min or T can
        # land a few ulps outside [lo, hi]: allow for the rounding of the caller's dtype. An
        # infinite end (lambda(T) = -inf for flow matching) does not widen the tolerance.
        ulp = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
        finite = [abs(v) for v in (lo, hi) if math.isfinite(v)]
        span = hi - lo if len(finite) == 2 else 0.0
        tol = 1e-9 * span + 1e-12 + 4 * ulp * max(finite, default=0.0)
        bad = torch.isnan(l64) | (l64 < lo - tol) | (l64 > hi + tol)
        if bool(bad.any()):
            val = l64[bad].flatten()[0].item()
            raise ValueError(f"lambda={val!r} is outside the half-logSNR range of {self!r}: "
                             f"expected {lo:.6g} <= lambda <= {hi:.6g}")
        t = self._t_of_lambda(l64.clamp(lo, hi))
        return t.clamp(self.t_min, self.T).to(dtype)

    def t_of_sigma_tilde(self, sigma_tilde: Any) -> Tensor:
        """Inverse of :meth:`sigma_tilde`."""
        s = as_tensor(sigma_tilde)
        if bool((s <= 0).any()):
            raise ValueError(f"sigma_tilde must be > 0, got min {s.min().item()!r}")
        return self._t_of_lambda_checked(-torch.log(s.double()), s.dtype)

    def f(self, t: Any) -> Tensor:
        """Drift coefficient: ``f(t) = d log alpha / dt``."""
        return self._eval(self._f, t)

    def alpha_dot(self, t: Any) -> Tensor:
        """``d alpha / dt`` (autograd by default; closed forms in subclasses where they exist)."""
        return self._eval(self._alpha_dot, t)

    def sigma_dot(self, t: Any) -> Tensor:
        """``d sigma / dt`` (autograd by default; closed forms in subclasses where they exist)."""
        return self._eval(self._sigma_dot, t)

    def g2(self, t: Any) -> Tensor:
        """Squared diffusion: ``g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2``."""
        return self._eval(self._g2, t)

    def g(self, t: Any) -> Tensor:
        """Diffusion coefficient g(t)."""
        return self._eval(lambda u: torch.sqrt(self._g2(u).clamp_min(0)), t)

    def drift(self, x: Tensor, t: Any) -> Tensor:
        """Forward drift ``f(t) x``; ``t`` is a scalar or one time per sample."""
        return append_dims(self.f(t).to(x), x.ndim) * x

    def diffusion(self, t: Any) -> Tensor:
        return self.g(t)

    def marginal_sample(self, x0: Tensor, t: Any, noise: Tensor | None = None,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample ``x_t | x_0``; returns ``(x_t, noise)`` where
        ``x_t = alpha x_0 + sigma noise``."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        elif noise.shape != x0.shape:
            raise ValueError(f"shape mismatch: noise has shape {tuple(noise.shape)} but x0 has "
                             f"shape {tuple(x0.shape)}")
        a = append_dims(self.alpha(t).to(x0), x0.ndim)
        s = append_dims(self.sigma(t).to(x0), x0.ndim)
        return a * x0 + s * noise, noise

    # prior ---------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior ``N(0, prior_std^2 I)`` at time ``T``.

        Default: ``sqrt(alpha_T^2 + sigma_T^2)``, the marginal scale for data of unit variance
        (1 for VP; about sigma_max for VE-like processes).
        """
        t = torch.tensor(self.T, dtype=torch.float64)
        return float(torch.sqrt(torch.exp(2 * self._log_alpha(t))
                                + torch.exp(2 * self._log_sigma(t))))

    def marginal_std(self, t: Any) -> float:
        """Standard deviation of ``x_t`` for data of unit variance, ``sqrt(alpha_t^2 + sigma_t^2)``:
        the initial state's scale of a solve that starts at ``t`` (from ``T``:
        :attr:`prior_std`)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return float((self.alpha(t) ** 2 + self.sigma(t) ** 2).sqrt())

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        return self.prior_std * torch.randn(tuple(shape), generator=generator, dtype=dtype,
                                            device=device)

    def prior_logp(self, z: Tensor) -> Tensor:
        """Log-density of the prior, summed over all but the batch dimension."""
        d = z[0].numel()
        s = self.prior_std
        flat = z.reshape(z.shape[0], -1)
        return -0.5 * d * math.log(2 * math.pi * s * s) - flat.pow(2).sum(1) / (2 * s * s)

    # model conditioning ----------------------------------------------------------
    def model_time(self, t: Any) -> Tensor:
        """The time value passed to a network by default (continuous t; overridden by
        :class:`DiscreteDDPM` to the network's integer-timestep scale)."""
        tt, dtype = self._time(t)
        return tt.to(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, T={self.T:g})"


def check_forward_sde(sde: Any, expected: str = "e.g. sdekit.VPSDE()") -> None:
    """Raise a TypeError unless ``sde`` is a :class:`ForwardSDE` (``expected``: which one, in
    the message)."""
    if not isinstance(sde, ForwardSDE):
        raise TypeError(f"sde must be an sdekit ForwardSDE ({expected}), got "
                        f"{type(sde).__name__}")
