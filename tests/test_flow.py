"""Flow matching as a forward process: FlowSDE's closed forms, the flow prediction kind, sampling
from t = 1 (alpha = 0, lambda = -inf) and the timestep shift."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_TRAIN, fitted_slope, gaussian_problem, rms, run_cli

import sdekit
from sdekit import FlowSDE, GaussianData, make_grid, sample
from sdekit.dynamics import DiffusionModel, convert, from_eps, to_eps, to_x0
from sdekit.grids import flux_mu, shift_factor, shift_times
from sdekit.sde.base import ForwardSDE
from sdekit.solvers import get_solver, solver_names

F64 = torch.float64
FLOW = FlowSDE()
INNER = torch.tensor([1e-3, 0.01, 0.2, 0.5, 0.8, 0.99, 0.9999], dtype=F64)


# ------------------------------------------------------------------------------ the process
def test_schedule_and_exact_prior_at_t_equal_one():
    t = torch.cat([INNER, torch.ones(1, dtype=F64)])
    torch.testing.assert_close(FLOW.alpha(t), 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(FLOW.sigma(t), t, rtol=0, atol=0)
    assert FLOW.T == 1.0 and float(FLOW.alpha(1.0)) == 0.0
    assert FLOW.lambda_min == -math.inf and float(FLOW.sigma_tilde(1.0)) == math.inf
    assert FLOW.prior_std == 1.0
    assert float(FLOW.t_of_lambda(-math.inf)) == 1.0
    assert float(FLOW.t_of_sigma_tilde(math.inf)) == 1.0
    assert sdekit.get_sde("flow").T == 1.0
    # the range check of t(lambda) survives the infinite end (its tolerance stays finite)
    with pytest.raises(ValueError, match=r"lambda=.*outside the half-logSNR range"):
        FLOW.t_of_lambda(FLOW.lambda_max + 1.0)
    with pytest.raises(ValueError, match=r"lambda=nan"):
        FLOW.t_of_lambda(float("nan"))


TRIG = sdekit.TrigFlowSDE()
INTERPOLANTS = {"flow": FLOW, "trigflow": TRIG}


def test_trigonometric_interpolant_schedule_and_exact_prior():
    """alpha = cos(pi t/2), sigma = sin(pi t/2) as documented, alpha = 0 exactly at t = 1."""
    t = torch.cat([INNER, torch.ones(1, dtype=F64)])
    torch.testing.assert_close(TRIG.alpha(t[:-1]), torch.cos(math.pi / 2 * t[:-1]), rtol=1e-15,
                               atol=0)
    torch.testing.assert_close(TRIG.sigma(t), torch.sin(math.pi / 2 * t), rtol=1e-15, atol=0)
    assert float(TRIG.alpha(1.0)) == 0.0 and float(TRIG.sigma(1.0)) == 1.0
    assert TRIG.lambda_min == -math.inf and float(TRIG.sigma_tilde(1.0)) == math.inf
    assert TRIG.prior_std == 1.0 and float(TRIG.t_of_lambda(-math.inf)) == 1.0
    assert float(TRIG.f(1.0)) == -math.inf and float(TRIG.g2(1.0)) == math.inf
    torch.testing.assert_close(TRIG.alpha(t) ** 2 + TRIG.sigma(t) ** 2, torch.ones_like(t),
                               rtol=1e-15, atol=0)
    assert isinstance(sdekit.get_sde("trigflow"), sdekit.TrigFlowSDE)
    assert isinstance(TRIG, sdekit.LinearInterpolantSDE) and isinstance(FLOW,
                                                                          sdekit.LinearInterpolantSDE)
    sde = sdekit.TrigFlowSDE(t_min=0.01, T=0.9)
    assert math.isfinite(sde.lambda_min) and abs(sde.prior_std - 1.0) < 1e-15


@pytest.mark.parametrize("name", sorted(INTERPOLANTS))
def test_closed_forms_match_the_generic_autograd_and_bisection_defaults(name):
    sde = INTERPOLANTS[name]
    t = INNER
    for meth in ("_f", "_g2", "_alpha_dot", "_sigma_dot"):
        closed, generic = getattr(sde, meth)(t), getattr(ForwardSDE, meth)(sde, t)
        torch.testing.assert_close(closed, generic, rtol=1e-10, atol=1e-12, msg=meth)
    if name == "flow":
        torch.testing.assert_close(sde.f(t), -1 / (1 - t), rtol=1e-14, atol=0)
        torch.testing.assert_close(sde.g2(t), 2 * t / (1 - t), rtol=1e-14, atol=0)
    else:
        torch.testing.assert_close(sde.f(t), -math.pi / 2 * torch.tan(math.pi / 2 * t),
                                   rtol=1e-14, atol=0)
        torch.testing.assert_close(sde.g2(t), -2 * sde.f(t), rtol=1e-14, atol=0)
    lam = sde.lambda_(t)
    torch.testing.assert_close(sde._t_of_lambda(lam), ForwardSDE._t_of_lambda(sde, lam),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(sde.t_of_lambda(lam), t, rtol=1e-13, atol=0)
    torch.testing.assert_close(sde.t_of_sigma_tilde(sde.sigma_tilde(t)), t, rtol=1e-13, atol=0)
    # generic alpha', sigma' of another process: alpha' = f alpha, (sigma^2)' = g^2 + 2 f sigma^2
    vp = sdekit.VPSDE()
    tv = torch.linspace(0.01, 0.99, 9, dtype=F64)
    torch.testing.assert_close(vp.alpha_dot(tv), vp.f(tv) * vp.alpha(tv), rtol=1e-10, atol=0)
    torch.testing.assert_close(2 * vp.sigma(tv) * vp.sigma_dot(tv),
                               vp.g2(tv) + 2 * vp.f(tv) * vp.sigma(tv) ** 2, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kwargs,name", [(dict(t_min=0.0), "t_min"), (dict(t_min=-0.1), "t_min"),
                                         (dict(T=1.5), "T"), (dict(t_min=float("nan")), "t_min")])
@pytest.mark.parametrize("cls", [FlowSDE, sdekit.TrigFlowSDE])
def test_bad_time_range_names_the_argument(kwargs, name, cls):
    with pytest.raises(ValueError, match=rf"^{name}="):
        cls(**kwargs)


def test_flow_process_before_t_equal_one():
    sde = FlowSDE(t_min=0.01, T=0.9)
    assert math.isfinite(sde.lambda_min) and abs(sde.prior_std - math.hypot(0.1, 0.9)) < 1e-15


# ------------------------------------------------------------------------ parametrisations
KINDS = ["eps", "x0", "v", "score", "flow"]


def _oracle(data: GaussianData, kind: str, x, t):
    return {"eps": data.eps, "x0": data.x0, "v": data._v, "score": data.score,
            "flow": data.flow_velocity}[kind](x, t)


@pytest.mark.parametrize("sde_name", ["flow", "trigflow", "vp", "ve"])
def test_every_parametrisation_converts_to_every_other(sde_name):
    """A network of each kind (the exact oracle) asked for each other kind (and the denoiser)
    reproduces that kind's oracle, on Gaussian data, per-sample times."""
    sde = {"flow": FLOW, "trigflow": TRIG, "vp": sdekit.VPSDE(), "ve": sdekit.VESDE()}[sde_name]
    data = gaussian_problem(sde, dim=3)
    t = torch.tensor([sde.t_min * 1.5, 0.3, 0.6, 0.95 * sde.T], dtype=F64)
    x = data.marginal_sample(4, t, torch.Generator().manual_seed(0), dtype=F64)
    for src in KINDS:
        model = DiffusionModel(lambda xx, c, k=src: _oracle(data, k, xx, c), sde, src,
                               time_input="t")
        for dst in KINDS:
            ref = _oracle(data, dst, x, t)
            out = model.predict(x, t, dst)
            tol = 1e-9 * (1 + float(ref.abs().max()))
            torch.testing.assert_close(out, ref, rtol=1e-8, atol=tol, msg=f"{src} -> {dst}")
        xt = x / sde.alpha(t)[:, None]
        torch.testing.assert_close(model.denoiser(xt, sde.sigma_tilde(t)), data.x0(x, t),
                                   rtol=1e-8, atol=1e-9, msg=f"{src} -> denoiser")


def test_flow_conversions_are_inverse_and_finite_at_alpha_zero():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.999, 1.0], dtype=F64)[:, None]
    a, s, da, ds = FLOW.alpha(t), FLOW.sigma(t), FLOW.alpha_dot(t), FLOW.sigma_dot(t)
    x = a * x0 + s * eps
    u = eps - x0  # rectified flow's velocity
    torch.testing.assert_close(to_x0("flow", u, x, a, s, da, ds), x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(to_eps("flow", u, x, a, s, da, ds), eps, rtol=0, atol=1e-14)
    for kind in ("x0", "v"):  # the kinds that determine x0 at alpha = 0
        out = convert("flow", kind, u, x, a, s, da, ds)
        torch.testing.assert_close(convert(kind, "flow", out, x, a, s, da, ds), u, rtol=0,
                                   atol=1e-12, msg=kind)
    inner = slice(0, 5)  # from eps needs alpha > 0
    torch.testing.assert_close(from_eps("flow", eps[inner], x[inner], a[inner], s[inner],
                                        da[inner], ds[inner]), u[inner], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="prediction='flow' needs alpha_dot and sigma_dot"):
        to_eps("flow", u, x, a, s)


def test_time_input_t1000():
    seen = []
    model = DiffusionModel(lambda x, c: seen.append(c) or torch.zeros_like(x), FLOW, "flow",
                           time_input="t1000")
    model.raw(torch.zeros(2, 3, dtype=F64), torch.tensor([1.0, 0.25], dtype=F64))
    torch.testing.assert_close(seen[0], torch.tensor([1000.0, 250.0], dtype=F64))


# -------------------------------------------------------------------- sampling from t = 1
STARTERS = [n for n in solver_names() if get_solver(n).starts_at_alpha_zero]
ODE_STARTERS = [n for n in STARTERS if not get_solver(n).stochastic and not get_solver(n).adaptive]
# The step from alpha = 0 is first order (local error O(alpha_1^2)) for solvers of order <= 2 and
# corrected to second order (trapezoid in u = e^lambda) above: UniPC's corrector, and
# ExpIntegrator.correct_first for DPM-Solver++ 3M (which measured 1.8 before, capped at 2).


def test_the_solvers_that_start_at_alpha_zero():
    assert set(ODE_STARTERS) == {"ddim", "dpmpp_1", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s",
                                 "unipc_bh1", "unipc_bh2", "unic_dpmpp_2m"}
    assert set(STARTERS) - set(ODE_STARTERS) == {"ancestral", "dpmpp_sde_1", "dpmpp_2m_sde",
                                                 "dopri5"}


def test_dopri5_from_t_equal_one_integrates_the_velocity_in_t(flow_problem):
    data, x_T, ref = flow_problem
    errs = []
    for tol in (1e-4, 1e-6, 1e-8):
        sol = sample(FLOW, data.model("flow"), x_T, solver="dopri5", rtol=tol, atol=tol)
        errs.append(rms(sol.x, ref))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6, errs


@pytest.fixture(scope="module")
def flow_problem():
    data = gaussian_problem(FLOW)
    x_T = data.marginal_sample(16, 1.0, torch.Generator().manual_seed(0), dtype=F64)
    return data, x_T, data.flow(x_T, 1.0, FLOW.t_min)


@pytest.mark.parametrize("name", ODE_STARTERS)
def test_exact_gaussian_flow_sampled_from_t_equal_one_converges(name, flow_problem):
    """A flow network on the exact Gaussian flow, every deterministic solver that starts at
    t = 1, its default (logSNR) grid from t = 1: the error falls at the declared order in the
    grid's largest lambda step (from t = 1 it is ~ (lambda_max + log steps) / steps, see
    test_solvers_registry._step_sizes): within 0.2 below it (3M: 4.0, the Gaussian cancellation
    of the registry's order test)."""
    data, x_T, ref = flow_problem
    s = get_solver(name)
    ladder = [32, 64, 128, 256]
    errs = [rms(sample(FLOW, data.model("flow"), x_T, solver=name, steps=n).x, ref)
            for n in ladder]
    lams = [FLOW.lambda_(make_grid(FLOW, s.grid_for(FLOW), n)) for n in ladder]
    hs = [float(lam[1:].diff().abs().max()) for lam in lams]
    slope = fitted_slope(hs, errs)
    assert s.order - 0.2 < slope < s.order + 1.2, f"{name}: slope {slope:.2f}, errors {errs}"


def test_first_step_from_alpha_zero_is_the_closed_form(flow_problem):
    """One data-prediction step from t = 1: x_1 = sigma_1 x_T + alpha_1 x0_hat(x_T, 1), and at
    t = 1 the exact x0_hat is the data mean."""
    data, x_T, _ = flow_problem
    t1 = 0.7
    expect = t1 * x_T + (1 - t1) * data.mean
    for name in ODE_STARTERS:
        for kind in ("flow", "x0", "v"):
            out = sample(FLOW, data.model(kind), x_T, solver=name, grid=[1.0, t1]).x
            torch.testing.assert_close(out, expect, rtol=0, atol=1e-13, msg=f"{name} {kind}")


@pytest.mark.parametrize("name", sorted(set(STARTERS) - set(ODE_STARTERS)))
def test_stochastic_solvers_from_t_equal_one_sample_the_data_law(name):
    """Started at the exact prior N(0, I) (t = 1), the stochastic solvers reproduce the data
    mean and covariance within Monte-Carlo error."""
    mean = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
    data = GaussianData(FLOW, mean, cov)
    n = 4000
    x = sample(FLOW, data.model("flow"), shape=(n, 2), solver=name, steps=200, dtype=F64,
               seed=7).x
    target_mean, target_cov = data.marginal_mean(FLOW.t_min), data.marginal_cov(FLOW.t_min)
    se = torch.sqrt(torch.diagonal(target_cov) / n)
    assert ((x.mean(0) - target_mean).abs() < 5 * se + 0.02).all(), f"mean {x.mean(0)}"
    d = torch.diagonal(target_cov)  # the registry's weak test's bound
    se_cov = torch.sqrt((target_cov ** 2 + torch.outer(d, d)) / n)
    C = torch.cov(x.T)
    assert ((C - target_cov).abs() < 5 * se_cov + 0.03).all(), f"cov {C} vs {target_cov}"


@pytest.mark.parametrize("name", ["euler", "heun", "edm_heun", "deis_tab3", "dpm_solver_2",
                                  "dpmpp_adaptive", "euler_maruyama", "ipndm", "deis_rhork"])
def test_solvers_that_cannot_start_at_alpha_zero_say_so(name, flow_problem):
    data, x_T, _ = flow_problem
    with pytest.raises(ValueError, match=rf"solver '{name}' cannot start at t_start=1.*t_start <"):
        sample(FLOW, data.model("flow"), x_T, solver=name, steps=4)
    # they run from t_start < 1
    out = sample(FLOW, data.model("flow"), x_T, solver=name, steps=4, t_start=0.99).x
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["eps", "score"])
def test_models_without_x0_at_alpha_zero_say_so(kind, flow_problem):
    data, x_T, _ = flow_problem
    with pytest.raises(ValueError, match=rf"prediction='{kind}' cannot be sampled from t_start=1"):
        sample(FLOW, data.model(kind), x_T, solver="dpmpp_2m", steps=4)


# ------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("grid", ["logsnr", "karras"])
def test_named_grids_from_an_infinite_start(grid):
    n = 8
    t = make_grid(FLOW, grid, n)
    assert t[0] == 1.0 and t[-1] == FLOW.t_min and t.numel() == n + 1
    assert abs(float(t[1]) - (1 - (1 - FLOW.t_min) / n)) < 1e-15
    torch.testing.assert_close(t[1:], make_grid(FLOW, grid, n - 1, t_start=float(t[1])))
    if grid == "logsnr":
        dl = torch.diff(FLOW.lambda_(t[1:]))
        torch.testing.assert_close(dl, dl[0].expand_as(dl), rtol=1e-10, atol=0)


@pytest.mark.parametrize("grid", ["uniform", "quadratic", "logsnr", "karras"])
@pytest.mark.parametrize("s", [0.7, 3.0])
def test_static_shift_is_sd3_formula_on_every_grid(grid, s):
    t_end = 0.05
    base = make_grid(FLOW, grid, 10, t_end=t_end)
    out = make_grid(FLOW, grid, 10, t_end=t_end, shift=s)
    torch.testing.assert_close(out, s * base / (1 + (s - 1) * base), rtol=0, atol=0)
    # = a translation of the half-logSNR by -log s (how the shift applies to any SDE)
    lam = FLOW.lambda_(base[1:]) - math.log(s)
    torch.testing.assert_close(out[1:], FLOW.t_of_lambda(lam), rtol=1e-12, atol=0)


def test_dynamic_shift_flux():
    assert flux_mu(256) == pytest.approx(0.5, abs=1e-15)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-15)
    assert flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840, abs=1e-15)
    base = make_grid(FLOW, "uniform", 6)
    mu = 0.8
    exp_ = make_grid(FLOW, "uniform", 6, mu=mu)
    torch.testing.assert_close(exp_, math.exp(mu) / (math.exp(mu) + (1 / base - 1)), rtol=1e-14,
                               atol=0)
    mu = 1.5  # the linear type needs mu >= 1 to keep t_end >= t_min
    lin = make_grid(FLOW, "uniform", 6, mu=mu, shift_type="linear")
    torch.testing.assert_close(lin, mu / (mu + (1 / base - 1)), rtol=1e-14, atol=0)
    torch.testing.assert_close(make_grid(FLOW, "uniform", 6, image_seq_len=4096),
                               make_grid(FLOW, "uniform", 6, mu=flux_mu(4096)))
    # through sample()'s grid_options
    data = gaussian_problem(FLOW, dim=2)
    sol = sample(FLOW, data.model("flow"), shape=(2, 2), steps=6, grid="uniform",
                 grid_options={"shift": 3.0})
    torch.testing.assert_close(sol.times, make_grid(FLOW, "uniform", 6, shift=3.0))


@pytest.mark.parametrize("opts,match", [
    (dict(shift=0.0), r"shift=0.0 is invalid"), (dict(shift=-2.0), r"shift=-2.0 is invalid"),
    (dict(shift=float("nan")), r"shift=nan is invalid"), (dict(shift="3"), r"shift='3'"),
    (dict(mu=float("inf")), r"mu=inf is invalid"),
    (dict(mu=-0.5, shift_type="linear"), r"mu=-0.5 is invalid for shift_type='linear'"),
    (dict(mu=1.0, shift_type="cubic"), r"shift_type='cubic' is invalid"),
    (dict(shift=3.0, mu=1.0), r"are exclusive"), (dict(image_seq_len=0), r"image_seq_len=0"),
    (dict(shift=0.5), r"below t_min"),
])
def test_bad_shift_names_the_argument(opts, match):
    with pytest.raises(ValueError, match=match):
        make_grid(FLOW, "uniform", 4, **opts)


def test_shift_on_other_processes_and_explicit_grids():
    vp = sdekit.VPSDE()
    base = make_grid(vp, "uniform", 5, t_start=0.5)
    out = make_grid(vp, "uniform", 5, t_start=0.5, shift=2.0)
    torch.testing.assert_close(vp.lambda_(out), vp.lambda_(base) - math.log(2.0), rtol=1e-10,
                               atol=1e-10)
    with pytest.raises(ValueError, match=r"shift=2 moves the grid outside the time range"):
        make_grid(vp, "uniform", 5, shift=2.0)
    with pytest.raises(ValueError, match="do not apply to an explicit grid"):
        make_grid(FLOW, [1.0, 0.5, 0.1], shift=2.0)
    assert shift_factor() == 1.0 and shift_times(FLOW, base, 1.0) is base


# ------------------------------------------------------------ cross-check against diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ddim_on_flow_is_diffusers_flow_match_euler_step_for_step(shift):
    """On rectified flow DDIM is Euler in t on the velocity (x0 and eps are constant along the
    straight interpolant: x_s = x + (s - t) u), i.e. diffusers' FlowMatchEulerDiscreteScheduler.
    Its grid is shift(linspace(1, shift(1/1000), N)) followed by sigma = 0, computed in float32;
    sdekit's uniform grid with the same shift gives it to float32 rounding. Its step rounds the
    state to float32 before ``x + dt u`` (a documented upcast: ``sample.to(torch.float32)``) and
    takes ``dt`` as the float32 difference of its float32 sigmas, so step for step, from the
    same float32-rounded state and over the same dt, sdekit's DDIM must give diffusers' state to
    1e-12 in float64; the last step, to sigma = 0, is the x0 prediction x - t u (sdekit's
    ``denoise=True``). Over the whole run the two agree to float32 rounding."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")
    N = 8
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(N)
    sig = sch.sigmas.double()
    assert sig[-1] == 0 and sig[0] == 1
    t_end = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    ours = make_grid(FLOW, "uniform", N - 1, t_end=t_end, shift=shift)
    torch.testing.assert_close(ours, sig[:-1], rtol=2e-7, atol=0)
    data = gaussian_problem(FLOW, dim=4)
    model = data.model("flow")
    x = data.marginal_sample(8, 1.0, torch.Generator().manual_seed(3), dtype=F64)
    for i, ts in enumerate(sch.timesteps):
        x = x.float().double()  # the state as diffusers' step rounds it
        x_next = sch.step(model.flow(x, sig[i]), ts, x, return_dict=False)[0]
        assert x_next.dtype == F64
        if i < N - 1:
            # diffusers' step size is the float32 difference of its float32 sigmas
            dt = float(sch.sigmas[i + 1] - sch.sigmas[i])
            mine = sample(FLOW, model, x, solver="ddim", grid=[sig[i], sig[i] + dt]).x
        else:  # the step to sigma = 0: the x0 prediction (what sample(denoise=True) returns)
            mine = model.x0(x, sig[i])
        torch.testing.assert_close(mine, x_next, rtol=0, atol=1e-12, msg=f"step {i}")
        x = x_next
    # the whole run: sdekit in float64 on the same grid vs diffusers' float32-rounded loop
    x0 = data.marginal_sample(8, 1.0, torch.Generator().manual_seed(3), dtype=F64)
    full = sample(FLOW, model, x0, solver="ddim", grid=sig[:-1], denoise=True).x
    torch.testing.assert_close(full, x, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ conditional flow matching
def test_flow_loss_target_is_the_conditional_velocity():
    from sdekit.training.losses import DSMLoss
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=F64)
    noise = torch.randn(64, 3, generator=g, dtype=F64)
    for sde in (FLOW, sdekit.VPSDE()):
        loss = DSMLoss(sde, "flow", prediction="flow", time_input="t")
        t = loss.sample_t(64, g)
        da, ds = sde.alpha_dot(t)[:, None], sde.sigma_dot(t)[:, None]
        exact = loss.per_sample(lambda x, c: da * x0 + ds * noise, x0, t, noise)
        assert float(exact.abs().max()) < 1e-24, sde
        if isinstance(sde, FlowSDE):  # rectified flow: u = eps - x0
            assert float(loss.per_sample(lambda x, c: noise - x0, x0, t, noise).max()) < 1e-24


def test_flow_loss_is_minimised_by_the_exact_velocity_for_any_output_kind():
    """On Gaussian data the posterior velocity minimises the CFM loss; an eps or v network
    holding the same function (converted by the one model contract) has the same loss."""
    from sdekit.training.losses import DSMLoss
    data = gaussian_problem(FLOW, dim=3)
    g = torch.Generator().manual_seed(1)
    x0 = data.sample(4096, g, dtype=F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    t = DSMLoss(FLOW, "flow").sample_t(4096, g)
    values = {}
    for kind, fn in (("flow", data.flow_velocity), ("eps", data.eps), ("v", data._v)):
        loss = DSMLoss(FLOW, "flow", prediction=kind, time_input="t")
        values[kind] = float(loss.per_sample(fn, x0, t, noise).mean())
    assert values["eps"] == pytest.approx(values["flow"], rel=1e-9)
    assert values["v"] == pytest.approx(values["flow"], rel=1e-9)
    loss = DSMLoss(FLOW, "flow", prediction="flow", time_input="t")
    worse = float(loss.per_sample(lambda x, c: 1.05 * data.flow_velocity(x, c), x0, t,
                                  noise).mean())
    assert worse > values["flow"]


def test_flow_loss_time_sampling():
    from sdekit.training.losses import DSMLoss
    g = torch.Generator().manual_seed(2)
    t = DSMLoss(FLOW, "flow").sample_t(20000, g)
    z = torch.logit(t)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.03
    t = DSMLoss(FLOW, "flow", t_sampling="logit_normal", logit_mean=1.0, logit_std=0.5).sample_t(
        20000, g)
    assert abs(float(torch.logit(t).mean()) - 1) < 0.03
    t = DSMLoss(FLOW, "flow", t_sampling="uniform").sample_t(20000, g)
    assert FLOW.t_min <= float(t.min()) and float(t.max()) <= 1
    assert abs(float(t.mean()) - 0.5) < 0.01
    for kw, name in ((dict(t_sampling="beta"), "t_sampling"), (dict(logit_std=0.0), "logit_std"),
                     (dict(logit_mean=float("nan")), "logit_mean")):
        with pytest.raises(ValueError, match=rf"^{name}="):
            DSMLoss(FLOW, "flow", **kw)


def test_cli_train_objective_flow_then_sample(tmp_path):
    import json

    from sdekit.cli.main import main as cli
    out = tmp_path / "run"
    args = ["train", "--data", "two_moons", "--objective", "flow", "--steps", "3", "--width",
            "16", "--depth", "1", "--batch-size", "32", "--ckpt-every", "3", "--sample-n", "16",
            "--sample-steps", "2", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert cli(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["sde"], cfg["loss"], cfg["net"]["prediction"]) == ("flow", "flow", "flow")
    assert cli(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--solver", "dpmpp_2m",
                "--steps", "3", "--n", "12", "--out", str(tmp_path / "s")]) == 0
    # a solver that cannot start at t = 1 is refused with the reason
    assert cli(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--solver", "heun",
                "--steps", "3", "--n", "4", "--out", str(tmp_path / "h")]) == 2


def test_bench_problems_on_flow_use_a_flow_model():
    from sdekit.bench.problems import gaussian_problem as bench_gaussian
    from sdekit.bench.problems import gmm_problem
    for make in (bench_gaussian, gmm_problem):
        prob = make(FLOW, dim=3)
        assert prob.model.prediction == "flow"
        g = torch.Generator().manual_seed(0)
        x = sample(FLOW, prob.model, prob.sample_init(8, g).double(), solver="unipc_bh2",
                   steps=10).x
        assert torch.isfinite(x).all()
        assert make(sdekit.VPSDE(), dim=3).model.prediction == "eps"


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("which", ["dpmsolver", "unipc"])
def test_dpmpp_2m_and_unipc_match_diffusers_flow_sigma_schedulers(which, shift):
    """diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler with
    ``use_flow_sigmas=True, prediction_type='flow_prediction'`` against sdekit's dpmpp_2m /
    unipc_bh2 (order 2) on the same sigmas (diffusers' grid starts just below 1, ends at 0:
    sdekit takes its points and finishes with final_to_zero). Documented differences: diffusers
    holds its sigmas and half-logSNRs in float32, so the two agree to float32 rounding (~1e-7
    here), not to 1e-10; and diffusers' UniPC takes its last step (to sigma = 0) from the
    uncorrected state's x0, while sdekit's final_to_zero returns the data estimate at the
    corrected state, so for UniPC every state but the last is compared."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")
    cls, solver, kw = {
        "dpmsolver": (diffusers.DPMSolverMultistepScheduler, "dpmpp_2m",
                      dict(algorithm_type="dpmsolver++", solver_order=2)),
        "unipc": (diffusers.UniPCMultistepScheduler, "unipc_bh2", dict(solver_order=2))}[which]
    sde = FlowSDE(t_min=1e-4)
    N = 8
    sch = cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, **kw)
    sch.set_timesteps(N)
    sig = sch.sigmas.double()
    assert sig[-1] == 0 and sig.numel() == N + 1
    data = gaussian_problem(sde, dim=4)
    model = data.model("flow")
    x = data.marginal_sample(8, float(sig[0]), torch.Generator().manual_seed(3), dtype=F64)
    states, xs = [], x.clone()
    for i, ts in enumerate(sch.timesteps):
        xs = sch.step(model.flow(xs, sig[i]), ts, xs, return_dict=False)[0]
        states.append(xs.double())
    grid = torch.cat([sig[:N], torch.tensor([sde.t_min], dtype=F64)])
    opts = dict(order=2) if which == "unipc" else {}
    sol = sample(sde, model, x, solver=solver, grid=grid, final_to_zero=True,
                 lower_order_final=True, save_at=grid[1:N].tolist(), **opts)
    for i in range(N - 1):
        torch.testing.assert_close(sol.trajectory[float(grid[i + 1])], states[i], rtol=0,
                                   atol=1e-6, msg=f"step {i}")
    if which == "dpmsolver":
        torch.testing.assert_close(sol.x, states[-1], rtol=0, atol=1e-6)


# ------------------------------------------------------------ recipes, CLI, checkpoints
TINY_FLOW = TINY_TRAIN
_cli = run_cli


def _one_line_error(rc, err, *names):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and ": error: " in lines[0], err
    for n in names:
        assert n in lines[0], (n, err)


def test_flow_recipes_change_only_the_flow_entries():
    from sdekit.training.trainer import recipe
    for data, t_sampling in (("digits", "logit_normal"), ("two_moons", "uniform")):
        dsm, flow = recipe(data).to_dict(), recipe(data, objective="flow").to_dict()
        assert (flow["sde"], flow["loss"], flow["net"]["prediction"]) == ("flow", "flow", "flow")
        assert flow["t_sampling"] == t_sampling
        changed = sorted(k for k in dsm if dsm[k] != flow[k])
        assert set(changed) <= {"sde", "loss", "net", "t_sampling"}, changed
        assert {k for k in dsm["net"] if dsm["net"][k] != flow["net"][k]} == {"prediction"}
        # the flow loss chosen without the objective samples t as the flow recipe does
        assert recipe(data, loss="flow").t_sampling == t_sampling
    over = recipe("digits", objective="flow", logit_mean=-0.5, net={"base_channels": 8})
    assert over.logit_mean == -0.5 and over.net["base_channels"] == 8
    with pytest.raises(ValueError, match=r"^objective='score' is invalid"):
        recipe("digits", objective="score")


def test_trainer_samples_the_configured_flow_times_and_validates_them():
    from sdekit.training.trainer import Trainer, recipe
    small = {"net": {"width": 16, "depth": 1}, "batch_size": 8, "device": "cpu"}
    tr = Trainer(recipe("two_moons", objective="flow", t_sampling="logit_normal",
                        logit_mean=1.5, logit_std=0.25, **small), progress=False)
    assert (tr.loss_fn.t_sampling, tr.loss_fn.logit_mean, tr.loss_fn.logit_std) == \
        ("logit_normal", 1.5, 0.25)
    t = tr.loss_fn.sample_t(4000, torch.Generator().manual_seed(0))
    assert abs(float(torch.logit(t).mean()) - 1.5) < 0.02   # the configured mean, not SD3's 0
    for key, bad in (("t_sampling", "beta"), ("logit_std", 0.0), ("logit_mean", math.nan)):
        with pytest.raises(ValueError, match=rf"^{key}="):
            Trainer(recipe("two_moons", objective="flow", **{key: bad}, **small),
                    progress=False)


def test_cli_t_sampling_flags_defaults_and_bad_input(capsys):
    rc, out, _ = _cli(["train", "--help"], capsys)
    assert rc == 0
    flat = " ".join(out.split())
    assert "--t-sampling {logit_normal,uniform}" in flat
    assert "default: digits logit_normal, toys uniform" in flat
    assert "default: 0.0" in flat and "default: 1.0" in flat
    rc, out, _ = _cli(["train", "--data", "digits", "--objective", "flow", "--logit-mean",
                       "-0.5", "--logit-std", "1.5", "--print-config"], capsys)
    import json
    cfg = json.loads(out)
    assert rc == 0 and (cfg["t_sampling"], cfg["logit_mean"], cfg["logit_std"]) == \
        ("logit_normal", -0.5, 1.5)
    rc, out, _ = _cli(["train", "--data", "two_moons", "--objective",
                       "flow", "--print-config"], capsys)
    assert rc == 0 and json.loads(out)["t_sampling"] == "uniform"
    for argv, names in (
            (["--t-sampling", "uniform"], ["--t-sampling", "'edm'", "--loss flow"]),
            (["--objective", "flow", "--t-sampling", "uniform", "--logit-std", "2"],
             ["--logit-std", "'uniform'", "logit_normal"]),
            (["--objective", "flow", "--logit-std", "0"], ["--logit-std", "> 0"]),
            (["--objective", "flow", "--logit-mean", "nan"], ["--logit-mean", "finite"]),
            (["--objective", "flow", "--t-sampling", "beta"], ["--t-sampling", "'beta'"])):
        rc, _, err = _cli(["train", "--data", "digits", *argv, "--print-config"], capsys)
        _one_line_error(rc, err, *names)


@pytest.fixture(scope="module")
def flow_and_dsm_runs(tmp_path_factory):
    """Tiny two_moons runs: flow matching (logit-normal t, m = -0.5) and the diffusion recipe."""
    from sdekit.cli.main import main as cli
    root = tmp_path_factory.mktemp("flowruns")
    assert cli(["train", "--data", "two_moons", "--objective", "flow", "--t-sampling",
                "logit_normal", "--logit-mean", "-0.5", "--steps", "3", *TINY_FLOW,
                "--out", str(root / "flow")]) == 0
    assert cli(["train", "--data", "two_moons", "--steps", "3", *TINY_FLOW,
                "--out", str(root / "dsm")]) == 0
    return root / "flow" / "checkpoint.pt", root / "dsm" / "checkpoint.pt"


def test_checkpoint_records_the_flow_objective_and_sampling_needs_no_flags(
        flow_and_dsm_runs, tmp_path, capsys):
    from sdekit.training.checkpoint import load_model
    flow_ck, _ = flow_and_dsm_runs
    net, sde, cfg = load_model(flow_ck)
    assert isinstance(sde, FlowSDE) and net.prediction == "flow" and net.time_input == "t"
    assert (cfg["loss"], cfg["t_sampling"], cfg["logit_mean"], cfg["logit_std"]) == \
        ("flow", "logit_normal", -0.5, 1.0)
    # the recorded SDE and prediction may be restated; the default solver starts at t = 1
    rc, _, err = _cli(["sample", "--checkpoint", flow_ck, "--sde", "flow", "--prediction",
                       "flow", "--steps", "2", "--n", "4", "--out", tmp_path / "s"], capsys)
    assert rc == 0, err
    assert (tmp_path / "s.npz").exists()


def test_sampling_with_another_prediction_or_sde_than_recorded_is_an_error(
        flow_and_dsm_runs, tmp_path, capsys):
    flow_ck, dsm_ck = flow_and_dsm_runs
    for ck, argv, names in (
            (dsm_ck, ["--prediction", "flow"], ["--prediction='flow'", "'denoiser'", "'edm'"]),
            (flow_ck, ["--prediction", "eps"], ["--prediction='eps'", "expected 'flow'"]),
            (flow_ck, ["--sde", "vp"], ["--sde='vp'", "expected 'flow'"]),
            (dsm_ck, ["--sde", "flow"], ["--sde='flow'", "expected 'vp'"])):
        out = tmp_path / "bad"
        rc, _, err = _cli(["sample", "--checkpoint", ck, *argv, "--steps", "2", "--n", "4",
                           "--out", out], capsys)
        _one_line_error(rc, err, *names)
        assert not out.with_suffix(".npz").exists()
    # a solver that cannot start at t = 1 (alpha = 0): one line naming it and what can
    rc, _, err = _cli(["sample", "--checkpoint", flow_ck, "--solver", "heun", "--steps", "2",
                       "--n", "4", "--out", tmp_path / "h"], capsys)
    _one_line_error(rc, err, "'heun'", "t_start=1", "dpmpp_2m")
    # bench: a checkpoint brings its own SDE
    rc, _, err = _cli(["bench", "--problem", f"checkpoint:{flow_ck}", "--sde", "vp",
                       "--out", tmp_path / "b"], capsys)
    _one_line_error(rc, err, "--sde", "built-in problems")


def test_bench_of_a_flow_checkpoint_needs_no_flags(flow_and_dsm_runs, tmp_path, capsys):
    import json
    flow_ck, _ = flow_and_dsm_runs
    rc, _, err = _cli(["bench", "--problem", f"checkpoint:{flow_ck}", "--solvers",
                       "ddim,dpmpp_2m,heun", "--grids", "uniform", "--nfe", "4", "-n", "16",
                       "--quiet", "--formats", "json", "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    cells = {c["solver"]: c for c in json.loads((tmp_path / "b" / "bench.json").read_text())
             ["cells"]}
    assert cells["ddim"]["status"] == "ok" and cells["dpmpp_2m"]["status"] == "ok"
    assert cells["heun"]["status"] == "skipped" and "t_start=1" in cells["heun"]["reason"]


def test_solver_listings_say_which_solvers_start_at_t_equal_one(capsys):
    import subprocess
    import sys
    from pathlib import Path
    starts = {d["name"]: d["starts_at_alpha_zero"] for d in sdekit.list_solvers()}
    assert starts["dpmpp_2m"] and starts["unipc_bh2"] and not starts["heun"]
    rc, out, _ = _cli(["solvers", "--markdown"], capsys)
    assert rc == 0
    lines = out.strip().splitlines()
    col = [c.strip() for c in lines[0].strip("|").split("|")].index("alpha=0")
    rows = {r.strip("|").split("|")[0].strip(): r.strip("|").split("|")[col].strip()
            for r in lines[2:]}
    assert rows == {k: "yes" if v else "no" for k, v in starts.items()}
    root = Path(__file__).resolve().parents[1]
    table = subprocess.run([sys.executable, str(root / "benchmarks" / "solver_table.py")],
                           capture_output=True, text=True, check=True, cwd=root,
                           env={**__import__("os").environ, "PYTHONPATH": str(root)}).stdout
    head, _, *body = table.strip().splitlines()
    col = [c.strip() for c in head.strip("|").split("|")].index(
        "starts at alpha = 0 (t = 1 of flow)")
    got = {r.strip("|").split("|")[0].strip().strip("`"): r.strip("|").split("|")[col].strip()
           for r in body}
    assert got == rows


def test_resuming_a_checkpoint_from_before_configurable_t_sampling(tmp_path):
    import warnings

    from sdekit.training.checkpoint import load_checkpoint, save_checkpoint
    from sdekit.training.trainer import Trainer, recipe

    def cfg(**kw):
        return recipe("two_moons", objective="flow", t_sampling="logit_normal", steps=3,
                      net={"width": 16, "depth": 1}, batch_size=8, device="cpu", **kw)
    Trainer(cfg(), tmp_path, progress=False).train(until=2)
    path = tmp_path / "checkpoint.pt"
    ck = load_checkpoint(path)
    old = {k: v for k, v in ck["config"].items() if k not in ("t_sampling", "logit_mean",
                                                                "logit_std")}
    save_checkpoint(path, config=old, model=ck["model"], ema=ck["ema"],
                    optimizer=ck["optimizer"], step=ck["step"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # it was trained with today's defaults: no warning
        assert Trainer(cfg(), tmp_path, resume=True, progress=False).step == 2
    with pytest.warns(UserWarning, match=r"changed settings \['logit_mean'\]"):
        Trainer(cfg(logit_mean=0.5), tmp_path, resume=True, progress=False)


# ------------------------------------------------- the flow comparison against diffusers (peers)
def _peers_harness():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "run.py"
    spec = importlib.util.spec_from_file_location("peers_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peers_flow_harness_measures_the_same_work_the_same():
    """benchmarks/peers/run.py --sde flow: its exact map from t = 1 reaches the data law at
    sigma = 0, and on the same grid sdekit's DDIM (+ the final x0 jump) and diffusers'
    FlowMatchEulerDiscreteScheduler, run each through the harness's own runner from the same
    states, get the same measured RMS (to diffusers' float32 state) and NFE."""
    pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")
    run = _peers_harness()
    prob = run.FlowProblem("gaussian", dim=8)
    end = prob.at(0.0)
    torch.testing.assert_close(end.T @ end, prob.data.cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(prob.at(0.3), prob.data.flow(prob.x1, 1.0, 0.3), rtol=0,
                               atol=1e-12)
    peer = run.flow_diffusers_runner(prob, "FlowMatchEulerDiscreteScheduler", 8, shift=3.0)
    theirs = run.flow_evaluate(prob, peer)
    import diffusers
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(peer["steps"])
    grid = sch.sigmas.double()[:-1]

    def ddim(x):
        sol = sample(run.FLOW, prob.model, x, solver="ddim", grid=grid, denoise=True)
        return sol.x, sol.nfe

    ours = run.flow_evaluate(prob, {"sig0": 1.0, "sig1": 0.0, "run": ddim})
    assert theirs["nfe"] == ours["nfe"] == 8
    assert ours["rms"] == pytest.approx(theirs["rms"], rel=1e-4)
    assert theirs["rms"] > 1e-3   # a real error, not a trivially exact solve


def test_peers_flow_harness_says_where_the_mixture_error_sits():
    """On a non-linear problem flow_evaluate counts the endpoints more than 1 from their reference
    and the worst 5 states' share of the squared error (the mixture's RMS at 5-10 NFE is made by
    a few states sent towards another mode)."""
    pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")
    run = _peers_harness()

    class Mixture:   # the two things flow_evaluate reads of a non-linear problem
        linear, dim = False, 2
        ref = torch.zeros(10, 2, dtype=F64)

        def at(self, sig):
            return self.ref

    out = torch.zeros(10, 2, dtype=F64)
    out[0, 0], out[1:, 1] = 3.0, 0.1   # one state 3 away, nine 0.1 away
    res = run.flow_evaluate(Mixture(), {"sig0": 1.0, "sig1": 0.0, "run": lambda x: (out, 4)})
    assert res["off_by_1"] == 1 and res["nfe"] == 4
    assert res["worst5_share"] == pytest.approx((9 + 4 * 0.01) / (9 + 9 * 0.01))
    assert res["rms"] == pytest.approx(math.sqrt((9 + 9 * 0.01) / 20))
