"""Reverse dynamics and model parametrisations."""
from .parameterization import (PREDICTIONS, TIME_INPUTS, DiffusionModel, NFECounter, as_model,
                               convert, from_eps, to_eps, to_x0)
from .reverse import ProbabilityFlowODE, ReverseSDE

__all__ = ["PREDICTIONS", "DiffusionModel", "NFECounter", "as_model", "from_eps", "to_eps",
           "to_x0", "convert", "TIME_INPUTS", "ReverseSDE", "ProbabilityFlowODE"]
