"""Solver options declared once and read by one rule (sdekit.solvers.registry.option_parameters)."""
from __future__ import annotations

import inspect
import math

import pytest

import sdekit
from sdekit.solvers.exp_integrator import ExpIntegrator, ThresholdingOptions
from sdekit.solvers.registry import _REGISTRY, option_parameters
from sdekit.tuned_grid import solver_config


def test_thresholding_options_live_in_exp_integrator_only():
    """The four thresholding options are ExpIntegrator's keyword-only parameters (their defaults)
    and ThresholdingOptions (their names and types); every registered solver that takes them
    takes exactly those, with those defaults, and passes them on unchanged."""
    kw_only = {p.name: p.default for p in inspect.signature(ExpIntegrator.__init__).parameters
               .values() if p.kind is p.KEYWORD_ONLY}
    assert set(kw_only) == set(ThresholdingOptions.__annotations__) == {
        "thresholding", "threshold_ratio", "threshold_min", "threshold_max"}
    takers = set()
    for name, (cls, _) in _REGISTRY.items():
        opts = {p.name: p.default for p in option_parameters(cls)}
        own = inspect.signature(cls.__init__).parameters
        if "thresholding" in opts:
            takers.add(name)
            assert {k: opts[k] for k in kw_only} == kw_only, name
            assert not set(kw_only) & set(own), f"{name} repeats the thresholding options"
    assert {"dpmpp_2m", "dpmpp_2s", "dpmpp_adaptive", "dpmpp_2m_sde", "unipc_bh2"} <= takers
    slv = sdekit.get_solver("unipc_bh2", thresholding=True, threshold_max=1.0)
    assert slv.threshold == (0.995, 1.0, 1.0)
    assert solver_config("dpmpp_2m")["threshold_max"] == math.inf
    with pytest.raises(ValueError, match="threshold_ratio=0"):
        sdekit.get_solver("dpmpp_2s", thresholding=True, threshold_ratio=0)
    with pytest.raises(TypeError, match=r"unknown options \['threshold_maxx'\].*'threshold_max'"):
        sdekit.get_solver("dpmpp_2m", threshold_maxx=1.0)
