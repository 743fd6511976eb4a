"""Reverse dynamics and model parametrisations."""
from .parameterization import (PREDICTIONS, DiffusionModel, NFECounter, as_model, from_eps,
                               to_eps)
from .reverse import ProbabilityFlowODE, ReverseSDE

__all__ = ["PREDICTIONS", "DiffusionModel", "NFECounter", "as_model", "from_eps", "to_eps",
           "ReverseSDE", "ProbabilityFlowODE"]
