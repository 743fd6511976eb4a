"""sdekit: diffusion sampling as numerical ODE/SDE solving."""
from .analytic import GaussianData, GaussianMixtureData
from .dynamics import DiffusionModel, NFECounter, ProbabilityFlowODE, ReverseSDE, as_model
from .grids import GRIDS, make_grid
from .integrate import Solution, sample
from .inverse import (
    DDRMSolver,
    Denoising,
    Inpainting,
    MatrixOperator,
    SuperResolution,
    SVDOperator,
    ddrm,
    dps,
    inpaint,
    replacement,
    sdedit,
)
from .likelihood import LikelihoodResult, likelihood
from .noise import BrownianNoise, SeededNoise
from .sde import (
    EDMSDE,
    VESDE,
    VPSDE,
    CosineVPSDE,
    CustomSDE,
    DiscreteDDPM,
    FlowSDE,
    ForwardSDE,
    LinearInterpolantSDE,
    SubVPSDE,
    TrigFlowSDE,
    get_sde,
)
from .solvers import Solver, get_solver, list_solvers, register, solver_names
from .solvers.analytic_dpm import MomentTable, estimate_moments
from .solvers.dpm_solver_v3 import EMS, estimate_ems
from .tune import TunedGrid, load_tuned_grid, search, tune

__version__ = "0.1.0"

__all__ = [
    "ForwardSDE", "VPSDE", "CosineVPSDE", "SubVPSDE", "VESDE", "EDMSDE", "DiscreteDDPM",
    "FlowSDE", "TrigFlowSDE", "LinearInterpolantSDE", "CustomSDE", "get_sde", "DiffusionModel",
    "NFECounter", "as_model", "ReverseSDE",
    "ProbabilityFlowODE", "GaussianData", "GaussianMixtureData", "__version__",
    "sample", "Solution", "GRIDS", "make_grid", "SeededNoise", "BrownianNoise", "Solver",
    "get_solver", "list_solvers", "register", "solver_names", "likelihood", "LikelihoodResult",
    "sdedit", "inpaint", "replacement", "dps", "ddrm", "DDRMSolver", "SVDOperator",
    "MatrixOperator", "Inpainting", "SuperResolution", "Denoising",
    "estimate_moments", "MomentTable", "estimate_ems", "EMS",
    "tune", "search", "TunedGrid", "load_tuned_grid",
]

#: subpackages loaded on first use (``sdekit.models.wrap(...)``,
#: ``sdekit.interop.to_diffusers(...)`` after a bare ``import sdekit``), not at import: they are
#: larger and the interop bridges reach for optional dependencies
_LAZY_SUBMODULES = frozenset({"models", "interop", "training", "bench", "distill", "cli"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sdekit' has no attribute {name!r}")
