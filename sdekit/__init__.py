"""sdekit: diffusion sampling as numerical ODE/SDE solving."""
from .analytic import GaussianData, GaussianMixtureData
from .dynamics import (DiffusionModel, NFECounter, ProbabilityFlowODE, ReverseSDE, as_model)
from .sde import (EDMSDE, VESDE, VPSDE, CosineVPSDE, CustomSDE, DiscreteDDPM, ForwardSDE,
                  SubVPSDE, get_sde)

__version__ = "0.1.0"

__all__ = [
    "ForwardSDE", "VPSDE", "CosineVPSDE", "SubVPSDE", "VESDE", "EDMSDE", "DiscreteDDPM",
    "CustomSDE", "get_sde", "DiffusionModel", "NFECounter", "as_model", "ReverseSDE",
    "ProbabilityFlowODE", "GaussianData", "GaussianMixtureData", "__version__",
]
