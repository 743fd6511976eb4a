"""Tests generated from the solver registry: every registered solver is covered without
editing this file (contract, ODE order, SDE strong order, weak correctness)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import INTERPOLANT_NAMES, SDE_NAMES, make_sde
from helpers import ORDER_SDES, fitted_slope, gaussian_problem, model_kind, rms, start_for

import sdekit
from sdekit import BrownianNoise, make_grid, sample
from sdekit.solvers import for_problem, get_solver, solver_names

NAMES = solver_names()
SOLVERS = {n: get_solver(n) for n in NAMES}


def _steps_for(s, n: int) -> int:
    return max(n, s.min_steps)


# ---------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("event_shape", [(3,), (1, 2, 2)])
def test_contract_shape_dtype_nfe(name, dtype, event_shape):
    s = SOLVERS[name]
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData(sde, torch.zeros(math.prod(event_shape)),
                               torch.linspace(0.5, 1.5, math.prod(event_shape)),
                               event_shape=event_shape)
    steps = _steps_for(s, 6)
    model = data.model()
    solver = for_problem(s, sde, model, event_shape)
    sol = sample(sde, model, shape=(5,) + event_shape, solver=solver, steps=steps,
                 dtype=dtype, seed=3)
    assert sol.x.shape == (5,) + event_shape
    assert sol.x.dtype == dtype
    assert torch.isfinite(sol.x).all()
    expected = s.expected_nfe(steps)
    if expected is None:
        assert sol.nfe > 0
    else:
        assert sol.nfe == expected, f"{name}: measured NFE {sol.nfe} != declared {expected}"


@pytest.mark.parametrize("sde_name", INTERPOLANT_NAMES)
@pytest.mark.parametrize("name", NAMES)
def test_contract_on_the_flow_processes(name, sde_name):
    """The same contract on the linear interpolants (flow matching) with a flow network: from
    t = 1 (alpha = 0, the exact prior) for the solvers that start there, from
    helpers.FLOW_T_START for the others (which refuse t = 1: tests/test_flow.py)."""
    s = SOLVERS[name]
    sde = make_sde(sde_name)
    data = gaussian_problem(sde, dim=3)
    model = data.model(model_kind(sde))
    steps = _steps_for(s, 6)
    t0 = start_for(s, sde)
    x_T = data.marginal_sample(5, t0, torch.Generator().manual_seed(3), dtype=torch.float32)
    sol = sample(sde, model, x_T, solver=for_problem(s, sde, model, (3,)), steps=steps, t_start=t0,
                 seeds=list(range(5)))
    assert sol.x.shape == (5, 3) and sol.x.dtype == torch.float32
    assert torch.isfinite(sol.x).all(), f"{name} on {sde_name}: {sol.x}"
    expected = s.expected_nfe(steps)
    if expected is None:
        assert sol.nfe > 0
    else:
        assert sol.nfe == expected, f"{name}: measured NFE {sol.nfe} != declared {expected}"


@pytest.mark.parametrize("name", NAMES)
def test_contract_determinism_and_batch_invariance(name):
    """Same seeds give the same samples, and (the issue-12 measurement) a batch of 3 holds the
    same samples as a batch of 8 with those seeds, in another order: to float rounding where the
    registry declares ``batch_invariant=True``, within the tolerance where it declares
    ``"tolerance"``. Only a solver that declares ``batch_invariant=False`` skips the second part."""
    s = SOLVERS[name]
    assert s.batch_invariant in (True, "tolerance", False), f"{name}: {s.batch_invariant!r}"
    sde = sdekit.VPSDE()
    data = gaussian_problem(sde, dim=3)
    steps = _steps_for(s, 6)
    kw = {"solver": for_problem(s, sde, data.model(), (3,)), "steps": steps, "dtype": torch.float64}
    seeds = list(range(10, 18))
    a = sample(sde, data.model(), shape=(8, 3), seeds=seeds, **kw).x
    b = sample(sde, data.model(), shape=(8, 3), seeds=seeds, **kw).x
    assert torch.equal(a, b), "same seeds must give the same samples"
    if s.stochastic:
        d = sample(sde, data.model(), shape=(8, 3), seeds=list(range(20, 28)), **kw).x
        assert not torch.allclose(a, d), "a stochastic solver must depend on its seeds"
    if s.batch_invariant is False:
        pytest.skip(f"{name} declares batch_invariant=False: a sample depends on its batch")
    c = sample(sde, data.model(), shape=(3, 3), seeds=[12, 10, 17], **kw).x
    tol = 1e-3 if s.batch_invariant == "tolerance" else 1e-10
    torch.testing.assert_close(c, a[[2, 0, 7]], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", [n for n in NAMES if SOLVERS[n].batch_invariant == "tolerance"])
def test_tolerance_invariant_solvers_hold_every_sample_to_tolerance(name):
    """Batch-shared adaptive steps: in a batch of 256 on a 2-D mixture every sample stays within
    50 x the tolerance of a tight solve, so its dependence on the batch is bounded by the
    tolerance whatever the batch size (an error norm averaged over the batch let single samples
    drift 110 x the tolerance away: 1.1e-3 at rtol = atol = 1e-5). The tolerance bounds the
    local error; the worst sample's global error has a heavy tail near the mixture's mode
    boundaries: worst / tol was 33, 10, 6.9, 9.2, 2.6, 4.6, 4.0, 11.1 for seeds 1-8 (median
    sample 0.1-0.9), hence 50 rather than the 30 that seed 1 once met by chance."""
    s = SOLVERS[name]
    sde = sdekit.VPSDE()
    data = sdekit.GaussianMixtureData(sde, [0.5, 0.3, 0.2], [[1.5, 0.0], [-1.0, 1.0], [-0.5, -1.5]],
                                      [0.3, 0.1, 0.05])
    kw = {"shape": (256, 2), "seed": 1, "dtype": torch.float64}
    x = sample(sde, data.model(), solver=name, **kw).x
    ref = sample(sde, data.model(), solver=name, rtol=1e-10, atol=1e-10, **kw).x
    err = (x - ref).pow(2).sum(1).sqrt().max()
    assert err < 50 * max(s.rtol, s.atol), f"{name}: worst sample off by {float(err):.3g}"


def test_pc_step_norms_declare_their_batch_invariance():
    """``pc``'s default Langevin step is per sample; ``step_norm='batch'`` (score-SDE's code)
    declares that a sample then depends on its batch, and it does."""
    assert SOLVERS["pc"].step_norm == "sample" and SOLVERS["pc"].batch_invariant is True
    batch = get_solver("pc", step_norm="batch")
    assert batch.batch_invariant is False
    assert get_solver("pc", step_norm="batch", n_corrector=0).batch_invariant is True
    sde = sdekit.VPSDE()
    data = gaussian_problem(sde, dim=3)
    kw = {"solver": batch, "steps": 6, "dtype": torch.float64}
    a = sample(sde, data.model(), shape=(8, 3), seeds=list(range(8)), **kw).x
    c = sample(sde, data.model(), shape=(3, 3), seeds=list(range(3)), **kw).x
    assert not torch.allclose(a[:3], c), "the batch rule should depend on the batch"
    with pytest.raises(ValueError, match="step_norm='x' is invalid"):
        get_solver("pc", step_norm="x")


# ---------------------------------------------------------------------------------- ODE order
ODE_NAMES = [n for n in NAMES if not SOLVERS[n].stochastic and not SOLVERS[n].adaptive
             and SOLVERS[n].order]


# Known, measured departures from the declared order, each with its cause (shown as xfail).
ORDER_LIMITS = {
    ("deis_tab3", "ve"): "the reference lower-order warm-up (first step at order 1) leaves an "
                         "O(h^2) global term that dominates below ~1e-6 on VE: slope 2.7 over "
                         "32-256 steps (3.9 over 16-128)",
    ("deis_tab2", "gmm"): "quadratic Lagrange extrapolation in t, started at lower order: "
                          "measured 2.70 over 64-256 steps on the mixture (2.8-2.96 on the "
                          "Gaussian flows), at the edge of the 0.3 band",
}


def _ladder(s):
    return [32, 64, 128, 256]


def _step_sizes(sde, s, ladder, t0):
    """The step size the order is measured against: 1 / steps; from alpha = 0 (lambda = -inf)
    the grid's largest finite lambda step. From t = 1 a named grid's first step ends at
    lambda_1 ~ -log(steps) (uniform in t, see grids._infinite_start) and the rest spans
    [lambda_1, lambda_max]: h ~ (lambda_max + log steps) / steps, and fitted against 1 / steps
    a p-th order method measures p - 0.15 (2M) to p - 0.25 (UniPC-3) on 32-256 steps."""
    if float(sde.alpha(t0)) != 0.0:
        return [1 / n for n in ladder]
    lams = [sde.lambda_(make_grid(sde, s.grid_for(sde), n, t_start=t0)) for n in ladder]
    return [float(lam[torch.isfinite(lam)].diff().abs().max()) for lam in lams]


@pytest.mark.parametrize("sde_name", sorted(ORDER_SDES))
@pytest.mark.parametrize("name", ODE_NAMES)
def test_ode_order_on_the_exact_gaussian_flow(name, sde_name):
    """Against the exact PF-ODE flow map of Gaussian data: the fitted slope of log(error) vs
    log(step size) is at least the declared order - 0.3. On Gaussian data the leading error term
    of some multistep methods nearly cancels (3M methods measure close to 4 here), so the
    two-sided check is made on a Gaussian mixture below."""
    s = SOLVERS[name]
    if (name, sde_name) in ORDER_LIMITS:
        pytest.xfail(ORDER_LIMITS[name, sde_name])
    sde = ORDER_SDES[sde_name]()
    data = gaussian_problem(sde)
    t0 = start_for(s, sde)   # a flow process: from t = 1 where the solver starts there
    x_T = data.marginal_sample(16, t0, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = data.flow(x_T, t0, sde.t_min)
    ladder = _ladder(s)
    model = data.model(model_kind(sde))
    errs = [rms(sample(sde, model, x_T, solver=name, steps=n, t_start=t0).x, ref)
            for n in ladder]
    slope = fitted_slope(_step_sizes(sde, s, ladder, t0), errs)
    assert s.order - 0.3 < slope < s.order + 1.3, \
        f"{name} on {sde_name}: slope {slope:.2f}, errors {errs}"


@pytest.fixture(scope="module")
def mixture_reference():
    """A 2-D, 3-component Gaussian mixture under VP, with a reference PF-ODE endpoint from RK4
    on 1024 logSNR steps (its error, about 5e-11, is far below every tested error)."""
    sde = sdekit.VPSDE()
    data = sdekit.GaussianMixtureData(sde, [0.5, 0.3, 0.2], [[1.5, 0.0], [-1.0, 1.0], [-0.5, -1.5]],
                                      [0.3, 0.1, 0.05])
    x_T = data.marginal_sample(16, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(sde, data.model(), x_T, solver="rk4", steps=1024, grid="logsnr").x
    return sde, data, x_T, ref


@pytest.mark.parametrize("name", ODE_NAMES)
def test_ode_order_on_a_gaussian_mixture(name, mixture_reference):
    """Two-sided on a problem with no special structure (a nonlinear score), against a converged
    reference, over 64-256 steps (coarser ladders are still pre-asymptotic here for third-order
    methods): slope within [order - 0.3, order + 0.8]. The upper allowance is wider because
    DEIS tAB-3 / rhoAB-3 (an order-4 update started at lower order, declared 3) measure 3.7-3.8
    here; every other solver lands within 0.3 of its declared order."""
    s = SOLVERS[name]
    if (name, "gmm") in ORDER_LIMITS:
        pytest.xfail(ORDER_LIMITS[name, "gmm"])
    sde, data, x_T, ref = mixture_reference
    ladder = [64, 128, 256]
    errs = [rms(sample(sde, data.model(), x_T, solver=name, steps=n, grid="logsnr").x, ref)
            for n in ladder]
    slope = fitted_slope([1 / n for n in ladder], errs)
    assert s.order - 0.3 < slope < s.order + 0.8, f"{name}: slope {slope:.2f}, errors {errs}"


# ------------------------------------------------------------------------------ strong order
STRONG_NAMES = [n for n in NAMES if SOLVERS[n].stochastic and SOLVERS[n].strong_order
                and not SOLVERS[n].adaptive and SOLVERS[n].batch_invariant is True]

# On Gaussian data the reverse drift is linear in x and the noise additive, so every order-2
# Ito-Taylor term but the deterministic one vanishes (each carries d^2f/dx^2 or dg/dx): a
# strong-order-1.5 scheme whose deterministic part has order >= 2 converges at order 2 here
# (torchsde's SRK measures 1.89 on VP, 2.16 on VE; 0.99 with its Levy area set to zero).
LINEAR_STRONG_ORDER = {"torchsde_srk": 2.0}


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("name", STRONG_NAMES)
def test_sde_strong_order(name, sde_name):
    """Nested uniform grids sharing one Brownian path per sample; error against the finest
    solve; slope within 0.3 of the declared strong order (additive noise), or of the order the
    scheme reaches on linear drifts (LINEAR_STRONG_ORDER). External-loop solvers (torchsde) are
    driven by the same path."""
    s = SOLVERS[name]
    expected = LINEAR_STRONG_ORDER.get(name, s.strong_order)
    sde = ORDER_SDES[sde_name]()
    data = gaussian_problem(sde, dim=2, eig_min=0.1)
    B, fine = 64, 2048
    x_T = data.marginal_sample(B, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    tf = make_grid(sde, "uniform", fine)
    seeds = list(range(B))

    def run(grid):
        return sample(sde, data.model(), x_T, solver=name, grid=grid,
                      noise=BrownianNoise(seeds, tf, (2,))).x

    ref = run(tf)
    ladder = [64, 128, 256, 512]
    errs = [rms(run(tf[:: fine // n]), ref) for n in ladder]
    slope = fitted_slope([1 / n for n in ladder], errs)
    assert abs(slope - expected) < 0.3, f"{name}: slope {slope:.2f}, errors {errs}"


def test_brownian_levy_area_is_one_path_across_grids():
    """BrownianNoise's space-time Levy area: standard normal, uncorrelated with the increment,
    and the areas of two half steps add up to the whole step's (``U = int (W - W(t0)) ds``
    aggregates as ``U = U1 + U2 + h2 dW1``), so every grid made of its points sees one path."""
    B = 4000
    tf = torch.linspace(0.0, 1.0, 65, dtype=torch.float64)
    noise = BrownianNoise(list(range(B)), tf, (1,))
    like = torch.empty(B, 1, dtype=torch.float64)

    def wu(a, b):
        h = abs(b - a)
        dW = noise.increment(a, b, like) * h ** 0.5
        return dW, h * (0.5 * dW + noise.levy_area(a, b, like) * (h / 12) ** 0.5)

    t0, tm, t1 = 1.0, float(tf[24]), 0.0   # a step in the solvers' direction, split unevenly
    (W1, U1), (W2, U2), (W, U) = wu(t0, tm), wu(tm, t1), wu(t0, t1)
    torch.testing.assert_close(W1 + W2, W, rtol=0, atol=1e-12)
    torch.testing.assert_close(U1 + U2 + (tm - t1) * W1, U, rtol=0, atol=1e-12)
    z, dz = noise.levy_area(t0, t1, like), noise.increment(t0, t1, like)
    assert abs(float(z.mean())) < 5 / B ** 0.5 and abs(float(z.std()) - 1) < 0.05
    assert abs(float((z * dz).mean())) < 5 / B ** 0.5
    assert torch.equal(noise.levy_area(t0, t1, like), z), "the same step gives the same area"


@pytest.mark.parametrize("brownian", [False, True])
def test_torchsde_euler_is_euler_maruyama_on_sdekits_noise(brownian):
    """The torchsde backend reads sdekit's noise: its Euler scheme is Euler-Maruyama step for
    step, on per-sample seeds as on a BrownianNoise path."""
    sde = sdekit.VPSDE()
    data = gaussian_problem(sde, dim=3)
    x_T = data.marginal_sample(5, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    tf = make_grid(sde, "uniform", 16)

    def run(name):
        kw = {"noise": BrownianNoise(list(range(5)), tf, (3,))} if brownian else \
            {"seeds": list(range(5))}
        return sample(sde, data.model(), x_T, solver=name, grid=tf[::2], **kw).x

    # 1e-10: torchsde steps a hair (1e-11 relative) over the grid's step
    torch.testing.assert_close(run("torchsde"), run("euler_maruyama"), rtol=1e-10, atol=1e-10)


def test_torchsde_srk_needs_a_levy_area():
    class Increments:   # a custom noise source without levy_area
        def __init__(self):
            self.inner = sdekit.SeededNoise([0, 1])
            self.randn, self.increment = self.inner.randn, self.inner.increment

    sde = sdekit.VPSDE()
    data = gaussian_problem(sde, dim=2)
    with pytest.raises(ValueError, match="torchsde_srk.*Levy area.*Increments"):
        sample(sde, data.model(), shape=(2, 2), solver="torchsde_srk", steps=4,
               noise=Increments())


# ---------------------------------------------------------------------------- weak correctness
WEAK_NAMES = [n for n in NAMES if SOLVERS[n].stochastic]
# One forward SDE of each kind (the CustomSDE is EDM's schedule given as functions, so the grid
# rule is exercised on a schedule it knows nothing about).
WEAK_SDES = ["vp", "cosine", "subvp", "ve", "edm", "ddpm", "custom_edm"] + INTERPOLANT_NAMES
# Known, measured departures from the exact law at the option-free call, with their cause.
# Known, measured departures of the option-free call from the exact law, each with its cause
# (none today: the torchsde backend used to step uniformly in t only, biased on EDM).
WEAK_LIMITS: dict[tuple[str, str], str] = {}
# Steps where the default (100 NFE, at least 20 steps) is not enough, each with its measurement.
# torchsde_srk on EDM and its CustomSDE twin (logsnr grid, sigma 80 -> 0.002, a factor 1.7 per
# step at 20 steps): the covariance's first entry was 0.725 / 0.865 / 0.983 of 1.0 at 20 / 40 /
# 100 steps (2000 samples, seed 11): a discretisation error that shrinks like 1 / steps, not a bias
# of the noise. (At 20 steps seed 7 once passed by 0.001 inside the tolerance.)
WEAK_STEPS: dict[tuple[str, str], int] = {("torchsde_srk", "edm"): 100,
                                         ("torchsde_srk", "custom_edm"): 100}


@pytest.mark.parametrize("sde_name", WEAK_SDES)
@pytest.mark.parametrize("name", WEAK_NAMES)
def test_weak_correctness(name, sde_name):
    """The option-free call (the solver's grid for this SDE, samples from the prior) with the
    exact score reproduces the data mean and covariance at t_min within Monte-Carlo error:
    5 standard errors of the sample mean / covariance for n samples, plus a discretisation
    allowance of 0.02 / 0.03 at 100 NFE (at least 20 steps). (With the uniform grid on EDM, the
    default before Solver.grid_for, the covariance was off by 10-60 standard errors.)"""
    if (name, sde_name) in WEAK_LIMITS:
        pytest.xfail(WEAK_LIMITS[name, sde_name])
    sde = make_sde(sde_name)
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    data = sdekit.GaussianData(sde, mean, cov)
    n = 1000
    s = SOLVERS[name]
    steps = WEAK_STEPS.get((name, sde_name), max(100 // s.nfe_per_step, 20))
    t0 = start_for(s, sde)   # a flow process: from its exact prior at t = 1 where the solver can
    init = ({"shape": (n, 2), "seed": 7} if t0 == sde.T else
            {"x_init": data.marginal_sample(n, t0, torch.Generator().manual_seed(7),
                                            dtype=torch.float64), "seeds": list(range(n))})
    x = sample(sde, data.model(model_kind(sde)), solver=name, steps=steps, t_start=t0,
               dtype=torch.float64, **init).x
    target_mean, target_cov = data.marginal_mean(sde.t_min), data.marginal_cov(sde.t_min)
    m, C = x.mean(0), torch.cov(x.T)
    se_mean = torch.sqrt(torch.diagonal(target_cov) / n)
    assert ((m - target_mean).abs() < 5 * se_mean + 0.02).all(), f"mean {m} vs {target_mean}"
    se_cov = torch.sqrt((target_cov ** 2 + torch.outer(torch.diagonal(target_cov),
                                                       torch.diagonal(target_cov))) / n)
    assert ((C - target_cov).abs() < 5 * se_cov + 0.03).all(), f"cov {C} vs {target_cov}"


def test_the_option_free_grid_is_the_solvers_grid_for_the_sde():
    """sample() without a grid uses Solver.grid_for(sde): uniform-in-t solvers keep the papers'
    uniform grid on VP and move to logsnr on EDM (sigma = t), the torchsde backend too (it runs
    on any grid through its time change); DEIS keeps quadratic on VP and moves to logsnr on the
    cosine schedule."""
    cases = [("euler_maruyama", sdekit.VPSDE(), "uniform"), ("euler_maruyama", sdekit.EDMSDE(),
             "logsnr"), ("deis_tab3", sdekit.VPSDE(), "quadratic"),
             ("deis_tab3", sdekit.CosineVPSDE(), "logsnr"), ("torchsde", sdekit.EDMSDE(), "logsnr"),
             ("torchsde", sdekit.VPSDE(), "uniform")]
    for name, sde, grid in cases:
        assert SOLVERS[name].grid_for(sde) == grid, (name, sde)
        data = gaussian_problem(sde, dim=2)
        sol = sample(sde, data.model(), shape=(2, 2), solver=name, steps=8)
        torch.testing.assert_close(sol.times, make_grid(sde, grid, 8), rtol=0, atol=0)
    assert "logsnr where" in SOLVERS["pc"].describe()["grid_rule"]


@pytest.mark.parametrize("sde_name", ["vp", "ddpm", "ddpm_squaredcos", "ve", "edm", "flow"])
def test_the_option_free_call_is_the_default_rule(sde_name):
    """sample() without solver and grid runs default_config(sde, steps): its solver, options and
    grid (here against the same call made explicit); a grid without a solver runs DEFAULT_SOLVER
    with its registry defaults; an explicit solver keeps its own grid_for (unchanged)."""
    from sdekit.solvers.registry import DEFAULT_SOLVER, default_config

    sde = sdekit.FlowSDE() if sde_name == "flow" else make_sde(sde_name)
    data = gaussian_problem(sde, dim=3)
    pred = "flow" if float(sde.alpha(sde.T)) == 0.0 else "eps"
    model = data.model(pred)
    for steps in (5, 10, 20):
        cfg = default_config(sde, steps)
        got = sample(sde, model, shape=(4, 3), steps=steps, dtype=torch.float64, seed=3)
        want = sample(sde, model, shape=(4, 3), steps=steps, dtype=torch.float64, seed=3,
                      solver=cfg["solver"], grid=cfg["grid"], grid_options=cfg["grid_options"],
                      **cfg["options"])
        torch.testing.assert_close(got.x, want.x, rtol=0, atol=0)
        torch.testing.assert_close(got.times, make_grid(sde, cfg["grid"], steps,
                                                        **cfg["grid_options"]), rtol=0, atol=0)
        assert got.solver == cfg["solver"] and got.nfe == want.nfe
    named = sample(sde, model, shape=(4, 3), steps=8, grid="quadratic", dtype=torch.float64)
    plain = sample(sde, model, shape=(4, 3), steps=8, grid="quadratic", dtype=torch.float64,
                   solver=DEFAULT_SOLVER)
    torch.testing.assert_close(named.x, plain.x, rtol=0, atol=0)
    own = sample(sde, model, shape=(2, 3), steps=8, solver="dpmpp_2m")
    torch.testing.assert_close(own.times, make_grid(sde, SOLVERS["dpmpp_2m"].grid_for(sde), 8),
                               rtol=0, atol=0)


@pytest.mark.parametrize("sde_name", ["vp", "ddpm_squaredcos"])
def test_the_default_grid_floor_beats_the_plain_logsnr_grid(sde_name):
    """The option-free grid jumps from lambda(T) to lambda = -2.5 in one step (lambda_floor):
    at 10 NFE it is more than 2x more accurate than the plain logsnr grid with the same solver
    and options (the previous default: 2.8x / 3.9x the best fixed configuration on sdekit
    bench's Gaussian under VP / the squared-cosine DDPM table, docs/defaults.md)."""
    from sdekit.bench.problems import gaussian_problem as bench_gaussian
    from sdekit.solvers.registry import default_config
    from sdekit.tune import prior_states

    sde = make_sde(sde_name)
    prob = bench_gaussian(sde=sde, dim=16, seed=0)
    x = prior_states(sde, 128, (16,), seed=1, dtype=torch.float64)
    ref = prob.flow(x)
    cfg = default_config(sde, 10)
    assert cfg["grid"] == "logsnr" and cfg["grid_options"] == {"lambda_floor": -2.5}

    def err(**grid_options) -> float:
        out = sample(sde, prob.model, x, solver=cfg["solver"], grid="logsnr", steps=10,
                     grid_options=grid_options, float64=True, **cfg["options"]).x
        return float((out - ref).pow(2).mean().sqrt())

    default = float((sample(sde, prob.model, x, steps=10, float64=True).x - ref)
                    .pow(2).mean().sqrt())
    assert default == err(**cfg["grid_options"])
    assert default < 0.5 * err(), (default, err())


def test_default_config_rejects_bad_steps():
    from sdekit.solvers.registry import default_config

    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match=f"steps={bad!r} is invalid"):
            default_config(sdekit.VPSDE(), bad)


# ---------------------------------------------------------------------- adaptive step control
ADAPTIVE_NAMES = [n for n in NAMES if SOLVERS[n].adaptive and not SOLVERS[n].stochastic]


def _vp_gaussian(n: int = 16):
    sde = sdekit.VPSDE()
    data = gaussian_problem(sde)
    x_T = data.marginal_sample(n, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    return sde, data, x_T, data.flow(x_T, sde.T, sde.t_min)


@pytest.mark.parametrize("name", ADAPTIVE_NAMES)
def test_adaptive_error_follows_rtol(name):
    """Tightening rtol alone (every other option at its default) tightens the error against the
    exact flow: each 10x smaller rtol at least 3x smaller error (DPM-Solver's adaptive step with
    the paper's fixed atol = 0.0078 stalled at about 2e-3 here below rtol 1e-2)."""
    sde, data, x_T, ref = _vp_gaussian()
    errs = [rms(sample(sde, data.model(), x_T, solver=name, rtol=r).x, ref)
            for r in (1e-2, 1e-3, 1e-4)]
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, f"{name}: errors {errs}"


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("name", ADAPTIVE_NAMES)
def test_adaptive_default_tolerance_on_every_forward_sde(name, sde_name):
    """At its default options an adaptive solver is accurate on every forward SDE: RMS error
    against the exact flow below 0.5% of the data scale (unit), no sample above 1%.
    (dpm_solver_adaptive measured 0.01-2.3 RMS on seven of these before its step cap and
    VP-equivalent error norm.)"""
    sde = make_sde(sde_name)
    data = gaussian_problem(sde)
    x_T = data.marginal_sample(16, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = data.flow(x_T, sde.T, sde.t_min)
    x = sample(sde, data.model(), x_T, solver=name).x
    per_sample = (x - ref).pow(2).mean(1).sqrt()
    assert rms(x, ref) < 5e-3 and per_sample.max() < 1e-2, \
        f"{name} on {sde_name}: RMS {rms(x, ref):.3g}, worst sample {per_sample.max():.3g}"


@pytest.fixture(scope="module")
def mixture_256():
    """256 samples of the 2-D mixture of ``mixture_reference`` (same seed), their converged
    endpoints and a sample's mode: the component of highest density at t_min."""
    sde = sdekit.VPSDE()
    data = sdekit.GaussianMixtureData(sde, [0.5, 0.3, 0.2], [[1.5, 0.0], [-1.0, 1.0], [-0.5, -1.5]],
                                      [0.3, 0.1, 0.05])
    x_T = data.marginal_sample(256, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(sde, data.model(), x_T, solver="rk4", steps=256, grid="logsnr").x  # error ~1e-8

    def mode(x):
        return torch.stack([c.log_prob(x, sde.t_min) for c in data.components], 1).argmax(1)

    return sde, data, x_T, ref, mode


@pytest.mark.parametrize("name", ADAPTIVE_NAMES)
def test_adaptive_keeps_every_mixture_sample_in_its_mode(name, mixture_256):
    """No sample of a 2-D Gaussian mixture ends in another mode, at the default tolerance and at
    rtol 1e-3, and the RMS error is below 2% (before their step cap, both DPM-Solver adaptive
    solvers sent 1-3 of these 256 samples to another mode, RMS 0.03-0.31)."""
    sde, data, x_T, ref, mode = mixture_256
    for opts in ({}, {"rtol": 1e-3}):
        x = sample(sde, data.model(), x_T, solver=name, **opts).x
        switched = int((mode(x) != mode(ref)).sum())
        assert switched == 0 and rms(x, ref) < 0.02, \
            f"{name} {opts}: {switched} of 256 samples in another mode, RMS {rms(x, ref):.3g}"


def test_adaptive_dpm_solver_rejects_a_bad_step_cap():
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="h_max"):
            get_solver("dpm_solver_adaptive", h_max=bad)


# ----------------------------------------------------------------------------- registry itself
def test_registry_lists_metadata():
    infos = sdekit.list_solvers()
    assert [i["name"] for i in infos] == NAMES
    for i in infos:
        assert i["nfe_per_step"] >= 1 and i["kind"] in ("ODE", "SDE") and i["paper"]


def test_registry_rejects_duplicates_and_unknown_names():
    from sdekit.solvers import register
    from sdekit.solvers.ode import DDIM
    with pytest.raises(ValueError, match="already registered"):
        register("ddim")(DDIM)
    with pytest.raises(ValueError, match="unknown solver 'nope'.*ddim"):
        get_solver("nope")


def test_registry_refuses_options_named_like_sample_keywords():
    """A solver option named like a keyword of sample() is refused when the solver is
    registered (constructor parameters and registered defaults alike), so the name-plus-options
    form of sample() can never hand an option to the wrong place."""
    import inspect

    from sdekit.solvers import Solver, register
    from sdekit.solvers.registry import _REGISTRY, SAMPLE_KEYWORDS
    assert SAMPLE_KEYWORDS == set(inspect.signature(sample).parameters)

    class StepsOption(Solver):
        def __init__(self, steps: int = 2, order: int = 1) -> None:
            self.steps_ = steps

    class AnyOptions(Solver):
        def __init__(self, **options) -> None:
            self.options = options

    with pytest.raises(ValueError, match=r"'clash_steps'.*StepsOption.*\['steps'\]"):
        register("clash_steps")(StepsOption)
    with pytest.raises(ValueError, match=r"AnyOptions.*\['seed'\]"):
        register("clash_seed", seed=1)(AnyOptions)
    assert "clash_steps" not in _REGISTRY and "clash_seed" not in _REGISTRY
    for name in NAMES:  # every built-in solver's options stay clear of sample()'s keywords
        assert not SAMPLE_KEYWORDS & set(inspect.signature(type(SOLVERS[name])).parameters)


def test_configured_solver_object_is_the_name_plus_options_form():
    from sdekit.solvers.ode import DDIM
    sde = sdekit.VPSDE()
    model = sdekit.GaussianData(sde, torch.zeros(3), torch.ones(3)).model()
    kw = dict(shape=(4, 3), steps=8, seed=5)
    by_name = sample(sde, model, solver="dpmpp_2m", order=3, **kw)
    by_object = sample(sde, model, solver=get_solver("dpmpp_2m", order=3), **kw)
    assert torch.equal(by_name.x, by_object.x) and by_object.solver == "dpmpp_2m"
    assert torch.equal(sample(sde, model, solver=DDIM(eta=1.0), **kw).x,
                       sample(sde, model, solver="ancestral", **kw).x)
    with pytest.raises(TypeError, match="only be given with a solver name"):
        sample(sde, model, solver=get_solver("dpmpp_2m"), order=3, **kw)
