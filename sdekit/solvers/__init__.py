"""The solver registry and the built-in solvers."""
# imported for their registrations: the classic, ODE, fast exponential-integrator and learned
# solvers
from . import classic, deis, dpm_solver, dpm_solver_v3, ode, operator, unipc  # noqa: F401
from .base import (
    AdaptiveSolver,
    ExternalSolver,
    FixedGridSolver,
    LearnedSampler,
    ModelOutput,
    ModelOutputError,
    OneCallStepper,
    Problem,
    Schedule,
    Solver,
    for_problem,
)
from .registry import (
    DEFAULT_SOLVER,
    default_config,
    get_solver,
    list_solvers,
    register,
    solver_names,
)

__all__ = ["Solver", "FixedGridSolver", "OneCallStepper", "AdaptiveSolver", "ExternalSolver",
           "LearnedSampler", "for_problem", "Problem", "Schedule", "ModelOutput",
           "ModelOutputError", "register", "DEFAULT_SOLVER", "default_config", "get_solver",
           "list_solvers", "solver_names"]
