"""sdekit.interop.SdekitScheduler: sdekit solvers inside an unchanged diffusers pipeline loop
(tiny local UNet2DModel, nothing downloaded)."""
from __future__ import annotations

import inspect
import runpy
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import sdekit

diffusers = pytest.importorskip("diffusers")
from sdekit.interop import SdekitScheduler

#: solvers a fixed timesteps list cannot serve (their call times depend on the network's
#: outputs, or a learned operator replaces the network)
REFUSED = {"dopri5": "adaptive", "dpm_solver_adaptive": "adaptive", "dpmpp_adaptive": "adaptive",
           "fno": "a learned operator"}
STEPS = 6
SEEDS = [11, 12]


def _unet() -> torch.nn.Module:
    """A tiny random UNet2DModel made a sensible eps-network: the exact eps of data
    N(0, 0.5^2 I) plus 0.1 x the random UNet (so samples stay mostly inside the pipeline's
    [0, 1] clamp and every solver's result depends on the network)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    sde = sdekit.DiscreteDDPM()

    def gaussian_eps(module, args, out):
        x, t = args[0], torch.as_tensor(args[1], dtype=torch.float64)
        tt = sde.timestep_to_t(t.clamp(0, sde.N - 1)).reshape(-1, *[1] * (x.ndim - 1))
        a, s = sde.alpha(tt).to(x), sde.sigma(tt).to(x)
        out.sample = s * x / (0.25 * a * a + s * s) + 0.1 * out.sample
        return out

    unet.register_forward_hook(gaussian_eps)
    unet.calls = 0

    def count(module, args):
        module.calls += 1

    unet.register_forward_pre_hook(count)
    return unet


@pytest.fixture(scope="module")
def unet():
    return _unet()


def _pipe(unet, scheduler, steps=STEPS, batch=2, seed=0, generator=None):
    pipe = diffusers.DDPMPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    unet.calls = 0
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    return pipe(batch_size=batch, generator=gen, num_inference_steps=steps,
                output_type="pt").images


def _initial_noise(unet, batch=2, seed=0):
    """The pipeline's initial noise (diffusers' randn_tensor on the CPU)."""
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_scheduler_module_imports_diffusers_only_when_the_class_is_used():
    code = ("import sys, sdekit.interop.scheduler as m; assert 'diffusers' not in sys.modules; "
            "m.SdekitScheduler; assert 'diffusers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ddim_pipeline_equals_diffusers_ddim(unet):
    ddim = diffusers.DDIMScheduler(clip_sample=False)
    ref = _pipe(unet, ddim, steps=10)
    sched = SdekitScheduler(solver="ddim", grid="leading")
    out = _pipe(unet, sched, steps=10)
    assert torch.equal(sched.timesteps, ddim.timesteps)
    assert unet.calls == 10
    inside = ((ref > 0) & (ref < 1)).float().mean().item()
    assert inside > 0.9   # not decided by the pipeline's clamp
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", sdekit.solver_names())
def test_every_solver_runs_in_the_pipeline(unet, name, record_property):
    """Inside DDPMPipeline every fixed-grid solver gives what sdekit.sample gives on the same
    grid (per-sample seeds for the stochastic ones), with one network call per timestep."""
    if name in REFUSED:
        with pytest.raises(ValueError, match=f"solver {name!r} is {REFUSED[name]}"):
            SdekitScheduler(solver=name)
        return
    sched = SdekitScheduler(solver=name, seeds=SEEDS)
    out = _pipe(unet, sched)
    nfe = unet.calls
    record_property("nfe", nfe)
    print(f"{name}: NFE {nfe} in DDPMPipeline(num_inference_steps={STEPS})")
    assert nfe == len(sched.timesteps)
    ref = sdekit.sample(sched.sde, lambda x, t: unet(x, t).sample, _initial_noise(unet),
                        solver=name, grid=sched.times, denoise=True, seeds=SEEDS)
    assert nfe == ref.nfe + int(sched._core.lead_in)
    assert nfe == sched.solver.expected_nfe(sched.times.numel() - 1) + 1   # + the final x0
    # the pipeline's first call is at its sample x_T; a solver working in x / alpha makes it at
    # (x_T / alpha) alpha, an ulp away, which the results show at ~1e-6
    torch.testing.assert_close(out, (ref.x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_multistage_timesteps_one_per_model_call():
    """Heun: two calls per step (the second at the step's end), then the final x0."""
    sched = SdekitScheduler(solver="heun", grid="leading")
    sched.set_timesteps(4)
    assert sched.order == 2
    assert sched.timesteps.tolist() == [750, 500, 500, 250, 250, 0, 0]


def test_explicit_timesteps_and_grid():
    """set_timesteps(timesteps=...) in the network's units and an explicit sdekit grid give the
    same plan as the spacing rule they spell out."""
    leading = SdekitScheduler(solver="ddim", grid="leading")
    leading.set_timesteps(5)
    custom = SdekitScheduler(solver="ddim")
    custom.set_timesteps(timesteps=[800, 600, 400, 200, 0])
    explicit = SdekitScheduler(solver="ddim", grid=leading.times)
    explicit.set_timesteps(5)
    for s in (custom, explicit):
        assert torch.equal(s.timesteps, leading.timesteps)
        torch.testing.assert_close(s.times, leading.times, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="num_inference_steps=4 disagrees with the explicit grid "
                                         "of 5 times"):
        explicit.set_timesteps(4)


def test_churn_before_the_first_call_gets_a_lead_in_timestep():
    """EDM churn at the first step moves the state before any model call: the pipeline's first
    output (at its own sample) is discarded and the result is still sdekit.sample's."""
    opts = {"S_tmax": 1e9}
    sched = SdekitScheduler(solver="edm_heun_sde", grid_options={"t_start": 0.9}, seeds=[5, 6],
                            **opts)
    sched.set_timesteps(5)
    torch.manual_seed(0)
    W = 0.3 * torch.randn(4, 4)

    def net(x, t):
        return torch.tanh(x @ W) + torch.as_tensor(t).reshape(-1, 1) / 1000

    x_T = torch.randn(2, 4)
    x, x0s = x_T, []
    for t in sched.timesteps:
        out = sched.step(net(x, t), t, x)
        x, x0s = out.prev_sample, x0s + [out.pred_original_sample]
    ref = sdekit.sample(sched.sde, net, x_T, solver="edm_heun_sde", grid=sched.times,
                        denoise=True, seeds=[5, 6], **opts)
    assert len(sched.timesteps) == ref.nfe + 1 and x0s[0] is None
    torch.testing.assert_close(x, ref.x, atol=1e-6, rtol=0)


def test_generator_gives_per_sample_seeds(unet):
    """A stochastic solver seeded from a list of generators: a sample does not depend on its
    batch (batch of 2 vs the second sample alone)."""
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    pair = _pipe(unet, SdekitScheduler(solver="dpmpp_2m_sde"), batch=2, generator=gens(3, 4))
    alone = _pipe(unet, SdekitScheduler(solver="dpmpp_2m_sde"), batch=1, generator=gens(4))
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(pair[0], pair[1], atol=1e-3)


def test_bad_timestep_and_edited_sample_are_refused():
    sched = SdekitScheduler(solver="dpmpp_2m")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros_like(x), 999, x)
    sched.set_timesteps(5)
    t0, t1 = sched.timesteps[:2].tolist()
    with pytest.raises(ValueError, match=rf"timestep=500 .*at timestep {t0:g}"):
        sched.step(torch.zeros_like(x), 500, x)
    prev = sched.step(0.1 * x, t0, x).prev_sample
    with pytest.raises(ValueError, match=rf"timestep={t0:g} .*call 1 of 5\) is at timestep"):
        sched.step(0.1 * prev, t0, prev)
    with pytest.raises(ValueError, match="sample different from the prev_sample"):
        sched.step(0.1 * prev, t1, prev + 1)
    with pytest.raises(ValueError, match="shape mismatch: model_output"):
        sched.step(prev[:1], t1, prev)


def test_abandoned_solve_ends_its_thread():
    before = threading.active_count()
    sched = SdekitScheduler(solver="heun")
    sched.set_timesteps(4)
    x = torch.randn(1, 3, 8, 8)
    for t in sched.timesteps[:3]:
        x = sched.step(0.1 * x, t, x).prev_sample
    assert threading.active_count() == before + 1
    sched.set_timesteps(4)   # a new solve ends the unfinished one
    assert threading.active_count() == before


def test_from_config_keeps_the_model_and_round_trips(tmp_path):
    src = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, prediction_type="v_prediction")
    sched = SdekitScheduler.from_config(src.config, solver="dpmpp_3m", grid="logsnr",
                                        lower_order_final=False)
    assert sched.config.prediction_type == "v_prediction"
    assert sched._core.prediction == "v"
    assert SdekitScheduler.from_config(src).config.source_class == "DDIMScheduler"
    sched.save_config(tmp_path)
    again = SdekitScheduler.from_pretrained(tmp_path)
    assert again.config.solver_options == {"lower_order_final": False}
    for s in (sched, again):
        s.set_timesteps(8)
    assert torch.equal(sched.timesteps, again.timesteps)
    with pytest.raises(ValueError, match="grid='leadin' is invalid"):
        SdekitScheduler(grid="leadin")


def test_flow_matching_config_from_its_dot_config():
    """A FlowMatch scheduler's .config (which has no _class_name): flow timesteps N sigma, and
    the loop gives what sdekit.sample gives (a manual pipeline loop, as SD3's)."""
    cfg = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    sched = SdekitScheduler.from_config(cfg, solver="dpmpp_2m")
    sched.set_timesteps(5)
    assert sched.sde.__class__.__name__ == "FlowSDE" and float(sched.timesteps[0]) == 1000.0
    torch.manual_seed(0)
    W = 0.3 * torch.randn(4, 4)

    def net(x, t):   # a flow network: u = eps - x0, told 1000 t
        return torch.tanh(x @ W) + t.reshape(-1, 1) / 1000

    x_T = torch.randn(3, 4)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t.expand(3)), t, x).prev_sample
    ref = sdekit.sample(sched.sde, sdekit.DiffusionModel(net, sched.sde, "flow", "t1000"), x_T,
                        solver="dpmpp_2m", grid=sched.times, denoise=True)
    torch.testing.assert_close(x, ref.x, atol=1e-6, rtol=0)
    assert len(sched.timesteps) == ref.nfe


def test_example_runs(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "diffusers_pipeline.py"
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "ddim" in out and "NFE" in out


# --- flow pipelines' custom sigmas (Flux, SD3) and img2img ------------------------------------
def _retrieve_timesteps(scheduler, num_inference_steps=None, device=None, timesteps=None,
                        sigmas=None, **kwargs):
    """diffusers' pipelines' retrieve_timesteps (the Flux / SD3 modules import transformers, not
    installed here), as it calls the scheduler: custom lists only where set_timesteps' signature
    names them."""
    params = inspect.signature(scheduler.set_timesteps).parameters
    if timesteps is not None:
        assert "timesteps" in params
        scheduler.set_timesteps(timesteps=timesteps, device=device, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)
    if sigmas is not None:
        assert "sigmas" in params
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps, num_inference_steps


def _get_timesteps(scheduler, num_inference_steps, strength, begin=True):
    """The img2img pipelines' get_timesteps (StableDiffusionImg2Img's int() rounding)."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if begin and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, t_start


@pytest.fixture(scope="module")
def flux():
    """A tiny random FluxTransformer2DModel and its conditioning (packed latents: 16 tokens
    of 8 channels)."""
    torch.manual_seed(0)
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4)).eval()
    ids = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8), "pooled_projections": torch.randn(2, 8),
            "txt_ids": torch.zeros(3, 3),
            "img_ids": torch.cat([torch.zeros(16, 1), ids.reshape(16, 2)], 1)}

    def net(latents, t):    # the Flux pipeline's call: timestep = t.expand(B) / 1000
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with torch.no_grad():
            return tr(hidden_states=latents, timestep=timestep / 1000, guidance=None,
                      return_dict=False, **cond)[0]

    return net


def _flux_loop(scheduler, net, latents, steps, mu, strength=None, image=None):
    """The scheduler calls of FluxPipeline (strength None) / FluxImg2ImgPipeline."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = _retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    if strength is not None:
        timesteps, _ = _get_timesteps(scheduler, steps, strength)
        latent_timestep = timesteps[:1].repeat(latents.shape[0])
        latents = scheduler.scale_noise(image, latent_timestep, latents)
    start = latents
    for t in timesteps:
        latents = scheduler.step(net(latents, t), t, latents, return_dict=False)[0]
    return latents, start


FLOW_CONFIGS = {"sd3_shift": {"shift": 3.0},
                "flux_dynamic": {"use_dynamic_shifting": True, "base_shift": 0.5,
                                 "max_shift": 1.15},
                "linear_dynamic": {"use_dynamic_shifting": True, "time_shift_type": "linear"}}


@pytest.mark.parametrize("config", sorted(FLOW_CONFIGS))
def test_flux_sigmas_equal_flow_match_euler(flux, config):
    """set_timesteps(sigmas=..., mu=...) through retrieve_timesteps: the same timesteps as
    FlowMatchEulerDiscreteScheduler (its shift / dynamic shift on the same sigmas), and ddim (Euler
    in the flow's sigma) the same latents, in a loop making FluxPipeline's scheduler calls on a
    tiny Flux transformer; dpmpp_2m there equals sdekit.sample on the scheduler's grid."""
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**FLOW_CONFIGS[config])
    mu = sdekit.grids.flux_mu(1024) if ref.config.use_dynamic_shifting else None
    sched = SdekitScheduler.from_config(ref.config, solver="ddim")
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    want, _ = _flux_loop(ref, flux, noise, 6, mu)
    got, _ = _flux_loop(sched, flux, noise, 6, mu)
    torch.testing.assert_close(sched.timesteps, ref.timesteps)
    torch.testing.assert_close(sched.times, ref.sigmas[:-1].double(), atol=1e-6, rtol=0)
    assert len(sched.timesteps) == 6 and float(sched.times[0]) == 1.0
    assert (want - noise).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)

    multi = SdekitScheduler.from_config(ref.config, solver="dpmpp_2m")
    out, _ = _flux_loop(multi, flux, noise, 6, mu)
    model = sdekit.DiffusionModel(lambda x, t: flux(x, t.float()), multi.sde, "flow", "t1000")
    sol = sdekit.sample(multi.sde, model, noise, solver="dpmpp_2m", grid=multi.times,
                        denoise=True)
    torch.testing.assert_close(out, sol.x, atol=2e-6, rtol=0)
    assert not torch.allclose(out, got, atol=1e-4)


def test_custom_sigmas_and_timesteps_rules():
    """sigmas= on a scheduler with its own grid counts only; timesteps= on a flow model are the
    network's times as given (the grid, unshifted); and the refusals."""
    cfg = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    own = SdekitScheduler.from_config(cfg, solver="dpmpp_2m", grid="logsnr")
    own.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5))
    named = SdekitScheduler.from_config(cfg, solver="dpmpp_2m", grid="logsnr")
    named.set_timesteps(5)
    assert torch.equal(own.timesteps, named.timesteps)
    custom = SdekitScheduler.from_config(cfg, solver="ddim")
    custom.set_timesteps(timesteps=[1000.0, 750.0, 500.0, 250.0])
    torch.testing.assert_close(custom.times,
                               torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigmas=.* is invalid: expected a strictly decreasing"):
        custom.set_timesteps(sigmas=[0.5, 0.8, 0.2])
    with pytest.raises(ValueError, match="num_inference_steps=4 disagrees with the 3 sigmas"):
        custom.set_timesteps(4, sigmas=[0.8, 0.5, 0.2])
    with pytest.raises(ValueError, match="give sigmas or timesteps, not both"):
        custom.set_timesteps(sigmas=[0.8, 0.5], timesteps=[800, 500])
    with pytest.raises(ValueError, match=r"shifted by 0.01 span .* outside the time range"):
        SdekitScheduler.from_config({**cfg, "shift": 0.01}, solver="ddim").set_timesteps(
            sigmas=[0.5, 0.05])
    karras = {**cfg, "use_karras_sigmas": True}
    with pytest.raises(ValueError, match="use_karras_sigmas=True makes diffusers replace"):
        SdekitScheduler.from_config(karras, solver="ddim").set_timesteps(sigmas=[0.8, 0.5, 0.2])
    SdekitScheduler.from_config(karras, solver="ddim", grid="karras").set_timesteps(
        sigmas=[0.8, 0.5, 0.2])
    ddpm = SdekitScheduler(solver="ddim")
    assert "sigmas" in inspect.signature(ddpm.set_timesteps).parameters
    with pytest.raises(ValueError, match="sigmas= .*applies to flow-matching models"):
        ddpm.set_timesteps(sigmas=[0.8, 0.5, 0.2])


def test_flow_img2img_equals_flow_match_euler(flux):
    """FluxImg2ImgPipeline's calls (strength 0.6): scale_noise at timesteps[t_start] after
    set_begin_index, then the tail of the loop: ddim equals FlowMatchEulerDiscreteScheduler, and
    the solve is sdekit.sample from t_start on the same grid."""
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = sdekit.grids.flux_mu(16)
    image = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(3))
    want, start_ref = _flux_loop(ref, flux, noise, 10, mu, strength=0.6, image=image)
    for name in ("ddim", "dpmpp_2s"):   # (no two-call solver starts at sigma = 1, alpha = 0)
        sched = SdekitScheduler.from_config(ref.config, solver=name)
        got, start = _flux_loop(sched, flux, noise, 10, mu, strength=0.6, image=image)
        assert sched.begin_index == 4
        torch.testing.assert_close(start, start_ref, atol=1e-6, rtol=0)
        model = sdekit.DiffusionModel(lambda x, t: flux(x, t.float()), sched.sde, "flow",
                                      "t1000")
        sol = sdekit.sample(sched.sde, model, start, solver=name, grid=sched.times[4:],
                            denoise=True)
        torch.testing.assert_close(got, sol.x, atol=2e-6, rtol=0)
        assert sol.nfe == len(sched.timesteps) - 4 * sched.order
        if name == "ddim":
            torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
        else:
            assert not torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_add_noise_equals_ddim_and_flow_match(beta_schedule):
    ddim = diffusers.DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085,
                                   beta_end=0.012)
    sched = SdekitScheduler.from_config(ddim.config, solver="ddim")
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    ts = torch.tensor([999, 500, 3])
    torch.testing.assert_close(sched.add_noise(x0, noise, ts), ddim.add_noise(x0, noise, ts))
    sched.set_timesteps(8)
    torch.testing.assert_close(sched.add_noise(x0, noise, ts), ddim.add_noise(x0, noise, ts))
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = SdekitScheduler.from_config(flow.config, solver="ddim")
    for s in (flow, ours):
        s.set_timesteps(8)
    t = flow.timesteps[[0, 3, 7]]
    torch.testing.assert_close(ours.scale_noise(x0, t, noise), flow.scale_noise(x0, t, noise))
    with pytest.raises(ValueError, match="timesteps has 2 entries but the batch has 3"):
        sched.add_noise(x0, noise, ts[:2])
    with pytest.raises(ValueError, match=r"timesteps=\[1200.0\] are invalid"):
        ours.add_noise(x0, noise, torch.tensor([1200.0]))
    with pytest.raises(ValueError, match="shape mismatch: noise has shape"):
        sched.add_noise(x0, noise[:1], ts)


def _img2img_loop(scheduler, unet, image, noise, steps, strength, begin=True):
    """StableDiffusionImg2ImgPipeline's scheduler calls (no text encoder: transformers is not
    installed): set_timesteps, get_timesteps, add_noise at the first kept timestep, the loop."""
    scheduler.set_timesteps(steps)
    timesteps, t_start = _get_timesteps(scheduler, steps, strength, begin)
    latents = scheduler.add_noise(image, noise, timesteps[:1].repeat(image.shape[0]))
    start = latents
    with torch.no_grad():
        for t in timesteps:
            inp = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(unet(inp, t).sample, t, latents).prev_sample
    return latents, start, t_start


@pytest.mark.parametrize("begin", [True, False], ids=["set_begin_index", "sliced_only"])
def test_img2img_ddim_equals_diffusers_ddim(unet, begin):
    """strength 0.6 of 10 steps: SdekitScheduler(solver='ddim') in the img2img loop equals
    DDIMScheduler (which has no set_begin_index), and is sdekit.sample from timesteps[4] on the
    same grid; a loop that only slices timesteps begins there too."""
    image = _initial_noise(unet, seed=4).clamp(-1, 1)
    noise = _initial_noise(unet, seed=5)
    ddim = diffusers.DDIMScheduler(clip_sample=False)
    want, start_ref, t_start = _img2img_loop(ddim, unet, image, noise, 10, 0.6)
    sched = SdekitScheduler.from_config(ddim.config, solver="ddim", grid="leading")
    got, start, _ = _img2img_loop(sched, unet, image, noise, 10, 0.6, begin)
    assert t_start == 4 and sched.begin_index == 4
    torch.testing.assert_close(start, start_ref)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    assert (got - image).abs().max() > 0.1
    sol = sdekit.sample(sched.sde, lambda x, t: unet(x, t).sample, start, solver="ddim",
                        grid=sched.times[4:], denoise=True)
    torch.testing.assert_close(got, sol.x, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["heun", "dpmpp_3m"])
def test_img2img_multistage_and_multistep_solvers(unet, name):
    """Heun (2 calls per step: get_timesteps slices at t_start * order) and a multistep solver
    (its history starts afresh at the begin index) in the img2img loop: sdekit.sample from the
    grid's time t_start on the same grid."""
    image = _initial_noise(unet, seed=4).clamp(-1, 1)
    noise = _initial_noise(unet, seed=5)
    sched = SdekitScheduler(solver=name, grid="leading")
    got, start, t_start = _img2img_loop(sched, unet, image, noise, 8, 0.5)
    assert t_start == 4 and sched.begin_index == 4 * sched.order
    unet.calls = 0
    sol = sdekit.sample(sched.sde, lambda x, t: unet(x, t).sample, start, solver=name,
                        grid=sched.times[4:], denoise=True)
    assert sol.nfe == len(sched.timesteps) - sched.begin_index
    torch.testing.assert_close(got, sol.x, atol=2e-6, rtol=0)


def test_begin_index_refusals():
    heun = SdekitScheduler(solver="heun")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        heun.set_begin_index(2)
    heun.set_timesteps(6)
    with pytest.raises(ValueError, match="begin_index=3 is not the first model call of a step "
                                         "of solver 'heun': expected a multiple of order=2"):
        heun.set_begin_index(3)
    with pytest.raises(ValueError, match="begin_index=10 leaves no step of solver 'heun'"):
        heun.set_begin_index(10)
    with pytest.raises(ValueError, match=r"begin_index=99 is invalid: expected an integer in "
                                         r"\[0, 11\)"):
        heun.set_begin_index(99)
    churn = SdekitScheduler(solver="edm_heun_sde", S_tmax=1e9, grid_options={"t_start": 0.9})
    churn.set_timesteps(6)
    with pytest.raises(ValueError, match="moves the state .*before its first model call"):
        churn.set_begin_index(2)
    churn = SdekitScheduler(solver="edm_heun_sde")
    churn.set_timesteps(10)
    with pytest.raises(ValueError, match="its solve from step 4 .*makes other model calls"):
        churn.set_begin_index(8)
