"""The solver registry and the built-in solvers."""
from . import classic, ode, operator  # noqa: F401  (registers the built-in solvers)
from . import deis, dpm_solver, unipc  # noqa: F401  (fast exponential-integrator solvers)
from .base import (AdaptiveSolver, ExternalSolver, FixedGridSolver, LearnedSampler, ModelOutput,
                   ModelOutputError, OneCallStepper, Problem, Schedule, Solver, for_problem)
from .registry import (DEFAULT_SOLVER, default_config, get_solver, list_solvers, register,
                       solver_names)

__all__ = ["Solver", "FixedGridSolver", "OneCallStepper", "AdaptiveSolver", "ExternalSolver",
           "LearnedSampler", "for_problem", "Problem", "Schedule", "ModelOutput",
           "ModelOutputError", "register", "DEFAULT_SOLVER", "default_config", "get_solver",
           "list_solvers", "solver_names"]
