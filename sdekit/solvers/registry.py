"""The solver registry: ``@register("name", **defaults)`` on a Solver class."""
from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._utils import is_flag, require
from .base import Solver

# The default solver: of the option-free rule (default_config), and of a call that gives a grid
# but no solver (sdekit.sample, sdekit sample, the trainers' sample previews).
DEFAULT_SOLVER = "unipc_bh2"


#: default_config: the largest lambda step of its grid at which the default solver is of order 3
ORDER3_MAX_LAMBDA_STEP = 1.2
#: default_config: its logsnr grid jumps from lambda(T) to this half-logSNR in one step (see
#: :func:`sdekit.grids.uniform_logsnr`, ``lambda_floor``)
DEFAULT_LAMBDA_FLOOR = -2.5
#: default_config: up to this many steps the floor is DEFAULT_LAMBDA_FLOOR; above, it falls by
#: FLOOR_FALL * ln(steps / FLOOR_FULL_STEPS), so that the one step below it stops bounding the
#: error as the steps grow (see default_lambda_floor)
FLOOR_FULL_STEPS = 20
FLOOR_FALL = 0.75
#: default_config on a process that starts at alpha = 0 (flow matching): above this lambda step
#: of the floored grid (N <= 5 on rectified flow: h = 2.35 at 5 steps, 1.88 at 6) the Karras
#: grid replaces it (measured at N = 3..9: better at 3-5 steps, 2-15x worse on the Gaussian
#: at 6-8, see docs/defaults.md)
ALPHA_ZERO_KARRAS_MIN_LAMBDA_STEP = 2.0


def default_lambda_floor(steps: int) -> float:
    """The option-free grid's floor at ``steps`` steps: :data:`DEFAULT_LAMBDA_FLOOR` (-2.5) up
    to :data:`FLOOR_FULL_STEPS` (20) steps, then ``-2.5 - 0.75 ln(steps / 20)`` (-3.0 at 39
    steps, -3.5 at 76, -4.1 at 160). The first step, from lambda(T) to the floor, has an
    error that does not shrink with ``steps`` and falls as ``e^{p floor}``, ``p`` about 4
    (measured on the 16-dim Gaussians of sdekit bench under VP and flow matching at 320 steps:
    6-9x less per half unit of lambda, VP 3.4e-6 at -2.5, 3.9e-7 at -3.0), while the order-3
    steps after it have an error falling as ``steps^-3``: a floor falling by ``(3 / 4)
    ln(steps)`` keeps the first step's share of the error from growing. With the fixed floor
    the default stalled at RMS 3.4e-6 from 160 to 320 steps on the VP Gaussian (the plain
    logsnr grid: 1.8e-7 at 160; this floor: 1.2e-7; benchmarks/default_many_steps.py,
    tests/test_default_flow.py)."""
    return DEFAULT_LAMBDA_FLOOR - FLOOR_FALL * math.log(max(steps, FLOOR_FULL_STEPS)
                                                        / FLOOR_FULL_STEPS)


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
    the end (its automatic ``lower_order_final`` is off: equal, short steps). Above 20 steps
    the floor falls with ``steps`` (:func:`default_lambda_floor`), so the rule converges at the
    solver's order as the steps grow.

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
    grid_options = {"lambda_floor": default_lambda_floor(steps)}
    lam = sde.lambda_(make_grid(sde, "logsnr", steps, **grid_options)).double()
    d = lam[torch.isfinite(lam)].diff()
    h = float(d.median()) if d.numel() > 1 else math.inf   # the equal steps (not the jump)
    if h > ALPHA_ZERO_KARRAS_MIN_LAMBDA_STEP and sde.alpha_zero_at_T:
        return {"solver": DEFAULT_SOLVER, "options": {}, "grid": "karras", "grid_options": {}}
    options = ({"order": 3} if h <= ORDER3_MAX_LAMBDA_STEP else
               {"order": 2, "lower_order_final": False})
    return {"solver": DEFAULT_SOLVER, "options": options, "grid": "logsnr",
            "grid_options": grid_options}


_REGISTRY: dict[str, tuple[type[Solver], dict[str, Any]]] = {}
#: the registered classes whose instances register() names (see _name_instances), and the
#: options each such instance was built with
_NAMED: set[type[Solver]] = set()
_BUILT: weakref.WeakKeyDictionary[Solver, dict[str, Any]] = weakref.WeakKeyDictionary()

#: the keyword names of :func:`sdekit.sample` (tests/test_solvers_registry.py holds this to its
#: signature): no solver option may be named like one, so ``sample(..., solver=name,
#: **solver_options)`` can never route an option to the wrong place
SAMPLE_KEYWORDS = frozenset({
    "sde", "model", "x_init", "shape", "solver", "steps", "grid", "t_start", "t_end",
    "prediction", "denoise", "float64", "seed", "seeds", "noise", "save_at", "callback",
    "progress", "dtype", "device", "project", "grid_options", "grad", "solver_options"})


def option_parameters(cls: type[Solver]) -> tuple[inspect.Parameter, ...]:
    """The options of solver class ``cls`` (what get_solver accepts, solver_config records and
    sdekit tune searches): its constructor's named parameters (without ``self``) and, where it
    also takes ``**kwargs``, the keyword-only parameters of the next constructor up its class
    hierarchy, which it passes them on to (the exponential integrators'
    :class:`~sdekit.solvers.exp_integrator.ThresholdingOptions`), and so on up."""
    out: dict[str, inspect.Parameter] = {}
    inits = [vars(k)["__init__"] for k in cls.__mro__ if "__init__" in vars(k)]
    for i, init in enumerate(inits):
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind is p.KEYWORD_ONLY or (i == 0 and p.kind is p.POSITIONAL_OR_KEYWORD):
                out.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return tuple(out.values())


def _check_option_names(name: str, cls: type[Solver], defaults: dict[str, Any]) -> None:
    """Refuse a registration whose solver options (``cls``'s :func:`option_parameters` and the
    registered defaults) include a keyword of :func:`sdekit.sample`."""
    params = [p.name for p in option_parameters(cls)]
    clash = sorted(SAMPLE_KEYWORDS.intersection([*params, *defaults]))
    if clash:
        raise ValueError(f"@register({name!r}): solver {cls.__name__} has options {clash} named "
                         "like keywords of sdekit.sample(), which would take them; rename the "
                         f"options (sample()'s keywords: {sorted(SAMPLE_KEYWORDS)})")


def register(name: str, **defaults: Any) -> Callable[[type[Solver]], type[Solver]]:
    """Register a solver class under ``name`` with default options (one class may be registered
    under several names with different defaults). Duplicate names are an error. An instance
    built straight from the class (``DPMSolverMultistep(order=3)``) is named after its
    registration (:func:`registered_name`), as :func:`get_solver` names its own."""

    def deco(cls: type[Solver]) -> type[Solver]:
        if name in _REGISTRY:
            raise ValueError(f"solver name {name!r} is already registered "
                             f"(by {_REGISTRY[name][0].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"@register({name!r}) must decorate a Solver subclass")
        _check_option_names(name, cls, defaults)
        _REGISTRY[name] = (cls, dict(defaults))
        if cls not in _NAMED:
            _name_instances(cls)   # at the first registration of cls
        return cls

    return deco


def _name_instances(cls: type[Solver]) -> None:
    """Wrap ``cls.__init__`` (once, its signature kept) so that an instance of ``cls`` itself
    is named after the effective options it was built with (:func:`registered_name`), which
    :func:`built_options` returns."""
    init = cls.__init__

    flags = {p.name: p.annotation == "bool | None" for p in option_parameters(cls)
             if p.annotation in ("bool", "bool | None")}   # on/off options (None: automatic)

    @functools.wraps(init)
    def __init__(self: Solver, *args: Any, **kwargs: Any) -> None:
        if type(self) is not cls:   # a subclass is not this registration
            init(self, *args, **kwargs)
            return
        options = _effective_options(cls, args, kwargs)
        for k, allow_none in flags.items():
            if k in options:
                require(is_flag(options[k], allow_none), k, options[k],
                        "True or False" + (" (or None: automatic)" if allow_none else "")
                        + f" for solver {cls.__name__}")
        init(self, *args, **kwargs)
        _BUILT[self] = options
        self.name = _name_of(cls, options)

    setattr(cls, "__init__", __init__)   # (mypy refuses assigning to a method)
    _NAMED.add(cls)


def _effective_options(cls: type[Solver], args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> dict[str, Any]:
    """The options of ``cls(*args, **kwargs)``: the given ones and the defaults of the rest."""
    sig = inspect.signature(cls.__init__)
    eff = {p.name: p.default for p in option_parameters(cls) if p.default is not p.empty}
    for k, v in list(sig.bind(None, *args, **kwargs).arguments.items())[1:]:   # without self
        kind = sig.parameters[k].kind
        if kind is kind.VAR_KEYWORD:
            eff.update(v)
        elif kind is not kind.VAR_POSITIONAL:
            eff[k] = v
    return eff


def built_options(solver: Solver) -> dict[str, Any] | None:
    """The effective options (given or defaults) that ``solver``, an instance of a registered
    class, was built with (by :func:`get_solver` or straight from its class); None for another."""
    return _BUILT.get(solver)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):   # e.g. a tensor of several elements
        return False


def _name_of(cls: type[Solver], options: dict[str, Any]) -> str:
    fits = [(n, d) for n, (c, d) in _REGISTRY.items()
            if c is cls and all(k in options and _equal(options[k], v) for k, v in d.items())]
    return max(fits, key=lambda nd: len(nd[1]))[0] if fits else "?"


def registered_name(cls: type[Solver], *args: Any, **kwargs: Any) -> str:
    """The registry name of ``cls(*args, **kwargs)``: of the registrations of ``cls`` whose
    default options the call's effective options (given or the constructor's defaults) agree
    with, the one that sets the most (``UniPC(order=2, predictor="dpmpp_2m")`` is
    ``unic_dpmpp_2m``, not ``unipc_bh2``; ``EDMHeun(heun=False)`` is ``edm_euler``), the first
    registered among equals; ``"?"`` where none does."""
    return _name_of(cls, _effective_options(cls, args, kwargs))


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
    valid = [p.name for p in option_parameters(cls)]
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


def alpha_zero_starters() -> list[str]:
    """The registered solvers (with their default options) that can start where alpha = 0,
    flow matching's t = 1 (``Solver.starts_at_alpha_zero``): what an error names as valid."""
    return [n for n in solver_names() if get_solver(n).starts_at_alpha_zero]


def _load_builtin() -> None:
    import sdekit.solvers  # noqa: F401  (registers the built-in solvers)
