"""Time discretisations, separate from solvers (so benchmarks sweep solver x grid x steps).

Every grid is a float64 tensor of ``steps + 1`` strictly decreasing times from ``t_start``
(default ``sde.T``) to ``t_end`` (default ``sde.t_min``), usable with any forward SDE.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch import Tensor

from ._utils import is_real
from .sde.base import ForwardSDE


def uniform_t(sde: ForwardSDE, steps: int, t_start: float, t_end: float) -> Tensor:
    """Uniform in t."""
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def quadratic_t(sde: ForwardSDE, steps: int, t_start: float, t_end: float) -> Tensor:
    """Uniform in sqrt(t) (the DDIM / DEIS "quadratic" schedule): dense near t_end."""
    return torch.linspace(t_start ** 0.5, t_end ** 0.5, steps + 1, dtype=torch.float64) ** 2


def _infinite_start(fn: Callable[..., Tensor], sde: ForwardSDE, steps: int, t_start: float,
                    t_end: float, **kwargs: Any) -> Tensor:
    """A grid whose variable is infinite at ``t_start`` (lambda = -inf, sigma_tilde = inf where
    alpha(t_start) = 0, e.g. flow matching at t = 1): the first interval runs from ``t_start`` to
    the first interior point of the uniform-in-t grid, ``t_1 = t_start - (t_start - t_end) /
    steps`` (the step from alpha = 0 is first order in alpha_1 = alpha(t_1), so alpha_1 = O(1/steps)
    keeps it at the size of the other steps' errors); the remaining ``steps - 1`` intervals are
    the named grid on ``[t_1, t_end]``."""
    if steps == 1:
        return torch.tensor([t_start, t_end], dtype=torch.float64)
    t1 = t_start - (t_start - t_end) / steps
    return torch.cat([torch.tensor([t_start], dtype=torch.float64),
                      fn(sde, steps - 1, t1, t_end, **kwargs)])


def uniform_logsnr(sde: ForwardSDE, steps: int, t_start: float, t_end: float) -> Tensor:
    """Uniform in the half-logSNR lambda (DPM-Solver's recommended grid). From a start where
    lambda = -inf (alpha = 0, flow matching at t = 1) see :func:`_infinite_start`."""
    if not math.isfinite(float(sde.lambda_(t_start))):
        return _infinite_start(uniform_logsnr, sde, steps, t_start, t_end)
    lam = torch.linspace(float(sde.lambda_(t_start)), float(sde.lambda_(t_end)), steps + 1,
                         dtype=torch.float64)
    t = sde.t_of_lambda(lam)
    t[0], t[-1] = t_start, t_end  # exact endpoints (no round-off through lambda and back)
    return t


def karras(sde: ForwardSDE, steps: int, t_start: float, t_end: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 Eq. 5 in the VE-equivalent sigma = exp(-lambda):
    ``sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``. From a
    start where sigma_tilde = inf (alpha = 0) see :func:`_infinite_start`."""
    if not (is_real(rho) and rho > 0):
        raise ValueError(f"rho={rho!r} is invalid: expected a number > 0")
    if not math.isfinite(float(sde.sigma_tilde(t_start))):
        return _infinite_start(karras, sde, steps, t_start, t_end, rho=rho)
    smax, smin = float(sde.sigma_tilde(t_start)), float(sde.sigma_tilde(t_end))
    r = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    sig = (smax ** (1 / rho) + r * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = sde.t_of_sigma_tilde(sig)
    t[0], t[-1] = t_start, t_end
    return t


GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_t, "quadratic": quadratic_t, "logsnr": uniform_logsnr, "karras": karras,
}


def make_grid(sde: ForwardSDE, grid: str | Tensor | Any = "logsnr", steps: int | None = None,
              t_start: float | None = None, t_end: float | None = None, **kwargs: Any) -> Tensor:
    """Build a validated time grid.

    Args:
        grid: a name in :data:`GRIDS` or an explicit array of times (then ``steps`` must be None
            or equal ``len(grid) - 1``).
        steps: number of intervals.
        t_start, t_end: defaults ``sde.T`` and ``sde.t_min``.
        kwargs: grid options (``rho`` for ``karras``).
    """
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if v is not None and not is_real(v):
            raise ValueError(f"{name}={v!r} is invalid: expected a finite number")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.t_min if t_end is None else float(t_end)
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}: expected one of {sorted(GRIDS)} or an "
                             "array of times")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
        if not t_start > t_end:
            raise ValueError(f"t_start={t_start!r} must be greater than t_end={t_end!r}")
        sde.lambda_(torch.tensor([t_start, t_end], dtype=torch.float64))  # range check
        fn = GRIDS[grid]
        valid = list(inspect.signature(fn).parameters)[4:]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"grid_options {unknown} do not apply to grid {grid!r}: its options "
                             f"are {valid or 'none'}")
        times = fn(sde, steps, t_start, t_end, **kwargs)
    else:
        if kwargs:
            raise ValueError(f"grid_options {sorted(kwargs)} do not apply to an explicit grid")
        times = torch.as_tensor(grid, dtype=torch.float64).detach().cpu().clone()
        if times.ndim != 1 or times.numel() < 2:
            raise ValueError(f"grid must be a 1-D array of at least 2 times, got shape "
                             f"{tuple(times.shape)}")
        if steps is not None and steps != times.numel() - 1:
            raise ValueError(f"steps={steps!r} disagrees with the given grid of "
                             f"{times.numel()} times ({times.numel() - 1} steps)")
    validate_grid(sde, times)
    return times


def validate_grid(sde: ForwardSDE, times: Tensor) -> None:
    """Raise unless ``times`` is finite, inside the SDE's range and strictly decreasing in t
    and in lambda (two steps at the same lambda would be a zero-length step)."""
    if not bool(torch.isfinite(times).all()):
        raise ValueError("grid contains NaN or Inf")
    lam = sde.lambda_(times)  # raises for times outside [t_min, T]
    dt = times[1:] - times[:-1]
    if not bool((dt < 0).all()):
        i = int((dt >= 0).nonzero()[0])
        raise ValueError(f"grid must be strictly decreasing (from T towards t_min), but "
                         f"times[{i}]={times[i].item():.6g} and times[{i + 1}]="
                         f"{times[i + 1].item():.6g}")
    dl = lam[1:] - lam[:-1]
    if not bool((dl > 0).all()):
        i = int((dl <= 0).nonzero()[0])
        raise ValueError(f"grid puts steps {i} and {i + 1} at the same half-logSNR lambda="
                         f"{lam[i].item():.6g}: use fewer steps or another grid")
