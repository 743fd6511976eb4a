"""DPM-Solver-v3 (sdekit/solvers/dpm_solver_v3.py): its special cases, the empirical model
statistics against their closed form on Gaussian data, its order with estimated statistics, and
the refusal of statistics that do not fit the solve."""
from __future__ import annotations

import pytest
import torch
from conftest import make_sde
from helpers import ORDER_SDES, fitted_slope, gaussian_problem, model_kind, rms

import sdekit
from sdekit.solvers.dpm_solver_v3 import EMS, estimate_ems

F64 = torch.float64


def _start(sde) -> float:
    return sde.T if float(sde.alpha(sde.T)) > 0 else 0.99   # flow: alpha(T) = 0


def _problem(name, dim=4, n=16):
    sde = make_sde(name)
    data = gaussian_problem(sde, dim=dim)
    t0 = _start(sde)
    x = data.marginal_sample(n, t0, torch.Generator().manual_seed(0), dtype=F64)
    return sde, data, data.model(model_kind(sde)), t0, x


def _ems(sde, data, model, t0, m=256, n=200):
    return estimate_ems(sde, model, data.sample(m, torch.Generator().manual_seed(3)).double(),
                        n=n, t_start=t0)


@pytest.mark.parametrize("sde_name", [*sorted(ORDER_SDES), "edm"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_named_statistics_are_dpm_solver_pp_and_dpm_solver(order, sde_name):
    """l = 1, s = b = 0 is DPM-Solver++ and l = 0, s = -1, b = 0 DPM-Solver, multistep of the
    same order with the exact Lagrange weights: the same samples to rounding on every forward
    process (the EMS-weighted integrals, computed numerically, equal the closed-form phi
    weights)."""
    sde, data, model, t0, x = _problem(sde_name)
    kw = {"lower_order_final": False}
    if order > 1:
        kw["solver_type"] = "lagrange"
    if order == 3:
        kw["warmup"] = "lower_order"
    for ems, ref in (("data_prediction", "dpmpp"), ("noise_prediction", "dpm_solver")):
        name = f"{ref}_{order}m" if order > 1 else f"{ref}_1"
        a = sdekit.sample(sde, model, x, solver="dpm_solver_v3", ems=ems, order=order,
                          corrector=False, steps=7,
                          t_start=t0, lower_order_final=False).x
        b = sdekit.sample(sde, model, x, solver=name, steps=7, t_start=t0, **kw).x
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ems_have_their_closed_form_on_a_diagonal_gaussian():
    """Data N(mu, diag(v)): eps = sigma C^-1 (x - alpha mu), C = alpha^2 diag(v) + sigma^2 I, so
    the optimal l = sigma^2 / (alpha^2 v + sigma^2) = 1 / (1 + v e^{2 lambda}) exactly (the
    Jacobian is diagonal: Hutchinson's estimate is exact, and central differences of an affine
    eps too); then N = sigma eps - l x does not depend on x, f = -l mu is constant over the
    batch (Var f = 0, so s = 0), and b = f' = -mu dl/dlambda = 2 mu v e^{2 lambda} /
    (1 + v e^{2 lambda})^2. With these EMS the v3 step is exact up to the statistics'
    resolution: a few steps already beat DPM-Solver++(3M) by orders of magnitude."""
    sde = sdekit.VPSDE()
    mu, v = torch.tensor([0.8, -0.5, 0.2]), torch.tensor([0.05, 0.4, 1.3])
    data = sdekit.GaussianData(sde, mu, torch.diag(v))
    x_cal = data.sample(64, torch.Generator().manual_seed(1)).double()
    ems = estimate_ems(sde, data.model(), x_cal, n=400)
    q = v.double() * torch.exp(2 * ems.lam)[:, None]
    torch.testing.assert_close(ems.l, 1 / (1 + q), rtol=0, atol=1e-8)
    assert float(ems.s.abs().max()) == 0.0
    b = 2 * mu.double() * q / (1 + q) ** 2
    torch.testing.assert_close(ems.b, b, rtol=0, atol=2e-3 * float(b.abs().max()))
    assert ems.nfe == 5 * 401 and ems.n == 64
    x = data.marginal_sample(32, sde.T, torch.Generator().manual_seed(0), dtype=F64)
    exact = data.flow(x, sde.T, sde.t_min)
    v3 = rms(sdekit.sample(sde, data.model(), x, solver="dpm_solver_v3", ems=ems, steps=3).x, exact)
    pp = rms(sdekit.sample(sde, data.model(), x, solver="dpmpp_3m", steps=3).x, exact)
    assert v3 < 1e-3 < 1e-2 < pp, (v3, pp)


def test_l_is_the_jacobian_diagonal_on_a_correlated_gaussian():
    """Correlated Gaussian data: l = sigma^2 diag(C^-1) (the mean of the Jacobian diagonal of
    sigma eps); Hutchinson's estimate carries Monte-Carlo noise from the off-diagonal terms,
    within 0.03 here with 2000 samples (its standard error is below 0.01)."""
    sde = sdekit.VPSDE()
    data = gaussian_problem(sde, dim=3)
    ems = estimate_ems(sde, data.model(), data.sample(2000, torch.Generator().manual_seed(2))
                       .double(), n=8)
    t = sde.t_of_lambda(ems.lam)
    for k in range(ems.lam.numel()):
        a, s = float(sde.alpha(t[k])), float(sde.sigma(t[k]))
        C = a * a * data.cov.double() + s * s * torch.eye(3, dtype=F64)
        torch.testing.assert_close(ems.l[k], s * s * torch.linalg.inv(C).diagonal(), rtol=0,
                                   atol=0.03)


@pytest.fixture(scope="module")
def mixture():
    """A 2-D, 3-component mixture under VP, its RK4 reference on 512 logSNR steps (error ~1e-9,
    far below the tested ones) and EMS estimated from 256 data samples (seeds apart)."""
    sde = sdekit.VPSDE()
    mix = sdekit.GaussianMixtureData(sde, [0.5, 0.3, 0.2], [[1.5, 0.0], [-1.0, 1.0], [-0.5, -1.5]],
                                     [0.3, 0.1, 0.05])
    x = mix.marginal_sample(16, sde.T, torch.Generator().manual_seed(0), dtype=F64)
    ref = sdekit.sample(sde, mix.model(), x, solver="rk4", steps=512, grid="logsnr").x
    ems = estimate_ems(sde, mix.model(), mix.sample(256, torch.Generator().manual_seed(3)).double(),
                       n=200)
    return sde, mix, x, ref, ems


@pytest.mark.parametrize("options,order", [({"order": 3, "corrector": False}, 3), ({}, 3),
                                           ({"order": 3, "corrector": False,
                                             "pseudo_order": True}, 2)])
def test_declared_order_with_estimated_statistics_on_a_mixture(options, order, mixture):
    """With EMS estimated from a Gaussian mixture (a nonlinear score), against a converged RK4
    reference: the fitted slope over 32-128 logSNR steps is the declared order (the predictor's
    order; the corrector, on by default with order 2, adds one; the pseudo-order caps it at
    2)."""
    sde, mix, x, ref, ems = mixture
    solver = sdekit.get_solver("dpm_solver_v3", ems=ems, **options)
    assert solver.order == order
    ladder = [32, 64, 128]
    errs = [rms(sdekit.sample(sde, mix.model(), x, solver=solver, steps=n).x, ref) for n in ladder]
    slope = fitted_slope([1 / n for n in ladder], errs)
    assert order - 0.3 < slope < order + 0.8, (slope, errs)


@pytest.mark.parametrize("sde_name", [*sorted(ORDER_SDES), "edm"])
def test_estimated_statistics_beat_dpm_solver_pp_on_every_forward_process(sde_name):
    """EMS estimated on calibration data (seeds apart from the initial states) on each process
    the exponential integrators support; at 5 steps v3 is more accurate than DPM-Solver++(3M)
    on the exact Gaussian flow (measured 4-19x)."""
    sde, data, model, t0, x = _problem(sde_name)
    ems = _ems(sde, data, model, t0, n=100)
    exact = data.flow(x, t0, sde.t_min)
    v3 = rms(sdekit.sample(sde, model, x, solver="dpm_solver_v3", ems=ems, steps=5,
                           t_start=t0).x, exact)
    pp = rms(sdekit.sample(sde, model, x, solver="dpmpp_3m", steps=5, t_start=t0).x, exact)
    assert v3 < pp / 2, (v3, pp)


def test_ems_save_and_load(tmp_path):
    sde, data, model, t0, x = _problem("vp")
    ems = _ems(sde, data, model, t0, m=32, n=20)
    path = tmp_path / "ems.pt"
    ems.save(path)
    back = EMS.load(path)
    assert torch.equal(back.l, ems.l) and torch.equal(back.times, ems.times)
    assert back.sde == ems.sde == repr(sde) and back.nfe == ems.nfe
    a = sdekit.sample(sde, model, x, solver="dpm_solver_v3", ems=ems, steps=4).x
    b = sdekit.sample(sde, model, x, solver="dpm_solver_v3", ems=str(path), steps=4).x
    assert torch.equal(a, b)


def test_statistics_that_do_not_fit_are_refused():
    """EMS of another forward process, of a lambda range the grid leaves, of another state
    shape, or not EMS at all: a clear error before any model call."""
    sde, data, model, t0, x = _problem("vp", dim=3)
    ems = _ems(sde, data, model, t0, m=16, n=10)
    with pytest.raises(ValueError, match=r"ems were estimated on VPSDE.* but sampling uses "
                                         r"VESDE.*half-logSNR differs"):
        ve = sdekit.VESDE()
        sdekit.sample(ve, gaussian_problem(ve, dim=3).model(), x, solver="dpm_solver_v3",
                      ems=ems, steps=4)
    other = sdekit.VPSDE(beta_max=10.0)   # same class, another schedule
    with pytest.raises(ValueError, match="half-logSNR differs at the EMS times"):
        sdekit.sample(other, gaussian_problem(other, dim=3).model(), x, solver="dpm_solver_v3",
                      ems=ems, steps=4)
    short = estimate_ems(sde, model, data.sample(16, torch.Generator().manual_seed(0)).double(),
                         n=10, t_end=0.1)
    with pytest.raises(ValueError, match=r"ems cover lambda in \[.*\] but the grid spans"):
        sdekit.sample(sde, model, x, solver="dpm_solver_v3", ems=short, steps=4)
    wide = sdekit.GaussianData.random(sde, dim=5, seed=0)
    nfe = model.nfe
    with pytest.raises(ValueError, match=r"state shape \(3,\) do not fit the state shape \(5,\)"):
        sdekit.sample(sde, wide.model(), shape=(2, 5), solver="dpm_solver_v3", ems=ems, steps=4)
    assert model.nfe == nfe
    for bad in (3.0, "no_such_preset_or_file", torch.zeros(3)):
        with pytest.raises(ValueError, match="ems=.* is invalid"):
            sdekit.get_solver("dpm_solver_v3", ems=bad)
    with pytest.raises(ValueError, match="order=4 is invalid"):
        sdekit.get_solver("dpm_solver_v3", order=4)
    with pytest.raises(ValueError, match="EMS.s of shape"):
        EMS(ems.lam, ems.l, ems.s[:-1], ems.b)
    with pytest.raises(ValueError, match="strictly increasing"):
        EMS(ems.lam.flip(0), ems.l, ems.s, ems.b)


def test_estimate_ems_refuses_bad_input():
    sde, data, model, t0, x = _problem("vp", dim=3)
    xc = data.sample(8, torch.Generator().manual_seed(0)).double()
    with pytest.raises(ValueError, match="x_cal of shape"):
        estimate_ems(sde, model, xc[:1])
    with pytest.raises(ValueError, match="n=0 is invalid"):
        estimate_ems(sde, model, xc, n=0)
    with pytest.raises(ValueError, match="fd_step=0.5 is invalid"):
        estimate_ems(sde, model, xc, fd_step=0.5)
    with pytest.raises(TypeError, match="model must be a DiffusionModel"):
        estimate_ems(sde, lambda x, t: x, xc)
    flow = sdekit.FlowSDE()
    with pytest.raises(ValueError, match="finite half-logSNR.*t_start=0.99"):
        estimate_ems(flow, gaussian_problem(flow, dim=3).model("flow"), xc)
    assert model.nfe == 0


def test_ems_from_prior_states_match_those_from_data():
    """``source="prior"``: calibration states at T carried along the EMS grid by a teacher solve
    (the model's own marginals) give the EMS that noised data give: on Gaussian data l exactly
    (the Jacobian does not depend on x), b to sampling error, and the same accuracy."""
    sde, data, model, t0, x = _problem("vp")
    from_data = _ems(sde, data, model, t0, n=50)
    prior = data.marginal_sample(256, sde.T, torch.Generator().manual_seed(7), dtype=F64)
    from_prior = estimate_ems(sde, model, prior, n=50, source="prior")
    assert from_prior.nfe == from_data.nfe + 50
    torch.testing.assert_close(from_prior.l, from_data.l, rtol=0, atol=1e-10)
    assert float((from_prior.b - from_data.b).abs().max()) < 0.05 * float(from_data.b.abs().max())
    exact = data.flow(x, t0, sde.t_min)
    errs = [rms(sdekit.sample(sde, model, x, solver="dpm_solver_v3", ems=e, steps=5).x, exact)
            for e in (from_data, from_prior)]
    assert errs[1] < 1.5 * errs[0], errs
    with pytest.raises(ValueError, match="source='x' is invalid"):
        estimate_ems(sde, model, prior, source="x")
