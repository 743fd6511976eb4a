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


@pytest.mark.parametrize("solver, options, match", [
    # a wrong type used to end in Python's own TypeError from a comparison or conversion
    ("dpmpp_2m", {"threshold_ratio": "0.9"}, r"threshold_ratio='0.9' is invalid"),
    ("dpmpp_2m", {"threshold_max": None}, r"threshold_max=None are invalid"),
    ("dpmpp_2m", {"threshold_min": [1]}, r"threshold_min=\[1\], .* are invalid"),
    ("dpmpp_adaptive", {"theta": None}, r"theta=None is invalid"),
    ("dpmpp_adaptive", {"max_iters": None}, r"max_iters=None is invalid"),
    ("dpmpp_adaptive", {"max_iters": "x"}, r"max_iters='x' is invalid"),
    ("edm_heun", {"S_tmax": "50"}, r"S_tmax='50' is invalid"),
    ("unipc_bh2", {"disable_corrector": 2}, r"disable_corrector=2 is invalid"),
    ("unipc_bh2", {"disable_corrector": [1.5]}, r"disable_corrector=\[1.5\] is invalid"),
    ("heun", {"method": ["rk4"]}, r"method=\['rk4'\] is invalid"),
    ("dopri5", {"method": ["dopri5"]}, r"method=\['dopri5'\] is invalid"),
    ("torchsde", {"method": ["srk"]}, r"method=\['srk'\] is invalid"),
    # accepted, then a solve that could never converge: RuntimeError after the work
    ("dpmpp_adaptive", {"max_iters": 0}, r"max_iters=0 is invalid: expected an integer >= 1"),
    ("dpm_solver_adaptive", {"max_iters": 2.5}, r"max_iters=2.5 is invalid"),
])
def test_bad_option_value_is_refused_by_name_when_the_solver_is_built(solver, options, match):
    with pytest.raises(ValueError, match=match):
        sdekit.get_solver(solver, **options)


def test_option_checks_keep_valid_values():
    """The checks accept what was valid before: an infinite threshold_max, any iterable of step
    indices, a NumPy integer max_iters."""
    import numpy as np
    slv = sdekit.get_solver("dpmpp_2m", thresholding=True, threshold_max=math.inf)
    assert slv.threshold == (0.995, 1.0, math.inf)
    assert sdekit.get_solver("unipc_bh2", disable_corrector=range(2)).disable_corrector == {0, 1}
    assert sdekit.get_solver("dpmpp_adaptive", max_iters=np.int64(50)).max_iters == 50


def _flag_options() -> list[tuple[str, str, bool]]:
    """(solver, option, takes None) for every on/off option of every registered solver."""
    return [(name, p.name, p.annotation == "bool | None") for name, (cls, _) in _REGISTRY.items()
            for p in option_parameters(cls) if p.annotation in ("bool", "bool | None")]


def test_every_flag_option_is_found():
    found = {(s, o) for s, o, _ in _flag_options()}
    assert {("dpmpp_2m", "final_to_zero"), ("unipc_bh2", "corrector"), ("edm_heun", "heun"),
            ("dpmpp_2m", "lower_order_final"), ("dpm_solver_v3", "pseudo_order")} <= found


@pytest.mark.parametrize("solver, option, takes_none", _flag_options())
def test_on_off_options_take_only_bools(solver, option, takes_none):
    """A string or number for an on/off option used to be read for its truth ('no' as True);
    it is refused by name when the solver is built. True and False (and None where the option
    is automatic by default) still build."""
    for bad in ("no", 1, 0.0) + (() if takes_none else (None,)):
        with pytest.raises(ValueError, match=f"{option}={bad!r} is invalid: expected True or "
                                             "False"):
            sdekit.get_solver(solver, **{option: bad})
    for good in (True, False) + ((None,) if takes_none else ()):
        try:
            sdekit.get_solver(solver, **{option: good})
        except ValueError as e:   # a valid flag may still clash with another option
            assert f"{option}={good!r} is invalid" not in str(e)
