"""Forward SDEs: marginal consistency, inverse half-logSNR, closed forms vs generic defaults,
DDPM tables, dtypes/shapes and input validation."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    NON_VP_NAMES,
    SDE_NAMES,
    assert_close,
    custom_vp,
    ddpm_table,
    finite_diff,
    is_discrete,
    make_sde,
    off_knot_time,
    time_at,
    vp_alpha_fn,
    vp_sigma_fn,
)
from hypothesis import example, given
from hypothesis import strategies as st

from sdekit.sde import (
    EDMSDE,
    SDES,
    VESDE,
    VPSDE,
    CosineVPSDE,
    CustomSDE,
    DiscreteDDPM,
    ForwardSDE,
    SubVPSDE,
    get_sde,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("torch_single_thread")
unit = st.floats(0.0, 1.0)
inner = st.floats(0.002, 0.998)
frac = st.floats(0.2, 0.8)


def T64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=F64)


# ------------------------------------------------------------ marginal consistency
def check_marginal_consistency(sde: ForwardSDE, t: float) -> None:
    """d alpha/dt = f alpha and d sigma^2/dt = 2 f sigma^2 + g^2, against finite differences of
    the public alpha() and sigma() in float64."""
    if is_discrete(sde):
        h = 0.01 / sde.N  # stays inside one linear segment of log alpha
    else:
        h = min(1e-5 * (sde.T - sde.t_min), (t - sde.t_min) / 2.5, (sde.T - t) / 2.5)
    assert h > 0

    def alpha(s):
        return sde.alpha(T64(s))

    def sigma2(s):
        return sde.sigma(T64(s)) ** 2

    f, g2 = sde.f(T64(t)), sde.g2(T64(t))
    a, s2 = alpha(t), sigma2(t)
    assert f.dtype == F64 and g2.dtype == F64
    assert_close(finite_diff(alpha, t, h), f * a, rtol=1e-6, atol=1e-12,
                 msg=f"{sde!r}: d alpha/dt vs f alpha at t={t}")
    scale = float(max(g2.abs(), (2 * f * s2).abs(), 1e-300))
    assert_close(finite_diff(sigma2, t, h), 2 * f * s2 + g2, rtol=1e-6, atol=1e-9 * scale,
                 msg=f"{sde!r}: d sigma^2/dt vs 2 f sigma^2 + g^2 at t={t}")
    assert float(g2) >= 0
    assert_close(sde.g(T64(t)) ** 2, g2, rtol=1e-12, msg="g^2 vs g2")


@pytest.mark.parametrize("name", SDE_NAMES)
@given(u=inner, fr=frac)
def test_f_and_g2_reproduce_marginal_derivatives(name, u, fr):
    sde = make_sde(name)
    check_marginal_consistency(sde, off_knot_time(sde, u, fr))


@given(beta_min=st.floats(0.0, 5.0), delta=st.floats(0.0, 30.0), sub=st.booleans(),
       u=inner)
def test_marginal_consistency_random_vp_schedules(beta_min, delta, sub, u):
    beta_max = beta_min + delta
    if beta_max <= 0.05:
        beta_max = 0.05 + beta_min
    cls = SubVPSDE if sub else VPSDE
    sde = cls(beta_min=beta_min, beta_max=beta_max, t_min=1e-3, T=1.0)
    check_marginal_consistency(sde, time_at(sde, u))


@given(sigma_min=st.floats(1e-3, 1.0), log_ratio=st.floats(0.7, 9.0), edm=st.booleans(),
       u=inner)
def test_marginal_consistency_random_ve_schedules(sigma_min, log_ratio, edm, u):
    sigma_max = sigma_min * math.exp(log_ratio)
    sde = (EDMSDE(sigma_min, sigma_max) if edm else VESDE(sigma_min, sigma_max))
    check_marginal_consistency(sde, time_at(sde, u))


@given(seed=st.integers(0, 2**16), n=st.integers(2, 64), u=unit, fr=frac)
def test_marginal_consistency_random_ddpm_tables(seed, n, u, fr):
    g = torch.Generator().manual_seed(seed)
    betas = torch.sort(torch.rand(n, generator=g, dtype=F64) * 0.3 + 1e-4).values
    sde = DiscreteDDPM(betas=betas)
    check_marginal_consistency(sde, off_knot_time(sde, u, fr))
    # on a segment, f is the constant slope of log alpha: N/2 log(1 - beta_{n+1})
    t = off_knot_time(sde, u, fr)
    k = int(t * n - 1)
    assert_close(sde.f(t), 0.5 * n * math.log1p(-float(betas[k + 1])), rtol=1e-10,
                 msg="DDPM f on a segment")


# ------------------------------------------------------------- schedule formulas
@pytest.mark.parametrize("name", SDE_NAMES)
def test_schedule_definitions(name):
    """Each process's alpha and sigma against the formula it documents."""
    sde = make_sde(name)
    t = torch.linspace(sde.t_min, sde.T, 101, dtype=F64)
    a, s = sde.alpha(t), sde.sigma(t)
    assert bool((a > 0).all() and (s > 0).all())
    if name in ("vp", "custom_vp", "vp_const_beta"):
        b0, b1 = (2.0, 2.0) if name == "vp_const_beta" else (0.1, 20.0)
        assert_close(a, vp_alpha_fn(b0, b1)(t), rtol=1e-13)
        assert_close(s, vp_sigma_fn(b0, b1)(t), rtol=1e-12)
    elif name == "subvp":
        assert_close(a, vp_alpha_fn()(t), rtol=1e-13)
        assert_close(s, 1 - a * a, rtol=1e-12)
    elif name == "cosine":
        ns = 0.008
        ref = torch.cos(math.pi / 2 * (t + ns) / (1 + ns)) / math.cos(math.pi / 2 * ns / (1 + ns))
        assert_close(a, ref, rtol=1e-12)
    elif name == "ve":
        assert_close(a, torch.ones_like(t), rtol=0)
        assert_close(s, 0.01 * (50.0 / 0.01) ** t, rtol=1e-12)
    elif name in ("edm", "custom_edm"):
        assert_close(a, torch.ones_like(t), rtol=0)
        assert_close(s, t, rtol=1e-14)
    if name not in NON_VP_NAMES:
        assert_close(a * a + s * s, torch.ones_like(t), rtol=1e-12, msg="VP: alpha^2 + sigma^2")
    lam = sde.lambda_(t)
    assert bool((lam[1:] < lam[:-1]).all()), "lambda must be strictly decreasing"
    assert_close(lam, torch.log(a) - torch.log(s), rtol=1e-12, atol=1e-12)
    assert_close(sde.sigma_tilde(t), s / a, rtol=1e-12)
    assert_close(sde.lambda_min, lam[-1], rtol=1e-12, atol=1e-12)
    assert_close(sde.lambda_max, lam[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ inverse half-logSNR
def t_tolerance(sde: ForwardSDE) -> float:
    return 1e-9 * (sde.T - sde.t_min) + 1e-12


@pytest.mark.parametrize("name", SDE_NAMES)
@given(u=unit)
@example(u=0.0)
@example(u=1.0)
@example(u=1e-12)
@example(u=1 - 1e-12)
@example(u=1e-6)
@example(u=1 - 1e-6)
def test_t_of_lambda_inverts_lambda(name, u):
    sde = make_sde(name)
    t = T64(time_at(sde, u))
    t2 = sde.t_of_lambda(sde.lambda_(t))
    assert t2.dtype == F64
    assert abs(float(t2 - t)) <= t_tolerance(sde), f"{sde!r}: t={float(t)!r} -> {float(t2)!r}"


@pytest.mark.parametrize("name", SDE_NAMES)
@given(u=unit)
@example(u=0.0)
@example(u=1.0)
@example(u=1e-9)
@example(u=1 - 1e-9)
def test_lambda_of_t_of_lambda(name, u):
    sde = make_sde(name)
    lo, hi = sde.lambda_min, sde.lambda_max
    lam = T64(hi if u >= 1 else lo + u * (hi - lo))
    t = sde.t_of_lambda(lam)
    assert sde.t_min <= float(t) <= sde.T
    assert_close(sde.lambda_(t), lam, rtol=1e-9, atol=1e-9, msg=f"{sde!r}: lambda(t(lambda))")


@pytest.mark.parametrize("name", SDE_NAMES)
def test_t_of_lambda_vectorised_and_float32_ends(name):
    """Per-sample lambdas, and float32 times at both ends: lambda_ rounds its float32 output,
    which must not be rejected by t_of_lambda as out of range."""
    sde = make_sde(name)
    t = torch.tensor([sde.t_min, time_at(sde, 1e-4), time_at(sde, 0.3), time_at(sde, 0.97), sde.T],
                     dtype=torch.float32)
    lam = sde.lambda_(t)
    assert lam.dtype == torch.float32 and lam.shape == t.shape
    t2 = sde.t_of_lambda(lam)
    assert t2.dtype == torch.float32 and t2.shape == t.shape
    lam2 = sde.lambda_(t2.double())
    assert_close(lam2, lam, rtol=1e-5, atol=1e-5, msg=f"{sde!r}: float32 round trip")
    assert_close(t2, t, rtol=1e-4, atol=1e-5 * (sde.T - sde.t_min), msg=f"{sde!r}: float32 t")
    # sigma_tilde round trip (the k-diffusion interface)
    st_ = sde.sigma_tilde(t)
    assert_close(sde.t_of_sigma_tilde(st_), t, rtol=1e-4, atol=1e-5 * (sde.T - sde.t_min))


# -------------------------------------------------- closed forms vs generic defaults
def generic_f_g2(sde: ForwardSDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f and g^2 from autograd of _log_alpha and _log_sigma only (no override involved)."""
    with torch.enable_grad():
        tt = t.clone().requires_grad_(True)
        la = sde._log_alpha(tt) + 0 * tt
        s2 = torch.exp(2 * sde._log_sigma(tt))
        (f,) = torch.autograd.grad(la.sum(), tt)
        (ds2,) = torch.autograd.grad(s2.sum(), tt)
    return f, ds2 - 2 * f * s2.detach()


OVERRIDING = [n for n in SDE_NAMES if not n.startswith("custom")]


@pytest.mark.parametrize("name", OVERRIDING)
def test_sde_has_closed_forms(name):
    sde = make_sde(name)
    for meth in ("_f", "_g2", "_t_of_lambda"):
        assert getattr(type(sde), meth) is not getattr(ForwardSDE, meth), f"{name}.{meth}"


@pytest.mark.parametrize("name", OVERRIDING)
@given(u=unit)
@example(u=0.0)
@example(u=1.0)
def test_closed_form_f_g2_match_generic_autograd(name, u):
    sde = make_sde(name)
    t = T64([time_at(sde, u), time_at(sde, 1 - u)])
    f_ref, g2_ref = generic_f_g2(sde, t)
    assert_close(sde._f(t), f_ref, rtol=1e-9, atol=1e-12, msg=f"{sde!r}: f")
    assert_close(ForwardSDE._f(sde, t), f_ref, rtol=1e-12, atol=1e-14, msg="ForwardSDE._f")
    assert_close(sde._g2(t), g2_ref, rtol=1e-8, atol=1e-10 * float(g2_ref.abs().max()),
                 msg=f"{sde!r}: g2")


@pytest.mark.parametrize("name", OVERRIDING)
@given(u=unit)
@example(u=0.0)
@example(u=1.0)
def test_closed_form_t_of_lambda_matches_bisection(name, u):
    sde = make_sde(name)
    lo, hi = sde.lambda_min, sde.lambda_max
    lam = T64([lo + u * (hi - lo), hi - u * (hi - lo)]).clamp(lo, hi)
    assert_close(sde._t_of_lambda(lam), ForwardSDE._t_of_lambda(sde, lam), rtol=0,
                 atol=t_tolerance(sde), msg=f"{sde!r}: t_of_lambda")


# --------------------------------------------------------------------- CustomSDE
@given(u=unit)
@example(u=0.0)
@example(u=1.0)
def test_custom_sde_matches_vpsde(u):
    vp, cu = make_sde("vp"), custom_vp()
    t = T64([time_at(vp, u), time_at(vp, 1 - u), 0.5])
    for meth in ("alpha", "sigma", "f", "g2", "lambda_", "sigma_tilde"):
        assert_close(getattr(cu, meth)(t), getattr(vp, meth)(t), rtol=1e-9, atol=1e-12,
                     msg=f"CustomSDE vs VPSDE: {meth}")
    lam = vp.lambda_(t)
    assert_close(cu.t_of_lambda(lam), vp.t_of_lambda(lam), rtol=0, atol=1e-9)
    assert cu.prior_std == 1.0


def test_custom_sde_constant_alpha_matches_edm():
    """alpha = ones_like(t) has no autograd graph: f must be 0, not an autograd error."""
    cu, edm = make_sde("custom_edm"), make_sde("edm")
    t = T64([0.002, 0.5, 3.0, 80.0])
    for meth in ("f", "g2", "lambda_", "sigma"):
        assert_close(getattr(cu, meth)(t), getattr(edm, meth)(t), rtol=1e-10, atol=1e-14,
                     msg=f"CustomSDE vs EDMSDE: {meth}")
    lam = edm.lambda_(t)
    assert_close(cu.t_of_lambda(lam), t, rtol=1e-9)
    # default prior_std: sqrt(alpha_T^2 + sigma_T^2)
    assert_close(cu.prior_std, math.sqrt(1 + 80.0 ** 2), rtol=1e-12)


# ----------------------------------------------------------------- DiscreteDDPM
def _ddpm_cases():
    lin = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    n = torch.arange(1001, dtype=F64) / 1000
    abar = torch.cos((n + 0.008) / 1.008 * math.pi / 2) ** 2
    cos = torch.cumprod(1 - (1 - abar[1:] / abar[:-1]).clamp(max=0.999), 0)
    return [("ddpm", lin), ("ddpm_squaredcos", cos), ("ddpm_table", ddpm_table())]


@pytest.mark.parametrize("name,table", _ddpm_cases(), ids=["linear", "squaredcos", "table"])
def test_ddpm_reproduces_table_at_grid_points(name, table):
    sde = make_sde(name)
    N = table.numel()
    assert sde.N == N and sde.t_min == 1 / N and sde.T == 1.0
    n = torch.arange(N)
    t_n = (n + 1).double() / N
    assert_close(sde.alpha(t_n) ** 2, table, rtol=1e-11, msg="alpha(t_n)^2 vs alphas_cumprod")
    assert_close(sde.sigma(t_n) ** 2, 1 - table, rtol=1e-9, msg="sigma(t_n)^2")
    assert_close(sde.alphas_cumprod, table, rtol=1e-12)
    assert_close(sde.model_time(t_n), n.double(), rtol=0, atol=1e-9, msg="model_time(t_n)")
    assert_close(sde.timestep_to_t(n), t_n, rtol=1e-15, msg="timestep_to_t(n)")
    # t_of_lambda lands on the knots
    assert_close(sde.t_of_lambda(sde.lambda_(t_n)), t_n, rtol=0, atol=1e-12)
    # log alpha is linear between knots: the midpoint gets the mean of the neighbours
    mid = (t_n[:-1] + t_n[1:]) / 2
    la = 0.5 * torch.log(table)
    assert_close(sde.log_alpha(mid), (la[:-1] + la[1:]) / 2, rtol=1e-11, atol=1e-14,
                 msg="log-linear interpolation")


@pytest.mark.parametrize("name", ["ddpm", "ddpm_table", "ddpm_squaredcos"])
@given(u=unit, k=st.integers(0, 10**6))
def test_ddpm_timestep_round_trip(name, u, k):
    sde = make_sde(name)
    t = T64(time_at(sde, u))
    assert_close(sde.timestep_to_t(sde.model_time(t)), t, rtol=1e-13, atol=1e-15)
    n = k % sde.N
    assert_close(sde.model_time(sde.timestep_to_t(n)), T64(float(n)), rtol=0, atol=1e-9)
    m = sde.model_time(t)
    assert 0 <= float(m) <= sde.N - 1


@given(seed=st.integers(0, 2**16), n=st.integers(2, 40), u=unit)
def test_ddpm_betas_and_alphas_cumprod_give_same_process(seed, n, u):
    g = torch.Generator().manual_seed(seed)
    betas = torch.rand(n, generator=g, dtype=F64) * 0.2 + 1e-3
    a = DiscreteDDPM(betas=betas)
    b = DiscreteDDPM(alphas_cumprod=torch.cumprod(1 - betas, 0))
    c = DiscreteDDPM(betas=betas.tolist())  # plain Python lists are accepted too
    assert a.N == b.N == c.N == n
    t = T64([time_at(a, u), time_at(a, 1 - u), a.t_min, a.T])
    for meth in ("alpha", "sigma", "f", "g2", "lambda_", "model_time"):
        ra = getattr(a, meth)(t)
        assert_close(getattr(b, meth)(t), ra, rtol=1e-10, atol=1e-12, msg=meth)
        assert_close(getattr(c, meth)(t), ra, rtol=0, atol=0, msg=meth)
    lam = a.lambda_(t)
    assert_close(b.t_of_lambda(lam), a.t_of_lambda(lam), rtol=0, atol=1e-11)


def test_ddpm_default_is_ho_et_al_linear_table():
    sde = DiscreteDDPM()
    assert sde.N == 1000
    ref = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    assert_close(sde.alphas_cumprod, ref, rtol=1e-12)
    small = DiscreteDDPM(num_timesteps=10, beta_start=0.1, beta_end=0.5)
    assert small.N == 10
    assert_close(small.alphas_cumprod,
                 torch.cumprod(1 - torch.linspace(0.1, 0.5, 10, dtype=F64), 0), rtol=1e-12)


# ----------------------------------------------------------------- dtypes / shapes
@pytest.mark.parametrize("name", SDE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_of_outputs(name, dtype):
    sde = make_sde(name)
    tb = torch.linspace(sde.t_min, sde.T, 5, dtype=F64)
    for meth in ("alpha", "sigma", "log_alpha", "log_sigma", "lambda_", "sigma_tilde", "f",
                 "g2", "g", "model_time"):
        ref = getattr(sde, meth)(tb)
        out = getattr(sde, meth)(tb.to(dtype))
        assert out.dtype == dtype and out.shape == (5,), meth
        assert_close(out, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6, msg=meth)
        scalar = getattr(sde, meth)(float(tb[2]))
        assert scalar.dtype == F64 and scalar.shape == (), meth
        assert_close(scalar, ref[2], rtol=1e-12, msg=meth)


@pytest.mark.parametrize("name", SDE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 2), (4, 1, 4, 4)])
def test_drift_and_marginal_sample_per_sample_times(name, dtype, shape):
    sde = make_sde(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.tensor([time_at(sde, u) for u in (0.0, 0.3, 0.7, 1.0)], dtype=dtype)
    view = (-1,) + (1,) * (len(shape) - 1)
    d = sde.drift(x, t)
    assert d.dtype == dtype and d.shape == x.shape
    assert_close(d, sde.f(t.double()).view(view) * x.double(), rtol=1e-5, atol=1e-6)
    xt, n_out = sde.marginal_sample(x, t, noise=noise)
    assert xt.dtype == dtype and n_out is noise
    ref = (sde.alpha(t.double()).view(view) * x.double()
           + sde.sigma(t.double()).view(view) * noise.double())
    assert_close(xt, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # one scalar time == that time repeated per sample
    assert_close(sde.drift(x, t[1]), sde.drift(x, t[1].expand(4)), rtol=0, atol=0)
    xt2, _ = sde.marginal_sample(x, t[1], noise=noise)
    xt3, _ = sde.marginal_sample(x, t[1].expand(4), noise=noise)
    assert_close(xt2, xt3, rtol=0, atol=0)
    assert_close(sde.diffusion(t), sde.g(t), rtol=0)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior(name):
    sde = make_sde(name)
    expected_std = {"ve": 50.0, "edm": 80.0, "custom_edm": math.sqrt(1 + 80.0 ** 2)}.get(name, 1.0)
    assert_close(sde.prior_std, expected_std, rtol=1e-12)
    # the prior matches the marginal at T for unit-variance data to within the schedule's clipping
    a, s = float(sde.alpha(sde.T)), float(sde.sigma(sde.T))
    assert abs(sde.prior_std - math.sqrt(a * a + s * s)) <= 1e-3 * sde.prior_std
    z = sde.prior_sample((4000, 3), generator=torch.Generator().manual_seed(1), dtype=F64)
    assert z.shape == (4000, 3) and z.dtype == F64
    assert abs(float(z.std()) / sde.prior_std - 1) < 5 / math.sqrt(2 * z.numel())
    x = torch.randn(5, 1, 2, 2, dtype=F64) * sde.prior_std
    ref = torch.distributions.Normal(T64(0.0), T64(sde.prior_std)).log_prob(x).flatten(1).sum(1)
    assert_close(sde.prior_logp(x), ref, rtol=1e-12)


def test_get_sde_builds_every_registered_process():
    assert set(SDES) == {"vp", "cosine", "subvp", "ve", "edm", "ddpm", "flow", "trigflow"}
    for name, cls in SDES.items():
        assert type(get_sde(name)) is cls
    vp = get_sde("vp", beta_min=0.2, beta_max=10.0)
    assert (vp.beta_min, vp.beta_max) == (0.2, 10.0)
    assert get_sde("ddpm", num_timesteps=20).N == 20


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize("build,match", [
    (lambda: VPSDE(beta_min=1.0, beta_max=0.5), "beta_max"),
    (lambda: SubVPSDE(beta_min=1.0, beta_max=0.5), "beta_max"),
    (lambda: VPSDE(beta_min=-0.1), "beta_min"),
    (lambda: VPSDE(beta_min=float("nan")), "beta_min"),
    (lambda: VPSDE(beta_max=float("inf")), "beta_max"),
    (lambda: VPSDE(t_min=0.0), "t_min"),
    (lambda: VPSDE(t_min=0.5, T=0.4), "t_min"),
    (lambda: CosineVPSDE(T=1.0), "T"),
    (lambda: CosineVPSDE(s=0.0), "s"),
    (lambda: VESDE(sigma_min=0.0), "sigma_min"),
    (lambda: VESDE(sigma_min=-1.0), "sigma_min"),
    (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
    (lambda: EDMSDE(sigma_min=0.0), "sigma_min"),
    (lambda: EDMSDE(sigma_min=-0.002), "sigma_min"),
    (lambda: EDMSDE(sigma_data=0.0), "sigma_data"),
    (lambda: EDMSDE(sigma_min=1.0, sigma_max=1.0), "sigma_max"),
    (lambda: DiscreteDDPM(betas=[0.1, 1.0, 0.2]), r"betas\[1\]"),
    (lambda: DiscreteDDPM(betas=[0.1, 0.0]), r"betas\[1\]"),
    (lambda: DiscreteDDPM(betas=[-0.1, 0.2]), r"betas\[0\]"),
    (lambda: DiscreteDDPM(betas=[0.1, float("nan")]), "betas"),
    (lambda: DiscreteDDPM(betas=[0.1]), "betas"),
    (lambda: DiscreteDDPM(alphas_cumprod=[0.9, 0.95, 0.5]), "alphas_cumprod"),
    (lambda: DiscreteDDPM(alphas_cumprod=[0.9, 0.9]), "alphas_cumprod"),
    (lambda: DiscreteDDPM(alphas_cumprod=[0.9, float("nan"), 0.1]), "alphas_cumprod"),
    (lambda: DiscreteDDPM(alphas_cumprod=[1.0, 0.5]), "alphas_cumprod"),
    (lambda: DiscreteDDPM(alphas_cumprod=[0.5, 0.0, 0.0]), "alphas_cumprod"),
    (lambda: DiscreteDDPM(betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.7]), "alphas_cumprod"),
    (lambda: DiscreteDDPM(num_timesteps=1), "num_timesteps"),
    (lambda: get_sde("bogus"), "bogus"),
    (lambda: CustomSDE(lambda t: torch.ones_like(t), lambda t: 2.0 - t, 0.1, 1.0), "lambda"),
    (lambda: CustomSDE(lambda t: torch.exp(-(t - 0.5) ** 2), lambda t: torch.ones_like(t),
                       0.0, 1.0), "lambda"),
    (lambda: CustomSDE(lambda t: torch.ones_like(t), lambda t: t - 0.5, 0.0, 1.0), "sigma"),
    (lambda: CustomSDE(lambda t: torch.ones_like(t)[:-1], lambda t: t, 0.1, 1.0), "alpha"),
    (lambda: CustomSDE(lambda t: torch.ones_like(t), lambda t: t, 1.0, 0.1), "t_min"),
    # accepted, then the prior draw ended in torch's "unsupported operand" (or sampled with a
    # negative scale)
    (lambda: CustomSDE(lambda t: torch.ones_like(t), lambda t: t, 0.1, 1.0, prior_std=-1.0),
     "prior_std=-1.0 is invalid"),
    (lambda: CustomSDE(lambda t: torch.ones_like(t), lambda t: t, 0.1, 1.0, prior_std="1"),
     "prior_std='1' is invalid"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_invalid_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("name", ["betas", "alphas_cumprod"])
def test_discrete_table_of_no_numbers_is_refused_by_name(name):
    """It used to end in torch's "new(): invalid data type 'str'"."""
    with pytest.raises(TypeError, match=f"{name}='x' is invalid: expected a 1-D table"):
        DiscreteDDPM(**{name: "x"})


def test_get_sde_error_lists_valid_names():
    with pytest.raises(ValueError, match=r"name.*'bogus'.*\['cosine', 'ddpm'"):
        get_sde("bogus")


@pytest.mark.parametrize("name", SDE_NAMES)
def test_time_outside_range_is_rejected(name):
    sde = make_sde(name)
    span = sde.T - sde.t_min
    for bad in (sde.T + 0.01 * span, sde.t_min - 0.01 * span, float("nan"), float("inf")):
        for meth in (sde.alpha, sde.sigma, sde.f, sde.g2, sde.lambda_, sde.model_time):
            with pytest.raises(ValueError, match=r"t=.*outside the time range"):
                meth(bad)
        with pytest.raises(ValueError, match=r"t=.*outside"):
            sde.alpha(torch.tensor([time_at(sde, 0.5), bad]))
        x = torch.zeros(2, 3)
        with pytest.raises(ValueError, match="t="):
            sde.drift(x, torch.tensor([time_at(sde, 0.5), bad]))
    for bad in (sde.lambda_max + 0.01 * (sde.lambda_max - sde.lambda_min) + 1e-3,
                sde.lambda_min - 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"lambda=.*half-logSNR range"):
            sde.t_of_lambda(bad)
    with pytest.raises(ValueError, match="sigma_tilde"):
        sde.t_of_sigma_tilde(torch.tensor([1.0, 0.0]))


def test_noise_shape_mismatch_names_both_shapes():
    sde = make_sde("vp")
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3, 4\)|\(3, 4\).*\(3, 2\)"):
        sde.marginal_sample(torch.zeros(3, 4), 0.5, noise=torch.zeros(3, 2))


def test_timestep_out_of_range():
    sde = make_sde("ddpm")
    for bad in (-1, 1000, float("nan")):
        with pytest.raises(ValueError, match="timestep"):
            sde.timestep_to_t(bad)
