"""The feature-space loss (sdekit.training.feature_loss) and train_operator's feature_loss
option, on tiny networks (the trained digits feature network is replaced by a tiny one)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sdekit
from sdekit.distill import _objective, generate_trajectories, train_operator
from sdekit.training import feature_loss as FL
from sdekit.training.feature_loss import FeatureLoss


class Tiny(nn.Module):
    """Two conv layers (the second strided) and a dropout, which must be off in the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)

    def features(self, x):
        h1 = torch.tanh(self.c1(x))
        return [h1, self.drop(torch.tanh(self.c2(h1)))]


def _direct(net, a, b):
    """The loss written out: per layer, channel-unit-normalised activations, squared difference
    averaged over channels and positions; layers summed; batch averaged."""
    total = torch.zeros(a.shape[0], dtype=a.dtype)
    with torch.no_grad():
        for fa, fb in zip(net.features(a), net.features(b)):
            na = fa / fa.pow(2).sum(1, keepdim=True).sqrt()
            nb = fb / fb.pow(2).sum(1, keepdim=True).sqrt()
            total += ((na - nb) ** 2).mean((1, 2, 3))
    return total.mean()


def test_feature_loss_is_the_normalised_layer_distance_and_freezes_its_network():
    net = Tiny().double()
    loss = FeatureLoss(net, eps=0.0).train()   # train() must leave the feature net in eval
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    value = loss(a, b)
    torch.testing.assert_close(value, _direct(net.eval(), a, b), rtol=1e-10, atol=1e-12)
    assert value.item() > 0 and loss(a, b).item() == value.item()   # no dropout noise
    assert loss(b, b).item() == pytest.approx(0.0, abs=1e-12)
    # scaling every activation of a layer by a positive factor per position changes nothing:
    # only the direction of the channel vector counts (a scaled input to a linear first layer
    # without bias, here through a bias-free copy of the tiny network)
    lin = Tiny().double()
    lin.c1.bias.data.zero_()
    lin.features = lambda x: [lin.c1(x)]
    torch.testing.assert_close(FeatureLoss(lin)(3.0 * a, b), FeatureLoss(lin)(a, b))
    value.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="shape mismatch"):
        loss(a, b[:, :, :4])
    with pytest.raises(ValueError, match="net=.* is invalid"):
        FeatureLoss(lambda x: [x])


def _digits_like_trajectories(path, n=64):
    """A Gaussian teacher on 64 = 8 x 8 coordinates, its trajectories reshaped to images."""
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData.random(sde, dim=64, eig_min=1e-2, seed=3)
    vec = path / "vec"
    generate_trajectories(vec, sde, data.model(), (64,), n, solver="ddim",
                          steps_per_segment=2, shard_size=n)
    return sde, vec


def test_train_operator_feature_loss_option(tmp_path, monkeypatch):
    """feature_loss=c adds c times the feature loss of the last slot to the slot-weighted L2
    loss; it is recorded in the checkpoint (a resume with another weight is refused); vector
    states and negative weights are refused before any work."""
    tiny = Tiny()
    monkeypatch.setattr(FL, "digits_feature_loss", lambda cache=None: FeatureLoss(tiny))
    w = torch.tensor([0.5, 1.5]).reshape(1, 2, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 1, 8, 8, generator=g), torch.randn(3, 2, 1, 8, 8, generator=g)
    l2 = (w * (pred - target) ** 2).mean()
    torch.testing.assert_close(_objective(w, 0.0, (1, 8, 8))(pred, target), l2)
    torch.testing.assert_close(_objective(w, 0.3, (1, 8, 8))(pred, target),
                               l2 + 0.3 * FeatureLoss(tiny)(pred[:, -1], target[:, -1]))
    with pytest.raises(ValueError, match=r"feature_loss=0.3 needs digit images \(1, S, S\)"):
        _objective(w, 0.3, (64,))

    sde, vec = _digits_like_trajectories(tmp_path)
    with pytest.raises(ValueError, match="feature_loss=-1.0 is invalid"):
        train_operator(vec, tmp_path / "x.pt", sde, feature_loss=-1.0)
    with pytest.raises(ValueError, match="needs digit images"):
        train_operator(vec, tmp_path / "x.pt", sde, feature_loss=0.5, steps=1)
    assert not (tmp_path / "x.pt").exists()


def test_train_operator_records_and_resumes_the_feature_loss(tmp_path, monkeypatch):
    """On digit-shaped trajectories (a tiny U-Net teacher), the feature loss trains, is
    recorded, and a resume keyed on it refuses another weight."""
    from sdekit.models import build_network, wrap
    from sdekit.training.checkpoint import load_checkpoint
    tiny = Tiny()
    monkeypatch.setattr(FL, "digits_feature_loss", lambda cache=None: FeatureLoss(tiny))
    torch.manual_seed(0)
    cfg = {"name": "unet", "in_channels": 1, "image_size": 8, "base_channels": 8,
           "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "groups": 4}
    sde = sdekit.VPSDE()
    teacher = build_network(cfg).eval()
    generate_trajectories(tmp_path / "traj", sde, wrap(teacher, sde), (1, 8, 8), 16,
                          solver="ddim", steps_per_segment=1, slots=2, shard_size=16)
    kw = dict(backbone=cfg, backbone_at="start", batch=4, steps=2, checkpoint_every=1)
    train_operator(tmp_path / "traj", tmp_path / "op.pt", sde, feature_loss=0.5, until=1, **kw)
    assert load_checkpoint(tmp_path / "op.pt")["config"]["train"]["feature_loss"] == 0.5
    with pytest.raises(ValueError, match="another config"):
        train_operator(tmp_path / "traj", tmp_path / "op.pt", sde, feature_loss=0.25, **kw)
    op = train_operator(tmp_path / "traj", tmp_path / "op.pt", sde, feature_loss=0.5, **kw)
    assert load_checkpoint(tmp_path / "op.pt")["step"] == 2
    assert all(torch.isfinite(p).all() for p in op.parameters())
    # without the option nothing is recorded (older checkpoints keep resuming)
    train_operator(tmp_path / "traj", tmp_path / "plain.pt", sde, **kw)
    assert "feature_loss" not in load_checkpoint(tmp_path / "plain.pt")["config"]["train"]


def test_distill_cli_refuses_a_feature_loss_on_vectors_before_any_work(tmp_path, capsys):
    from sdekit.cli.main import main as cli
    out = tmp_path / "op"
    assert cli(["distill", "--problem", "gaussian", "--dim", "4", "--out", str(out),
                "--n", "64", "--train-steps", "1", "--feature-loss", "0.5", "--quiet"]) == 2
    assert "feature_loss=0.5 needs digit images (1, S, S)" in capsys.readouterr().err
    assert not (out / "trajectories").exists()
    with pytest.raises(SystemExit) as e:
        cli(["distill", "--problem", "gaussian", "--out", str(out), "--feature-loss", "-1"])
    assert e.value.code == 2
    assert "--feature-loss: -1 is invalid: expected a number >= 0" in capsys.readouterr().err
