"""sdekit.interop.SdekitScheduler: sdekit solvers inside an unchanged diffusers pipeline loop
(tiny local UNet2DModel, nothing downloaded)."""
from __future__ import annotations

import runpy
import subprocess
import sys
import threading
from pathlib import Path

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
