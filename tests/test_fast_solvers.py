"""The fast exponential-integrator solvers (DPM-Solver(++), DEIS, iPNDM, UniPC): the shared
engine, reductions to DDIM, cross-checks against diffusers' schedulers to float64 tolerance,
options (final_to_zero, thresholding, UniC on other predictors, adaptive steps) and bad input.
The order of every registered solver is checked by tests/test_solvers_registry.py."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import make_sde

import sdekit
from sdekit import DiscreteDDPM, GaussianData, make_grid, sample
from sdekit.sde.base import ForwardSDE
from sdekit.solvers import get_solver, solver_names
from sdekit.solvers.exp_integrator import block_plan, ei_weights, phi

F64 = torch.float64
FAST = ("dpm_solver", "dpmpp", "deis", "ipndm", "unipc", "unic")
MINE = [n for n in solver_names() if n.startswith(FAST)]


def problem(sde: ForwardSDE, dim: int = 6, n: int = 5, mean_scale: float = 1.0):
    data = GaussianData.random(sde, dim=dim, eig_min=1e-3, seed=2, mean_scale=mean_scale)
    x = data.marginal_sample(n, sde.T, torch.Generator().manual_seed(0), F64)
    return data, x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------ the engine
def test_phi_matches_closed_forms_on_both_branches():
    z = torch.tensor([-30.0, -2.5, -1.0, -0.999, -1e-3, -1e-9, 0.0, 1e-9, 1e-3, 0.999, 1.0, 2.5,
                      20.0], dtype=F64)
    exact = {1: lambda z: np.expm1(z) / z, 2: lambda z: (np.expm1(z) - z) / z ** 2,
             3: lambda z: (np.expm1(z) - z - z * z / 2) / z ** 3}
    for k, f in exact.items():
        got = phi(k, z)
        assert got[6] == 1 / math.factorial(k)                      # phi_k(0) = 1/k!
        big = z.abs() > 0.5                                         # closed forms are stable there
        np.testing.assert_allclose(got[big].numpy(), f(z[big].numpy()), rtol=1e-13)
        series = sum(z[~big].numpy() ** n / math.factorial(n + k) for n in range(30))
        np.testing.assert_allclose(got[~big].numpy(), series, rtol=1e-14)


@pytest.mark.parametrize("k", [1.0, -1.0, -2.0])
@pytest.mark.parametrize("r,c", [([0.0], 1.0), ([0.0, -0.7], 1.0), ([0.0, -1.0, -2.3], 1.0),
                                 ([0.0, 0.4], 0.7), ([0.0, 1 / 3, 2 / 3], 1.0)])
def test_ei_weights_integrate_polynomials_exactly(r, c, k):
    """sum_j W_j p(r_j) = |k| int_0^{ch} e^{k(ch - tau)} p(tau/h) dtau for deg p < len(r)."""
    h = 0.83
    W = ei_weights(r, c, h, k)
    x, w = np.polynomial.legendre.leggauss(40)
    H = c * h
    tau = (x + 1) * H / 2
    for deg in range(len(r)):
        p = lambda u: (u - 0.3) ** deg                              # noqa: E731
        quad = abs(k) * float(np.sum(w * np.exp(k * (H - tau)) * p(tau / h)) * H / 2)
        got = float(sum(W[j] * p(r[j]) for j in range(len(r))))
        assert got == pytest.approx(quad, rel=1e-12, abs=1e-14)


def test_block_plan_spends_the_budget():
    for steps in range(1, 12):
        for order in (1, 2, 3):
            for where in ("start", "end"):
                plan = block_plan(steps, order, where)
                assert sum(k for _, k in plan) == steps
                assert [i for i, _ in plan] == list(np.cumsum([0] + [k for _, k in plan])[:-1])
                assert sum(k < order for _, k in plan) <= (2 if where == "end" else 1)
    assert block_plan(9, 3, "end") == [(0, 3), (3, 3), (6, 2), (8, 1)]   # DPM-Solver's schedule
    assert block_plan(10, 3, "start") == [(0, 1), (1, 3), (4, 3), (7, 3)]


# ----------------------------------------------------------------------- reductions to DDIM
FIRST_ORDER = [("dpm_solver_1", {}), ("dpmpp_1", {}), ("deis_tab1", {"ab_order": 0}),
               ("deis_rhoab", {"ab_order": 0}), ("deis_tab1", {"ab_order": 0, "interp": "logrho"}),
               ("unipc_bh1", {"order": 1, "corrector": False}),
               ("unipc_bh2", {"order": 1, "corrector": False, "predict_x0": False}),
               ("dpm_solver_2", {"order": 1}), ("dpmpp_2s", {"order": 1}),
               ("ipndm", {"max_order": 1})]


@pytest.mark.parametrize("sde_name", ["vp", "ve", "ddpm", "cosine", "subvp", "edm"])
def test_first_order_solvers_are_ddim(sde_name):
    sde = make_sde(sde_name)
    data, x = problem(sde)
    grid = make_grid(sde, "karras", 7)
    ref = sample(sde, data.model(), x, solver="ddim", grid=grid).x
    for name, opts in FIRST_ORDER:
        out = sample(sde, data.model(), x, solver=name, grid=grid, **opts)
        assert out.nfe == 7
        assert rel(out.x, ref) < 1e-11, (name, opts)


@pytest.mark.parametrize("sde_name", ["vp", "ve", "ddpm"])
def test_equivalent_formulations_agree(sde_name):
    """Exact Lagrange weights in lambda = DEIS's log-rho interpolation; on VE (log rho affine
    in t) tAB = log-rho."""
    sde = make_sde(sde_name)
    data, x = problem(sde)
    grid = make_grid(sde, "logsnr", 9)

    def go(name, **o):
        return sample(sde, data.model(), x, solver=name, grid=grid, lower_order_final=False, **o).x

    assert rel(go("dpm_solver_3m", warmup="lower_order"), go("deis_tab2", interp="logrho")) < 1e-11
    if sde_name == "ve":
        assert rel(go("deis_tab2"), go("deis_tab2", interp="logrho")) < 1e-10


# --------------------------------------------------------------------- diffusers cross-checks
CFG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.fixture(scope="module")
def ddpm():
    pytest.importorskip("diffusers", reason="diffusers is not installed: no cross-check")
    sde = DiscreteDDPM()
    data, x = problem(sde, dim=8, n=4)
    return sde, data, x


def _prepare(sde, sched, steps):
    """diffusers' timesteps n as sdekit times (n + 1)/N, ending at sigma_min = t_min, and its
    sigmas replaced by the float64 ones of the same schedule."""
    sched.set_timesteps(steps)
    times = torch.tensor([(int(n) + 1) / sde.N for n in sched.timesteps] + [sde.t_min], dtype=F64)
    sched.sigmas = sde.sigma_tilde(times).double()
    return times


def _run_diffusers(sde, data, x, sched, steps, **step_kw):
    times = _prepare(sde, sched, steps)
    for k, (n, t) in enumerate(zip(sched.timesteps, times[:-1])):
        kw = {key: v[k] for key, v in step_kw.items()}
        x = sched.step(data.eps(x, t), n, x, **kw).prev_sample
    return x, times


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order,predict_x0", [(1, True), (2, True), (3, True), (2, False)])
def test_unipc_matches_diffusers(ddpm, steps, variant, order, predict_x0):
    from diffusers import UniPCMultistepScheduler
    sde, data, x = ddpm
    sched = UniPCMultistepScheduler(**CFG, solver_order=order, solver_type=variant,
                                    predict_x0=predict_x0, final_sigmas_type="sigma_min")
    ref, times = _run_diffusers(sde, data, x, sched, steps)
    out = sample(sde, data.model(), x, solver="unipc_" + variant, grid=times, order=order,
                 predict_x0=predict_x0, lower_order_final=True)
    assert out.nfe == steps
    assert rel(out.x, ref) < 1e-12


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_logrho_matches_diffusers(ddpm, steps, order):
    from diffusers import DEISMultistepScheduler
    sde, data, x = ddpm
    ref, times = _run_diffusers(sde, data, x, DEISMultistepScheduler(**CFG, solver_order=order),
                                steps)
    out = sample(sde, data.model(), x, solver="deis_tab1", grid=times, ab_order=order - 1,
                 interp="logrho", lower_order_final=steps < 15)
    assert rel(out.x, ref) < 1e-12


DPM_CASES = [(2, "midpoint", "dpmsolver++"), (2, "heun", "dpmsolver++"),
             (2, "midpoint", "dpmsolver"), (2, "heun", "dpmsolver"),
             (3, "midpoint", "dpmsolver++"), (3, "midpoint", "dpmsolver")]


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order,solver_type,algorithm", DPM_CASES)
def test_dpm_solver_multistep_matches_diffusers(ddpm, steps, order, solver_type, algorithm):
    """DPMSolverMultistepScheduler's update rules driven in float64 (its step() computes in
    float32), plus its own step() to float32 tolerance (checks the order control too)."""
    from diffusers import DPMSolverMultistepScheduler
    sde, data, x = ddpm
    cfg = dict(**CFG, solver_order=order, solver_type=solver_type, algorithm_type=algorithm,
               final_sigmas_type="sigma_min")
    s = DPMSolverMultistepScheduler(**cfg)
    times = _prepare(sde, s, steps)
    s.model_outputs, s.lower_order_nums, s._step_index = [None] * order, 0, 0
    ref = x.clone()
    for k, t in enumerate(times[:-1]):
        m = s.convert_model_output(data.eps(ref, t), sample=ref)
        s.model_outputs = s.model_outputs[1:] + [m]
        last = k == steps - 1 and steps < 15
        second = k == steps - 2 and steps < 15
        if order == 1 or s.lower_order_nums < 1 or last:
            ref = s.dpm_solver_first_order_update(m, sample=ref)
        elif order == 2 or s.lower_order_nums < 2 or second:
            ref = s.multistep_dpm_solver_second_order_update(s.model_outputs, sample=ref)
        else:
            ref = s.multistep_dpm_solver_third_order_update(s.model_outputs, sample=ref)
        s.lower_order_nums = min(s.lower_order_nums + 1, order)
        s._step_index += 1
    name = ("dpmpp_" if algorithm == "dpmsolver++" else "dpm_solver_") + f"{order}m"
    extra = {"warmup": "lower_order"} if order == 3 else {}
    out = sample(sde, data.model(), x, solver=name, grid=times, lower_order_final=steps < 15,
                 solver_type="midpoint" if solver_type == "midpoint" else "lagrange", **extra).x
    assert rel(out, ref) < 1e-12
    full, _ = _run_diffusers(sde, data, x, DPMSolverMultistepScheduler(**cfg), steps)
    assert rel(out, full) < 2e-6


@pytest.mark.parametrize("order,steps,solver_type", [
    (2, 9, "heun"), (2, 9, "midpoint"), (3, 9, "heun"), (3, 10, "heun"), (3, 11, "heun")])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_dpm_solver_singlestep_matches_diffusers(ddpm, order, steps, solver_type, algorithm):
    """The fast schedule with the lower-order blocks last = diffusers' order list."""
    from diffusers import DPMSolverSinglestepScheduler
    sde, data, x = ddpm
    s = DPMSolverSinglestepScheduler(**CFG, solver_order=order, solver_type=solver_type,
                                     algorithm_type=algorithm, final_sigmas_type="sigma_min",
                                     lower_order_final=True)
    ref, times = _run_diffusers(sde, data, x, s, steps)
    out = sample(sde, data.model(), x, solver="dpm_solver_3", grid=times, order=order,
                 predict_x0=algorithm == "dpmsolver++", lower_order_at="end",
                 solver_type="lagrange" if solver_type == "heun" else "midpoint")
    assert out.nfe == steps
    assert rel(out.x, ref) < 1e-12


class _GivenNoise:
    """A noise source replaying given normals, one per step."""

    def __init__(self, zs):
        self.zs, self.k = zs, 0

    def increment(self, t0, t1, like):
        self.k += 1
        return self.zs[self.k - 1].to(like)

    def randn(self, like):
        raise AssertionError("SDE-DPM-Solver++ draws one normal per step")


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
def test_sde_dpmpp_matches_diffusers(ddpm, order, solver_type):
    from diffusers import DPMSolverMultistepScheduler
    sde, data, x = ddpm
    steps = 12
    zs = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    s = DPMSolverMultistepScheduler(**CFG, solver_order=order, solver_type=solver_type,
                                    algorithm_type="sde-dpmsolver++",
                                    final_sigmas_type="sigma_min", lower_order_final=False)
    ref, times = _run_diffusers(sde, data, x, s, steps, variance_noise=zs)
    out = sample(sde, data.model(), x, solver="dpmpp_2m_sde", grid=times, order=order,
                 noise=_GivenNoise(zs), lower_order_final=False,
                 solver_type="midpoint" if solver_type == "midpoint" else "lagrange").x
    assert rel(out, ref) < 2e-6          # diffusers' step() computes in float32


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpm_solver_3m", "deis_tab2", "dpm_solver_3",
                                  "dpmpp_2m_sde"])
def test_final_to_zero_is_the_data_estimate_without_an_extra_call(name):
    sde = sdekit.VPSDE()
    data, x = problem(sde)
    grid = make_grid(sde, "logsnr", 12)
    kw = dict(solver=name, lower_order_final=False) if name != "dpm_solver_3" else dict(solver=name)
    a = sample(sde, data.model(), x, grid=grid, final_to_zero=True, seed=1, **kw)
    b = sample(sde, data.model(), x, grid=grid[:-1], denoise=True, seed=1, **kw)
    assert a.nfe == b.nfe == 12
    assert rel(a.x, b.x) < 1e-12


def test_unipc_final_to_zero_uses_the_corrected_state():
    sde = sdekit.VPSDE()
    data, x = problem(sde)
    grid = make_grid(sde, "logsnr", 12)
    a = sample(sde, data.model(), x, solver="unipc_bh2", grid=grid, final_to_zero=True)
    b = sample(sde, data.model(), x, solver="unipc_bh2", grid=grid[:-1], denoise=True)
    assert a.nfe == 12 and b.nfe == 12
    # both estimate the data at sigma = 0; the corrected last state is closer to the exact flow
    exact_x0 = data.x0(data.flow(x, sde.T, grid[-2]), grid[-2])
    assert (a.x - exact_x0).norm() < (b.x - exact_x0).norm()


def test_thresholding_bounds_the_data_prediction():
    sde = sdekit.VPSDE()
    data, x = problem(sde, mean_scale=20.0)            # data far outside [-1, 1]
    for name in ("dpmpp_2m", "unipc_bh2", "dpmpp_2s", "dpmpp_2m_sde"):
        out = sample(sde, data.model(), x, solver=name, steps=8, thresholding=True,
                     final_to_zero=True).x
        assert out.abs().max() <= 1 + 1e-12, name
        free = sample(sde, data.model(), x, solver=name, steps=8, final_to_zero=True).x
        assert free.abs().max() > 1.5, name
    # a cap on s (diffusers' sample_max_value) makes it a plain clamp to [-cap, cap] / cap
    out = sample(sde, data.model(), x, solver="dpmpp_2m", steps=8, thresholding=True,
                 threshold_max=1.0, final_to_zero=True).x
    assert out.abs().max() <= 1 + 1e-12
    with pytest.raises(ValueError, match="predict_x0=True"):
        get_solver("dpm_solver_2m", thresholding=True)


def test_unic_on_another_predictor_costs_no_nfe_and_raises_the_order():
    sde = sdekit.VPSDE()
    data, x = problem(sde)
    ref = data.flow(x, sde.T, sde.t_min)
    errs = {}
    for name in ("dpmpp_2m", "unic_dpmpp_2m"):
        for n in (20, 40):
            sol = sample(sde, data.model(), x, solver=name, steps=n)
            assert sol.nfe == n
            errs[name, n] = float((sol.x - ref).pow(2).mean().sqrt())
    assert errs["unic_dpmpp_2m", 20] < 0.5 * errs["dpmpp_2m", 20]
    assert math.log2(errs["dpmpp_2m", 20] / errs["dpmpp_2m", 40]) < 2.3
    assert math.log2(errs["unic_dpmpp_2m", 20] / errs["unic_dpmpp_2m", 40]) > 2.6  # 2M + UniC: 3
    for bad in ("heun", "ancestral", "dopri5"):
        with pytest.raises(ValueError, match="UniC needs"):
            get_solver("unic_dpmpp_2m", predictor=bad)


@pytest.mark.parametrize("name", ["dpm_solver_adaptive", "dpmpp_adaptive"])
def test_adaptive_meets_tolerance_per_sample(name):
    sde = sdekit.VPSDE()
    data, x = problem(sde, n=3)
    ref = data.flow(x, sde.T, sde.t_min)
    errs, nfes = [], []
    for rtol in (1e-2, 1e-4):
        sol = sample(sde, data.model(), x, solver=name, rtol=rtol, atol=rtol / 10)
        errs.append(float((sol.x - ref).abs().max()))
        nfes.append(sol.nfe)
    assert errs[1] < 0.05 * errs[0] and errs[1] < 1e-3 and nfes[1] > nfes[0]
    one = sample(sde, data.model(), x[2:], solver=name, rtol=1e-4, atol=1e-5).x
    full = sample(sde, data.model(), x, solver=name, rtol=1e-4, atol=1e-5).x
    assert rel(one[0], full[2]) < 1e-9                      # steps are chosen per sample


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,opts,match", [
    ("dpmpp_2m", {"order": 4}, "order=4"), ("dpm_solver_3", {"order": 0}, "order=0"),
    ("unipc_bh2", {"order": 5}, "order=5"), ("deis_tab3", {"ab_order": 4}, "ab_order=4"),
    ("unipc_bh2", {"variant": "bh3"}, "variant"),
    ("dpmpp_2m", {"solver_type": "rk"}, "solver_type"),
    ("dpm_solver_3", {"lower_order_at": "middle"}, "lower_order_at"),
    ("deis_tab1", {"interp": "sigma"}, "interp"), ("deis_rhork", {"method": "5rk"}, "method"),
    ("dpm_solver_adaptive", {"rtol": 0.0}, "rtol"),
    ("dpmpp_2m", {"lower_order_final": "yes"}, "lower_order_final"),
])
def test_bad_options_are_clear_errors(name, opts, match):
    with pytest.raises(ValueError, match=match):
        get_solver(name, **opts)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_orders_above_what_the_steps_allow_fall_back_to_lower_orders(steps):
    sde = sdekit.VPSDE()
    data, x = problem(sde)
    for name in MINE:
        s = get_solver(name)
        if s.stochastic or s.adaptive:
            continue
        sol = sample(sde, data.model(), x, solver=name, steps=steps)
        assert torch.isfinite(sol.x).all(), name
        assert sol.nfe == s.expected_nfe(steps), name


class _SigmaIsT(ForwardSDE):
    """alpha = 1, sigma = t on [0, 1]: lambda(0) = +inf."""

    def _log_alpha(self, t):
        return 0 * t

    def _log_sigma(self, t):
        return torch.log(t)


def test_infinite_lambda_is_a_clear_error_not_nan():
    sde = _SigmaIsT(0.0, 1.0)
    data, x = problem(sde)
    for name in ("dpmpp_2m", "dpm_solver_3", "deis_tab2", "unipc_bh2", "dpmpp_2m_sde",
                 "dpm_solver_adaptive"):
        with pytest.raises(ValueError, match="half-logSNR lambda is inf"):
            sample(sde, data.model(), x, solver=name, grid="uniform", steps=5)


def test_two_steps_at_the_same_lambda_are_rejected():
    """A zero-length step would divide by h = 0 in the multistep ratios: the grid is refused."""
    sde = sdekit.VPSDE()
    data, x = problem(sde)
    for grid in ([1.0, 0.5, 0.5, 0.1], [1.0, 0.5, 0.5 - 1e-17, 0.1]):
        with pytest.raises(ValueError, match="strictly decreasing|same half-logSNR"):
            sample(sde, data.model(), x, solver="dpmpp_3m", grid=grid)


@pytest.mark.parametrize("sde", [sdekit.CosineVPSDE(t_min=1e-7), DiscreteDDPM.squaredcos()],
                         ids=["cosine_tiny_tmin", "ddpm_squaredcos"])
def test_cosine_schedules_near_both_ends_stay_finite(sde):
    data, x = problem(sde)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for name in MINE:
            s = get_solver(name)
            if s.adaptive:
                continue
            out = sample(sde, data.model(), x, solver=name, steps=6, seed=0).x
            assert torch.isfinite(out).all(), name


@pytest.mark.parametrize("sde_name", ["cosine", "ddpm_squaredcos"])
@pytest.mark.parametrize("grid", ["uniform", "quadratic"])
def test_dpm_solver_3m_default_warmup_is_stable_on_steep_schedules(sde_name, grid):
    """The singlestep warm-up block of noise-prediction DPM-Solver-3M blew up where the first
    three lambda steps are uneven (cosine schedules on uniform / quadratic grids: RMS 1e1 to
    1e6 at 5-20 NFE); the default warm-up now takes the lower-order start there, and the
    singlestep block where the steps are even (identical results on a logsnr grid)."""
    from conftest import make_sde  # noqa: PLC0415
    from helpers import gaussian_problem, rms

    sde = make_sde(sde_name)
    data = gaussian_problem(sde, dim=8)
    x_T = data.marginal_sample(32, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = data.flow(x_T, sde.T, sde.t_min)
    for n in (5, 10, 20):
        err = rms(sdekit.sample(sde, data.model(), x_T, solver="dpm_solver_3m", grid=grid,
                                steps=n).x, ref)
        assert err < 0.2, f"{sde_name}/{grid}/{n}: RMS {err:.3g}"
    even = dict(solver="dpm_solver_3m", grid="logsnr", steps=10)
    torch.testing.assert_close(sdekit.sample(sde, data.model(), x_T, **even).x,
                               sdekit.sample(sde, data.model(), x_T, warmup="singlestep",
                                             **even).x, rtol=0, atol=0)


@pytest.mark.parametrize("grid", ["logsnr", "karras"])
def test_deis_tab3_caps_its_extrapolation_on_grids_packed_near_T(grid):
    """On the squared-cosine DDPM table, logsnr and Karras grids pack their first points into a
    sliver of t near T, and tAB3's t-polynomial extrapolated from there amplified the eps history
    700-7400x (RMS 0.5 and 28 at 10 NFE on 64-d Gaussians); its steps now lower their order
    until the amplification is at most DEISMultistep.MAX_AMPLIFICATION."""
    from helpers import gaussian_problem, rms

    from sdekit.solvers.base import Problem

    sde = sdekit.DiscreteDDPM.squaredcos()
    data = gaussian_problem(sde, dim=8)
    slv = get_solver("deis_tab3")
    W = slv.coefficients(Problem(sde, data.model(), sdekit.make_grid(sde, grid, 10), None))
    assert max(float(w.abs().sum() / w.sum().abs()) for w in W) <= slv.MAX_AMPLIFICATION
    x_T = data.marginal_sample(32, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = data.flow(x_T, sde.T, sde.t_min)
    err = rms(sdekit.sample(sde, data.model(), x_T, solver="deis_tab3", grid=grid, steps=10).x,
              ref)
    assert err < 0.2, f"RMS {err:.3g}"


def test_automatic_lower_order_final_follows_the_grids_last_lambda_step():
    """lower_order_final=None lowers the final order where the grid's last lambda step is more
    than auto_lower_order_ratio times the one before, or longer than auto_lower_order_step, at
    any step count. Under the old rule (on below 10 steps only), dpmpp_3m on a uniform grid at 10
    steps (last lambda step 4.7x the one before) sent most of a mixture's samples to another mode
    (RMS 2.5 against a converged reference; 0.1 with the lower-order final step). Below 10 steps on
    a uniform grid it stays on (unchanged); on a VP logsnr grid (equal steps) it is on at 5 steps
    (unchanged) and off at 8 (lambda steps of 1.2)."""
    from sdekit.bench.problems import gmm_problem
    from sdekit.solvers.base import Problem
    from sdekit.solvers.exp_integrator import last_lambda_step_ratio
    from sdekit.tune import prior_states

    sde = sdekit.VPSDE()
    prob = gmm_problem(sde=sde, dim=16)
    x = prior_states(sde, 64, (16,), seed=0, dtype=F64)
    ref = sample(sde, prob.model, x, solver="dopri5", rtol=1e-7, atol=1e-7, float64=True).x
    slv = get_solver("dpmpp_3m")

    def auto_lof(grid: str, steps: int) -> bool:
        return slv.lof(Problem(sde, prob.model, make_grid(sde, grid, steps), None))

    assert last_lambda_step_ratio(sde.lambda_(make_grid(sde, "uniform", 10))) > 4
    for steps in (5, 8, 10, 15, 20):
        assert auto_lof("uniform", steps), steps   # last step 4-5x the one before
    assert auto_lof("logsnr", 5)   # equal steps, but long: 1.9 in lambda (on, as before)
    for steps in (8, 10, 15, 20):  # equal steps of 1.2 and below
        assert not auto_lof("logsnr", steps), steps
    out = {lof: sample(sde, prob.model, x, solver="dpmpp_3m", grid="uniform", steps=10,
                       float64=True, **({} if lof is None else {"lower_order_final": lof})).x
           for lof in (None, True, False)}
    torch.testing.assert_close(out[None], out[True], rtol=0, atol=0)
    far = ((out[None] - ref).norm(dim=1) > 1.0).float().mean()   # modes are ~5 apart
    assert far < 0.05, f"{float(far):.0%} of samples far from their reference mode"
    assert float(((out[False] - ref).norm(dim=1) > 1.0).float().mean()) > 0.3  # the old failure
    for steps in (5, 8):   # below 10 steps on a uniform grid: unchanged (on)
        a = sample(sde, prob.model, x, solver="dpmpp_3m", grid="uniform", steps=steps).x
        b = sample(sde, prob.model, x, solver="dpmpp_3m", grid="uniform", steps=steps,
                   lower_order_final=True).x
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_automatic_lower_order_final_long_last_step_only_for_data_prediction():
    """On a Karras grid at 10 steps under VP the last lambda step is long (1.8) but only 1.3x
    the one before. The step criterion (last step > auto_lower_order_step) applied to every
    solver made the noise-prediction dpm_solver_3m 7.6x worse on a Gaussian (the rule before
    this fix); it now applies to data prediction only, where it helps (dpmpp_3m, same grid)."""
    from sdekit.bench.problems import gaussian_problem as bench_gaussian
    from sdekit.solvers.base import Problem
    from sdekit.solvers.exp_integrator import last_lambda_step_ratio
    from sdekit.tune import prior_states

    sde = sdekit.VPSDE()
    prob = bench_gaussian(sde=sde, dim=16, seed=0)
    x = prior_states(sde, 128, (16,), seed=1, dtype=F64)
    ref = prob.flow(x)
    grid = make_grid(sde, "karras", 10)
    lam = sde.lambda_(grid)
    assert float(lam.diff()[-1]) > get_solver("dpm_solver_3m").auto_lower_order_step
    assert last_lambda_step_ratio(lam) < get_solver("dpm_solver_3m").auto_lower_order_ratio

    def err(name: str, **o) -> float:
        out = sample(sde, prob.model, x, solver=name, grid=grid, float64=True, **o).x
        return float((out - ref).pow(2).mean().sqrt())

    for name, lowered in (("dpm_solver_3m", False), ("dpmpp_3m", True)):
        assert get_solver(name).lof(Problem(sde, prob.model, grid, None)) is lowered, name
        auto, on, off = err(name), err(name, lower_order_final=True), err(name,
                                                                            lower_order_final=False)
        assert auto == (on if lowered else off), name
    assert err("dpm_solver_3m", lower_order_final=True) > 3 * err("dpm_solver_3m")
