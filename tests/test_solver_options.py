"""Solver options declared once and read by one rule (sdekit.solvers.registry.option_parameters),
and solvers built straight from their class named as the registry names them."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import sdekit
from sdekit.bench.problems import gaussian_problem
from sdekit.solvers.dpm_solver import DPMSolverMultistep
from sdekit.solvers.exp_integrator import ExpIntegrator, ThresholdingOptions
from sdekit.solvers.ode import EDMHeun
from sdekit.solvers.registry import _REGISTRY, option_parameters, registered_name
from sdekit.solvers.unipc import UniPC
from sdekit.tune import TuneError, tune
from sdekit.tuned_grid import solver_config

DIM = 4


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


@pytest.mark.parametrize("build, name", [
    (lambda: DPMSolverMultistep(), "dpmpp_2m"),
    (lambda: DPMSolverMultistep(order=3), "dpmpp_3m"),
    (lambda: DPMSolverMultistep(3, False), "dpm_solver_3m"),
    (lambda: DPMSolverMultistep(thresholding=True), "dpmpp_2m"),
    (lambda: UniPC(), "unipc_bh2"),
    (lambda: UniPC(variant="bh1"), "unipc_bh1"),
    (lambda: UniPC(order=2, predictor="dpmpp_2m"), "unic_dpmpp_2m"),  # the most specific
    (lambda: EDMHeun(heun=False), "edm_euler"),
])
def test_a_solver_built_from_its_class_has_its_registry_name(build, name):
    assert build().name == name


def test_registered_name_of_an_unregistered_configuration_and_a_subclass():
    class Mine(DPMSolverMultistep):
        pass

    assert Mine().name == "?"                    # a subclass is not the registered class
    assert registered_name(UniPC, variant="bh2", order=3, predictor="ddim") == "unipc_bh2"
    assert sdekit.get_solver("dpmpp_2m", order=3).name == "dpmpp_2m"   # get_solver's own name


@pytest.fixture(scope="module")
def problem():
    return gaussian_problem(dim=DIM)


def test_directly_built_solver_samples_under_its_name_and_takes_its_tuned_grid(problem,
                                                                               tmp_path):
    x = problem.sde.prior_std * torch.randn(3, DIM, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64)
    direct = sdekit.sample(problem.sde, problem.model, x, solver=DPMSolverMultistep(order=3),
                           steps=5)
    named = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_3m", steps=5)
    assert direct.solver == "dpmpp_3m" and torch.equal(direct.x, named.x)
    path = tmp_path / "dpmpp_3m-5.json"
    tune(problem.sde, problem.model, "dpmpp_3m", 5, reference=problem.flow, out=path,
         max_sweeps=1, calibration=4, heldout=4, shape=(DIM,), dtype=torch.float64,
         progress=False)
    on_grid = sdekit.sample(problem.sde, problem.model, x, solver=DPMSolverMultistep(order=3),
                            grid=path)
    assert on_grid.solver == "dpmpp_3m" and on_grid.nfe == 5
    assert torch.equal(on_grid.x, sdekit.sample(problem.sde, problem.model, x,
                                                solver="dpmpp_3m", grid=path).x)
    with pytest.raises(TuneError, match="solver: tuned for 'dpmpp_3m', given 'dpmpp_2m'"):
        sdekit.sample(problem.sde, problem.model, x, solver=DPMSolverMultistep(), grid=path)
    # an instance is held to its options too, however it was built (a name alone was checked)
    for other, what in ((DPMSolverMultistep(3, lower_order_final=False), "lower_order_final"),
                        (sdekit.get_solver("dpmpp_3m", solver_type="midpoint"), "solver_type")):
        with pytest.raises(TuneError, match=f"solver options differs in {what} "):
            sdekit.sample(problem.sde, problem.model, x, solver=other, grid=path)
