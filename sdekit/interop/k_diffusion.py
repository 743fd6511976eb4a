"""Solvers out, k-diffusion style: :func:`k_sampler` turns any registered sdekit solver into a
function with the signature of k-diffusion's samplers,
``sample(model, x, sigmas, extra_args=None, callback=None, disable=None)``.

Semantics are k-diffusion's: ``model`` is a denoiser ``D(x, sigma, **extra_args) -> x0`` in the
VE space (``x = x0 + sigma eps``), ``x`` is the start state (already scaled by ``sigmas[0]``),
``sigmas`` a strictly decreasing list of noise levels, usually ending in 0. The solve is
:func:`sdekit.sample` on an EDM (VE) process ``sigma = t`` whose grid is the positive sigmas; a
final 0 is the jump to sigma = 0 that every k-diffusion sampler takes with the denoiser's
output (a first-order step to 0 returns ``D``): sdekit's ``denoise=True``. So k-diffusion's
``sample_euler``, ``sample_heun`` and ``sample_dpmpp_2m`` are sdekit's ``edm_euler`` (and
``ddim``: the same step in sigma), ``edm_heun`` and ``dpmpp_2m`` (with ``lower_order_final=False``,
set by default here: the jump to 0 is already the first-order final step). sdekit's ``euler`` /
``heun`` / ``rk4`` step the probability-flow ODE in lambda, not in sigma, so they differ from
k-diffusion's Euler / Heun on the same sigmas.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..dynamics.parameterization import DiffusionModel
from ..integrate import sample as _sample
from ..sde.ve import EDMSDE
from ..solvers.base import Solver
from ..solvers.registry import get_solver, list_solvers


class _Recorder:
    """``net(x, sigma)`` calling ``D(x, sigma, **extra_args)`` and keeping the first call since
    :meth:`reset` (k-diffusion's callback reports a step's first ``sigma_hat`` and ``denoised``)."""

    def __init__(self, model: Callable[..., Tensor], extra_args: dict[str, Any]) -> None:
        self.model, self.extra_args = model, extra_args
        self.reset()

    def reset(self) -> None:
        self.sigma: Tensor | None = None
        self.denoised: Tensor | None = None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.model(x, sigma, **self.extra_args)
        if self.denoised is None:
            self.sigma, self.denoised = sigma[0], out
        return out


def _check_sigmas(sigmas: Any) -> Tensor:
    if not isinstance(sigmas, Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"sigmas must be a 1-D tensor of noise levels, got "
                            f"{type(sigmas).__name__}") from e
    s = sigmas.detach().double().cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape "
                         f"{tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("sigmas contains NaN or Inf: expected finite noise levels")
    pos = s[:-1] if float(s[-1]) == 0.0 else s
    if not bool((pos > 0).all()):
        i = int((pos <= 0).nonzero()[0])
        raise ValueError(f"sigmas[{i}]={float(s[i])!r} is invalid: every sigma must be > 0 "
                         "except a final 0")
    if not bool((s[1:] < s[:-1]).all()):
        i = int((s[1:] >= s[:-1]).nonzero()[0])
        raise ValueError(f"sigmas must be strictly decreasing, but sigmas[{i + 1}]="
                         f"{float(s[i + 1])!r} >= sigmas[{i}]={float(s[i])!r}")
    return s


def _check_call(model: Any, x: Any, extra_args: Any, callback: Any) -> None:
    """The types of a k-diffusion sampler call's arguments (sigmas: :func:`_check_sigmas`)."""
    if not callable(model):
        raise TypeError(f"model must be a k-diffusion denoiser D(x, sigma, **extra_args), "
                        f"got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")


def k_sampler(solver: str | Solver, *, seed: int = 0, float64: bool = False, **options: Any
              ) -> Callable[..., Tensor]:
    """A k-diffusion-style sampler running the registered sdekit ``solver`` (a name, with
    ``options``, or a Solver instance).

    Returns ``sample(model, x, sigmas, extra_args=None, callback=None, disable=None) -> x``
    (see the module docstring). ``callback``, if given, is called once per interval of
    ``sigmas`` with k-diffusion's dict ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}``: the
    state at ``sigmas[i]``, the first noise level the model was called at in that step and its
    output there (called after the step, where k-diffusion calls it before the update; solvers
    that run their own loop, ``torchsde*``, report no steps). ``disable=False`` shows a progress
    bar. Stochastic solvers draw their noise from per-sample seeds derived from ``seed``
    (k-diffusion's draw from torch's global generator: same distribution, other numbers).
    ``float64=True`` keeps the solver state in float64.

    Solvers that choose their own steps (adaptive) or ignore the grid (learned operators) cannot
    follow a given list of sigmas and raise ``ValueError``.
    """
    slv = get_solver(solver, **options)        # unknown names / options fail here
    if slv.adaptive or slv.grid_free:
        why = "chooses its own steps (adaptive)" if slv.adaptive else \
            "ignores the time grid (a learned operator)"
        ok = [d["name"] for d in list_solvers() if not (d["adaptive"] or d["grid_free"])]
        raise ValueError(f"solver {slv.name!r} {why}, so it cannot follow a k-diffusion sigmas "
                         f"list: use one of {ok}")
    params = inspect.signature(type(slv).__init__).parameters
    if isinstance(solver, str) and "lower_order_final" in params and \
            "lower_order_final" not in options:
        slv = get_solver(solver, **options, lower_order_final=False)

    def sample(model: Callable[..., Tensor], x: Tensor, sigmas: Tensor,
               extra_args: dict[str, Any] | None = None, callback: Callable[[dict], Any] | None
               = None, disable: bool | None = None) -> Tensor:
        _check_call(model, x, extra_args, callback)
        s = _check_sigmas(sigmas)
        sig_of = (lambda i: sigmas[i]) if isinstance(sigmas, Tensor) else (lambda i: s[i])
        to_zero = float(s[-1]) == 0.0
        pos = s[:-1] if to_zero else s
        rec = _Recorder(model, dict(extra_args or {}))
        last_x = [x]

        def report(i: int, x_next: Tensor | None) -> None:
            if callback is not None and not slv.external_loop:
                sh = rec.sigma if rec.sigma is not None else sig_of(i)
                callback({"x": last_x[0], "i": i, "sigma": sig_of(i), "sigma_hat": sh,
                          "denoised": rec.denoised})
            if x_next is not None:
                last_x[0] = x_next
            rec.reset()

        if pos.numel() == 1:     # [sigma, 0]: the jump to 0 alone
            sde = EDMSDE(float(pos[0]) / 2, float(pos[0]))
            with torch.no_grad():
                out = DiffusionModel(rec, sde, "denoiser").x0(x, float(pos[0]))
            report(0, None)
            return out
        sde = EDMSDE(float(pos[-1]), float(pos[0]))
        grid = pos.clone()
        grid[0], grid[-1] = sde.T, sde.t_min    # exact ends (EDMSDE keeps them as floats)
        sol = _sample(sde, DiffusionModel(rec, sde, "denoiser"), x, solver=slv, grid=grid,
                      denoise=to_zero, seed=seed, float64=float64, progress=disable is False,
                      callback=lambda i, t, xn: report(i, xn))
        if to_zero:
            report(len(s) - 2, None)
        return sol.x

    sample.__name__ = f"sample_{slv.name}"
    sample.__doc__ = f"sdekit's {slv.name!r} with k-diffusion's sampler signature (see k_sampler)."
    return sample
