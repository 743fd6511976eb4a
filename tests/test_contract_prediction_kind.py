"""The model contract (issue 13, section 2): a prediction kind is one registration in
sdekit/dynamics/parameterization.py that every solver, the losses and the checks pick up; solvers
hand the model their precomputed coefficients; one time-input dispatch; the solvers' drift
formulas are those of ReverseSDE and ProbabilityFlowODE."""
from __future__ import annotations

import pytest
import torch

import sdekit
from sdekit.dynamics import (
    KINDS,
    PREDICTIONS,
    Coeffs,
    PredictionKind,
    ProbabilityFlowODE,
    ReverseSDE,
    convert,
    register_prediction,
    time_cond,
)
from sdekit.solvers import get_solver, solver_names
from sdekit.training.losses import DSMLoss

F64 = torch.float64

# a toy kind, defined here and nowhere else: d = eps - x0 (rectified flow's velocity, but for any
# forward SDE). From x = alpha x0 + sigma eps: x0 = (x - sigma d) / (alpha + sigma),
# eps = (x + alpha d) / (alpha + sigma); finite at alpha = 0.
DIFF = PredictionKind(
    "diff",
    to_x0=lambda out, x, c: (x - c.sigma * out) / (c.alpha + c.sigma),
    to_eps=lambda out, x, c: (x + c.alpha * out) / (c.alpha + c.sigma),
    from_x0_eps=lambda x0, eps, x, c: eps() - x0(),
    linear_form="x0", x0_at_alpha_zero=True)


@pytest.fixture
def diff_kind():
    register_prediction(DIFF)
    yield DIFF
    KINDS.pop(DIFF.name)


def _models(data):
    """The exact eps model and the same predictor as a ``diff`` network."""
    eps_model = data.model("eps")

    def net(x, t):
        return (data.eps(x, t).double() - data.x0(x, t).double()).to(x.dtype)

    return eps_model, sdekit.DiffusionModel(net, data.sde, "diff", time_input="t")


NAMES = [n for n in solver_names() if not get_solver(n).grid_free]


@pytest.mark.parametrize("name", NAMES)
def test_a_kind_registered_in_a_test_is_picked_up_by_every_solver(name, diff_kind):
    """Every solver samples a ``diff`` network as it samples the same predictor as an eps
    network (same seeds: the same noise), with no edit outside this test."""
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData(sde, torch.linspace(-1, 1, 3), torch.linspace(0.3, 1.5, 3))
    eps_model, diff_model = _models(data)
    s = get_solver(name)
    steps = max(6, s.min_steps)
    ref = sdekit.sample(sde, eps_model, shape=(4, 3), solver=name, steps=steps, dtype=F64, seed=5)
    got = sdekit.sample(sde, diff_model, shape=(4, 3), solver=name, steps=steps, dtype=F64,
                        seed=5)
    tol = 1e-6 if s.adaptive else 1e-10   # adaptive: step choices agree to the tolerance
    torch.testing.assert_close(got.x, ref.x, rtol=tol, atol=tol)
    assert got.nfe == ref.nfe or s.adaptive


def test_a_registered_kind_starts_at_alpha_zero_as_its_flag_says(diff_kind):
    """``x0_at_alpha_zero`` decides whether a solve may start where alpha = 0 (flow matching's
    t = 1); the kind's name appears nowhere in the solvers."""
    sde = sdekit.FlowSDE()
    data = sdekit.GaussianData(sde, torch.zeros(2), torch.tensor([0.5, 1.5]))
    _, diff_model = _models(data)
    xT = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = sdekit.sample(sde, data.model("flow"), xT, solver="dpmpp_2m", steps=8)
    got = sdekit.sample(sde, diff_model, xT, solver="dpmpp_2m", steps=8)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-10, atol=1e-10)
    eps_like = PredictionKind("eps_twice", to_x0=lambda o, x, c: (x - c.sigma * o / 2) / c.alpha,
                              to_eps=lambda o, x, c: o / 2,
                              from_x0_eps=lambda x0, eps, x, c: 2 * eps())
    register_prediction(eps_like)
    try:
        model = sdekit.DiffusionModel(lambda x, t: 2 * data.eps(x, t), sde, "eps_twice",
                                      time_input="t")
        with pytest.raises(ValueError, match="eps_twice.*cannot be sampled from"):
            sdekit.sample(sde, model, xT, solver="dpmpp_2m", steps=8)
    finally:
        KINDS.pop("eps_twice")


# (the likelihood weighting samples lambda uniformly: not on FlowSDE, whose lambda reaches -inf)
@pytest.mark.parametrize("sde_name,loss", [("vp", "eps"), ("vp", "likelihood"), ("vp", "edm"),
                                           ("vp", "flow"), ("flow", "eps"), ("flow", "edm"),
                                           ("flow", "flow")])
def test_a_registered_kind_is_picked_up_by_the_losses(loss, sde_name, diff_kind):
    sde = sdekit.VPSDE() if sde_name == "vp" else sdekit.FlowSDE()
    data = sdekit.GaussianData(sde, torch.linspace(-1, 1, 3), torch.linspace(0.3, 1.5, 3))
    eps_model, diff_model = _models(data)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 3, generator=g, dtype=F64)
    noise = torch.randn(16, 3, generator=g, dtype=F64)
    ref_loss = DSMLoss(sde, loss, prediction="eps", time_input="t")
    t = ref_loss.sample_t(16, torch.Generator().manual_seed(2))
    ref = ref_loss.per_sample(eps_model.net.fn, x0, t, noise)
    got = DSMLoss(sde, loss, prediction="diff", time_input="t").per_sample(
        diff_model.net.fn, x0, t, noise)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert "diff" in PREDICTIONS


def test_kind_names_are_a_live_view_and_a_name_is_registered_once(diff_kind):
    assert tuple(PREDICTIONS)[-1] == "diff" and PREDICTIONS == tuple(KINDS)
    with pytest.raises(ValueError, match="'diff' is already registered"):
        register_prediction(DIFF)
    with pytest.raises(ValueError, match="linear_form='v' is invalid"):
        register_prediction(PredictionKind("bad", DIFF.to_x0, DIFF.to_eps, DIFF.from_x0_eps,
                                           linear_form="v"))
    with pytest.raises(ValueError, match="values_of='w' is invalid"):
        register_prediction(PredictionKind("bad", DIFF.to_x0, DIFF.to_eps, DIFF.from_x0_eps,
                                           values_of="w"))
    with pytest.raises(ValueError, match="name='a b' is invalid"):
        register_prediction(PredictionKind("a b", DIFF.to_x0, DIFF.to_eps, DIFF.from_x0_eps))
    assert "bad" not in PREDICTIONS
    with pytest.raises(ValueError, match=r"prediction='nope' is invalid: expected one of \("):
        sdekit.DiffusionModel(lambda x, t: x, sdekit.VPSDE(), "nope")


@pytest.mark.parametrize("prediction", ["x0", "v", "score", "flow"])
def test_predict_converts_with_the_given_coefficients_without_evaluating_the_sde(prediction,
                                                                                 monkeypatch):
    """With ``coeffs`` (a solver's precomputed alpha, sigma) the conversion evaluates nothing of
    the SDE; its result is the conversion with those numbers."""
    sde = sdekit.VPSDE()
    model = sdekit.DiffusionModel(lambda x, t: torch.sin(x), sde, prediction, time_input="t")
    x = torch.randn(4, 3, dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    dots = (sde.alpha_dot(t), sde.sigma_dot(t)) if prediction == "flow" else (None, None)
    model.raw(x, t)   # the network's conditioning is cached per time, as before
    calls = {"n": 0}
    for name in ("alpha", "sigma", "alpha_dot", "sigma_dot"):
        fn = getattr(sde, name)
        monkeypatch.setattr(sde, name, lambda u, fn=fn: (calls.__setitem__("n", calls["n"] + 1),
                                                         fn(u))[1])
    got = model.predict(x, t, "eps", coeffs=Coeffs(a, s, *dots))
    assert calls["n"] == 0
    want = convert(prediction, "eps", torch.sin(x), x, torch.tensor(a, dtype=F64),
                   torch.tensor(s, dtype=F64), *dots)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, model.predict(x, t, "eps"), rtol=1e-12, atol=1e-12)
    assert calls["n"] > 0   # without coefficients they come from the SDE


def test_the_losses_use_the_samplers_time_input_dispatch():
    """One time-input dispatch (``time_cond``): the loss accepts every time input the model
    does (``t1000`` was rejected) and conditions the network with the same values."""
    sde = sdekit.DiscreteDDPM()
    seen = {}

    def net(x, c):
        seen["cond"] = c
        return torch.zeros_like(x)

    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    for ti in ("lambda", "t", "model_time", "sigma_tilde", "t1000"):
        DSMLoss(sde, "eps", time_input=ti).per_sample(net, torch.zeros(3, 2, dtype=F64), t,
                                                      torch.zeros(3, 2, dtype=F64))
        torch.testing.assert_close(seen["cond"], time_cond(sde, ti, t))
    with pytest.raises(ValueError, match="time_input='tau' is invalid"):
        DSMLoss(sde, "eps", time_input="tau")


@pytest.mark.parametrize("name,cls,method", [
    ("euler_maruyama", ReverseSDE, "drift"), ("torchsde", ReverseSDE, "drift"),
    ("euler", ProbabilityFlowODE, "drift_lambda"), ("rk4", ProbabilityFlowODE, "drift_lambda"),
    ("dopri5", ProbabilityFlowODE, "drift_lambda")])
def test_the_solvers_drifts_are_the_reverse_dynamics_objects(name, cls, method, monkeypatch):
    """The reverse SDE's and the PF-ODE's drift live once, in sdekit/dynamics/reverse.py: the
    solvers call them (one call per model evaluation)."""
    if name.startswith("torchsde"):
        pytest.importorskip("torchsde")
    if name == "dopri5":
        pytest.importorskip("torchdiffeq")
    calls = {"n": 0}
    fn = getattr(cls, method)

    def counted(self, *a, **k):
        calls["n"] += 1
        return fn(self, *a, **k)

    monkeypatch.setattr(cls, method, counted)
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData(sde, torch.zeros(2), torch.ones(2))
    sol = sdekit.sample(sde, data.model(), shape=(3, 2), solver=name, steps=5, dtype=F64, seed=0)
    assert calls["n"] == sol.nfe > 0


def test_reverse_dynamics_without_a_model_need_the_noise_prediction():
    sde = sdekit.VPSDE()
    x, t = torch.zeros(2, 3), torch.tensor(0.5, dtype=F64)
    with pytest.raises(ValueError, match="ReverseSDE was built without a model"):
        ReverseSDE(sde).drift(x, t)
    with pytest.raises(ValueError, match="ProbabilityFlowODE was built without a model"):
        ProbabilityFlowODE(sde).drift_lambda(x, t)
    eps = torch.ones(2, 3)
    rev, ode = ReverseSDE(sde).drift(x, t, eps), ProbabilityFlowODE(sde).drift(x, t, eps)
    torch.testing.assert_close(rev - sde.drift(x, t), 2 * (ode - sde.drift(x, t)))
