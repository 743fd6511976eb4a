"""The solver registry and the built-in solvers."""
from . import classic, ode, operator  # noqa: F401  (registers the built-in solvers)
from . import deis, dpm_solver, unipc  # noqa: F401  (fast exponential-integrator solvers)
from .base import ModelOutputError, Problem, Solver
from .registry import (DEFAULT_SOLVER, default_config, get_solver, list_solvers, register,
                       solver_names)

__all__ = ["Solver", "Problem", "ModelOutputError", "register", "DEFAULT_SOLVER", "default_config",
           "get_solver", "list_solvers", "solver_names"]
