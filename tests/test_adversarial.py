"""The second stages of the operator distillation (issue 18), adversarial and distribution
matching: the discriminator and the fake score learn, the stages resume exactly, their settings
and checkpoints are checked."""
from __future__ import annotations

import math

import pytest
import torch

import sdekit
from sdekit.distill import (
    AdversarialSettings,
    DistributionMatchingSettings,
    generate_trajectories,
    load_operator,
    train_operator,
)
from sdekit.models.embedding import ScoreNet
from sdekit.training.adversarial import AdversarialTerm, DistributionMatchingTerm, discriminator


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 6), (5,)])
def test_discriminator_gives_one_logit_per_state(shape):
    d = discriminator(shape, width=4)
    assert d(torch.randn((7,) + shape)).shape == (7, 1)


def test_discriminator_steps_separate_two_laws_and_push_the_fakes():
    """Real N(+1, I) against fake N(-1, I): its loss falls from 2 ln 2 and the student's loss
    has a gradient that moves the fakes toward the real law."""
    torch.manual_seed(0)
    term = AdversarialTerm((4,), lr=1e-2, width=8)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        real = torch.randn(64, 4, generator=g) + 1
        fake = (torch.randn(64, 4, generator=g) - 1).requires_grad_(True)
        loss = term.step(real, fake)
    assert term.last_disc_loss < 0.5 * 2 * math.log(2)
    (grad,) = torch.autograd.grad(loss, fake)
    assert (-grad).mean() > 0, "descending the student's loss moves the fakes toward +1"


def _teacher(tmp_path):
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData.random(sde, dim=4, eig_min=1e-2, seed=3, mean_scale=1.0)
    generate_trajectories(tmp_path / "traj", sde, data.model(), (4,), 128, solver="heun",
                          steps_per_segment=4, shard_size=128)
    return sde, data


def test_adversarial_stage_resumes_exactly_and_records_its_first_stage(tmp_path):
    """4 L2 steps then 4 adversarial steps; stopping inside either stage and resuming gives the
    uninterrupted run's weights; the L2 stage is kept beside it and named in the config."""
    sde, _ = _teacher(tmp_path)
    adv = AdversarialSettings(0.5, steps=4, lr=1e-3)
    kw = dict(steps=4, batch=16, checkpoint_every=2, adversarial=adv)
    full = train_operator(tmp_path / "traj", tmp_path / "a" / "op.pt", sde, **kw)
    assert (tmp_path / "a" / "op_l2.pt").exists()
    for stop in (2, 6):
        out = tmp_path / f"b{stop}" / "op.pt"
        train_operator(tmp_path / "traj", out, sde, until=stop, **kw)
        assert out.exists() == (stop > 4)
        resumed = train_operator(tmp_path / "traj", out, sde, **kw)
        for (k, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"stop {stop}: {k}")
    l2, _ = load_operator(tmp_path / "a" / "op_l2.pt")
    assert any((p - q).abs().max() > 0 for p, q in
               zip(l2.state_dict().values(), full.state_dict().values())), "stage 2 trained"
    _, cfg = load_operator(tmp_path / "a" / "op.pt")
    from sdekit._io import content_hash
    assert cfg["train"]["adversarial"]["weight"] == 0.5
    assert cfg["train"]["adversarial"]["init_sha256"] == content_hash(l2.state_dict())
    with pytest.raises(ValueError, match="another config"):   # other adversarial settings
        train_operator(tmp_path / "traj", tmp_path / "a" / "op.pt", sde,
                       **{**kw, "adversarial": AdversarialSettings(0.25, steps=4, lr=1e-3)})


def test_adversarial_stage_without_its_discriminator_is_refused(tmp_path):
    """A stage-2 checkpoint whose discriminator state is gone cannot resume exactly: refused by
    name, not silently restarted with a fresh discriminator."""
    from sdekit.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    sde, _ = _teacher(tmp_path)
    kw = dict(steps=2, batch=16, checkpoint_every=1,
              adversarial=AdversarialSettings(0.5, steps=4))
    out = tmp_path / "op.pt"
    train_operator(tmp_path / "traj", out, sde, until=3, **kw)
    ck = load_checkpoint(out)
    save_checkpoint(out, config=ck["config"], model=ck["model"], ema=ck["ema"],
                    optimizer=ck["optimizer"], step=ck["step"], extra={"world_size": 1})
    with pytest.raises(CheckpointError, match="no discriminator state"):
        train_operator(tmp_path / "traj", out, sde, **kw)


@pytest.mark.parametrize("kw, name", [
    ({"weight": 0.0}, "adversarial weight"), ({"weight": float("nan")}, "adversarial weight"),
    ({"weight": 1.0, "steps": 0}, "adversarial steps"),
    ({"weight": 1.0, "lr": -1.0}, "adversarial lr"),
    ({"weight": 1.0, "disc_lr": 0.0}, "adversarial disc_lr"),
    ({"weight": 1.0, "ema_decay": 1.0}, "adversarial ema_decay")])
def test_adversarial_settings_name_a_bad_value(kw, name):
    with pytest.raises(ValueError, match=name):
        AdversarialSettings(**kw)


def test_cli_adversarial_stage(tmp_path):
    """`sdekit distill --adversarial W` keeps operator_l2.pt and writes operator.pt with the
    adversarial settings; a negative weight is refused by name."""
    from sdekit.cli.main import main as cli
    out = tmp_path / "op"
    base = ["distill", "--problem", "gaussian", "--dim", "4", "--n", "64", "--train-steps", "2",
            "--batch", "16", "--quiet"]
    assert cli(base + ["--out", str(out), "--adversarial", "0.1",
                       "--adversarial-steps", "2"]) == 0
    assert (out / "operator_l2.pt").exists()
    _, cfg = load_operator(out / "operator.pt")
    assert cfg["train"]["adversarial"]["steps"] == 2
    with pytest.raises(SystemExit):
        cli(base + ["--out", str(tmp_path / "x"), "--adversarial", "-1"])
    # a setting of the stage without the stage is refused, not ignored, before any work
    assert cli(base + ["--out", str(tmp_path / "y"), "--adversarial-steps", "5"]) == 2
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------ distribution matching (DMD)
class _GaussianDenoiser(ScoreNet):
    """The exact x0-prediction of data N(m, I) under a variance-preserving process, with the
    mean m a parameter (so the fake score's copy can learn another one)."""

    def __init__(self, m: float, dim: int = 3) -> None:
        super().__init__(prediction="x0")
        self.m = torch.nn.Parameter(torch.full((dim,), float(m)))

    def _forward(self, x, c_noise, y):
        a = torch.sigmoid(2 * c_noise).sqrt().reshape(-1, 1)   # lambda -> alpha (VP)
        return self.m + a * (x - a * self.m)


def _dmd_term(m_teacher=1.0, lr=0.05, fake_steps=1):
    from sdekit.training.losses import DSMLoss
    sde = sdekit.VPSDE()
    net = _GaussianDenoiser(m_teacher).requires_grad_(False)
    loss = DSMLoss(sde, "eps", prediction="x0", time_input="lambda")
    return DistributionMatchingTerm(net, sde, loss, lr=lr, fake_steps=fake_steps), net


def test_dmd_term_is_zero_while_its_fake_score_is_the_teacher():
    """The fake score starts as a copy of the teacher: the first step's loss and its gradient
    are exactly zero, and the teacher's network is never trained."""
    term, net = _dmd_term()
    x = torch.randn(32, 3).requires_grad_(True)
    loss = term.step(x, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(loss, x)
    assert float(loss.detach()) == 0.0 and float(grad.abs().max()) == 0.0
    torch.testing.assert_close(net.m, torch.ones(3))
    assert float((term.fake_net.m.detach() - 1).abs().max()) > 0, "the fake score took a step"


def test_dmd_fake_score_learns_the_students_law_and_pushes_it_to_the_teachers():
    """Student samples from N(-1, I) against a teacher of N(+1, I): the fake score's mean moves
    to the student's, and descending the student's loss moves the samples toward +1."""
    term, _ = _dmd_term(lr=0.05, fake_steps=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = (torch.randn(64, 3, generator=g) - 1).requires_grad_(True)
        loss = term.step(x, g)
    assert float(term.fake_net.m.detach().mean()) < -0.5, term.fake_net.m
    (grad,) = torch.autograd.grad(loss, x)
    assert (-grad).mean() > 0, "descending the student's loss moves the samples toward +1"


def test_dmd_stage_resumes_exactly_and_needs_the_teachers_checkpoint(tmp_path):
    """`sdekit distill --dmd W` from a trained toy checkpoint: the L2 stage is kept, the DMD
    stage recorded and resumable exactly through the library; without a checkpoint teacher, with
    --adversarial too, or with another teacher's checkpoint it is refused before any work."""
    from sdekit.cli.main import main as cli
    run, out = tmp_path / "run", tmp_path / "op"
    assert cli(["train", "--data", "eight_gaussians", "--out", str(run), "--steps", "20",
                "--width", "32", "--depth", "1", "--ckpt-every", "20", "--no-progress",
                "--sample-n", "16"]) == 0
    ck = str(run / "checkpoint.pt")
    base = ["distill", "--checkpoint", ck, "--n", "64", "--train-steps", "2", "--batch", "16",
            "--quiet"]
    assert cli(base + ["--out", str(out), "--dmd", "1.0", "--dmd-steps", "3"]) == 0
    assert (out / "operator_l2.pt").exists()
    full, cfg = load_operator(out / "operator.pt")
    assert cfg["train"]["distribution_matching"]["steps"] == 3
    assert "adversarial" not in cfg["train"]
    sde = sdekit.get_sde("vp")
    stage = DistributionMatchingSettings(1.0, steps=3)
    kw = dict(steps=2, batch=16, lr=2e-3, checkpoint_every=1, adversarial=stage, teacher=ck)
    for stop in (4,):   # inside the DMD stage
        b = tmp_path / f"b{stop}" / "operator.pt"
        train_operator(out / "trajectories", b, sde, until=stop, **kw)
        resumed = train_operator(out / "trajectories", b, sde, **kw)
        for (k, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"stop {stop}: {k}")
    with pytest.raises(ValueError, match="teacher=None"):
        train_operator(out / "trajectories", tmp_path / "c.pt", sde, steps=2, adversarial=stage)
    other = tmp_path / "run2"
    assert cli(["train", "--data", "eight_gaussians", "--out", str(other), "--steps", "20",
                "--width", "32", "--depth", "1", "--ckpt-every", "20", "--no-progress",
                "--sample-n", "16", "--seed", "5"]) == 0
    with pytest.raises(ValueError, match="were made by weights"):
        train_operator(out / "trajectories", tmp_path / "d.pt", sde, steps=2, adversarial=stage,
                       teacher=other / "checkpoint.pt")
    assert cli(base + ["--out", str(tmp_path / "x"), "--dmd", "1", "--adversarial", "1"]) == 2
    assert cli(["distill", "--problem", "gaussian", "--dim", "4", "--n", "64", "--quiet",
                "--out", str(tmp_path / "y"), "--dmd", "1"]) == 2
    assert cli(base + ["--out", str(tmp_path / "z"), "--dmd-lr", "1e-3"]) == 2
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


@pytest.mark.parametrize("kw, name", [
    ({"weight": 0.0}, "distribution matching weight"),
    ({"steps": 0}, "distribution matching steps"),
    ({"fake_lr": float("inf")}, "distribution matching fake_lr"),
    ({"fake_steps": 0}, "distribution matching fake_steps"),
    ({"ema_decay": -0.1}, "distribution matching ema_decay")])
def test_distribution_matching_settings_name_a_bad_value(kw, name):
    with pytest.raises(ValueError, match=name):
        DistributionMatchingSettings(**kw)
