"""Analytic-DPM (Bao et al. 2022): the Monte-Carlo moment Gamma and the optimal reverse variance
against their closed forms on Gaussian data, the ancestral sampler reproducing the data
covariance with it (and not with beta / beta-tilde) at 10-50 steps on VP and VE, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import sdekit
from sdekit.bench.metrics import fit_gaussian, gaussian_kl
from sdekit.solvers import get_solver
from sdekit.solvers.analytic_dpm import MomentTable, analytic_variance, estimate_moments

MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
ISO = 0.3 * torch.eye(4, dtype=torch.float64)
DIAG = torch.diag(torch.tensor([1.0, 0.3, 0.05, 0.01], dtype=torch.float64))


def _closed_form(sde, cov, t):
    """Gamma_t (per coordinate) and E tr Cov[x0 | x_t] / d for x0 ~ N(m, cov):
    E[eps | x_t] = sigma C^-1 (x_t - alpha m), C = alpha^2 cov + sigma^2 I, so
    E eps_hat_j^2 = sigma^2 (C^-1)_jj; Cov[x0 | x_t] = cov - alpha^2 cov C^-1 cov."""
    t = torch.tensor(t, dtype=torch.float64)
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    Ci = torch.linalg.inv(a * a * cov + s * s * torch.eye(cov.shape[0], dtype=torch.float64))
    gamma_j = s * s * torch.diagonal(Ci)
    post = cov - a * a * cov @ Ci @ cov
    return gamma_j, float(torch.trace(post)) / cov.shape[0]


@pytest.mark.parametrize("sde", [sdekit.VPSDE(), sdekit.VESDE()], ids=["vp", "ve"])
def test_gamma_and_optimal_variance_match_the_closed_form(sde):
    cov = DIAG
    data = sdekit.GaussianData(sde, MEAN, cov)
    x0 = data.sample(40000, torch.Generator().manual_seed(1))
    grid = sdekit.make_grid(sde, "uniform", 10)
    tab = estimate_moments(sde, data.model(), x0, grid)
    diag = estimate_moments(sde, data.model(), x0, grid, diagonal=True)
    assert tab.gamma.shape == (11,) and diag.gamma.shape == (11, 4) and tab.n == 40000
    for i, t in enumerate(grid.tolist()):
        g_j, post = _closed_form(sde, cov, t)
        # the scalar estimate within 4 standard errors, the diagonal one within 3 %
        assert abs(float(tab.gamma[i]) - float(g_j.mean())) < 4 * float(tab.stderr[i]) + 1e-12
        torch.testing.assert_close(diag.gamma[i], g_j, rtol=0.03, atol=1e-6)
        if i == len(grid) - 1:
            continue
        # Theorem 1 on this step t -> s for the DDPM posterior (lambda^2 = beta_tilde) and DDIM
        s = grid[i + 1]
        a_t, s_t = float(sde.alpha(grid[i])), float(sde.sigma(grid[i]))
        a_s, s_s = float(sde.alpha(s)), float(sde.sigma(s))
        beta_tilde = s_s ** 2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2)
        for lam2 in (beta_tilde, 0.0):
            k = a_s - math.sqrt(s_s ** 2 - lam2) * a_t / s_t
            exact = lam2 + k * k * post          # lambda^2 + k^2 E tr Cov[x0 | x_t] / d
            v = float(analytic_variance(a_t, s_t, a_s, s_s, lam2, g_j.mean()))
            assert v == pytest.approx(exact, rel=1e-9, abs=1e-15)
            # the estimate's error is its Monte-Carlo error times dv/dGamma = k^2 sigma^2/alpha^2
            # (large near T, where 1 - Gamma ~ alpha^2: the clipping bounds keep it >= lambda^2)
            v_mc = float(analytic_variance(a_t, s_t, a_s, s_s, lam2, tab.gamma[i]))
            tol = 4 * k * k * (s_t / a_t) ** 2 * float(tab.stderr[i])
            assert abs(v_mc - exact) <= tol + 1e-12 and v_mc >= lam2 * (1 - 1e-12)


def test_variance_is_clipped_to_the_bounds():
    # Gamma > 1 (an over-confident model) -> lambda^2; Gamma < 0 is refused elsewhere;
    # Gamma = 0 at a large sigma/alpha is capped by the data range
    lam2 = 0.01
    assert float(analytic_variance(0.5, 0.8, 0.7, 0.6, lam2, 1.3)) == pytest.approx(lam2)
    k = 0.7 - math.sqrt(0.36 - lam2) * 0.5 / 0.8
    free = float(analytic_variance(0.5, 0.8, 0.7, 0.6, lam2, 0.0))
    assert free == pytest.approx(lam2 + k * k * (0.8 / 0.5) ** 2)
    capped = float(analytic_variance(0.5, 0.8, 0.7, 0.6, lam2, 0.0, data_range=(-1.0, 1.0)))
    assert capped == pytest.approx(lam2 + k * k * 1.0)
    with pytest.raises(ValueError, match="alpha_t = 0"):
        analytic_variance(0.0, 1.0, 0.1, 0.99, 0.0, 0.5)


class BatchNoise:
    """One generator for the whole batch (20,000 per-sample generators are slow to draw from)."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, like):
        return torch.randn(like.shape, generator=self.g, dtype=like.dtype)

    def increment(self, t0, t1, like):
        return self.randn(like)


def _output_kl(sde, data, steps, **kw):
    grid = sdekit.make_grid(sde, "uniform", steps)
    xT = data.marginal_sample(20000, sde.T, torch.Generator().manual_seed(2))
    sol = sdekit.sample(sde, data.model(), xT, solver="ancestral", grid=grid,
                        noise=BatchNoise(0), **kw)
    m, S = fit_gaussian(sol.x.double())
    return gaussian_kl(m, S, data.mean, data.cov)


@pytest.mark.parametrize("sde", [sdekit.VPSDE(), sdekit.VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("cov,diagonal", [(ISO, False), (DIAG, True)], ids=["iso", "diag"])
def test_ancestral_with_the_analytic_variance_reproduces_the_data_covariance(sde, cov, diagonal):
    """With the exact model the true reverse step of Gaussian data is Gaussian with covariance
    lambda^2 I + k^2 Cov[x0 | x_t]: isotropic data makes the scalar v* exact, axis-aligned data
    the diagonal one, so the sampler reaches the Monte-Carlo floor of the fitted KL (about
    D (D + 3) / (4 n) = 3.5e-4 nats here) at 10 steps already, while beta-tilde and beta stay
    10-10,000x above it (measured: 2.4e-2..1.3 and 3.2e-3..4.1 nats at 10 and 50 steps)."""
    data = sdekit.GaussianData(sde, MEAN, cov)
    x0 = data.sample(20000, torch.Generator().manual_seed(1))
    for steps in (10, 50):
        tab = estimate_moments(sde, data.model(), x0, sdekit.make_grid(sde, "uniform", steps),
                               diagonal=diagonal)
        kl_a = _output_kl(sde, data, steps, variance="analytic", moments=tab)
        kl_bt = _output_kl(sde, data, steps)
        kl_b = _output_kl(sde, data, steps, variance="beta")
        assert kl_a < 1e-2, (steps, kl_a)
        assert kl_a < kl_bt / 5 and kl_a < kl_b / 5, (steps, kl_a, kl_bt, kl_b)


def test_default_ancestral_is_unchanged_and_one_gamma_per_step_is_accepted():
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData(sde, MEAN, DIAG)
    grid = sdekit.make_grid(sde, "uniform", 8)
    xT = data.marginal_sample(64, sde.T, torch.Generator().manual_seed(3))
    base = sdekit.sample(sde, data.model(), xT, solver="ancestral", grid=grid, seed=1)
    same = sdekit.sample(sde, data.model(), xT, solver="ancestral", grid=grid, seed=1,
                         variance="beta_tilde")
    assert torch.equal(base.x, same.x)
    x0 = data.sample(2000, torch.Generator().manual_seed(1))
    tab = estimate_moments(sde, data.model(), x0, grid)
    a = sdekit.sample(sde, data.model(), xT, solver="ancestral", grid=grid, seed=1,
                      variance="analytic", moments=tab)
    b = sdekit.sample(sde, data.model(), xT, solver="ancestral", grid=grid, seed=1,
                      variance="analytic", moments=tab.gamma[:-1].tolist())
    assert torch.equal(a.x, b.x) and a.nfe == 8
    # Analytic-DDIM (eta = 0) is stochastic with the analytic variance
    assert get_solver("ddim", variance="analytic", moments=tab).stochastic


def test_flow_matching_start_needs_the_data_range():
    sde = sdekit.FlowSDE()
    data = sdekit.GaussianData(sde, MEAN, ISO)
    grid = sdekit.make_grid(sde, "uniform", 10)
    x0 = data.sample(4000, torch.Generator().manual_seed(1))
    tab = estimate_moments(sde, data.model("flow"), x0, grid)
    xT = data.marginal_sample(32, sde.T, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="data_range"):
        sdekit.sample(sde, data.model("flow"), xT, solver="ancestral", grid=grid,
                      variance="analytic", moments=tab)
    sol = sdekit.sample(sde, data.model("flow"), xT, solver="ancestral", grid=grid,
                        variance="analytic", moments=tab, data_range=(-4.0, 4.0))
    assert bool(torch.isfinite(sol.x).all())


@pytest.mark.parametrize("kw,msg", [
    ({"variance": "optimal"}, (r"variance='optimal' is invalid: expected one of "
                               r"\('beta_tilde', 'beta', 'analytic'\)")),
    ({"variance": "analytic"}, "variance='analytic' needs moments="),
    ({"moments": [0.5, 0.5]}, "moments= is used only with variance='analytic'"),
    ({"variance": "analytic", "moments": [0.5, -0.1]}, "negative entries"),
    ({"variance": "analytic", "moments": [0.5, float("nan")]}, "must be finite"),
    ({"variance": "analytic", "moments": []}, "non-empty"),
    ({"variance": "analytic", "moments": "abc"}, "moments='abc' is invalid"),
    ({"variance": "analytic", "moments": [0.5], "data_range": (1.0, -1.0)},
     r"data_range=\(1.0, -1.0\) is invalid: expected \(lo, hi\) with finite lo < hi"),
])
def test_bad_options_are_refused_at_construction(kw, msg):
    with pytest.raises(ValueError, match=msg):
        get_solver("ancestral", **kw)


def test_beta_needs_eta_one():
    with pytest.raises(ValueError, match="variance='beta' .* needs eta=1"):
        get_solver("ddim", variance="beta")


def test_table_that_does_not_fit_the_grid_is_refused_before_any_model_call():
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData(sde, MEAN, DIAG)
    model = data.model()
    xT = data.marginal_sample(16, sde.T, torch.Generator().manual_seed(3))
    grid = sdekit.make_grid(sde, "uniform", 10)
    with pytest.raises(ValueError, match="moments has 9 entries but the grid has 10 steps"):
        sdekit.sample(sde, model, xT, solver="ancestral", grid=grid, variance="analytic",
                      moments=[0.5] * 9)
    other = estimate_moments(sde, model, data.sample(100), sdekit.make_grid(sde, "uniform", 7))
    nfe = model.nfe
    with pytest.raises(ValueError, match="the table has no entry at the step time"):
        sdekit.sample(sde, model, xT, solver="ancestral", grid=grid, variance="analytic",
                      moments=other)
    with pytest.raises(ValueError, match=r"per-coordinate Gamma of shape \(3,\) does not match"):
        sdekit.sample(sde, model, xT, solver="ancestral", grid=grid, variance="analytic",
                      moments=torch.full((10, 3), 0.5))
    assert model.nfe == nfe  # no model call by the refused solves


@pytest.mark.parametrize("args,msg", [
    ({"data": torch.zeros(1, 4)}, r"data of shape \(1, 4\) is invalid"),
    ({"data": torch.full((5, 4), float("nan"))}, "data contains NaN"),
    ({"times": [0.5, 2.0]}, r"times \[2.0\] are outside the SDE's range"),
    ({"times": []}, "times=\\[\\] is invalid"),
    ({"model": lambda x, t: x}, "model must be a DiffusionModel"),
])
def test_estimate_moments_bad_input(args, msg):
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData(sde, MEAN, DIAG)
    kw = {"sde": sde, "model": data.model(), "data": data.sample(10), "times": [0.5], **args}
    with pytest.raises((ValueError, TypeError), match=msg):
        estimate_moments(**kw)


def test_moment_table_lookup():
    tab = MomentTable(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64),
                      torch.tensor([0.9, 0.6, 0.2], dtype=torch.float64), 10)
    torch.testing.assert_close(tab.at(torch.tensor([0.5, 1.0], dtype=torch.float64)),
                               torch.tensor([0.6, 0.9], dtype=torch.float64))
