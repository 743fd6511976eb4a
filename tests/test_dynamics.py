"""Reverse dynamics and the one model contract: parametrisation adapters, the denoiser
interface, NFE counting and conditioning inputs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import assert_close, make_sde, random_spd, random_vector, time_at
from hypothesis import given
from hypothesis import strategies as st

from sdekit.analytic import GaussianData
from sdekit.dynamics import (
    PREDICTIONS,
    DiffusionModel,
    NFECounter,
    ProbabilityFlowODE,
    ReverseSDE,
    as_model,
    from_eps,
    to_eps,
)
from sdekit.sde import ForwardSDE

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("torch_single_thread")
# VP-type and non-VP processes (sub-VP, VE, EDM: alpha^2 + sigma^2 != 1)
DYN_SDES = ["vp", "cosine", "ddpm", "subvp", "ve", "edm", "custom_edm"]
KINDS = [k for k in PREDICTIONS if k != "flow"]  # flow needs alpha', sigma': test_flow.py
SHAPES = [(4, 2), (4, 1, 4, 4)]


def _view(x: torch.Tensor) -> tuple:
    return (-1,) + (1,) * (x.ndim - 1)


def coeffs(sde: ForwardSDE, t: torch.Tensor, x: torch.Tensor):
    """alpha, sigma broadcast against x, computed in float64 and cast to x's dtype."""
    tb = t.double().expand(x.shape[0]) if t.ndim == 0 else t.double()
    return (sde.alpha(tb).view(_view(x)).to(x.dtype), sde.sigma(tb).view(_view(x)).to(x.dtype))


def draw_times(sde: ForwardSDE, us, per_sample: bool, dtype) -> torch.Tensor:
    if per_sample:
        return torch.tensor([time_at(sde, u) for u in us], dtype=dtype)
    return torch.tensor(time_at(sde, us[0]), dtype=dtype)


_G: dict = {}


def gaussian(name: str, event=(2,)) -> GaussianData:
    key = (name, tuple(event))
    if key not in _G:
        D = math.prod(event)
        _G[key] = GaussianData(make_sde(name), random_vector(D, 1), random_spd(D, 1),
                               event_shape=event)
    return _G[key]


hyp = dict(name=st.sampled_from(DYN_SDES), shape=st.sampled_from(SHAPES),
           us=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), per_sample=st.booleans(),
           dtype=st.sampled_from([torch.float32, F64]), seed=st.integers(0, 2**16))


def rtol_for(dtype) -> float:
    return 1e-10 if dtype == F64 else 1e-4


def cond_atol(a: torch.Tensor, s: torch.Tensor, dtype, *tensors: torch.Tensor) -> torch.Tensor:
    """Per-sample absolute tolerance for conversions between parametrisations: rounding of the
    inputs is amplified by up to (1 + a/s + s/a)(1 + 1/s + s) (e.g. x0 -> score divides a
    difference of O(|x|) terms by sigma twice)."""
    a, s = a.double(), s.double()
    amp = (1 + a / s + s / a) * (1 + 1 / s + s)
    mag = 1 + sum(t.double().abs().flatten(1).max(1).values for t in tensors).view(a.shape)
    return 50 * torch.finfo(dtype).eps * amp * mag


# ------------------------------------------------------------ adapter round trips
@given(**hyp)
def test_to_eps_from_eps_are_inverse(name, shape, us, per_sample, dtype, seed):
    sde = make_sde(name)
    t = draw_times(sde, us, per_sample, dtype)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    a, s = coeffs(sde, t, x0.to(dtype))
    a64, s64 = a.double(), s.double()
    x = (a64 * x0 + s64 * eps).to(dtype)
    eps = eps.to(dtype)
    # what each parametrisation *is*, written out
    x0_true = (x.double() - s64 * eps.double()) / a64
    truth = {"eps": eps.double(), "x0": x0_true, "denoiser": x0_true,
             "v": a64 * eps.double() - s64 * x0_true, "score": -eps.double() / s64}
    for kind in KINDS:
        out = from_eps(kind, eps, x, a, s)
        assert out.dtype == dtype and out.shape == x.shape
        ref = truth[kind]
        r = rtol_for(dtype)
        assert_close(out, ref, rtol=r, atol=r * float(ref.abs().max() + 1), msg=f"from_eps {kind}")
        back = to_eps(kind, out, x, a, s)
        atol = cond_atol(a64.expand(x.shape[0], *a64.shape[1:]),
                         s64.expand(x.shape[0], *a64.shape[1:]), dtype, x, eps, ref)
        assert_close(back, eps, rtol=r, atol=atol, msg=f"to_eps(from_eps({kind}))")
        assert_close(to_eps(kind, ref.to(dtype), x, a, s), eps, rtol=r, atol=atol,
                     msg=f"to_eps {kind}")


def const_net(value: torch.Tensor):
    return lambda x, cond: value.clone()


@pytest.mark.parametrize("name", DYN_SDES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", SHAPES)
def test_predict_round_trip_for_every_pair(name, dtype, shape):
    """A network of type p, read as q, then re-read as p, gives the network's output back."""
    sde = make_sde(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=dtype) * sde.prior_std
    t = torch.tensor([time_at(sde, u) for u in (0.0, 0.25, 0.6, 1.0)], dtype=dtype)
    out = torch.randn(shape, generator=g, dtype=dtype)
    r = rtol_for(dtype)
    for p, q in itertools.product(KINDS, KINDS):
        mp = DiffusionModel(const_net(out), sde, prediction=p)
        y = mp.predict(x, t, q)
        assert y.dtype == dtype and y.shape == x.shape
        mq = DiffusionModel(const_net(y), sde, prediction=q)
        back = mq.predict(x, t, p)
        a, s = coeffs(sde, t, x.double())
        assert_close(back, out, rtol=r, atol=cond_atol(a, s, dtype, x, out, y),
                     msg=f"{p} -> {q} -> {p}")
        assert mp.nfe == 1 and mq.nfe == 1


@pytest.mark.parametrize("name", DYN_SDES)
@pytest.mark.parametrize("event", [(2,), (1, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_model_of_exact_gaussian_predictions(name, event, dtype):
    """Every pair (network type, requested type) on the exact Gaussian predictors."""
    data = gaussian(name, event)
    sde = data.sde
    t = torch.tensor([time_at(sde, u) for u in (0.0, 0.3, 0.7, 1.0)], dtype=dtype)
    x = data.marginal_sample(4, t, generator=torch.Generator().manual_seed(2), dtype=dtype)
    a, s = coeffs(sde, t, x.double())
    eps = data.eps(x, t).double()
    x0 = data.x0(x, t).double()
    truth = {"eps": eps, "x0": x0, "denoiser": x0, "score": data.score(x, t).double(),
             "v": a * eps - s * x0}
    r = rtol_for(dtype)
    for p in ("eps", "x0", "v", "score"):
        model = data.model(p)
        assert isinstance(model, DiffusionModel) and model.prediction == p
        for q in KINDS:
            out = model.predict(x, t, q)
            ref = truth[q]
            assert_close(out, ref, rtol=r, atol=cond_atol(a, s, dtype, x, ref, truth[p]),
                         msg=f"{sde!r}: model({p}).{q}")
        for q in ("eps", "x0", "v", "score"):
            assert_close(getattr(model, q)(x, t), truth[q], rtol=r,
                         atol=cond_atol(a, s, dtype, x, truth[q], truth[p]),
                         msg=f"model({p}).{q}()")
    # the v target on non-VP processes really is alpha eps - sigma x0 (not eps - ... )
    assert_close(data.model("eps").v(x, t), a * eps - s * x0, rtol=r,
                 atol=cond_atol(a, s, dtype, x, eps, x0))
    assert_close(data.model("eps")(x, t), eps, rtol=0, atol=0)


# ------------------------------------------------------------------ the denoiser
def kdiff_denoiser(data: GaussianData, calls: list):
    """k-diffusion style D(x_tilde, sigma_tilde) for Gaussian data, written independently:
    x_tilde = x0 + sigma_tilde eps, so
    E[x0 | x_tilde] = mu + Sigma (Sigma + st^2 I)^-1 (x_tilde - mu)."""
    def D(x_tilde: torch.Tensor, sigma_tilde: torch.Tensor) -> torch.Tensor:
        calls.append((x_tilde.clone(), sigma_tilde.clone()))
        B = x_tilde.shape[0]
        xs = x_tilde.double().reshape(B, -1)
        st_ = sigma_tilde.double().expand(B)
        out = []
        for b in range(B):
            C = data.cov + st_[b] ** 2 * torch.eye(data.dim, dtype=F64)
            out.append(data.mean + data.cov @ torch.linalg.solve(C, xs[b] - data.mean))
        return torch.stack(out).reshape(x_tilde.shape).to(x_tilde.dtype)
    return D


@pytest.mark.parametrize("name", DYN_SDES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_denoiser_prediction(name, dtype):
    data = gaussian(name, (1, 2, 2))
    sde = data.sde
    t = torch.tensor([time_at(sde, u) for u in (0.0, 0.4, 0.8, 1.0)], dtype=dtype)
    x = data.marginal_sample(4, t, generator=torch.Generator().manual_seed(3), dtype=dtype)
    a, s = coeffs(sde, t, x.double())
    calls: list = []
    model = DiffusionModel(kdiff_denoiser(data, calls), sde, prediction="denoiser")
    r = rtol_for(dtype)
    x0 = model.x0(x, t)
    assert model.nfe == 1
    # the network saw x / alpha and sigma_tilde = sigma / alpha, in x's dtype
    (xin, sin), = calls
    assert xin.dtype == dtype and sin.dtype == dtype and sin.shape == (4,)
    assert_close(xin, x.double() / a, rtol=r, atol=r)
    assert_close(sin, (s / a).reshape(-1), rtol=r * 10)
    assert_close(x0, data.x0(x.double(), t.double()), rtol=r * 10, atol=r * 10 * 20)
    assert_close(model.eps(x, t), data.eps(x.double(), t.double()), rtol=r * 10,
                 atol=r * 1e3 * float(a.max() / s.min()))
    assert_close(model.score(x, t), data.score(x.double(), t.double()), rtol=r * 10,
                 atol=r * 1e3 * float(a.max() / s.min() ** 2))
    assert model.nfe == 3
    # the oracle's x0 wrapped as a k-diffusion denoiser
    def oracle_D(x_tilde, sigma_tilde):
        tt = sde.t_of_sigma_tilde(sigma_tilde)
        at = sde.alpha(tt).view(_view(x_tilde)).to(x_tilde.dtype)
        return data.x0(x_tilde * at, tt)
    wrapped = DiffusionModel(oracle_D, sde, prediction="denoiser")
    assert_close(wrapped.x0(x, t), x0, rtol=r * 10, atol=r * 100)
    assert_close(wrapped.eps(x, t), model.eps(x, t), rtol=r * 10,
                 atol=r * 1e3 * float(a.max() / s.min()))
    # DiffusionModel.denoiser: the k-diffusion interface of any model
    eps_model = data.model("eps")
    x_tilde = (x.double() / a).to(dtype)
    sig = (s / a).reshape(-1).to(dtype)
    calls.clear()
    ref = kdiff_denoiser(data, calls)(x_tilde, sig)
    assert_close(eps_model.denoiser(x_tilde, sig), ref, rtol=r * 10, atol=r * 100)
    assert eps_model.nfe == 1
    assert_close(model.denoiser(x_tilde, sig), ref, rtol=r * 10, atol=r * 100)


# ---------------------------------------------------------------- reverse dynamics
@given(**hyp)
def test_reverse_sde_and_pf_ode_drifts(name, shape, us, per_sample, dtype, seed):
    data = gaussian(name, shape[1:])
    sde = data.sde
    t = draw_times(sde, us, per_sample, dtype)
    x = data.marginal_sample(shape[0], t, generator=torch.Generator().manual_seed(seed),
                             dtype=dtype)
    tb = t.double().expand(shape[0]) if t.ndim == 0 else t.double()
    f, g2 = sde.f(tb).view(_view(x)), sde.g2(tb).view(_view(x))
    score = data.score(x.double(), tb)
    for prediction in ("score", "eps", "x0", "v"):
        model = data.model(prediction)
        rev, ode = ReverseSDE(sde, model), ProbabilityFlowODE(sde, model)
        assert rev.model is model and ode.model is model
        dr, do = rev.drift(x, t), ode.drift(x, t)
        assert dr.dtype == dtype and do.dtype == dtype and dr.shape == x.shape
        assert model.nfe == 2
        r = rtol_for(dtype)
        ref_r = f * x.double() - g2 * score
        ref_o = f * x.double() - 0.5 * g2 * score
        amp = 1e3 if prediction != "score" else 10
        assert_close(dr, ref_r, rtol=r * amp, atol=r * amp * float(ref_r.abs().max() + 1),
                     msg=f"reverse SDE drift ({prediction})")
        assert_close(do, ref_o, rtol=r * amp, atol=r * amp * float(ref_o.abs().max() + 1),
                     msg=f"PF-ODE drift ({prediction})")
    assert_close(rev.diffusion(t), sde.g(t), rtol=0)
    # a raw callable is wrapped with the given prediction type
    raw = ReverseSDE(sde, lambda x, c: data.score(x, c), prediction="score")
    assert isinstance(raw.model, DiffusionModel) and raw.model.prediction == "score"


# ----------------------------------------------------------------- NFE and inputs
def test_nfe_counter_counts_one_per_network_call():
    calls = []
    net = NFECounter(lambda x, c: calls.append(1) or x)
    assert net.count == 0
    for _ in range(3):
        net(torch.zeros(2), torch.zeros(()))
    assert net.count == 3 == len(calls)
    net.reset()
    assert net.count == 0

    data = gaussian("vp")
    model = data.model("eps")
    x = torch.zeros(8, 2)
    n = 0
    for meth in ("eps", "x0", "v", "score", "__call__"):
        getattr(model, meth)(x, 0.5)
        n += 1
        assert model.nfe == n, meth
    for kind in KINDS:
        model.predict(x, torch.full((8,), 0.5), kind)
        n += 1
        assert model.nfe == n, kind
    model.denoiser(x, 0.3)
    assert model.nfe == n + 1
    big = data.model("eps")
    big.eps(torch.zeros(1000, 2), 0.5)
    assert big.nfe == 1, "one call on a batch is one function evaluation"
    ReverseSDE(data.sde, big).drift(torch.zeros(3, 2), 0.5)
    ProbabilityFlowODE(data.sde, big).drift(torch.zeros(3, 2), 0.5)
    assert big.nfe == 3
    assert "nfe=3" in repr(big)


@pytest.mark.parametrize("name", ["vp", "ddpm", "ve", "edm"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_time_inputs(name, dtype):
    sde = make_sde(name)
    seen = []

    def net(x, c):
        seen.append(c)
        return torch.zeros_like(x)

    x = torch.zeros(3, 2, dtype=dtype)
    t = torch.tensor([time_at(sde, u) for u in (0.0, 0.5, 1.0)], dtype=F64)
    expected = {
        "model_time": (t * sde.N - 1) if name == "ddpm" else t,
        "t": t,
        "sigma_tilde": sde.sigma(t) / sde.alpha(t),
        "lambda": torch.log(sde.alpha(t)) - torch.log(sde.sigma(t)),
    }
    for ti, ref in expected.items():
        seen.clear()
        DiffusionModel(net, sde, time_input=ti).eps(x, t)
        (c,) = seen
        assert c.dtype == dtype and c.shape == (3,), ti
        r = rtol_for(dtype)
        assert_close(c, ref, rtol=r, atol=r, msg=ti)
    seen.clear()
    DiffusionModel(net, sde).eps(x, t[1])  # default: model_time, scalar t broadcast per sample
    assert seen[0].shape == (3,)
    assert_close(seen[0], expected["model_time"][1].expand(3), rtol=rtol_for(dtype))
    seen.clear()
    DiffusionModel(net, sde, time_input=lambda u: 2 * u).eps(x, t)
    assert_close(seen[0], 2 * t, rtol=rtol_for(dtype))
    if name == "ddpm":
        seen.clear()
        tn = sde.timestep_to_t(torch.tensor([0, 499, 999]))
        DiffusionModel(net, sde).eps(x, tn)
        assert_close(seen[0], torch.tensor([0.0, 499.0, 999.0], dtype=F64), rtol=0,
                     atol=1e-9 if dtype == F64 else 1e-4)


def test_as_model():
    sde = make_sde("vp")
    m = DiffusionModel(lambda x, c: x, sde, prediction="x0")
    assert as_model(m, sde) is m
    w = as_model(lambda x, c: x, sde, prediction="v")
    assert isinstance(w, DiffusionModel) and w.prediction == "v" and w.sde is sde
    with pytest.raises(ValueError, match="same forward SDE"):
        as_model(m, make_sde("ve"))
    with pytest.raises(TypeError, match="model"):
        as_model(3, sde)


# ------------------------------------------------------------------- bad input
def test_bad_predictions_and_inputs():
    sde = make_sde("vp")
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"prediction='bogus'.*expected one of"):
        DiffusionModel(lambda x, c: x, sde, prediction="bogus")
    with pytest.raises(ValueError, match="prediction='bogus'"):
        to_eps("bogus", x, x, torch.ones(()), torch.ones(()))
    with pytest.raises(ValueError, match="prediction='bogus'"):
        from_eps("bogus", x, x, torch.ones(()), torch.ones(()))
    with pytest.raises(ValueError, match="prediction='bogus'"):
        DiffusionModel(lambda x, c: x, sde).predict(x, 0.5, "bogus")
    with pytest.raises(ValueError, match="time_input='bogus'"):
        DiffusionModel(lambda x, c: x, sde, time_input="bogus")
    # both used to be accepted, then fail at the first model call ('int' object is not
    # callable, 'NoneType' object has no attribute ...)
    with pytest.raises(TypeError, match="net must be a callable net"):
        DiffusionModel(5, sde)
    with pytest.raises(TypeError, match="sde must be an sdekit ForwardSDE"):
        DiffusionModel(lambda x, c: x, None)
    with pytest.raises(ValueError, match="prediction"):
        ReverseSDE(sde, lambda x, c: x, prediction="bogus")
    m = DiffusionModel(lambda x, c: x, sde)
    with pytest.raises(ValueError, match=r"t has shape \(3,\).*x has shape \(4, 2\)"):
        m.eps(x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"t has shape \(4, 1\).*x has shape \(4, 2\)"):
        m.eps(x, torch.full((4, 1), 0.5))
    bad = DiffusionModel(lambda x, c: x[:, :1], sde)
    with pytest.raises(ValueError, match=r"shape \(4, 1\).*shape \(4, 2\)"):
        bad.eps(x, 0.5)
    with pytest.raises(ValueError, match=r"t=.*outside"):
        m.eps(x, 2.0)
    with pytest.raises(ValueError, match=r"t=nan"):
        ReverseSDE(sde, m).drift(x, float("nan"))


def test_unit_alpha_is_declared_exactly_where_alpha_is_one():
    """ForwardSDE.unit_alpha (it lets a denoiser call skip x / alpha) is declared only where
    alpha is 1 at every time, and by the built-in variance-exploding processes (a custom
    schedule with alpha = 1 does not declare it: only a missed shortcut)."""
    from conftest import SDE_FACTORIES
    for name in SDE_FACTORIES:
        sde = make_sde(name)
        t = torch.linspace(sde.t_min, sde.T, 17, dtype=torch.float64)
        if sde.unit_alpha:
            assert bool((sde.alpha(t) == 1).all()), name
    assert [n for n in SDE_FACTORIES if make_sde(n).unit_alpha] == ["ve", "edm"]


def test_a_denoiser_on_a_unit_alpha_process_sees_the_state_itself():
    """On EDM / VE the denoiser's input x / alpha is x: the network gets the state tensor (no
    division pass, no copy) and the result is the one of the explicit division."""
    from sdekit.sde import EDMSDE, VPSDE
    seen = []

    def net(x, c):
        seen.append(x)
        return 0.5 * x
    x = torch.randn(4, 3)
    for sde in (EDMSDE(), VPSDE()):
        seen.clear()
        m = DiffusionModel(net, sde, "denoiser")
        out = m.x0(x, 0.5)
        a = float(sde.alpha(torch.tensor(0.5, dtype=torch.float64)))
        assert (seen[0] is x) == sde.unit_alpha
        torch.testing.assert_close(out, 0.5 * (x / a), rtol=0, atol=0)
