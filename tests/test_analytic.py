"""Exact oracles: Gaussian and Gaussian-mixture data, checked against independent formulas
(torch.distributions densities, linear solves, Tweedie's formula, autograd, finite differences)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    assert_close,
    finite_diff,
    is_discrete,
    make_sde,
    off_knot_time,
    random_spd,
    random_vector,
    time_at,
)
from hypothesis import given
from hypothesis import strategies as st

from sdekit.analytic import GaussianData, GaussianMixtureData
from sdekit.dynamics import ProbabilityFlowODE
from sdekit.sde import ForwardSDE

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("torch_single_thread")
ORACLE_SDES = ["vp", "cosine", "subvp", "ve", "edm", "ddpm", "ddpm_squaredcos", "custom_vp",
               "custom_edm"]
EVENTS = [(3,), (1, 4, 4)]

_CACHE: dict = {}


def gaussian(sde_name: str, event: tuple = (3,), seed: int = 0) -> GaussianData:
    key = ("g", sde_name, event, seed)
    if key not in _CACHE:
        D = math.prod(event)
        _CACHE[key] = GaussianData(make_sde(sde_name), random_vector(D, seed),
                                   random_spd(D, seed), event_shape=event)
    return _CACHE[key]


def mixture(sde_name: str, event: tuple = (3,), K: int = 3, seed: int = 0) -> GaussianMixtureData:
    key = ("m", sde_name, event, K, seed)
    if key not in _CACHE:
        D = math.prod(event)
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(K, generator=g, dtype=F64) + 0.2
        means = 2 * torch.randn(K, D, generator=g, dtype=F64)
        covs = torch.stack([random_spd(D, seed + 1 + k) for k in range(K)])
        _CACHE[key] = GaussianMixtureData(make_sde(sde_name), w, means, covs, event_shape=event)
    return _CACHE[key]


def marginal_mvn(sde: ForwardSDE, mean, cov, t: float) -> torch.distributions.MultivariateNormal:
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    D = mean.numel()
    return torch.distributions.MultivariateNormal(a * mean,
                                                  a * a * cov + s * s * torch.eye(D, dtype=F64))


def probe_points(data, t: torch.Tensor, B: int, seed: int, dtype=F64) -> torch.Tensor:
    """Points spread like the marginal (so scores are O(1/sigma)), plus some outliers."""
    g = torch.Generator().manual_seed(seed)
    x = data.marginal_sample(B, t, generator=g, dtype=F64)
    x = x * (1 + torch.rand((B,) + (1,) * (x.ndim - 1), generator=g, dtype=F64))
    return x.to(dtype)


def times(sde: ForwardSDE, us, per_sample: bool, dtype) -> torch.Tensor:
    if per_sample:
        return torch.tensor([time_at(sde, u) for u in us], dtype=dtype)
    return torch.tensor(time_at(sde, us[0]), dtype=dtype)


def per_row(t: torch.Tensor, B: int) -> list[float]:
    return [float(t)] * B if t.ndim == 0 else [float(v) for v in t]


hyp_common = dict(name=st.sampled_from(ORACLE_SDES), event=st.sampled_from(EVENTS),
                  us=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
                  per_sample=st.booleans(), dtype=st.sampled_from([torch.float32, F64]),
                  seed=st.integers(0, 1000))


# ----------------------------------------------------------------- Gaussian oracle
@given(**hyp_common)
def test_gaussian_score_eps_x0_logprob_against_independent_formulas(name, event, us, per_sample,
                                                                     dtype, seed):
    data = gaussian(name, event)
    sde = data.sde
    B = 4
    t = times(sde, us, per_sample, dtype)
    x = probe_points(data, t, B, seed, dtype)
    score, eps, x0 = data.score(x, t), data.eps(x, t), data.x0(x, t)
    for out in (score, eps, x0):
        assert out.dtype == dtype and out.shape == x.shape
    lp = data.log_prob(x, t)
    assert lp.shape == (B,)
    rtol = 1e-9 if dtype == F64 else 1e-5
    xs = x.double().reshape(B, -1)
    for b, tb in enumerate(per_row(t, B)):
        mvn = marginal_mvn(sde, data.mean, data.cov, tb)
        a, s = float(sde.alpha(tb)), float(sde.sigma(tb))
        C = mvn.covariance_matrix
        assert_close(lp[b], mvn.log_prob(xs[b]), rtol=1e-10, atol=1e-10, msg="log_prob")
        ref_score = -torch.linalg.solve(C, xs[b] - a * data.mean)
        sc = float(ref_score.abs().max())
        assert_close(score[b].reshape(-1), ref_score, rtol=rtol, atol=rtol * sc, msg="score")
        assert_close(eps[b].reshape(-1), -s * ref_score, rtol=rtol, atol=rtol * s * sc, msg="eps")
        ref_x0 = data.mean + a * data.cov @ torch.linalg.solve(C, xs[b] - a * data.mean)
        assert_close(x0[b].reshape(-1), ref_x0, rtol=rtol,
                     atol=rtol * float(ref_x0.abs().max() + 1), msg="x0")
        # Tweedie: E[x0 | x_t] = (x_t + sigma^2 score) / alpha, for any data law
        tw = (xs[b] + s * s * ref_score) / a
        assert_close(x0[b].reshape(-1), tw, rtol=max(rtol, 1e-8),
                     atol=max(rtol, 1e-8) * float(xs[b].abs().max() / a + 1), msg="Tweedie")


@given(**hyp_common)
def test_gaussian_score_is_autograd_of_log_prob(name, event, us, per_sample, dtype, seed):
    data = gaussian(name, event)
    t = times(data.sde, us, per_sample, F64)
    x = probe_points(data, t, 4, seed).requires_grad_(True)
    (grad,) = torch.autograd.grad(data.log_prob(x, t).sum(), x)
    score = data.score(x.detach(), t)
    assert_close(score, grad, rtol=1e-9, atol=1e-9 * float(grad.abs().max()))
    # the per-sample time path gives the same as one call per row
    if per_sample:
        for b in range(4):
            assert_close(score[b:b + 1], data.score(x.detach()[b:b + 1], t[b]), rtol=1e-12,
                         atol=1e-14)


def test_marginal_mean_and_cov():
    data = gaussian("subvp", (3,))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    m, C = data.marginal_mean(t), data.marginal_cov(t)
    assert m.shape == (3, 3) and C.shape == (3, 3, 3)
    for b in range(3):
        mvn = marginal_mvn(data.sde, data.mean, data.cov, float(t[b]))
        assert_close(m[b], mvn.mean, rtol=1e-13)
        assert_close(C[b], mvn.covariance_matrix, rtol=1e-13)
        assert_close(data.marginal_mean(float(t[b])), mvn.mean, rtol=1e-13)
        assert_close(data.marginal_cov(float(t[b])), mvn.covariance_matrix, rtol=1e-13)


# ------------------------------------------------------------------- the flow map
@given(name=st.sampled_from(ORACLE_SDES), event=st.sampled_from(EVENTS),
       u=st.floats(0.0, 1.0), v=st.floats(0.01, 0.99), fr=st.floats(0.2, 0.8),
       seed=st.integers(0, 1000))
def test_pf_ode_drift_is_time_derivative_of_flow(name, event, u, v, fr, seed):
    """d/dt flow(x, s, t) = f(t) y - g(t)^2 score(y, t) / 2 with y = flow(x, s, t)."""
    data = gaussian(name, event)
    sde = data.sde
    s = time_at(sde, u)
    t = off_knot_time(sde, v, fr)
    if is_discrete(sde):
        h = 0.01 / sde.N
    else:
        h = min(1e-5 * (sde.T - sde.t_min), (t - sde.t_min) / 2.5, (sde.T - t) / 2.5)
    x = probe_points(data, torch.tensor(s, dtype=F64), 3, seed)
    y = data.flow(x, s, t)
    dydt = finite_diff(lambda r: data.flow(x, s, r), t, h)
    ode = ProbabilityFlowODE(sde, data.model("score"))
    drift = ode.drift(y, t)
    scale = float(drift.abs().max() + y.abs().max() * abs(float(sde.f(t))))
    assert_close(dydt, drift, rtol=1e-6, atol=1e-7 * scale,
                 msg=f"{sde!r}: d flow/dt vs PF-ODE drift")


@given(name=st.sampled_from(ORACLE_SDES), event=st.sampled_from(EVENTS),
       us=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), per_sample=st.booleans(),
       seed=st.integers(0, 1000))
def test_flow_inverse_composition_identity(name, event, us, per_sample, seed):
    data = gaussian(name, event)
    sde = data.sde
    B = 4
    if per_sample:
        g = torch.Generator().manual_seed(seed)
        s, t, r = (torch.tensor([time_at(sde, float(w)) for w in torch.rand(B, generator=g)],
                                dtype=F64) for _ in range(3))
    else:
        s, t, r = (torch.tensor(time_at(sde, u), dtype=F64) for u in us)
    x = probe_points(data, s, B, seed)
    sc = float(x.abs().max()) * max(1.0, float(sde.prior_std))
    assert_close(data.flow(x, s, s), x, rtol=1e-12, atol=1e-13 * sc, msg="flow(x, s, s)")
    y = data.flow(x, s, t)
    assert_close(data.flow(y, t, s), x, rtol=1e-9, atol=1e-10 * sc, msg="flow back")
    assert_close(data.flow(y, t, r), data.flow(x, s, r), rtol=1e-9, atol=1e-10 * sc,
                 msg="flow composes")


@pytest.mark.parametrize("name", ORACLE_SDES)
def test_flow_pushes_marginal_to_marginal(name):
    """The flow map is affine; it sends the mean to the mean and C_s to M C_s M^T = C_t,
    including across the whole range [t_min, T]."""
    data = gaussian(name, (3,))
    sde = data.sde
    for s, t in [(sde.T, sde.t_min), (sde.t_min, sde.T), (time_at(sde, 0.3), time_at(sde, 0.8))]:
        ms, mt = data.marginal_mean(s), data.marginal_mean(t)
        base = ms.expand(4, 3).clone()
        base[1:] += torch.eye(3, dtype=F64)
        out = data.flow(base, s, t)
        assert_close(out[0], mt, rtol=1e-10, atol=1e-12, msg="mean -> mean")
        M = (out[1:] - out[0]).T
        assert_close(M @ data.marginal_cov(s) @ M.T, data.marginal_cov(t), rtol=1e-8,
                     atol=1e-10 * float(data.marginal_cov(t).abs().max()), msg="C_s -> C_t")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_flow_dtype_and_shape(dtype):
    data = gaussian("vp", (1, 4, 4))
    x = torch.randn(2, 1, 4, 4, dtype=dtype)
    y = data.flow(x, 0.2, torch.tensor([0.5, 0.7]))
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, data.flow(x.double(), 0.2, torch.tensor([0.5, 0.7])), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- sampling
def check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, what: str) -> None:
    """Sample mean and covariance within ~5 standard errors of the truth."""
    n = x.shape[0]
    x = x.reshape(n, -1).double()
    var = torch.diagonal(cov)
    z_mean = (x.mean(0) - mean) / torch.sqrt(var / n)
    assert float(z_mean.abs().max()) < 5, f"{what}: mean off by {z_mean.abs().max():.2f} s.e."
    emp = torch.cov(x.T)
    se = torch.sqrt((var[:, None] * var[None, :] + cov ** 2) / n)
    z_cov = (emp - cov) / se
    assert float(z_cov.abs().max()) < 5.5, f"{what}: cov off by {z_cov.abs().max():.2f} s.e."


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm"])
def test_gaussian_marginal_sample_moments(name):
    data = gaussian(name, (3,), seed=3)
    sde = data.sde
    g = torch.Generator().manual_seed(123)
    n = 20000
    x = data.sample(n, generator=g, dtype=F64)
    assert x.shape == (n, 3) and x.dtype == F64
    check_moments(x, data.mean, data.cov, "data")
    t = time_at(sde, 0.4)
    x = data.marginal_sample(n, t, generator=g, dtype=torch.float32)
    assert x.dtype == torch.float32
    check_moments(x, data.marginal_mean(t), data.marginal_cov(t), f"marginal at {t}")
    # per-sample times: two halves at different times
    t1, t2 = time_at(sde, 0.1), time_at(sde, 0.9)
    tt = torch.tensor([t1] * (n // 2) + [t2] * (n // 2), dtype=F64)
    x = data.marginal_sample(n, tt, generator=g, dtype=F64)
    check_moments(x[: n // 2], data.marginal_mean(t1), data.marginal_cov(t1), "per-sample t1")
    check_moments(x[n // 2:], data.marginal_mean(t2), data.marginal_cov(t2), "per-sample t2")
    img = gaussian(name, (1, 4, 4), seed=3).marginal_sample(7, t, generator=g)
    assert img.shape == (7, 1, 4, 4)


def test_random_gaussian_has_requested_spectrum():
    data = GaussianData.random(make_sde("vp"), dim=8, eig_max=2.0, eig_min=1e-3, seed=5,
                               mean_scale=1.0)
    ev = torch.linalg.eigvalsh(data.cov)
    ref = torch.logspace(math.log10(1e-3), math.log10(2.0), 8, dtype=F64)
    assert_close(ev, ref, rtol=1e-10)
    assert_close(data.cov, data.cov.T, rtol=0, atol=1e-15)
    assert float(data.mean.abs().max()) > 0


# ------------------------------------------------------------------- mixtures
@given(name=st.sampled_from(ORACLE_SDES), event=st.sampled_from(EVENTS),
       us=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), per_sample=st.booleans(),
       seed=st.integers(0, 1000))
def test_gmm_against_independent_formulas(name, event, us, per_sample, seed):
    data = mixture(name, event)
    sde = data.sde
    B = 4
    t = times(sde, us, per_sample, F64)
    x = probe_points(data, t, B, seed).requires_grad_(True)
    lp = data.log_prob(x, t)
    (grad,) = torch.autograd.grad(lp.sum(), x)
    x = x.detach()
    score, x0, eps = data.score(x, t), data.x0(x, t), data.eps(x, t)
    assert_close(score, grad, rtol=1e-8, atol=1e-9 * float(grad.abs().max()),
                 msg="score vs autograd")
    xs = x.reshape(B, -1)
    for b, tb in enumerate(per_row(t, B)):
        a, s = float(sde.alpha(tb)), float(sde.sigma(tb))
        comps = [marginal_mvn(sde, c.mean, c.cov, tb) for c in data.components]
        lps = torch.stack([c.log_prob(xs[b]) for c in comps]) + torch.log(data.weights)
        assert_close(lp[b], torch.logsumexp(lps, 0), rtol=1e-10, atol=1e-10, msg="log_prob")
        r = torch.softmax(lps, 0)
        ref_x0 = sum(r[k] * (c.mean + a * c.cov @ torch.linalg.solve(comps[k].covariance_matrix,
                                                                     xs[b] - a * c.mean))
                     for k, c in enumerate(data.components))
        sc = float(ref_x0.abs().max() + 1)
        assert_close(x0[b].reshape(-1), ref_x0, rtol=1e-8, atol=1e-9 * sc, msg="x0")
        tw = (xs[b] + s * s * score[b].reshape(-1)) / a
        assert_close(x0[b].reshape(-1), tw, rtol=1e-7, atol=1e-8 * float(xs[b].abs().max() / a + 1),
                     msg="Tweedie")
        assert_close(eps[b], -s * score[b], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["vp", "ve", "edm", "ddpm"])
@pytest.mark.parametrize("event", EVENTS)
def test_single_component_gmm_equals_gaussian(name, event):
    g = gaussian(name, event, seed=7)
    m = GaussianMixtureData(g.sde, [2.5], g.mean[None], g.cov[None], event_shape=event)
    t = torch.tensor([time_at(g.sde, u) for u in (0.0, 0.2, 0.6, 1.0)], dtype=F64)
    x = probe_points(g, t, 4, 0)
    for what in ("score", "x0", "eps", "log_prob"):
        ref = getattr(g, what)(x, t)
        assert_close(getattr(m, what)(x, t), ref, rtol=1e-10,
                     atol=1e-12 * float(ref.abs().max() + 1), msg=what)


def test_gmm_covariance_forms_agree():
    sde = make_sde("vp")
    means = torch.tensor([[1.0, -1.0], [-2.0, 0.5]], dtype=F64)
    x = torch.randn(5, 2, dtype=F64)
    iso = GaussianMixtureData(sde, [1, 3], means, 0.3)
    per = GaussianMixtureData(sde, [1, 3], means, [0.3, 0.3])
    diag = GaussianMixtureData(sde, [1, 3], means, [[0.3, 0.3], [0.3, 0.3]])
    full = GaussianMixtureData(sde, [0.25, 0.75], means,
                               0.3 * torch.eye(2, dtype=F64).expand(2, 2, 2))
    ref = full.score(x, 0.3)
    for m in (iso, per, diag):
        assert_close(m.score(x, 0.3), ref, rtol=1e-12)
    assert_close(full.weights, torch.tensor([0.25, 0.75], dtype=F64), rtol=1e-15)


def test_gmm_far_from_modes_is_finite():
    """Responsibilities use log-sum-exp: far outliers and tiny times must not give NaN."""
    data = mixture("vp", (3,))
    x = torch.full((2, 3), 1e3, dtype=F64)
    x[1] *= -1
    for t in (data.sde.t_min, 0.5):
        for what in ("score", "x0", "eps", "log_prob"):
            assert bool(torch.isfinite(getattr(data, what)(x, t)).all()), what


def test_gmm_marginal_sample_moments():
    data = mixture("vp", (3,), K=3, seed=11)
    t = 0.3
    a, s = float(data.sde.alpha(t)), float(data.sde.sigma(t))
    mus = torch.stack([c.mean for c in data.components])
    m = data.weights @ mus
    second = sum(w * (c.cov + torch.outer(c.mean, c.mean))
                 for w, c in zip(data.weights, data.components))
    cov0 = second - torch.outer(m, m)
    g = torch.Generator().manual_seed(5)
    n = 20000
    check_moments(data.sample(n, generator=g, dtype=F64), m, cov0, "GMM data")
    check_moments(data.marginal_sample(n, t, generator=g, dtype=F64), a * m,
                  a * a * cov0 + s * s * torch.eye(3, dtype=F64), "GMM marginal")
    # per-sample times: two halves at different times (each sample keeps its own time)
    t2 = 0.9
    a2, s2 = float(data.sde.alpha(t2)), float(data.sde.sigma(t2))
    tt = torch.tensor([t] * (n // 2) + [t2] * (n // 2), dtype=F64)
    x = data.marginal_sample(n, tt, generator=g, dtype=F64)
    check_moments(x[: n // 2], a * m, a * a * cov0 + s * s * torch.eye(3, dtype=F64),
                  "GMM marginal per-sample t (first half)")
    check_moments(x[n // 2:], a2 * m, a2 * a2 * cov0 + s2 * s2 * torch.eye(3, dtype=F64),
                  "GMM marginal per-sample t (second half)")


# ---------------------------------------------------------------------- bad input
def test_oracle_rejects_bad_input():
    sde = make_sde("vp")
    with pytest.raises(ValueError, match=r"mean has shape \(3,\).*cov has shape \(2, 2\)"):
        GaussianData(sde, torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="cov must be symmetric"):
        GaussianData(sde, torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="cov must be positive semi-definite"):
        GaussianData(sde, torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="mean contains NaN"):
        GaussianData(sde, torch.tensor([0.0, float("nan")]), torch.ones(2))
    with pytest.raises(ValueError, match="event_shape"):
        GaussianData(sde, torch.zeros(4), torch.ones(4), event_shape=(1, 3))
    data = GaussianData(sde, torch.zeros(4), torch.ones(4), event_shape=(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(5, 4\).*\(1, 2, 2\)"):
        data.score(torch.zeros(5, 4), 0.5)
    with pytest.raises(ValueError, match=r"t=.*outside"):
        data.score(torch.zeros(5, 1, 2, 2), 1.5)
    with pytest.raises(ValueError, match="prediction"):
        data.model("denoiser")
    with pytest.raises(ValueError, match=r"weights has shape \(2,\).*means has shape \(3, 2\)"):
        GaussianMixtureData(sde, [1.0, 1.0], torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureData(sde, [1.0, -1.0], torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="covs has shape"):
        GaussianMixtureData(sde, [1.0, 1.0], torch.zeros(2, 2), torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="prediction"):
        GaussianMixtureData(sde, [1.0], torch.zeros(1, 2), 1.0).model("v")
