"""Guidance wrappers (sdekit.guidance): classifier-free guidance and its rescale, classifier
guidance, NFE counting, every registered solver with both, bounded memory, bad input; the
noise-conditional classifier and its training objective.

The analytic problem is a class-conditional Gaussian mixture: class k is N(mu_k, Sigma_k), so
the conditional and unconditional noise predictions and the exact posterior p(k | x_t) are known
in closed form at every t of every forward SDE."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

import sdekit
from sdekit.analytic import GaussianMixtureData
from sdekit.guidance import (
    CFGNet,
    ClassifierGuidedModel,
    classifier_free,
    classifier_guidance,
    is_guided,
)
from sdekit.models import ConditionedNet, NoisyClassifier, wrap
from tests.helpers import run_cli

K = 3
MEANS = [[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]]
WEIGHTS = [0.5, 0.3, 0.2]
COVS = [[0.3, 0.2], [0.2, 0.4], [0.25, 0.25]]


def mixture(sde) -> GaussianMixtureData:
    return GaussianMixtureData(sde, WEIGHTS, MEANS, COVS)


class CondNet:
    """Exact ``net(x, t, y)``: class y's noise prediction, the mixture's for the null class K.
    Counts its calls and the samples it was called on."""

    def __init__(self, gmm: GaussianMixtureData, kind: str = "eps") -> None:
        self.gmm, self.kind, self.calls, self.rows = gmm, kind, 0, 0

    @staticmethod
    def _of(data, kind, x, t):
        return data.flow_velocity(x, t) if kind == "flow" else getattr(data, kind)(x, t)

    def __call__(self, x, t, y):
        self.calls += 1
        self.rows += x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        y = torch.as_tensor(y).expand(x.shape[0])
        out = self._of(self.gmm, self.kind, x, t).clone()
        for k, comp in enumerate(self.gmm.components):
            m = y == k
            if m.any():
                out[m] = self._of(comp, self.kind, x[m], t[m]).to(out.dtype)
        return out


def exact_classifier(gmm: GaussianMixtureData):
    """log p(k | x_t) as logits, on the state and t (time input "t")."""
    def classify(x, t):
        lp = torch.stack([c.log_prob(x, t) for c in gmm.components], 1)
        return lp + torch.log(gmm.weights)
    return classify


def sde_cases():
    return {"vp": sdekit.VPSDE(), "ve": sdekit.VESDE(), "subvp": sdekit.SubVPSDE(),
            "ddpm": sdekit.DiscreteDDPM(), "flow": sdekit.FlowSDE()}


SDES = sde_cases()


def state(n=6, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mid_time(sde, u=0.4):
    return sde.t_min + u * (sde.T - sde.t_min)


# ------------------------------------------------------------------ classifier-free guidance
@pytest.mark.parametrize("kind", ["eps", "x0", "flow"])
def test_cfg_matches_its_formula_and_limits(kind):
    sde = SDES["vp"] if kind != "flow" else SDES["flow"]
    gmm = mixture(sde)
    net = CondNet(gmm, kind)
    x, t = state(), torch.tensor(mid_time(sde))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    tb = t.expand(6)
    cond, unc = net(x, tb, y), net(x, tb, torch.full((6,), K))
    for w in (0.0, -1.0, 2.5):
        g = CFGNet(net, y, null=K, scale=w)(x, t)
        torch.testing.assert_close(g, (1 + w) * cond - w * unc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(CFGNet(net, y, K, scale=0.0)(x, t), cond)
    torch.testing.assert_close(CFGNet(net, y, K, scale=-1.0)(x, t), unc, rtol=1e-12, atol=1e-12)


def test_cfg_rescale_by_hand():
    sde = SDES["vp"]
    net = CondNet(mixture(sde))
    x, t = state(), torch.tensor(0.3)
    y = torch.tensor(1)
    tb = t.expand(6)
    pos, neg = net(x, tb, y), net(x, tb, torch.tensor(K))
    w = 4.0
    g = pos + w * (pos - neg)
    ratio = pos.std(dim=1, keepdim=True) / g.std(dim=1, keepdim=True)
    for phi in (0.0, 0.7, 1.0):
        out = CFGNet(net, y, K, scale=w, rescale=phi)(x, t)
        torch.testing.assert_close(out, phi * g * ratio + (1 - phi) * g)
    full = CFGNet(net, y, K, scale=w, rescale=1.0)(x, t)
    torch.testing.assert_close(full.std(dim=1), pos.std(dim=1))


def test_cfg_batches_both_branches_and_counts_two_nfe():
    sde = SDES["vp"]
    net = CondNet(mixture(sde))
    model = classifier_free(net, sde, torch.tensor(2), K, 3.0, time_input="t")
    model.eps(state(5), 0.5)
    assert (net.calls, net.rows, model.nfe) == (1, 10, 2)   # one call, doubled batch, 2 NFE
    plain = classifier_free(net, sde, torch.tensor(2), K, 0.0, time_input="t")
    plain.eps(state(5), 0.5)
    assert (net.calls, net.rows, plain.nfe) == (2, 15, 1)   # w = 0: the conditional pass only
    sol = sdekit.sample(sde, classifier_free(CondNet(mixture(sde)), sde, 0, K, 2.0,
                                             time_input="t"),
                        shape=(4, 2), solver="dpmpp_2m", steps=7)
    assert sol.nfe == 14 and sol.steps == 7


def test_cfg_keyword_condition_and_embedding_null():
    """A network taking its condition by keyword, with embedding-valued conditions."""
    seen = []

    def net(x, t, *, context, gain=1.0):
        seen.append(context.shape)
        return gain * x * context[:, :1]

    x = state(4)
    ctx = torch.tensor([[2.0, 5.0]])            # one embedding shared by the batch
    m = CFGNet(net, ctx, null=torch.zeros(2), scale=1.5, cond_arg="context", gain=2.0)
    out = m(x, 0.5)
    assert seen == [torch.Size([8, 2])]
    torch.testing.assert_close(out, 2.5 * (2.0 * x * 2.0) - 1.5 * 0.0 * x)


def test_conditioned_net_is_the_cfg_wrapper():
    from tests.test_models import randomize, tiny_unet
    net = randomize(tiny_unet(num_classes=4))
    y = torch.tensor([0, 1, 3])
    x, c = torch.randn(3, 1, 8, 8), torch.tensor([0.5, -1.0, 2.0])
    m = ConditionedNet(net, y, guidance=2.0)
    assert isinstance(m, CFGNet)
    with torch.no_grad():
        torch.testing.assert_close(m(x, c), 3.0 * net(x, c, y) - 2.0 * net(x, c, None),
                                   atol=1e-5, rtol=1e-5)
    model = wrap(net, sdekit.VPSDE(), y=y, guidance=2.0)
    with torch.no_grad():
        model.eps(x, 0.5)
    assert model.nfe == 2 and is_guided(model)


def test_cfg_with_dynamic_thresholding_keeps_the_data_range():
    """The data-prediction solvers' dynamic thresholding applies to a guided model: a strongly
    guided sample of a class whose mean is far outside [-1, 1] stays inside it."""
    sde = SDES["vp"]
    model = classifier_free(CondNet(mixture(sde)), sde, 0, K, 4.0, time_input="t")
    kw = {"shape": (64, 2), "solver": "dpmpp_2m", "steps": 10}
    free = sdekit.sample(sde, model, **kw).x
    clipped = sdekit.sample(sde, model, thresholding=True, **kw).x
    assert free.abs().max() > 3
    assert clipped.abs().max() <= 1.05   # x0 in [-1, 1]; the last state keeps sigma(t_min) noise


# ------------------------------------------------------------------------ classifier guidance
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("kind", ["eps", "x0", "flow"])
def test_classifier_guidance_with_the_exact_posterior_is_the_conditional_score(sde_name, kind):
    sde = SDES[sde_name]
    gmm = mixture(sde)
    base = gmm.model(kind)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    x, t = state(), mid_time(sde)
    for s in (1.0, 2.5):
        guided = classifier_guidance(base, exact_classifier(gmm), y, s,
                                     classifier_time_input="t")
        with torch.enable_grad():
            eps = guided.eps(x.clone().requires_grad_(True), t).detach()
        tb = torch.full((6,), float(t), dtype=torch.float64)
        cond = CondNet(gmm, "eps")(x, tb, y)
        unc = gmm.eps(x, tb)
        # score_u + s (score_y - score_u), in eps: eps_u + s (eps_y - eps_u)
        torch.testing.assert_close(eps, unc + s * (cond - unc), rtol=1e-6, atol=1e-6)
        assert guided.nfe == 1 and guided.classifier_nfe == 1


def test_classifier_guided_sampling_reproduces_the_conditional_model():
    sde = SDES["vp"]
    gmm = mixture(sde)
    y = torch.tensor([0, 1, 2] * 4)
    guided = classifier_guidance(gmm.model("eps"), exact_classifier(gmm), y, 1.0,
                                 classifier_time_input="t")
    cond = classifier_free(CondNet(gmm), sde, y, K, 0.0, time_input="t")
    kw = {"shape": (12, 2), "solver": "dpmpp_2m", "steps": 12, "dtype": torch.float64}
    a = sdekit.sample(sde, guided, grad="model", **kw)
    b = sdekit.sample(sde, cond, **kw)
    torch.testing.assert_close(a.x, b.x, rtol=1e-6, atol=1e-6)
    assert a.nfe == b.nfe == 12 and guided.classifier_nfe == 12
    assert not a.x.requires_grad


def test_classifier_guidance_from_alpha_zero_on_flow_matching():
    """A flow model at t = 1 (alpha = 0), where the guidance term is 0/0: the output there is
    the unguided one and a solve from t = 1 stays finite; from just below t = 1 the exact
    classifier reproduces the conditional model."""
    sde = SDES["flow"]
    gmm = mixture(sde)
    y = torch.tensor([0, 1, 2, 1])
    guided = classifier_guidance(gmm.model("flow"), exact_classifier(gmm), y, 1.0,
                                 classifier_time_input="t")
    cond = classifier_free(CondNet(gmm, "flow"), sde, y, K, 0.0, prediction="flow",
                           time_input="t")
    x = state(4).requires_grad_(True)
    with torch.enable_grad():
        at_one = guided.predict(x, 1.0, "x0").detach()
    torch.testing.assert_close(at_one, gmm.model("flow").predict(x.detach(), 1.0, "x0"))
    kw = {"shape": (4, 2), "solver": "ddim", "steps": 8, "dtype": torch.float64}
    a = sdekit.sample(sde, guided, grad="model", **kw)
    assert float(sde.alpha(a.times[0])) == 0.0 and torch.isfinite(a.x).all()
    kw["t_start"] = 1 - 1e-3
    torch.testing.assert_close(sdekit.sample(sde, guided, grad="model", **kw).x,
                               sdekit.sample(sde, cond, **kw).x, rtol=1e-6, atol=1e-6)


def test_classifier_guidance_keeps_no_graph_across_steps():
    """Memory stays that of one call: every tensor the classifier made in a model call is freed
    before the next step (no autograd graph survives a step)."""
    sde = SDES["vp"]
    gmm = mixture(sde)
    inner = exact_classifier(gmm)
    made: list[weakref.ref] = []

    def classifier(x, t):
        out = inner(x, t)
        made.append(weakref.ref(out))
        return out

    alive = []

    def check(i, t, x):
        gc.collect()
        alive.append(sum(r() is not None for r in made))
        assert not x.requires_grad

    guided = classifier_guidance(gmm.model("eps"), classifier, 1, 2.0,
                                 classifier_time_input="t")
    sdekit.sample(sde, guided, shape=(16, 2), solver="heun", steps=6, grad="model",
                  callback=check)
    assert len(made) == guided.classifier_nfe > 6 and alive == [0] * 6


def test_classifier_guidance_with_a_float64_state_and_a_float32_classifier():
    """The classifier sees the network's dtype (float32) while the solver keeps float64."""
    sde = SDES["vp"]
    gmm = mixture(sde)
    exact = exact_classifier(gmm)

    class Float32Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, K)   # a float32 layer: rejects a float64 input

        def forward(self, x, t):
            return self.lin(x) * 0 + exact(x.double(), t).float()

    guided = classifier_guidance(gmm.model("eps"), Float32Classifier(), 1, 1.0,
                                 classifier_time_input="t")
    cond = classifier_free(CondNet(gmm), sde, 1, K, 0.0, time_input="t")
    kw = {"shape": (8, 2), "solver": "dpmpp_2m", "steps": 8, "float64": True}
    a = sdekit.sample(sde, guided, grad="model", **kw)
    torch.testing.assert_close(a.x, sdekit.sample(sde, cond, **kw).x, rtol=1e-4, atol=1e-4)


def test_classifier_guidance_needs_grad_model():
    sde = SDES["vp"]
    gmm = mixture(sde)
    guided = classifier_guidance(gmm.model("eps"), exact_classifier(gmm), 0, 1.0,
                                 classifier_time_input="t")
    with pytest.raises(RuntimeError, match="grad='model'"):
        sdekit.sample(sde, guided, shape=(4, 2), solver="ddim", steps=3)


# ---------------------------------------------------------- every registered solver, both kinds
def _steps(name: str) -> int:
    slv = sdekit.get_solver(name)
    return max(4, slv.min_steps)


@pytest.mark.parametrize("name", sdekit.solver_names())
def test_every_solver_runs_with_both_wrappers(name):
    sde = SDES["vp"]
    gmm = mixture(sde)
    net = CondNet(gmm)
    y = torch.tensor([0, 1, 2, 0])
    cfg = classifier_free(net, sde, y, K, 1.5, time_input="t")
    cls = classifier_guidance(gmm.model("eps"), exact_classifier(gmm), y, 1.5,
                              classifier_time_input="t")
    kw = {"shape": (4, 2), "solver": name, "steps": _steps(name)}
    if name == "dopri5":
        kw["rtol"] = 1e-3   # keep the test fast
    sub = sdekit.get_solver(name).evaluates_subsets
    if name == "fno":   # the operator replaces the model: guidance cannot apply
        for model in (cfg, cls):
            with pytest.raises(ValueError, match="cannot apply the model's guidance"):
                sdekit.sample(sde, model, grad="model", **kw)
        return
    if sub:   # per-sample labels cannot follow its calls
        for model in (cfg, cls):
            with pytest.raises(ValueError, match="evaluates the model on subsets of the batch"):
                sdekit.sample(sde, model, grad="model", **kw)
        y = torch.tensor(1)   # one label for the batch works
        net = CondNet(gmm)
        cfg = classifier_free(net, sde, y, K, 1.5, time_input="t")
        cls = classifier_guidance(gmm.model("eps"), exact_classifier(gmm), y, 1.5,
                                  classifier_time_input="t")
    a = sdekit.sample(sde, cfg, **kw)
    assert torch.isfinite(a.x).all()
    assert a.nfe == 2 * net.calls   # 2 network passes per batched call
    assert net.rows % 2 == 0 and (net.rows == 8 * net.calls or sub)
    b = sdekit.sample(sde, cls, grad="model", **kw)
    assert torch.isfinite(b.x).all() and not b.x.requires_grad
    assert b.nfe == cls.classifier_nfe >= 1


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "2", None])
def test_bad_scale_is_rejected_before_any_call(bad):
    sde = SDES["vp"]
    gmm = mixture(sde)
    with pytest.raises(ValueError, match="scale=.*finite real number"):
        CFGNet(CondNet(gmm), 0, K, scale=bad)
    with pytest.raises(ValueError, match="scale=.*finite real number"):
        classifier_guidance(gmm.model(), exact_classifier(gmm), 0, bad)
    with pytest.raises(ValueError, match="rescale=.*finite real number"):
        CFGNet(CondNet(gmm), 0, K, scale=1.0, rescale=bad)
    from tests.test_models import tiny_unet
    with pytest.raises(ValueError, match="guidance=.*finite real number"):
        wrap(tiny_unet(num_classes=4), sde, y=1, guidance=bad)


def test_bad_guidance_input_messages():
    sde = SDES["vp"]
    gmm = mixture(sde)
    net = CondNet(gmm)
    with pytest.raises(ValueError, match=r"rescale=1.5 is invalid: expected a number in \[0, 1\]"):
        CFGNet(net, 0, K, scale=1.0, rescale=1.5)
    with pytest.raises(ValueError, match="cond=None"):
        CFGNet(net, None, K, scale=1.0)
    with pytest.raises(ValueError, match="shape mismatch: cond has shape"):
        CFGNet(net, torch.tensor([0, 1]), K, scale=1.0)(state(5), 0.5)
    with pytest.raises(ValueError, match="shape mismatch: null has shape"):
        CFGNet(lambda x, t, c: x, torch.zeros(5, 3), torch.zeros(4), scale=1.0)(state(5), 0.5)
    from sdekit.training.fd_digits import DigitClassifier
    for clean in (DigitClassifier(), lambda x: x):   # no time input
        with pytest.raises(ValueError, match="no time input"):
            classifier_guidance(gmm.model(), clean, 0, 1.0)
    with pytest.raises(ValueError, match="integer class labels"):
        classifier_guidance(gmm.model(), exact_classifier(gmm), torch.zeros(2, 3).long(), 1.0)
    with pytest.raises(ValueError, match="integer class labels"):
        classifier_guidance(gmm.model(), exact_classifier(gmm), torch.tensor([0.5]), 1.0)
    with pytest.raises(ValueError, match="outside 0..9"):
        classifier_guidance(gmm.model(), NoisyClassifier(image_size=8), 10, 1.0)
    g = classifier_guidance(gmm.model(), exact_classifier(gmm), torch.tensor([0, 1]), 1.0,
                            classifier_time_input="t")
    with pytest.raises(ValueError, match="y has 2 labels but the batch has 4"):
        sdekit.sample(sde, g, shape=(4, 2), solver="ddim", steps=2, grad="model")
    g = classifier_guidance(gmm.model(), exact_classifier(gmm), 5, 1.0, classifier_time_input="t")
    with pytest.raises(ValueError, match="outside 0..2"):
        sdekit.sample(sde, g, shape=(4, 2), solver="ddim", steps=2, grad="model")
    with pytest.raises(ValueError, match="classifier_time_input='sigma'"):
        classifier_guidance(gmm.model(), exact_classifier(gmm), 0, 1.0,
                            classifier_time_input="sigma")
    with pytest.raises(TypeError, match="DiffusionModel"):
        classifier_guidance(CondNet(gmm), exact_classifier(gmm), 0, 1.0)
    from tests.test_models import tiny_unet
    with pytest.raises(ValueError, match="needs class labels y"):
        wrap(tiny_unet(num_classes=4), sde, guidance=1.0)
    assert isinstance(g, ClassifierGuidedModel)


# ------------------------------------------------------------- the noise-conditional classifier
def test_noisy_classifier_shapes_and_input_gradient():
    clf = NoisyClassifier(image_size=8, num_classes=10, base_channels=8)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    logits = clf(x, torch.tensor([0.0, 1.0, -2.0]))
    assert logits.shape == (3, 10)
    (g,) = torch.autograd.grad(logits[:, 0].sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0
    assert clf(x, torch.tensor(0.5)).shape == (3, 10)   # one noise level for the batch
    with pytest.raises(ValueError, match="shape mismatch"):
        clf(torch.randn(2, 1, 4, 4), torch.zeros(2))


def test_train_classifier_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    from sdekit.training import load_model
    out = tmp_path / "clf"
    rc, _o, e = run_cli(["train", "--data", "digits", "--objective", "classifier", "--steps",
                         "3", "--batch-size", "8", "--channels", "8", "--device", "cpu", "--quiet",
                        "--out", out], capsys)
    assert rc == 0, e
    net, _sde, cfg = load_model(out / "checkpoint.pt")
    assert isinstance(net, NoisyClassifier) and cfg["loss"] == "classifier"
    assert net(torch.zeros(2, 1, 8, 8), torch.zeros(2)).shape == (2, 10)
    assert not list(out.glob("samples_*.png"))   # no sample grids for a classifier
    rc, _o, e = run_cli(["train", "--data", "digits", "--objective", "classifier",
                        "--prediction", "eps", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "--prediction" in e and "drop --prediction" in e
    rc, _o, e = run_cli(["train", "--data", "two_moons", "--objective", "classifier",
                        "--out", tmp_path / "y"], capsys)
    assert rc == 2 and "labelled image data" in e

    # sdekit sample --classifier: an unconditional digits model guided towards --label
    score = tmp_path / "score"
    rc, _o, e = run_cli(["train", "--data", "digits", "--steps", "2", "--batch-size", "8",
                         "--channels", "8", "--sample-n", "4", "--sample-steps", "2",
                         "--device", "cpu", "--quiet", "--out", score], capsys)
    assert rc == 0, e
    base = ["sample", "--checkpoint", score / "checkpoint.pt", "--n", "4", "--steps", "2",
            "--solver", "ddim"]
    rc, o, e = run_cli([*base, "--classifier", out / "checkpoint.pt", "--label", "3",
                        "--classifier-scale", "2", "--out", tmp_path / "s"], capsys)
    assert rc == 0, e
    import json

    import numpy as np
    z = np.load(tmp_path / "s.npz")
    meta = json.loads(str(z["meta"]))
    assert (z["y"] == 3).all() and meta["classifier_scale"] == 2.0 and meta["nfe"] == 2
    assert np.isfinite(z["x"]).all()
    rc, o, e = run_cli([*base, "--classifier", score / "checkpoint.pt"], capsys)
    assert rc == 2 and "is not a classifier checkpoint" in e
    rc, o, e = run_cli([*base, "--label", "3"], capsys)
    assert rc == 2 and "--classifier for --label" in e
    rc, o, e = run_cli([*base, "--cfg-rescale", "1.5"], capsys)
    assert rc == 2 and "--cfg-rescale" in e

    # sdekit sample --guidance --cfg-rescale on a class-conditional model: 2 NFE per call
    cc = tmp_path / "cc"
    rc, _o, e = run_cli(["train", "--data", "digits", "--class-cond", "--steps", "2",
                         "--batch-size", "8", "--channels", "8", "--sample-n", "4",
                         "--sample-steps", "2", "--device", "cpu", "--quiet", "--out", cc],
                        capsys)
    assert rc == 0, e
    rc, o, e = run_cli(["sample", "--checkpoint", cc / "checkpoint.pt", "--n", "4", "--steps",
                        "3", "--solver", "ddim", "--guidance", "1.5", "--cfg-rescale", "0.5",
                        "--out", tmp_path / "g"], capsys)
    assert rc == 0, e
    meta = json.loads(str(np.load(tmp_path / "g.npz")["meta"]))
    assert meta["nfe"] == 6 and meta["cfg_rescale"] == 0.5 and "6 NFE" in o
