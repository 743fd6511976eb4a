"""Reverse dynamics and model parametrisations."""
from .parameterization import (
    KINDS,
    PREDICTIONS,
    TIME_INPUTS,
    Coeffs,
    DiffusionModel,
    NFECounter,
    PredictionKind,
    as_model,
    convert,
    from_eps,
    prediction_kind,
    register_prediction,
    time_cond,
    to_eps,
    to_x0,
)
from .reverse import ProbabilityFlowODE, ReverseSDE

__all__ = ["PREDICTIONS", "KINDS", "PredictionKind", "register_prediction", "prediction_kind",
           "Coeffs", "DiffusionModel", "NFECounter", "as_model", "from_eps", "to_eps", "to_x0",
           "convert", "time_cond", "TIME_INPUTS", "ReverseSDE", "ProbabilityFlowODE"]
