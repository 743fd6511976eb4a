"""Probability-flow likelihood (sdekit.likelihood) against the exact Gaussian oracles."""
import math

import pytest
import torch

import sdekit
from sdekit import likelihood

SDES = {
    "vp": lambda: sdekit.VPSDE(),
    "ve": lambda: sdekit.VESDE(),
    "subvp": lambda: sdekit.SubVPSDE(),
    "ddpm": lambda: sdekit.DiscreteDDPM(),
    "flow": lambda: sdekit.FlowSDE(),   # integrated in t up to T = 1, where the prior is exact
}


def _gaussian(sde, dim=4, seed=1):
    # mean zero: the Gaussian prior then differs from the true p_T by O(alpha_T^2) only
    return sdekit.GaussianData.random(sde, dim=dim, eig_min=1e-2, seed=seed)


def _data_at_tmin(data, n=6, seed=0):
    return data.marginal_sample(n, data.sde.t_min, torch.Generator().manual_seed(seed),
                                torch.float64)


def _pred(sde):
    return "flow" if isinstance(sde, sdekit.FlowSDE) else "eps"


@pytest.mark.parametrize("name", list(SDES))
def test_exact_trace_matches_closed_form(name):
    sde = SDES[name]()
    data = _gaussian(sde)
    x = _data_at_tmin(data)
    model = data.model(_pred(sde))
    r = likelihood(sde, model, x)
    ref = data.log_prob(x, sde.t_min)           # the marginal at t_min, exact
    assert r.logp.shape == (6,) and r.logp_se is None and r.bpd is None
    assert (r.logp - ref).abs().max().item() / data.dim < 1e-3
    assert r.nfe == model.nfe > 0               # counted, not assumed
    # with the true p_T in place of the Gaussian prior only the integration error is left
    r2 = likelihood(sde, model, x, rtol=1e-7, atol=1e-7,
                    prior_logp=lambda z: data.log_prob(z, sde.T))
    assert (r2.logp - ref).abs().max().item() / data.dim < 1e-5
    assert torch.allclose(r2.z, data.flow(x, sde.t_min, sde.T), atol=1e-4)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_within_standard_error(probe):
    sde = sdekit.VPSDE()
    data = _gaussian(sde, dim=6, seed=3)
    x = _data_at_tmin(data, n=4, seed=2)
    exact = likelihood(sde, data.model(), x, exact_trace=True).logp
    zs = []
    for seed in (0, 1):
        r = likelihood(sde, data.model(), x, exact_trace=False, probes=64, probe=probe,
                       seed=seed)
        assert r.logp_se is not None and bool((r.logp_se > 0).all())
        zs.append((r.logp - exact) / r.logp_se)
    z = torch.cat(zs)
    assert z.abs().max().item() < 4.5, z              # no sample is off by > 4.5 se
    # the 8 z-scores are ~N(0, 1): their mean is within 4 / sqrt(8)
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())


def test_hutchinson_default_above_32_dims():
    sde = sdekit.VPSDE()
    data = _gaussian(sde, dim=40, seed=4)
    x = _data_at_tmin(data, n=2)
    r = likelihood(sde, data.model(), x, probes=4, rtol=1e-4, atol=1e-4)
    assert r.logp_se is not None                      # Hutchinson chosen for D > 32
    z = (r.logp - data.log_prob(x, sde.t_min)) / r.logp_se
    assert z.abs().max().item() < 6


def test_gaussian_mixture_exact_score():
    sde = sdekit.VPSDE()
    mix = sdekit.GaussianMixtureData(sde, [0.5, 0.3, 0.2],
                                     [[1.0, -0.5], [-1.0, 0.5], [0.0, 1.2]], [0.05, 0.1, 0.02])
    x = mix.marginal_sample(8, sde.t_min, torch.Generator().manual_seed(0), torch.float64)
    ref = mix.log_prob(x, sde.t_min)
    r = likelihood(sde, mix.model("eps"), x, prior_logp=lambda z: mix.log_prob(z, sde.T))
    assert (r.logp - ref).abs().max().item() / mix.dim < 1e-3
    # with the Gaussian prior: the O(alpha_T |mean|) prior mismatch (alpha_T = 0.0066) remains
    r2 = likelihood(sde, mix.model("eps"), x)
    assert (r2.logp - ref).abs().max().item() / mix.dim < 1e-2


def test_fixed_grid():
    """rk4 at 40 steps is accurate; Euler's error halves as its steps double (order 1)."""
    sde = sdekit.DiscreteDDPM()
    data = _gaussian(sde)
    x = _data_at_tmin(data)
    ref = data.log_prob(x, sde.t_min)

    def err(solver, steps):
        model = data.model()
        r = likelihood(sde, model, x, solver=solver, steps=steps,
                       prior_logp=lambda z: data.log_prob(z, sde.T))
        assert r.nfe == model.nfe == steps * {"rk4": 4, "euler": 1}[solver]
        return (r.logp - ref).abs().max().item() / data.dim

    assert err("rk4", 40) < 1e-4
    ratio = err("euler", 200) / err("euler", 400)
    assert 1.6 < ratio < 2.4, ratio


def test_bits_per_dim_bounds_discrete_probability():
    """Dequantised bits/dim >= -log2 P(cell) / D (Jensen), and close to it for fine lattices."""
    sde = sdekit.VPSDE()
    var = torch.tensor([0.2, 0.1, 0.05])
    data = sdekit.GaussianData(sde, torch.zeros(3), var)
    bins, lo, hi = 64, -2.0, 2.0
    delta = (hi - lo) / (bins - 1)
    raw = data.marginal_sample(3, sde.t_min, torch.Generator().manual_seed(0), torch.float64)
    x = (lo + ((raw - lo) / delta).round().clamp(0, bins - 1) * delta)
    reps = 48                                   # 48 dequantisation draws of each sample
    r = likelihood(sde, data.model(), x.repeat_interleave(reps, 0), bins=bins,
                   data_range=(lo, hi))
    bpd = r.bpd.reshape(3, reps)
    mean, se = bpd.mean(1), bpd.std(1) / math.sqrt(reps)
    sd = torch.sqrt(data.marginal_cov(sde.t_min).diagonal())
    normal = torch.distributions.Normal(torch.zeros(3, dtype=torch.float64), sd)
    logP = torch.log(normal.cdf(x + delta / 2) - normal.cdf(x - delta / 2)).sum(1)
    bound = -logP / (3 * math.log(2))
    assert bool((mean >= bound - 4 * se).all()), (mean, bound, se)
    assert (mean - bound).abs().max().item() < 0.03


@pytest.mark.parametrize("kw,match", [
    ({"solver": "nope"}, "solver"),
    ({"solver": "rk4"}, "steps"),
    ({"steps": 10}, "steps"),
    ({"probes": 0}, "probes"),
    ({"probe": "normal"}, "probe"),
    ({"exact_trace": "yes"}, "exact_trace"),
    ({"rtol": -1.0}, "rtol"),
    ({"bins": 1}, "bins"),
    ({"bins": 256, "data_range": (1.0, -1.0)}, "data_range"),
    ({"bins": 256, "data_range": (-0.5, 0.5)}, "outside the declared data_range"),
    ({"bins": 3}, "not on the lattice"),
    # used to be ignored without bins (nothing said so)
    ({"data_range": (0.0, 1.0)}, "data_range=\\(0.0, 1.0\\) is only used with bins="),
    ({"prior_logp": 3}, "prior_logp"),
])
def test_bad_input(kw, match):
    sde = sdekit.VPSDE()
    data = _gaussian(sde, dim=2)
    model = data.model()
    x = torch.tensor([[0.9, -0.8], [0.1, 0.3]], dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        likelihood(sde, model, x, **kw)
    assert model.nfe == 0                     # raised before any work


def test_bad_x():
    sde = sdekit.VPSDE()
    model = _gaussian(sde, dim=2).model()
    with pytest.raises(ValueError, match="x"):
        likelihood(sde, model, torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="x"):
        likelihood(sde, model, torch.zeros(2))


# ------------------------------------------------------------------ sdekit likelihood (CLI)
TINY = ["--width", "8", "--depth", "1", "--batch-size", "16", "--sample-n", "4",
        "--sample-steps", "2", "--device", "cpu", "--quiet"]


def _cli(argv, capsys):
    from sdekit.cli.main import main
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    from sdekit.cli.main import main
    out = tmp_path_factory.mktemp("lik") / "digits"
    assert main(["train", "--data", "digits", "--steps", "2", *TINY, "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def test_cli_bits_per_dim(digits_ckpt, capsys):
    import json
    rc, out, err = _cli(["likelihood", "--checkpoint", digits_ckpt, "--n", "6", "--batch-size",
                         "4", "--rtol", "1e-3", "--json", "--threads", "1"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["n"] == 6 and res["nfe"] > 0
    assert math.isfinite(res["bpd"]) and res["bpd"] > 0 and res["bpd_se"] > 0


@pytest.mark.parametrize("extra,names", [
    (["--solver", "dopri5", "--steps", "5"], ["--steps"]),
    (["--solver", "rk4"], ["steps"]),
    (["--solver", "nope"], ["solver", "'nope'"]),
    (["--probes", "0"], ["--probes"]),
])
def test_cli_bad_input(digits_ckpt, capsys, extra, names):
    rc, _, err = _cli(["likelihood", "--checkpoint", digits_ckpt, *extra], capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    for n in names:
        assert n in lines[0], (n, err)


def test_cli_rejects_data_off_a_lattice(tmp_path, capsys):
    from sdekit.cli.main import main
    out = tmp_path / "moons"
    assert main(["train", "--data", "two_moons", "--steps", "2", *TINY, "--out", str(out)]) == 0
    rc, _, err = _cli(["likelihood", "--checkpoint", out / "checkpoint.pt"], capsys)
    assert rc == 2 and "pixel lattice" in err, err
