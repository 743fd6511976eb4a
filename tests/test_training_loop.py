"""The one training loop (sdekit.training.trainer.FitLoop) as the operator distillation runs
it: exact resume (dropout included), the non-finite stop, the resume checks and bad input.
The Trainer's side of the same loop is tested in test_training.py."""
from __future__ import annotations

import math

import pytest
import torch

import sdekit
from sdekit import distill
from sdekit.distill import generate_trajectories, train_operator
from sdekit.training.checkpoint import load_checkpoint
from sdekit.training.trainer import FitSettings, TrainingDiverged


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData.random(sde, dim=4, eig_min=1e-2, seed=3, mean_scale=1.0)
    path = tmp_path_factory.mktemp("loop") / "traj"
    generate_trajectories(path, sde, data.model(), (4,), 128, steps_per_segment=2,
                          shard_size=128)
    return path, sde


# a backbone with dropout: the loop's only consumer of the global RNG
DROPOUT = {"name": "mlp", "data_shape": [4], "width": 16, "depth": 1, "dropout": 0.3}


def test_operator_with_dropout_resumes_to_the_uninterrupted_result(traj, tmp_path):
    """An interrupted operator distillation, resumed from its checkpoint, ends with the
    weights, EMA and optimiser state of an uninterrupted run, also when dropout draws from the
    global RNG (the loop restores the RNG state saved with the checkpoint)."""
    data, sde = traj
    kw = dict(backbone=DROPOUT, batch=16, checkpoint_every=2, steps=6)
    full = train_operator(data, tmp_path / "full.pt", sde, **kw)
    train_operator(data, tmp_path / "split.pt", sde, until=3, **kw)
    assert load_checkpoint(tmp_path / "split.pt")["step"] == 3
    torch.manual_seed(12345)                                  # disturb the global RNG
    resumed = train_operator(data, tmp_path / "split.pt", sde, **kw)
    for (k, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=k)
    a, b = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "split.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)


def test_operator_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(traj, tmp_path,
                                                                            monkeypatch):
    data, sde = traj
    real = distill._OperatorFit.loss_at

    def poisoned(self, step):
        loss = real(self, step)
        return loss * float("nan") if step == 4 else loss

    monkeypatch.setattr(distill._OperatorFit, "loss_at", poisoned)
    out = tmp_path / "op.pt"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*op\.pt.*kept") as e:
        train_operator(data, out, sde, steps=10, batch=16, checkpoint_every=3)
    assert isinstance(e.value, FloatingPointError)   # what the operator loop raised before
    ck = load_checkpoint(out)
    assert ck["step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    with pytest.raises(TrainingDiverged, match="No checkpoint had been written yet"):
        train_operator(data, tmp_path / "none.pt", sde, steps=10, batch=16, checkpoint_every=8)


def test_operator_resume_checks(traj, tmp_path):
    """Another setting names the key that differs; fewer steps than the checkpoint has is
    refused (it used to return the checkpoint's operator silently)."""
    data, sde = traj
    kw = dict(batch=16, checkpoint_every=3)
    train_operator(data, tmp_path / "op.pt", sde, steps=3, **kw)
    with pytest.raises(ValueError, match=r"train\.lr: checkpoint 0\.0002 vs now 0\.001.*"
                                         r"another config"):
        train_operator(data, tmp_path / "op.pt", sde, steps=6, lr=1e-3, **kw)
    with pytest.raises(ValueError, match=r"steps=2 is invalid.*already at step 3"):
        train_operator(data, tmp_path / "op.pt", sde, steps=2, **kw)
    assert load_checkpoint(tmp_path / "op.pt")["step"] == 3


def test_operator_grad_clip_zero_is_no_clipping(traj, tmp_path):
    """grad_clip=0 (no clipping, as before) is grad_clip=inf, not a zero gradient."""
    data, sde = traj
    kw = dict(steps=4, batch=16, checkpoint_every=4, lr=1e-2)
    a = train_operator(data, tmp_path / "a.pt", sde, grad_clip=0.0, **kw)
    b = train_operator(data, tmp_path / "b.pt", sde, grad_clip=math.inf, **kw)
    c = train_operator(data, tmp_path / "c.pt", sde, grad_clip=1e-6, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kw,match", [
    (dict(checkpoint_every=0), "checkpoint_every=0 is invalid"),
    (dict(grad_clip=-1.0), r"grad_clip=-1\.0 is invalid"),
    (dict(lr_decay="linear"), "lr_decay='linear' is invalid"),
    (dict(ema_decay=1.0), "ema_decay=1.0 is invalid"),
    (dict(warmup=-1), "warmup=-1 is invalid"),
    (dict(steps=1.5), "steps=1.5 is invalid"),
])
def test_operator_bad_settings_name_the_argument_before_any_work(traj, tmp_path, kw, match):
    data, sde = traj
    with pytest.raises(ValueError, match=match):
        train_operator(tmp_path / "no-such-data", tmp_path / "op.pt", sde, **kw)
    assert not (tmp_path / "op.pt").exists()


def test_fit_settings_learning_rate_schedule():
    fit = FitSettings(steps=100, lr=1.0, warmup=10)
    assert fit.lr_at(0) == pytest.approx(0.1 * 0.5 * (1 + math.cos(0.0)))
    assert fit.lr_at(50) == pytest.approx(0.5)
    assert fit.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    const = FitSettings(steps=100, lr=1.0, warmup=0, lr_decay="constant")
    assert const.lr_at(0) == const.lr_at(99) == 1.0
    with pytest.raises(ValueError, match="log_every=0 is invalid"):
        FitSettings(steps=1, lr=1.0, log_every=0)
