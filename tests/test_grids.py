"""Named grids beyond the four defaults (issue 16, item 1): polyexponential, KL-optimal and a
stored grid interpolated to another step count; each a pure function of the forward process and
the step count, usable by every solver."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import gaussian_problem

import sdekit
from sdekit.grids import BENCH_GRIDS, GRIDS, is_grid_spec, make_grid, parse_grid

SDES = {"vp": sdekit.VPSDE, "ve": sdekit.VESDE, "ddpm": sdekit.DiscreteDDPM,
        "cosine": sdekit.CosineVPSDE, "flow": sdekit.FlowSDE}


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm", "cosine"])
def test_polyexponential_is_its_formula_and_rho_1_is_logsnr(name):
    sde = SDES[name]()
    torch.testing.assert_close(make_grid(sde, "polyexponential", 12, rho=1.0),
                               make_grid(sde, "logsnr", 12), rtol=0, atol=1e-12)
    t = make_grid(sde, "polyexponential", 9, rho=3.0)
    log_s = torch.log(sde.sigma_tilde(t))
    lo, hi = log_s[-1], log_s[0]
    ramp = torch.linspace(1, 0, 10, dtype=torch.float64) ** 3.0
    torch.testing.assert_close(log_s, lo + ramp * (hi - lo), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SDES))
def test_kl_optimal_is_uniform_in_arctan_sigma(name):
    sde = SDES[name]()
    t = make_grid(sde, "kl_optimal", 8)
    assert float(t[0]) == sde.T and float(t[-1]) == sde.t_min
    a = torch.atan(sde.sigma_tilde(t))   # atan(inf) = pi/2 where alpha = 0 (flow at t = 1)
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(a[1:] - a[:-1], (a[1:] - a[:-1]).mean().expand(8), rtol=0,
                               atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm"])
def test_interpolated_logsnr_grid_is_the_logsnr_grid(name):
    """AYS-style interpolation is linear in lambda over the normalised index, so a uniform-logSNR
    base grid interpolates to the uniform-logSNR grid of any step count."""
    sde = SDES[name]()
    base = make_grid(sde, "logsnr", 10)
    for n in (3, 10, 25):
        torch.testing.assert_close(make_grid(sde, "interpolated", n, base=base),
                                   make_grid(sde, "logsnr", n), rtol=0, atol=1e-10)


def test_interpolated_to_its_own_step_count_is_the_base_grid():
    sde = sdekit.VPSDE()
    ays_like = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.03, 0.001], dtype=torch.float64)
    torch.testing.assert_close(make_grid(sde, "interpolated", 5, base=ays_like), ays_like,
                               rtol=0, atol=1e-12)


def test_interpolated_keeps_the_flow_start():
    sde = sdekit.FlowSDE()
    base = make_grid(sde, "logsnr", 10)
    t = make_grid(sde, "interpolated", 6, base=base)
    assert t.numel() == 7 and float(t[0]) == 1.0 and float(t[1]) == float(base[1])
    assert float(t[-1]) == sde.t_min


@pytest.mark.parametrize("kwargs, msg", [
    (dict(grid="interpolated"), "needs grid_options"),
    (dict(grid="interpolated", base=[0.5, 0.9, 0.001]), "strictly decreasing"),
    (dict(grid="interpolated", base=[0.9, 0.001]), "t_start=1.0 differs"),
    (dict(grid="polyexponential", rho=0), "rho=0 is invalid"),
    (dict(grid="kl_optimal", rho=2), r"grid_options \['rho'\] do not apply"),
    (dict(grid="logsnr", lambda_floor=float("nan")), "lambda_floor=nan is invalid"),
    (dict(grid="logsnr", lambda_floor="-2"), "lambda_floor='-2' is invalid"),
])
def test_bad_grid_options(kwargs, msg):
    grid = kwargs.pop("grid")
    with pytest.raises(ValueError, match=msg):
        make_grid(sdekit.VPSDE(), grid, 5, **kwargs)


@pytest.mark.parametrize("sde", [None, "vp"])
def test_make_grid_refuses_an_sde_that_is_not_a_forward_sde(sde):
    """It used to end in AttributeError: 'NoneType' object has no attribute 'T'."""
    with pytest.raises(TypeError, match="sde must be an sdekit ForwardSDE"):
        make_grid(sde, "uniform", 5)


@pytest.mark.parametrize("grid", ["polyexponential", "kl_optimal"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc_bh2", "deis_tab3", "heun",
                                    "edm_heun", "euler_maruyama"])
def test_new_grids_serve_every_solver_kind(grid, solver):
    """Converges on the exact Gaussian flow (ODE) / gives finite samples (SDE)."""
    sde = sdekit.VPSDE()
    data = gaussian_problem(sde)
    x_T = data.marginal_sample(16, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = data.flow(x_T, sde.T, sde.t_min)
    errs = [float((sdekit.sample(sde, data.model(), x_T, solver=solver, grid=grid, steps=n).x
                   - ref).pow(2).mean().sqrt()) for n in (20, 80)]
    assert all(math.isfinite(e) for e in errs)
    if solver != "euler_maruyama":
        assert errs[1] < errs[0] / 2, f"{solver} on {grid}: errors {errs}"


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm", "cosine", "flow"])
def test_logsnr_floor_jumps_to_the_floor_then_equal_lambda_steps(name):
    """lambda_floor: the first step from lambda(T) (-inf on flow) straight to the floor, the
    other steps - 1 equal in lambda to the end; the plain grid where the floor is outside
    (lambda(T), lambda(t_end))."""
    sde = SDES[name]()
    t = make_grid(sde, "logsnr", 8, lambda_floor=-2.5)
    lam = sde.lambda_(t)
    assert float(t[0]) == sde.T and float(t[-1]) == sde.t_min and t.numel() == 9
    assert float(lam[0]) < -2.5 and float(lam[1]) == pytest.approx(-2.5, abs=1e-9)
    torch.testing.assert_close(lam[1:], torch.linspace(-2.5, float(lam[-1]), 8,
                                                       dtype=torch.float64), rtol=0, atol=1e-9)
    for floor in (float(lam[0]) - 1 if name != "flow" else None, float(lam[-1]) + 1):
        if floor is not None:
            torch.testing.assert_close(make_grid(sde, "logsnr", 8, lambda_floor=floor),
                                       make_grid(sde, "logsnr", 8), rtol=0, atol=0)


def test_bench_default_grids_are_unchanged():
    assert set(BENCH_GRIDS) == {"uniform", "quadratic", "logsnr", "karras"}
    assert set(BENCH_GRIDS) < set(GRIDS)


@pytest.mark.parametrize("spec, name, opts", [
    ("logsnr(lambda_floor=-2.5)", "logsnr", {"lambda_floor": -2.5}),
    ("uniform(shift=3, shift_type=linear)", "uniform", {"shift": 3, "shift_type": "linear"}),
    (" karras( rho = 5 ) ", "karras", {"rho": 5}),
    ("quadratic()", "quadratic", {}),
    ("kl_optimal", "kl_optimal", {}),
])
def test_a_grid_written_with_its_options_is_that_grid(spec, name, opts):
    """The ``name(key=value, ...)`` form the tables print names the grid with those options,
    in make_grid and in sample."""
    assert parse_grid(spec) == (name, opts) and is_grid_spec(spec)
    sde = sdekit.FlowSDE()
    torch.testing.assert_close(make_grid(sde, spec, 7), make_grid(sde, name, 7, **opts),
                               rtol=0, atol=0)
    data = gaussian_problem(sde)
    x = data.marginal_sample(4, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    model = data.model("flow")
    a = sdekit.sample(sde, model, x, solver="dpmpp_2m", grid=spec, steps=7)
    b = sdekit.sample(sde, model, x, solver="dpmpp_2m", grid=name, steps=7,
                      grid_options=opts or None)
    assert torch.equal(a.x, b.x)


@pytest.mark.parametrize("spec, kwargs, msg", [
    ("logsnr(rho=2)", {}, "grid option 'rho' does not apply to grid 'logsnr': its options are"),
    ("logsnr(lambda_floor)", {}, "malformed at 'lambda_floor'"),
    ("karras(rho=2", {}, r"malformed: expected karras\(key=value"),
    ("karras(rho=2, rho=3)", {}, "gives 'rho' twice"),
    ("cubic(rho=2)", {}, r"unknown grid 'cubic\(rho=2\)': expected one of"),
    ("karras(rho=2)", {"rho": 3}, r"grid option\(s\) \['rho'\] given twice"),
])
def test_bad_grid_specs_are_refused_by_name(spec, kwargs, msg):
    assert not is_grid_spec(spec) or kwargs
    with pytest.raises(ValueError, match=msg):
        make_grid(sdekit.VPSDE(), spec, 5, **kwargs)
