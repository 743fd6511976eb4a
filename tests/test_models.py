"""Score networks: shapes, declared parametrisations, EDM preconditioning, class conditioning and
classifier-free guidance, config round trips."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sdekit.dynamics import DiffusionModel, from_eps
from sdekit.models import (
    ConditionedNet,
    FourierEmbedding,
    MLPScoreNet,
    SinusoidalEmbedding,
    UNet,
    build_network,
    wrap,
)
from sdekit.sde import EDMSDE, VESDE, VPSDE, DiscreteDDPM

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny_unet(**kw) -> UNet:
    cfg = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               groups=4)
    cfg.update(kw)
    return UNet(**cfg)


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised output layers random weights so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(channel_mult=(1, 2, 2), attn_resolutions=(2, 4), num_heads=2),
    dict(image_size=16, in_channels=3, channel_mult=(1, 1, 2), embedding="fourier"),
    dict(num_classes=10, dropout=0.1),
])
def test_unet_shapes(cfg):
    net = tiny_unet(**cfg)
    c, s = net.data_shape[0], net.data_shape[1]
    x = torch.randn(3, c, s, s)
    y = torch.tensor([0, 5, 9]) if cfg.get("num_classes") else None
    out = net(x, torch.randn(3), y)
    assert out.shape == x.shape
    # zero-initialised output conv: a fresh eps network predicts 0
    assert torch.count_nonzero(out) == 0
    out.sum().backward()


def test_mlp_shapes_and_flattened_images():
    net = randomize(MLPScoreNet(data_shape=(2,), width=16, depth=2, emb_dim=8))
    assert net(torch.randn(5, 2), torch.randn(5)).shape == (5, 2)
    img = randomize(MLPScoreNet(data_shape=(1, 8, 8), width=16, depth=1, emb_dim=8))
    assert img(torch.randn(4, 1, 8, 8), torch.tensor(0.3)).shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="data_shape"):
        net(torch.randn(5, 3), torch.randn(5))


@pytest.mark.parametrize("kw, match", [
    (dict(image_size=6, channel_mult=(1, 2, 2)), "image_size=6"),
    (dict(prediction="score"), "prediction='score'"),
    (dict(embedding="rope"), "embedding='rope'"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(base_channels=8, num_heads=3), "num_heads=3"),
])
def test_unet_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_unet(**kw)


def test_embeddings():
    c = torch.linspace(-10, 10, 7)
    e = SinusoidalEmbedding(16)(c)
    assert e.shape == (7, 16)
    assert torch.allclose(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(7, 8))
    f1, f2 = FourierEmbedding(16, seed=3), FourierEmbedding(16, seed=3)
    assert torch.equal(f1(c), f2(c))
    assert "freqs" in f1.state_dict()          # travels with checkpoints
    with pytest.raises(ValueError, match="dim=7"):
        SinusoidalEmbedding(7)


def test_config_round_trip_is_json_and_rebuilds_the_same_function():
    for net in (tiny_unet(num_classes=3, prediction="v"),
                MLPScoreNet(data_shape=(2,), width=8, depth=1, emb_dim=8, prediction="x0")):
        randomize(net)
        cfg = json.loads(json.dumps(net.config))
        twin = build_network(cfg)
        twin.load_state_dict(net.state_dict())
        x = torch.randn((2,) + net.data_shape)
        assert torch.equal(net(x, torch.tensor([0.1, 2.0])), twin(x, torch.tensor([0.1, 2.0])))
        assert twin.prediction == net.prediction
    with pytest.raises(ValueError, match="name='transformer'"):
        build_network({"name": "transformer"})
    with pytest.raises(ValueError, match="invalid"):
        build_network({"name": "mlp", "wdth": 3})


def test_edm_preconditioning_matches_karras_table_1():
    net = MLPScoreNet(data_shape=(2,), width=8, depth=1, emb_dim=8, prediction="denoiser",
                      sigma_data=0.7)
    seen = {}

    def fake(x, c_noise, y):
        seen["x"], seen["c"] = x, c_noise
        return torch.full_like(x, 3.0)

    net._forward = fake
    x = torch.randn(4, 2)
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    out = net(x, sigma)
    sd = 0.7
    s = sigma[:, None]
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / torch.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / torch.sqrt(s ** 2 + sd ** 2)
    assert torch.allclose(out, c_skip * x + c_out * 3.0, atol=1e-6)
    assert torch.allclose(seen["x"], c_in * x, atol=1e-6)
    assert torch.allclose(seen["c"], -torch.log(sigma))
    assert net.time_input == "sigma_tilde"


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "denoiser"])
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), EDMSDE(), DiscreteDDPM()], ids=repr)
def test_wrap_uses_the_declared_parametrisation(prediction, sde):
    """wrap() feeds the network lambda (or sigma_tilde and x/alpha for a denoiser) and converts its
    declared output; checked against conversions written out here."""
    net = randomize(MLPScoreNet(data_shape=(3,), width=8, depth=1, emb_dim=8,
                                prediction=prediction))
    model = wrap(net, sde)
    x = torch.randn(5, 3, dtype=torch.float64).float()
    t = torch.linspace(sde.t_min, sde.T, 7, dtype=torch.float64)[1:6]
    a = sde.alpha(t).float()[:, None]
    s = sde.sigma(t).float()[:, None]
    lam = sde.lambda_(t).float()
    with torch.no_grad():
        eps = model.eps(x, t)
        if prediction == "denoiser":
            x0 = net(x / a, s[:, 0] / a[:, 0])
            want = (x - a * x0) / s
        else:
            out = net(x, lam)
            want = {"eps": out, "x0": (x - a * out) / s,
                    "v": (a * out + s * x) / (a * a + s * s)}[prediction]
    assert torch.allclose(eps, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert model.nfe == 1


def test_class_conditioning_null_class_and_guidance():
    net = randomize(tiny_unet(num_classes=4))
    x = torch.randn(3, 1, 8, 8)
    c = torch.tensor([0.5, -1.0, 2.0])
    y = torch.tensor([0, 1, 3])
    with torch.no_grad():
        cond = net(x, c, y)
        null = net(x, c, None)
        assert torch.equal(null, net(x, c, torch.full((3,), 4)))
        assert not torch.allclose(cond, null)
        w = 2.5
        guided = ConditionedNet(net, y, guidance=w)(x, c)
        assert torch.allclose(guided, (1 + w) * cond - w * null, atol=1e-5)
    sde = VPSDE()
    model = wrap(net, sde, y=y, guidance=w)
    with torch.no_grad():
        model.eps(x, 0.5)
    assert model.nfe == 2   # both CFG branches run in one batched call: 2 network passes
    with pytest.raises(ValueError, match="labels outside"):
        net(x, c, torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match="guidance"):
        ConditionedNet(tiny_unet(), None, guidance=1.0)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet()(x, c, y)


def test_wrap_rejects_foreign_callables():
    with pytest.raises(TypeError, match="ScoreNet"):
        wrap(lambda x, c: x, VPSDE())


def test_a_network_can_drive_diffusion_model_directly():
    net = randomize(tiny_unet(prediction="v"))
    sde = VPSDE()
    dm = DiffusionModel(net, sde, prediction=net.prediction, time_input=net.time_input)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        v = dm.v(x, 0.3)
        eps = dm.eps(x, 0.3)
    a, s = float(sde.alpha(0.3)), float(sde.sigma(0.3))
    assert torch.allclose(from_eps("v", eps, x, torch.tensor(a), torch.tensor(s)), v, atol=1e-5)
    assert math.isclose(a * a + s * s, 1.0, rel_tol=1e-9)
