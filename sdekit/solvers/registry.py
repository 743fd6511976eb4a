"""The solver registry: ``@register("name", **defaults)`` on a Solver class."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from .base import Solver

# The one default solver (sdekit.sample, sdekit sample, the trainers' sample previews).
DEFAULT_SOLVER = "unipc_bh2"

_REGISTRY: dict[str, tuple[type[Solver], dict[str, Any]]] = {}


def register(name: str, **defaults: Any) -> Callable[[type[Solver]], type[Solver]]:
    """Register a solver class under ``name`` with default options (one class may be registered
    under several names with different defaults). Duplicate names are an error."""

    def deco(cls: type[Solver]) -> type[Solver]:
        if name in _REGISTRY:
            raise ValueError(f"solver name {name!r} is already registered "
                             f"(by {_REGISTRY[name][0].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"@register({name!r}) must decorate a Solver subclass")
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
