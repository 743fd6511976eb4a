"""The solver registry: ``@register("name", **defaults)`` on a Solver class."""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from .base import Solver

# The default solver: of the option-free rule (default_config), and of a call that gives a grid
# but no solver (sdekit.sample, sdekit sample, the trainers' sample previews).
DEFAULT_SOLVER = "unipc_bh2"


#: default_config: the largest lambda step of its grid at which the default solver is of order 3
ORDER3_MAX_LAMBDA_STEP = 1.2
#: default_config: its logsnr grid jumps from lambda(T) to this half-logSNR in one step (see
#: :func:`sdekit.grids.uniform_logsnr`, ``lambda_floor``)
DEFAULT_LAMBDA_FLOOR = -2.5
#: default_config on a process that starts at alpha = 0 (flow matching): above this lambda step
#: of the floored grid (N <= 5 on rectified flow: h = 2.35 at 5 steps, 1.88 at 6) the Karras
#: grid replaces it (measured at N = 3..9: better at 3-5 steps, 2-15x worse on the Gaussian
#: at 6-8, see docs/defaults.md)
ALPHA_ZERO_KARRAS_MIN_LAMBDA_STEP = 2.0


def default_config(sde: Any, steps: int) -> dict[str, Any]:
    """The option-free call's configuration on forward process ``sde`` at ``steps`` steps:
    ``{"solver", "options", "grid", "grid_options"}`` (used by ``sdekit.sample``, ``sdekit
    sample`` and the trainers' sample previews when neither a solver nor a grid is given).

    Rule: ``unipc_bh2`` on the uniform-logSNR grid with a floor (``logsnr``,
    ``lambda_floor=`` :data:`DEFAULT_LAMBDA_FLOOR` = -2.5): where the process starts below
    lambda = -2.5 (VP and DDPM at -5, the squared-cosine DDPM table at -9.9, VE at -3.9, EDM at
    -4.4, flow matching at -inf) the first step goes straight to -2.5, where the
    signal-to-noise ratio against data of unit scale is 0.007 and the data prediction is
    nearly the data mean, and the other ``steps - 1`` are equal steps in lambda from there to
    the end (a plain logsnr grid spends 17-50% of its steps below -2.5, 50% on the
    squared-cosine table). Of order 3 where that grid's lambda step ``h`` is at most
    :data:`ORDER3_MAX_LAMBDA_STEP` (1.2), else of order 2 without the lower-order final step;
    ``h = (lambda_end - max(lambda(T), -2.5)) / (steps - 1)`` is 0.78-1.05 at 10 steps on VP,
    DDPM, VE, EDM, flow and the squared-cosine table, 1.8-2.4 at 5 steps (order 2: order 3 and
    the lower-order final step cost 4-6x on Gaussians there). Order 3 keeps its high order to
    the end (its automatic ``lower_order_final`` is off: equal, short steps).

    Measured by ``benchmarks/default_rule.py`` (docs/defaults.md) on sdekit bench's Gaussian
    and mixture problems under VP, DDPM, squared-cosine DDPM, VE, EDM and flow at 5, 10, 20 NFE
    against the best fixed solver x named grid configuration: see docs/defaults.md for the
    cells within 1.25x on two independent draws of the problems.

    A process that starts at alpha = 0 (flow matching at t = 1: lambda(T) = -inf) where ``h``
    is over :data:`ALPHA_ZERO_KARRAS_MIN_LAMBDA_STEP` = 2.0 (N <= 5 on rectified flow, whose
    floored grid spans -2.5..6.9 in lambda: h = 2.35 at 5 steps) gets ``unipc_bh2`` with its
    registry options (order 2, automatic lower-order final step) on the Karras grid: its steps
    shrink towards both ends in lambda (-1.4, 0, 1.6, 3.8, 6.9 at 5 steps from t = 1), where
    the floored grid's equal 2.35 steps overshoot the mixtures' mode decisions (lambda -2..1).
    At 5 NFE the worst of eight flow cells (the 16-dim Gaussian and mixture on two draws,
    benchmarks/peers/run.py --sde flow's 64-dim Gaussian and mixture, seeds 0 and 1) goes from
    4.1x to 3.2x of the best fixed configuration (docs/defaults.md); at 6-8 steps Karras is
    2-15x worse on the Gaussians, so there and at N >= 10 the rule above holds."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
    from ..grids import make_grid
    grid_options = {"lambda_floor": DEFAULT_LAMBDA_FLOOR}
    lam = sde.lambda_(make_grid(sde, "logsnr", steps, **grid_options)).double()
    d = lam[torch.isfinite(lam)].diff()
    h = float(d.median()) if d.numel() > 1 else math.inf   # the equal steps (not the jump)
    if h > ALPHA_ZERO_KARRAS_MIN_LAMBDA_STEP and not math.isfinite(float(lam[0])):  # alpha(T) = 0
        return {"solver": DEFAULT_SOLVER, "options": {}, "grid": "karras", "grid_options": {}}
    options = ({"order": 3} if h <= ORDER3_MAX_LAMBDA_STEP else
               {"order": 2, "lower_order_final": False})
    return {"solver": DEFAULT_SOLVER, "options": options, "grid": "logsnr",
            "grid_options": grid_options}


_REGISTRY: dict[str, tuple[type[Solver], dict[str, Any]]] = {}

#: the keyword names of :func:`sdekit.sample` (tests/test_solvers_registry.py holds this to its
#: signature): no solver option may be named like one, so ``sample(..., solver=name,
#: **solver_options)`` can never route an option to the wrong place
SAMPLE_KEYWORDS = frozenset({
    "sde", "model", "x_init", "shape", "solver", "steps", "grid", "t_start", "t_end",
    "prediction", "denoise", "float64", "seed", "seeds", "noise", "save_at", "callback",
    "progress", "dtype", "device", "project", "grid_options", "grad", "solver_options"})


def _check_option_names(name: str, cls: type[Solver], defaults: dict[str, Any]) -> None:
    """Refuse a registration whose solver options (``cls``'s constructor parameters and the
    registered defaults) include a keyword of :func:`sdekit.sample`."""
    params = [p.name for p in inspect.signature(cls.__init__).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][1:]   # without self
    clash = sorted(SAMPLE_KEYWORDS.intersection([*params, *defaults]))
    if clash:
        raise ValueError(f"@register({name!r}): solver {cls.__name__} has options {clash} named "
                         "like keywords of sdekit.sample(), which would take them; rename the "
                         f"options (sample()'s keywords: {sorted(SAMPLE_KEYWORDS)})")


def register(name: str, **defaults: Any) -> Callable[[type[Solver]], type[Solver]]:
    """Register a solver class under ``name`` with default options (one class may be registered
    under several names with different defaults). Duplicate names are an error."""

    def deco(cls: type[Solver]) -> type[Solver]:
        if name in _REGISTRY:
            raise ValueError(f"solver name {name!r} is already registered "
                             f"(by {_REGISTRY[name][0].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"@register({name!r}) must decorate a Solver subclass")
        _check_option_names(name, cls, defaults)
        _REGISTRY[name] = (cls, dict(defaults))
        return cls

    return deco


def solver_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_solver(solver: str | Solver, **options: Any) -> Solver:
    """A solver instance from a registry name (with options) or an instance (returned as is)."""
    if isinstance(solver, Solver):
        if options:
            raise TypeError("solver options can only be given with a solver name")
        return solver
    _load_builtin()
    if not isinstance(solver, str) or solver not in _REGISTRY:
        raise ValueError(f"unknown solver {solver!r}: expected one of {sorted(_REGISTRY)}")
    cls, defaults = _REGISTRY[solver]
    valid = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"solver {solver!r} got unknown options {unknown}: valid options are "
                        f"{valid}")
    obj = cls(**{**defaults, **options})
    obj.name = solver
    return obj


def list_solvers() -> list[dict[str, Any]]:
    """Metadata of every registered solver with its default options."""
    return [get_solver(n).describe() for n in solver_names()]


def _load_builtin() -> None:
    import sdekit.solvers  # noqa: F401  (registers the built-in solvers)
