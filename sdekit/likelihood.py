"""Probability-flow log-likelihood (Song et al. 2021, Sec. 4.3 and App. D.2).

Along a solution of the probability-flow ODE ``dx/dt = f_pf(x, t) = f(t) x - g(t)^2 score / 2``
the log-density obeys ``d/dt log p_t(x_t) = -div f_pf(x_t, t)`` (instantaneous change of
variables, Chen et al. 2018), so

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^{T} div f_pf(x_t, t) dt

with ``log p_T`` the prior's (``sde.prior_logp``). The augmented state ``[x, l]`` is integrated
from ``t_min`` to ``T``. The independent variable is the half-logSNR lambda (smooth even where
f(t) is not, e.g. DDPM-discrete tables), the same change of variable as the ODE samplers
(:meth:`sdekit.dynamics.ProbabilityFlowODE.drift_lambda`): ``dx/dlambda = k x - sigma eps`` with
``k = -2 sigma^2 f / g^2``; the divergence identity holds in any time variable. Where
``alpha(T) = 0`` (flow matching at ``T = 1``, lambda = -inf) it integrates in t with the
velocity (flow prediction), which is finite there.

The divergence is the exact trace (one vector-Jacobian product per dimension) or Hutchinson's
estimator ``E[z^T J z]`` (Hutchinson 1989; Grathwohl et al. 2019) with Rademacher or Gaussian
probes drawn once per solve; each probe carries its own log-det channel, so the result comes with
the probes' standard error. Autograd is used only inside each drift evaluation.

Note: the model's ``t_min > 0``, so this is ``log p_{t_min}``, the density of the marginal at
t_min (the data convolved with N(0, sigma(t_min)^2)), not ``log p_0``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._utils import check_seed, is_real, require, sum_tensors
from .dynamics.parameterization import DiffusionModel, as_model
from .dynamics.reverse import ProbabilityFlowODE
from .sde.base import ForwardSDE

PROBES = ("rademacher", "gaussian")
#: torchdiffeq's fixed-grid methods: they need ``steps``
FIXED_METHODS = ("euler", "midpoint", "heun3", "rk4", "explicit_adams", "implicit_adams")
EXACT_TRACE_MAX_DIM = 32
#: the default ``data_range`` of :func:`likelihood` (sdekit's data space, [-1, 1])
DATA_RANGE = (-1.0, 1.0)


@dataclass
class LikelihoodResult:
    """``logp``: log-density per sample in nats (of the dequantised data when ``bins`` is set);
    ``logp_se``: its Monte-Carlo standard error over the Hutchinson probes (None with the exact
    trace); ``bpd``: bits per dimension of the discrete data (None without ``bins``);
    ``nfe``: network evaluations used; ``z``: the latent at T."""
    logp: Tensor
    nfe: int
    logp_se: Tensor | None = None
    bpd: Tensor | None = None
    z: Tensor | None = None



def _check(x: Any, solver: str, steps: Any, exact_trace: Any, probes: Any, probe: Any, seed: Any,
           rtol: Any, atol: Any, bins: Any, data_range: Any) -> None:
    from torchdiffeq._impl.odeint import SOLVERS
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x is invalid: expected a floating-point tensor of shape "
                         f"(batch, *event_shape), got {getattr(x, 'shape', type(x).__name__)}")
    require(bool(torch.isfinite(x).all()), "x", "(a tensor with NaN or Inf)", "finite values")
    require(isinstance(solver, str) and solver in SOLVERS, "solver", solver,
            f"one of torchdiffeq's methods {sorted(SOLVERS)}")
    if solver in FIXED_METHODS:
        require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, "steps",
                steps, f"an integer >= 1 (the fixed-grid method {solver!r} needs a step count)")
    else:
        require(steps is None, "steps", steps, f"None (the adaptive method {solver!r} chooses its "
                f"steps; fixed-grid methods: {FIXED_METHODS})")
    require(exact_trace in (None, True, False), "exact_trace", exact_trace, "None, True or False")
    require(isinstance(probes, int) and not isinstance(probes, bool) and probes >= 1, "probes",
            probes, "an integer >= 1")
    require(probe in PROBES, "probe", probe, f"one of {PROBES}")
    check_seed("seed", seed)
    for k, v in (("rtol", rtol), ("atol", atol)):
        require(is_real(v) and v > 0, k, v, "a finite number > 0")
    if bins is not None:
        require(isinstance(bins, int) and not isinstance(bins, bool) and bins >= 2, "bins", bins,
                "None or an integer >= 2 (the number of levels of the data's lattice)")
        ok = (isinstance(data_range, (tuple, list)) and len(data_range) == 2
              and all(is_real(v) for v in data_range) and data_range[0] < data_range[1])
        require(ok, "data_range", data_range, "a pair (low, high) of finite numbers, low < high")
    elif not (isinstance(data_range, (tuple, list)) and tuple(data_range) == DATA_RANGE):
        raise ValueError(f"data_range={data_range!r} is only used with bins= (data on a lattice "
                         "of bins levels spanning it): give bins, or leave data_range out")


def _check_lattice(x: Tensor, bins: int, lo: float, hi: float) -> None:
    """Data must lie on the lattice ``lo + k (hi - lo) / (bins - 1)``, k = 0 .. bins - 1."""
    k = (x.double() - lo) * (bins - 1) / (hi - lo)
    out = (k < -1e-4) | (k > bins - 1 + 1e-4)
    if bool(out.any()):
        v = x[out].flatten()[0].item()
        raise ValueError(f"x contains {v!r}, outside the declared data_range=({lo}, {hi})")
    off = (k - k.round()).abs() > 1e-3
    if bool(off.any()):
        v = x[off].flatten()[0].item()
        raise ValueError(f"x contains {v!r}, not on the lattice of bins={bins} levels in "
                         f"data_range=({lo}, {hi}): expected low + k (high - low) / (bins - 1)")


def likelihood(sde: ForwardSDE, model: DiffusionModel | Any, x: Tensor, *,
               solver: str = "dopri5", steps: int | None = None,
               exact_trace: bool | None = None, probes: int = 1, probe: str = "rademacher",
               seed: int = 0, rtol: float = 1e-5, atol: float = 1e-5,
               bins: int | None = None, data_range: Sequence[float] = DATA_RANGE,
               prediction: str = "eps", prior_logp: Callable[[Tensor], Tensor] | None = None
               ) -> LikelihoodResult:
    """Probability-flow log-likelihood ``log p_{t_min}(x)`` of a batch ``x`` (see the module
    docstring).

    Args:
        sde, model: the forward process and a :class:`DiffusionModel` (or a raw ``net(x, cond)``
            with output ``prediction``).
        x: data, ``(batch, *event_shape)``; the computation runs in x's dtype.
        solver: a torchdiffeq method; adaptive (``dopri5``, ``bosh3``, ...; ``rtol``, ``atol``)
            or fixed-grid (``euler``, ``midpoint``, ``rk4``, ...: ``steps`` uniform steps in
            lambda, or in t where alpha(T) = 0).
        exact_trace: exact divergence (D VJPs per evaluation) or Hutchinson's estimator
            (``probes`` VJPs); default exact for D <= 32.
        probes, probe, seed: Hutchinson probes (``rademacher`` or ``gaussian``), fixed per solve
            and drawn from ``seed`` (which also seeds the dequantisation noise).
        bins, data_range: data on the lattice of ``bins`` levels spanning ``data_range``:
            uniform dequantisation ``x + (u - 1/2) delta`` (``delta = (high - low)/(bins - 1)``)
            and ``bpd = -(logp + D log delta) / (D log 2)``, an upper bound on the discrete
            model's bits/dim (Theis et al. 2016).
        prior_logp: log-density at T of the latent (default ``sde.prior_logp``, the Gaussian
            prior; the true p_T differs from it by O(alpha_T) for data with a non-zero mean, an
            error of the method, not of the integration).
    """
    _check(x, solver, steps, exact_trace, probes, probe, seed, rtol, atol, bins, data_range)
    if prior_logp is not None and not callable(prior_logp):
        raise TypeError(f"prior_logp={prior_logp!r} is invalid: expected None or a callable "
                        "z -> log p_T(z) per sample")
    model = as_model(model, sde, prediction)
    B, shape, D = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    exact = D <= EXACT_TRACE_MAX_DIM if exact_trace is None else exact_trace
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    x = x.detach()
    delta = 0.0
    if bins is not None:       # uniform dequantisation on the lattice
        lo, hi = float(data_range[0]), float(data_range[1])
        _check_lattice(x, bins, lo, hi)
        delta = (hi - lo) / (bins - 1)
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        x = x + (u - 0.5) * delta
    P = 0 if exact else probes
    zs = None
    if not exact:
        zs = torch.randn((P,) + x.shape, generator=gen, dtype=x.dtype, device=x.device)
        if probe == "rademacher":
            zs = torch.sign(zs)
    in_t, lo_s, hi_s, velocity = _probability_flow(sde, model)
    rhs = _augmented_rhs(velocity, B, shape, lo_s, hi_s, zs)

    from torchdiffeq import odeint

    from .solvers.ode import _per_sample_rms_max

    a, b = (lo_s, hi_s) if in_t else (hi_s, lo_s)
    y0 = torch.cat([x.reshape(B, D), x.new_zeros(B, max(P, 1))], 1)
    if solver in FIXED_METHODS:
        assert steps is not None  # _check: fixed-grid methods take a step count
        ts = torch.linspace(a, b, steps + 1, dtype=torch.float64).to(x)
        kw: dict[str, Any] = {}
    else:
        ts = torch.tensor([a, b], dtype=torch.float64).to(x)
        kw = {"rtol": rtol, "atol": atol, "options": {"norm": _per_sample_rms_max}}
    nfe0 = model.nfe
    yT = odeint(rhs, y0, ts, method=solver, **kw)[-1]
    nfe = model.nfe - nfe0
    z = yT[:, :D].reshape((B,) + shape)
    ell = yT[:, D:].double()
    prior = (sde.prior_logp if prior_logp is None else prior_logp)(z.double()).double()
    logp = prior + ell.mean(1)
    se = None if exact else ell.std(1, unbiased=True) / math.sqrt(P) if P > 1 else None
    bpd = None
    if bins is not None:
        bpd = -(logp + D * math.log(delta)) / (D * math.log(2))
    return LikelihoodResult(logp=logp, nfe=nfe, logp_se=se, bpd=bpd, z=z)


def _probability_flow(sde: ForwardSDE, model: DiffusionModel
                      ) -> tuple[bool, float, float, Callable[[Tensor, Tensor], Tensor]]:
    """The probability-flow ODE's velocity and its independent variable: ``(in_t, low,
    high, velocity(x, s))``. In t where alpha(T) = 0 (flow matching: the model's velocity,
    finite at T); otherwise in the half-logSNR lambda
    (:meth:`~sdekit.dynamics.ProbabilityFlowODE.drift_lambda`, smooth where dt/dlambda is
    not)."""
    if sde.alpha_zero_at_T:
        return True, sde.t_min, sde.T, model.flow
    pf_ode = ProbabilityFlowODE(sde, model)

    def velocity(xx: Tensor, s: Tensor) -> Tensor:
        return pf_ode.drift_lambda(xx, sde.t_of_lambda(s))
    return False, sde.lambda_min, sde.lambda_max, velocity


def _augmented_rhs(velocity: Callable[[Tensor, Tensor], Tensor], B: int, shape: tuple[int, ...],
                   lo_s: float, hi_s: float, zs: Tensor | None
                   ) -> Callable[[Tensor, Tensor], Tensor]:
    """The right-hand side of the state augmented with the divergence: ``y = [x (B, D), l (B,
    P)]``; the divergence is exact (``zs`` None: D vector-Jacobian products) or Hutchinson's
    ``z^T (dv/dx) z`` per probe."""
    D = math.prod(shape)

    def rhs(s: Tensor, y: Tensor) -> Tensor:
        s = s.double().clamp(lo_s, hi_s)
        with torch.enable_grad():
            xx = y[:, :D].reshape((B,) + shape).detach().requires_grad_(True)
            v = velocity(xx, s)
            if zs is None:
                vf = v.reshape(B, D)
                div = sum_tensors(torch.autograd.grad(vf[:, i].sum(), xx,
                                                      retain_graph=i < D - 1)[0]
                                  .reshape(B, D)[:, i] for i in range(D)).reshape(B, 1)
            else:
                P = zs.shape[0]
                div = torch.stack([
                    (torch.autograd.grad(v, xx, zs[k], retain_graph=k < P - 1)[0] * zs[k])
                    .reshape(B, D).sum(1) for k in range(P)], 1)
        return torch.cat([v.detach().reshape(B, D), div.detach().to(y)], 1)
    return rhs
