"""sdekit.interop.to_diffusers: a digits U-Net trained by sdekit's trainer, sampled inside an
unchanged diffusers DDPMPipeline with SdekitScheduler, equals sdekit.sample with the same solver,
grid and seeds (images and FD-digits). Nothing is downloaded: the network is trained here."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import sdekit
from sdekit.models import wrap
from sdekit.noise import sample_seeds
from sdekit.training import Trainer, load_model, recipe
from sdekit.training.fd_digits import RECIPE, FDDigits

diffusers = pytest.importorskip("diffusers")
from sdekit.interop import DiffusersUNet, SdekitScheduler, to_diffusers

pytestmark = pytest.mark.usefixtures("torch_single_thread")
N = 64
STEPS = 10   # pipeline num_inference_steps: 9 solver steps and the final x0 (10 NFE)


def _train(out, net=None, **kw):
    """A tiny digits U-Net, 40 optimiser steps on the VP SDE (the digits recipe's SDE)."""
    net = dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, groups=4, **(net or {}))
    cfg = recipe("digits", net=net, steps=40, batch_size=32, warmup=5, ckpt_every=40,
                 log_every=40, sample_n=4, sample_steps=2, device="cpu", **kw)
    Trainer(cfg, out, progress=False).train()
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The digits recipe's own network: an EDM-preconditioned denoiser (told sigma_tilde)."""
    return _train(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def eps_checkpoint(tmp_path_factory):
    """An eps-network (told the half-logSNR lambda)."""
    return _train(tmp_path_factory.mktemp("digits_eps"), net={"prediction": "eps"}, loss="eps")


@pytest.fixture(scope="module")
def fd(tmp_path_factory):
    """FD-digits with a 3-epoch classifier (the recipe trains 40): enough to compare two sets."""
    saved = RECIPE["epochs"]
    RECIPE["epochs"] = 3
    try:
        return FDDigits(cache=tmp_path_factory.mktemp("fd") / "clf.pt")
    finally:
        RECIPE["epochs"] = saved


def _pipeline_images(ckpt, solver, seeds):
    unet, scheduler = to_diffusers(ckpt, solver=solver)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]   # per-sample initial noise
    img = pipe(batch_size=len(seeds), generator=gens, num_inference_steps=STEPS,
               output_type="pt").images
    return img * 2 - 1, scheduler      # the pipeline's (x / 2 + 0.5).clamp(0, 1), undone


def _sdekit_images(ckpt, solver, seeds):
    net, sde, _ = load_model(ckpt)
    sol = sdekit.sample(sde, wrap(net, sde), shape=(len(seeds), *net.data_shape), solver=solver,
                        steps=STEPS - 1, denoise=True, seeds=seeds)
    return sol.x.clamp(-1, 1), sol


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc_bh2", "heun"])
def test_trained_digits_unet_in_a_diffusers_pipeline_equals_sdekit_sample(checkpoint, fd, solver):
    seeds = sample_seeds(0, N)
    piped, scheduler = _pipeline_images(checkpoint, solver, seeds)
    ref, sol = _sdekit_images(checkpoint, solver, seeds)
    assert len(scheduler.timesteps) == sol.nfe          # one timestep per network call
    assert torch.equal(scheduler.times, torch.as_tensor(sol.times, dtype=torch.float64))
    assert ref.std() > 0.1 and not torch.equal(piped[0], piped[1])   # real, distinct samples
    assert torch.allclose(piped, ref, atol=1e-6, rtol=0)
    assert math.isclose(fd(piped), fd(ref), rel_tol=1e-5, abs_tol=1e-6)


def test_eps_network_is_told_its_own_time_input(eps_checkpoint):
    seeds = sample_seeds(1, 8)
    piped, scheduler = _pipeline_images(eps_checkpoint, "dpmpp_2m", seeds)
    ref, _ = _sdekit_images(eps_checkpoint, "dpmpp_2m", seeds)
    net, sde, _ = load_model(eps_checkpoint)
    assert net.time_input == "lambda"
    assert torch.allclose(scheduler.timesteps, sde.lambda_(torch.tensor(scheduler._core.calls,
                                                                        dtype=torch.float64)))
    assert torch.allclose(piped, ref, atol=1e-6, rtol=0)


def test_unet_wrapper_matches_the_diffusion_model_call(checkpoint):
    """unet(x, sigma_tilde(t)) is the denoiser sdekit calls at (x, t), for a batch of times too."""
    net, sde, _ = load_model(checkpoint)
    unet = DiffusersUNet(net, sde)
    assert (unet.config.sample_size, unet.config.in_channels) == (8, 1)
    assert unet.dtype == torch.float32 and unet.device.type == "cpu"
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.3, 0.01], dtype=torch.float64)
    ref = wrap(net, sde).x0(x, t)
    out = unet(x, sde.sigma_tilde(t)).sample
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(unet(x, sde.sigma_tilde(t), return_dict=False)[0], out)


def test_bad_input_names_the_argument(checkpoint):
    net, sde, _ = load_model(checkpoint)
    with pytest.raises(ValueError, match="sde is required"):
        to_diffusers(net)
    with pytest.raises(ValueError, match="records its own SDE"):
        to_diffusers(checkpoint, sde=sde)
    with pytest.raises(TypeError, match="ScoreNet"):
        DiffusersUNet(lambda x, t: x, sde)
    with pytest.raises(ValueError, match="not both"):
        SdekitScheduler(sde=sde, scheduler_config={"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="need.*sde="):
        SdekitScheduler(prediction="denoiser")
    with pytest.raises(ValueError, match="prediction='bogus'"):
        SdekitScheduler(sde=sde, prediction="bogus")
    _, scheduler = to_diffusers(checkpoint, solver="dpmpp_2m")
    with pytest.raises(ValueError, match="sdekit_sde=.*pass that sde= again"):
        SdekitScheduler.from_config(scheduler.config)
    again = SdekitScheduler.from_config(scheduler.config, sde=sde)   # round trip, sde given
    assert again.solver.name == "dpmpp_2m" and again._core.time_input == "sigma_tilde"
    with pytest.raises(TypeError, match="continuous-time"):
        len(scheduler)
    assert bool(scheduler)


def test_the_unet_wrapper_does_not_import_diffusers():
    code = ("import sys, sdekit.interop.export; assert 'diffusers' not in sys.modules; "
            "sdekit.interop.to_diffusers")
    subprocess.run([sys.executable, "-c", code], check=True)
