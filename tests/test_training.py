"""Training: bundled data, DSM losses against analytic optima, the trainer (exact resume,
checkpoints, bad input, NaN handling, DDP under torchrun), the CLI and FD-digits."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdekit.cli.main import main as cli
from sdekit.dynamics import from_eps
from sdekit.sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, DiscreteDDPM, SubVPSDE
from sdekit.training import (
    DATASETS,
    CheckpointError,
    DSMLoss,
    Trainer,
    TrainingDiverged,
    generate,
    load_checkpoint,
    load_dataset,
    load_model,
    mode_coverage,
    recipe,
    sample_toy,
)
from sdekit.training.checkpoint import save_checkpoint
from sdekit.training.data import digits_split
from sdekit.training.fd_digits import RECIPE, FDDigits, frechet_distance

pytestmark = pytest.mark.usefixtures("torch_single_thread")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- data
def test_datasets_load_and_digits_split():
    for name in DATASETS:
        ds = load_dataset(name)
        assert torch.isfinite(ds.x).all() and ds.x.dtype == torch.float32
        assert ds.x.shape[1:] == ds.x_test.shape[1:]
    d = load_dataset("digits")
    assert d.x.shape[1:] == (1, 8, 8) and len(d) + d.x_test.shape[0] == 1797
    assert d.x.min() == -1 and d.x.max() == 1
    assert abs(len(d) - d.x_test.shape[0]) <= 10          # a 50/50 split
    for c in range(10):                                    # stratified
        assert abs(int((d.y == c).sum()) - int((d.y_test == c).sum())) <= 1
    # the halves partition the 1,797 images (indices into sklearn's order), and the split is fixed
    table = np.loadtxt(Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
                       / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    all_y = torch.tensor(table[:, -1]).long()
    tr, te = digits_split(all_y)
    assert not set(tr.tolist()) & set(te.tolist()) and len(tr) + len(te) == 1797
    assert torch.equal(d.y, all_y[tr]) and torch.equal(d.y_test, all_y[te])
    assert torch.equal(d.x.reshape(len(d), 64), torch.tensor(table[tr, :-1]).float() / 8 - 1)
    assert torch.equal(load_dataset("digits").x, d.x)
    up = load_dataset("digits", image_size=16)
    assert up.x.shape[1:] == (1, 16, 16) and up.transform["source_size"] == 8


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="eight_gaussians.*digits"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="expected one of"):
        recipe("mnist")


@pytest.mark.parametrize("name", ["eight_gaussians", "swiss_roll", "two_moons", "checkerboard"])
def test_mode_coverage_accepts_real_data_and_rejects_collapse_and_noise(name):
    x, k = sample_toy(name, 2000, seed=7)
    assert mode_coverage(name, x)["passed"]
    collapsed = mode_coverage(name, x[k == 0])
    assert not collapsed["passed"] and collapsed["modes_covered"] == 1
    noise = mode_coverage(name, 3 * torch.randn(2000, 2))
    assert not noise["passed"] and noise["on_support"] < 0.5


# --------------------------------------------------------------------------- losses
def gaussian_eps_net(sde, c: float, prediction: str):
    """The exact minimiser for data N(0, c^2 I), in any output parametrisation: for
    ``x_t = a x0 + s eps`` the posterior mean is ``E[eps | x_t] = s x_t / (a^2 c^2 + s^2)``."""
    def net(inp, cond, y=None):
        if prediction == "denoiser":            # inp = x / a, cond = sigma_tilde
            st = cond.double().reshape(-1, *([1] * (inp.ndim - 1)))
            return (c * c / (c * c + st * st) * inp.double()).to(inp.dtype)
        lam = cond.double().reshape(-1, *([1] * (inp.ndim - 1)))
        # recover a, s from lambda on this SDE
        t = sde.t_of_lambda(lam.flatten())
        a = sde.alpha(t).reshape(lam.shape)
        s = sde.sigma(t).reshape(lam.shape)
        eps = s * inp.double() / (a * a * c * c + s * s)
        return from_eps(prediction, eps, inp.double(), a, s).to(inp.dtype)
    return net


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "denoiser"])
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), EDMSDE(), CosineVPSDE(),
                                 DiscreteDDPM()], ids=repr)
def test_dsm_losses_at_the_analytic_optimum(sde, prediction):
    """At the exact minimiser for Gaussian data the per-dimension eps loss is
    ``a^2 c^2 / (a^2 c^2 + s^2)`` and the EDM loss is ``w(st) c^2 st^2 / (c^2 + st^2)``."""
    c, n, d = 0.8, 4000, 4
    g = torch.Generator().manual_seed(0)
    x0 = c * torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    net = gaussian_eps_net(sde, c, prediction)
    for u in (0.2, 0.6):
        t = torch.full((n,), sde.t_min + u * (sde.T - sde.t_min), dtype=torch.float64)
        a, s = float(sde.alpha(t[0])), float(sde.sigma(t[0]))
        eps_loss = DSMLoss(sde, "eps", prediction=prediction).per_sample(net, x0, t, noise)
        want = a * a * c * c / (a * a * c * c + s * s)
        got = float(eps_loss.mean())
        assert abs(got - want) < 0.04 * want + 1e-3, (u, got, want)
        edm = DSMLoss(sde, "edm", prediction=prediction, sigma_data=0.5)
        st = s / a
        w = (st * st + 0.25) / (st * 0.5) ** 2
        want = w * c * c * st * st / (c * c + st * st)
        got = float(edm.per_sample(net, x0, t, noise).mean())
        assert abs(got - want) < 0.04 * want, (u, got, want)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), DiscreteDDPM()], ids=repr)
def test_likelihood_weighting_estimators_agree(sde):
    """Importance sampling (lambda uniform, weight 1) and uniform t with weight
    ``g^2/sigma^2 (T - t_min) / (2 dlambda)`` estimate the same integral
    ``(1/dlambda) int L(lambda) dlambda``; checked against quadrature for the Gaussian optimum,
    where ``L(lambda) = sigmoid(2 lambda + 2 log c)``."""
    c, n = 0.8, 40000
    g = torch.Generator().manual_seed(1)
    x0 = c * torch.randn(n, 2, generator=g, dtype=torch.float64)
    net = gaussian_eps_net(sde, c, "eps")
    lo, hi = sde.lambda_min, sde.lambda_max
    lam = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    exact = float(torch.trapezoid(torch.sigmoid(2 * lam + 2 * math.log(c)), lam) / (hi - lo))
    for importance in (True, False):
        loss = DSMLoss(sde, "likelihood", importance=importance)
        t = loss.sample_t(n, g)
        est = loss.per_sample(net, x0, t, torch.randn(n, 2, generator=g, dtype=torch.float64))
        se = float(est.std()) / math.sqrt(n)
        got = float(est.mean())
        assert abs(got - exact) < 5 * se + 1e-3, (importance, got, exact)


def test_time_sampling_respects_discrete_and_edm_ranges():
    ddpm = DiscreteDDPM(num_timesteps=50)
    t = DSMLoss(ddpm, "eps").sample_t(500, torch.Generator().manual_seed(0))
    n = t * 50 - 1
    assert torch.allclose(n, n.round(), atol=1e-9) and n.min() >= 0 and n.max() <= 49
    vp = VPSDE()
    t = DSMLoss(vp, "edm").sample_t(2000, torch.Generator().manual_seed(0))
    assert t.min() >= vp.t_min and t.max() <= vp.T
    with pytest.raises(ValueError, match="loss='l1'"):
        DSMLoss(vp, "l1")


# -------------------------------------------------------------------------- trainer
def tiny_config(**kw):
    base = dict(net=dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                         attn_resolutions=[4], groups=4, dropout=0.1),
                class_cond=True, steps=6, batch_size=8, warmup=2, ckpt_every=3, log_every=1,
                sample_n=4, sample_steps=2, ema_decay=0.9, device="cpu")
    base.update(kw)
    return recipe("digits", **base)


def toy_config(**kw):
    base = dict(net=dict(width=16, depth=1, emb_dim=8), steps=4, batch_size=16, warmup=1,
                ckpt_every=2, log_every=1, sample_n=32, sample_steps=2, device="cpu")
    base.update(kw)
    return recipe("eight_gaussians", **base)


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            if not states_equal(va, vb):
                return False
        elif isinstance(va, torch.Tensor):
            if not torch.equal(va, vb):
                return False
        elif va != vb:
            return False
    return True


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Class-conditional U-Net with dropout and label dropout: every source of randomness."""
    full = Trainer(tiny_config(), tmp_path / "full", progress=False)
    full.train()
    first = Trainer(tiny_config(), tmp_path / "split", progress=False)
    first.train(until=3)                                      # "interrupted" after step 3
    torch.manual_seed(12345)                                  # disturb the global RNG
    second = Trainer(tiny_config(), tmp_path / "split", resume=True, progress=False)
    assert second.step == 3
    second.train()
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer"):
        assert states_equal(a[key], b[key]), key
    # ... and the log reads as one run
    rows = list(csv.DictReader(open(tmp_path / "split" / "log.csv")))
    full_rows = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
    # the interrupted run's log rows past the checkpoint are dropped on resume
    assert (tmp_path / "full" / "samples_0000006.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_contents_are_safe_and_json_readable(tmp_path):
    tr = Trainer(toy_config(), tmp_path, progress=False)
    tr.train()
    path = tmp_path / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)               # no code execution needed
    cfg = json.loads(raw["config"])
    assert cfg["net"]["name"] == "mlp" and cfg["sde"] == "vp" and cfg["transform"]["kind"]
    assert cfg["net"]["prediction"] == "denoiser" and cfg["loss"] == "edm"
    assert isinstance(raw["rng"]["torch"], torch.Tensor) and raw["step"] == 4
    side = json.loads((tmp_path / "checkpoint.json").read_text())
    assert side["step"] == 4 and side["config"] == cfg
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]   # atomic: no leftovers
    net, sde, _ = load_model(path)
    assert torch.equal(next(iter(net.state_dict().values())),
                       next(iter(tr.ema.state_dict().values())))
    assert repr(sde) == repr(tr.sde)


def test_corrupt_truncated_and_foreign_checkpoints_name_the_file(tmp_path):
    tr = Trainer(toy_config(steps=2), tmp_path / "run", progress=False)
    tr.train()
    good = tmp_path / "run" / "checkpoint.pt"
    data = good.read_bytes()
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    for bad in (trunc, junk, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError, match=bad.name):
            load_model(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an sdekit checkpoint"):
        load_checkpoint(foreign)
    # weights that do not fit the stored network config
    ck = load_checkpoint(good)
    cfg = dict(ck["config"])
    cfg["net"] = dict(cfg["net"], width=32)
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, config=cfg, model=ck["model"], ema=ck["ema"],
                    optimizer=ck["optimizer"], step=ck["step"])
    with pytest.raises(CheckpointError, match="wrong.pt.*different network config"):
        load_model(wrong)


def test_resume_with_a_different_network_is_refused(tmp_path):
    Trainer(toy_config(steps=2), tmp_path, progress=False).train()
    other = toy_config(steps=4, net=dict(width=32, depth=1, emb_dim=8))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*different configuration.*net"):
        Trainer(other, tmp_path, resume=True, progress=False)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    tr = Trainer(toy_config(steps=10, ckpt_every=3), tmp_path, progress=False)
    real = tr.loss_fn

    def poisoned(net, x0, y=None, generator=None):
        loss = real(net, x0, y, generator)
        return loss * float("nan") if tr.step == 4 else loss

    tr.loss_fn = poisoned
    with pytest.raises(TrainingDiverged, match=r"step 5.*checkpoint\.pt.*kept"):
        tr.train()
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert all(torch.isfinite(p).all() for p in tr.net.parameters())   # no NaN update applied


def test_bad_config_values_name_the_argument():
    with pytest.raises(ValueError, match="sde='vpp'.*'vp'"):
        Trainer(toy_config(sde="vpp"), None, progress=False)
    with pytest.raises(ValueError, match="lr=-1"):
        Trainer(toy_config(lr=-1.0), None, progress=False)
    with pytest.raises(ValueError, match="class_cond"):
        Trainer(toy_config(class_cond=True), None, progress=False)


@pytest.mark.parametrize("sde,loss,prediction", [("vp", "eps", "eps"), ("ve", "edm", "denoiser"),
                                                 ("ddpm", "likelihood", "v"),
                                                 ("edm", "edm", "x0")])
def test_short_training_reduces_the_loss_on_any_sde(sde, loss, prediction):
    cfg = toy_config(sde=sde, loss=loss, steps=60, batch_size=256, lr=3e-3, log_every=10,
                     ckpt_every=1000, net=dict(width=32, depth=1, emb_dim=16,
                                               prediction=prediction))
    res = Trainer(cfg, None, progress=False).train()
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert math.isfinite(last) and last < first, (first, last)


def test_generate_is_independent_of_batch_size():
    tr = Trainer(toy_config(steps=1), None, progress=False)
    a, nfe = generate(tr.ema, tr.sde, 10, steps=3, batch_size=3, seed=5)
    b, _ = generate(tr.ema, tr.sde, 10, steps=3, batch_size=10, seed=5)
    assert nfe == 3 and torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.skipif(not torch.distributed.is_available(),
                    reason="torch.distributed is not available in this build")
def test_data_parallel_training_with_two_cpu_processes(tmp_path):
    if not torch.distributed.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sdekit.cli.main", "train", "--data", "eight_gaussians", "--steps", "3",
           "--batch-size", "16", "--width", "16", "--depth", "1", "--ckpt-every", "3",
           "--sample-n", "8", "--sample-steps", "2", "--device", "cpu", "--no-progress",
           "--threads", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world size 2" in r.stdout
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 3 and ck["extra"]["world_size"] == 2   # ranks were checked in sync


# ----------------------------------------------------------------------------- CLI
def test_cli_train_then_sample(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "two_moons", "--steps", "3", "--width", "16", "--depth", "1",
            "--batch-size", "32", "--ckpt-every", "3", "--sample-n", "16", "--sample-steps",
            "2", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert cli(args + ["--resume"]) == 0        # nothing to resume: says so, starts at 0
    assert f"--resume: no checkpoint in {out}, so from step 0" in capsys.readouterr().out
    assert (out / "checkpoint.pt").exists() and (out / "log.csv").exists()
    assert (out / "samples_0000003.png").exists()
    assert cli(args) == 2                       # refuses to overwrite without --resume
    assert "--resume" in capsys.readouterr().err
    assert cli(args[:4] + ["5"] + args[5:] + ["--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert cli(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--solver", "ddim",
                "--steps", "3", "--n", "12", "--out", str(tmp_path / "s")]) == 0
    z = np.load(tmp_path / "s.npz")
    assert z["x"].shape == (12, 2) and json.loads(str(z["meta"]))["nfe"] == 3
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    assert cli(["sample", "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "bad.pt" in capsys.readouterr().err


def test_cli_unknown_names_list_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "--data", "mnist"])
    assert "digits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["train", "--data", "digits", "--sde", "foo"])
    err = capsys.readouterr().err
    assert "vp" in err and "edm" in err


# ------------------------------------------------------------------------ FD-digits
def test_frechet_distance_matches_the_definition():
    from scipy import linalg
    g = np.random.default_rng(0)
    a, b = g.normal(size=(6, 6)), g.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    m1, m2 = g.normal(size=6), g.normal(size=6)
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert math.isclose(frechet_distance(m1, c1, m2, c2), ref, rel_tol=1e-8)
    assert abs(frechet_distance(m1, c1, m1, c1)) < 1e-9


def test_fd_digits_recipe_orders_real_above_noise(tmp_path, monkeypatch):
    """A 3-epoch version of the recipe (the real one trains for 40): the floor is far below the FD
    of noise and of blurred digits."""
    monkeypatch.setitem(RECIPE, "epochs", 3)
    fd = FDDigits(cache=tmp_path / "clf.pt")
    assert (tmp_path / "clf.pt").exists()
    d = load_dataset("digits")
    blurred = torch.nn.functional.avg_pool2d(d.x, 3, 1, 1)
    assert fd.floor < fd(blurred) < fd(torch.rand(900, 1, 8, 8) * 2 - 1)
    again = FDDigits(cache=tmp_path / "clf.pt")            # loaded from the cache
    assert math.isclose(again.floor, fd.floor, rel_tol=1e-12)


