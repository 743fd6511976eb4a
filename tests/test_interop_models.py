"""sdekit.interop, models in: diffusers scheduler configs and networks, k-diffusion denoisers and
the k-diffusion sampler signature."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sdekit
from sdekit.interop import read_scheduler_config
from sdekit.interop.config import ddpm_alphas_cumprod

F64 = torch.float64


# ------------------------------------------------------------------------ scheduler configs
def test_import_sdekit_interop_does_not_import_diffusers():
    code = ("import sys, sdekit, sdekit.interop, sdekit.interop.config; "
            "assert 'diffusers' not in sys.modules and 'k_diffusion' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


SCHEDULES = [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
             {"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "sigmoid"},
             {"beta_schedule": "laplace"}, {"beta_schedule": "exp"},
             {"trained_betas": torch.linspace(2e-4, 0.03, 50).tolist(), "num_train_timesteps": 50},
             {"rescale_betas_zero_snr": True},
             {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True}]


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: "-".join(f"{k}" for k in c) or "default")
def test_alphas_cumprod_equal_diffusers_table(cfg):
    """The table is diffusers' float32 table, bit for bit (DDPMScheduler knows every schedule but
    exp, HeunDiscreteScheduler knows exp)."""
    diffusers = pytest.importorskip("diffusers")
    cls = diffusers.HeunDiscreteScheduler if cfg.get("beta_schedule") == "exp" else \
        diffusers.DDPMScheduler
    sched = cls(**cfg)
    ours = ddpm_alphas_cumprod(sched.config)
    assert ours.dtype == F64
    assert torch.equal(ours.float(), sched.alphas_cumprod)
    spec = read_scheduler_config(sched)
    assert isinstance(spec.sde, sdekit.DiscreteDDPM) and spec.sde.N == len(ours)
    torch.testing.assert_close(spec.sde.alphas_cumprod, ours, rtol=1e-13, atol=0)
    assert spec.sde.zero_terminal_snr == bool(cfg.get("rescale_betas_zero_snr"))


def test_zero_terminal_snr_table_is_a_forward_sde_with_alpha_T_zero():
    spec = read_scheduler_config({"beta_schedule": "linear", "rescale_betas_zero_snr": True})
    sde = spec.sde
    assert float(sde.alphas_cumprod[-1]) == 0.0 and float(sde.alpha(1.0)) == 0.0
    assert float(sde.sigma(1.0)) == 1.0 and float(sde.lambda_(1.0)) == float("-inf")
    t = torch.tensor([0.9996, 0.9991, 0.5, 0.3, sde.t_min], dtype=F64)
    torch.testing.assert_close(sde.t_of_lambda(sde.lambda_(t)), t, rtol=0, atol=1e-12)
    assert float(sde.t_of_lambda(torch.tensor(float("-inf"), dtype=F64))) == 1.0
    # on the knots the table itself; on the last interval alpha is linear
    n = torch.arange(sde.N, dtype=F64)
    torch.testing.assert_close(sde.alpha(sde.timestep_to_t(n)) ** 2, sde.alphas_cumprod)
    a_prev = float(sde.alpha(1 - 1 / sde.N))
    assert float(sde.alpha(1 - 0.25 / sde.N)) == pytest.approx(0.25 * a_prev, rel=1e-12)
    # f = d log alpha / dt there, -inf at T
    assert float(sde.f(1 - 0.25 / sde.N)) == pytest.approx(-sde.N / 0.25, rel=1e-12)
    # the lambda = -inf start is the prior N(0, I)
    assert sde.prior_std == 1.0


@pytest.mark.parametrize("ptype,kind", [("epsilon", "eps"), ("v_prediction", "v"),
                                        ("sample", "x0")])
def test_prediction_types(ptype, kind):
    spec = read_scheduler_config({"beta_schedule": "linear", "prediction_type": ptype})
    assert spec.prediction == kind and spec.time_input == "model_time" and spec.kind == "ddpm"


def test_flow_configs():
    spec = read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert isinstance(spec.sde, sdekit.FlowSDE) and spec.sde.t_min == 1e-3
    assert (spec.prediction, spec.time_input, spec.kind) == ("flow", "t1000", "flow")
    assert spec.grid_options() == {"shift": 3.0}
    # DPM-Solver / UniPC with flow sigmas
    spec = read_scheduler_config({"_class_name": "DPMSolverMultistepScheduler",
                                  "beta_schedule": "linear", "use_flow_sigmas": True,
                                  "flow_shift": 5.0, "prediction_type": "flow_prediction"})
    assert spec.kind == "flow" and spec.grid_options() == {"shift": 5.0}
    # another training length: the time input is N sigma
    spec = read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                  "num_train_timesteps": 500})
    assert spec.sde.t_min == 1 / 500 and spec.grid_options() == {}
    assert float(spec.time_input(torch.tensor(0.5, dtype=F64))) == 250.0
    # dynamic shift with the config's own line through (256, 0.5) and (4096, 1.15)
    spec = read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                  "use_dynamic_shifting": True, "shift": 3.0,
                                  "max_shift": 1.5, "time_shift_type": "linear"})
    assert spec.shift == 1.0
    opts = spec.grid_options(image_seq_len=4096)
    assert opts == {"mu": pytest.approx(1.5), "shift_type": "linear"}
    assert spec.grid_options(mu=0.7) == {"mu": 0.7, "shift_type": "linear"}
    with pytest.raises(ValueError, match="image_seq_len"):
        spec.grid_options()


@pytest.mark.parametrize("cfg,match", [
    ({"beta_schedule": "linear", "prediction_type": "original_sample"},
     r"prediction_type='original_sample' is not supported: expected one of \['epsilon'"),
    ({"beta_schedule": "cubic"}, r"beta_schedule='cubic' is not supported: expected one of"),
    ({"beta_schedule": "linear", "timestep_spacing": "uniform"},
     r"timestep_spacing='uniform' is not supported: expected one of \['leading'"),
    ({"beta_schedule": "linear", "timestep_type": "continuous"}, "timestep_type='continuous'"),
    ({"beta_schedule": "linear", "num_train_timesteps": 1}, "num_train_timesteps=1 is invalid"),
    ({"beta_schedule": "linear", "beta_end": "x"}, "beta_end='x' is invalid"),
    ({"beta_schedule": "linear", "variance_type": "weird"}, "variance_type='weird'"),
    ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, "trained_betas has 2 entries"),
    ({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002}, "EDMEulerScheduler is not supported"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.1}, "shift_terminal"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -1.0}, r"shift=-1\.0 is invalid"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
      "time_shift_type": "cubic"}, "time_shift_type='cubic'"),
    ({"use_flow_sigmas": True, "prediction_type": "epsilon"},
     r"prediction_type='epsilon' is not supported: expected one of \['flow_prediction'\]"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        read_scheduler_config(cfg)


def test_bad_config_type():
    with pytest.raises(TypeError, match="scheduler, its config"):
        read_scheduler_config([("beta_schedule", "linear")])


# ------------------------------------------------------------------ diffusers networks in
def _unet(conditional: bool = False, out_channels: int = 2):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    kw = {"sample_size": 8, "in_channels": 2, "out_channels": out_channels,
          "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4}
    if conditional:
        net = diffusers.UNet2DConditionModel(
            **kw, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
            attention_head_dim=2)
    else:
        net = diffusers.UNet2DModel(**kw, down_block_types=("DownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "UpBlock2D"))
    return net.double().eval()


@pytest.fixture(scope="module")
def unet():
    return _unet()


def _x(n=3, seed=1):
    return torch.randn(n, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(sched, net, x, **cond):
    y = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = net(y, t, **cond)
            y = sched.step(out.sample if hasattr(out, "sample") else out, t, y).prev_sample
    return y


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


DDIM_CASES = [("epsilon", "leading", False), ("epsilon", "trailing", False),
              ("v_prediction", "leading", False), ("v_prediction", "trailing", False),
              ("sample", "leading", False), ("sample", "trailing", False),
              ("v_prediction", "trailing", True), ("sample", "trailing", True),
              ("epsilon", "leading", True)]


@pytest.mark.parametrize("ptype,spacing,zero_snr", DDIM_CASES)
def test_ddim_equals_diffusers_ddim_scheduler_on_a_unet(unet, ptype, spacing, zero_snr):
    """sdekit's ddim on the scheduler's own timesteps (+ the final jump to alpha = 1: denoise)
    is DDIMScheduler's loop on the same float64 UNet to float64 round-off. With zero terminal
    SNR and trailing spacing the first step starts at alpha_T = 0 exactly, in both."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(prediction_type=ptype, timestep_spacing=spacing,
                                    rescale_betas_zero_snr=zero_snr, clip_sample=False)
    sde, model = sdekit.interop.from_diffusers(sched, unet)
    sched.set_timesteps(8)
    # diffusers keeps its (identical) table in float32: promote it so both sides run in float64
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    x = _x()
    ref = _diffusers_loop(sched, unet, x)
    grid = sde.timestep_to_t(sched.timesteps.double())
    assert (float(sde.alpha(grid[0])) == 0.0) == (zero_snr and spacing == "trailing")
    out = sdekit.sample(sde, model, x, solver="ddim", grid=grid, denoise=True)
    assert out.nfe == len(sched.timesteps)
    assert _rel(out.x, ref) < 1e-12


def test_eps_network_at_zero_terminal_snr_is_an_error_where_diffusers_returns_nan(unet):
    """At alpha_T = 0 an eps prediction says nothing about x0: diffusers' DDIM divides by
    sqrt(alpha_T) = 0 and returns non-finite samples; sdekit raises before any network call
    (Lin et al. 2024 train such tables with v prediction)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                    clip_sample=False)
    sde, model = sdekit.interop.from_diffusers(sched, unet)
    sched.set_timesteps(4)
    assert not bool(torch.isfinite(_diffusers_loop(sched, unet, _x())).all())
    with pytest.raises(ValueError, match="prediction='eps' cannot be sampled from t_start=1"):
        sdekit.sample(sde, model, _x(), solver="ddim",
                      grid=sde.timestep_to_t(sched.timesteps.double()), denoise=True)
    assert model.nfe == 0


DPM_CASES = [("epsilon", "linspace", False), ("v_prediction", "trailing", False),
             ("sample", "leading", False), ("v_prediction", "leading", True)]


@pytest.mark.parametrize("ptype,spacing,zero_snr", DPM_CASES)
def test_dpmpp_2m_equals_diffusers_dpm_solver_multistep_on_a_unet(unet, ptype, spacing, zero_snr):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, final sigma 0: its last step is
    first order, the jump to x0: sdekit's denoise with lower_order_final=False) on the same UNet.
    diffusers' step() computes in float32, hence the float32 tolerance."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type=ptype, timestep_spacing=spacing,
                                                  rescale_betas_zero_snr=zero_snr)
    sde, model = sdekit.interop.from_diffusers(sched, unet)
    sched.set_timesteps(8)
    x = _x()
    ref = _diffusers_loop(sched, unet, x)
    out = sdekit.sample(sde, model, x, solver="dpmpp_2m", denoise=True, lower_order_final=False,
                        grid=sde.timestep_to_t(sched.timesteps.double()))
    assert out.nfe == 8
    assert _rel(out.x, ref) < 2e-6


def test_dpmpp_2m_at_zero_terminal_snr_differs_from_diffusers_by_its_alpha_T_clip(unet):
    """Documented difference: with rescale_betas_zero_snr, DPMSolverMultistepScheduler replaces
    alpha_T^2 = 0 by 2^-24 (its table is then no longer decreasing: alphas_cumprod[998] =
    4.2e-9 < 2^-24), so its first step from timestep 999 starts at alpha = 2^-12 instead of 0.
    sdekit keeps the model's table (alpha_T = 0); the two differ by O(2^-12), not more."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction",
                                                  timestep_spacing="trailing",
                                                  rescale_betas_zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) == 2.0 ** -24
    sde, model = sdekit.interop.from_diffusers(sched, unet)
    assert float(sde.alphas_cumprod[-1]) == 0.0
    sched.set_timesteps(8)
    x = _x()
    ref = _diffusers_loop(sched, unet, x)
    out = sdekit.sample(sde, model, x, solver="dpmpp_2m", denoise=True, lower_order_final=False,
                        grid=sde.timestep_to_t(sched.timesteps.double()))
    assert 1e-6 < _rel(out.x, ref) < 4 * 2.0 ** -12


def test_conditional_unet_passes_conditioning_through():
    diffusers = pytest.importorskip("diffusers")
    net = _unet(conditional=True)
    emb = torch.randn(3, 4, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    sched = diffusers.DDIMScheduler(clip_sample=False, prediction_type="v_prediction")
    sde, model = sdekit.interop.from_diffusers(sched, net, encoder_hidden_states=emb)
    sched.set_timesteps(4)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    x = _x()
    ref = _diffusers_loop(sched, net, x, encoder_hidden_states=emb)
    grid = sde.timestep_to_t(sched.timesteps.double())
    out = sdekit.sample(sde, model, x, solver="ddim", grid=grid, denoise=True).x
    assert _rel(out, ref) < 1e-12
    # the condition matters, and a call can override it (what a guidance wrapper does)
    t = grid[1:2].expand(3)
    cond = model.net.fn.cond["encoder_hidden_states"]
    with torch.no_grad():
        a = model.net.fn(x, sde.model_time(t))
        b = model.net.fn(x, sde.model_time(t), encoder_hidden_states=torch.zeros_like(cond))
    assert _rel(a, b) > 1e-3 and model.net.fn.cond["encoder_hidden_states"] is cond
    with pytest.raises(TypeError, match=r"does not take the conditioning arguments \['prompt'\]"):
        sdekit.interop.from_diffusers(sched, net, prompt="a cat")


def test_dit_transformer_with_class_labels_and_learned_sigma():
    """DiTTransformer2DModel: ``timestep`` keyword, class labels passed through, 2x output
    channels (learned sigma) cut to the first half as diffusers' DiT pipeline does."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4,
                                          in_channels=2, out_channels=4, num_layers=1,
                                          sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10).double().eval()
    labels = torch.tensor([1, 2, 3])
    sched = diffusers.DDIMScheduler(clip_sample=False)
    sde, model = sdekit.interop.from_diffusers(sched, dit, class_labels=labels)
    sched.set_timesteps(4)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    x = _x()
    y = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = dit(y, timestep=t.expand(3), class_labels=labels).sample[:, :2]
            y = sched.step(eps, t, y).prev_sample
    out = sdekit.sample(sde, model, x, solver="ddim", denoise=True,
                        grid=sde.timestep_to_t(sched.timesteps.double())).x
    assert _rel(out, y) < 1e-12


def test_sd3_transformer_on_a_flow_match_scheduler():
    """SD3Transformer2DModel with FlowMatchEulerDiscreteScheduler(shift=3): the network is told
    1000 sigma; sdekit's ddim on flow matching is the Euler step in sigma, ending with the jump
    to sigma = 0 (denoise). diffusers' step keeps its state in float32."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, num_layers=1,
                                          attention_head_dim=4, num_attention_heads=2,
                                          joint_attention_dim=8, caption_projection_dim=8,
                                          pooled_projection_dim=8, out_channels=2,
                                          pos_embed_max_size=8).double().eval()
    gen = torch.Generator().manual_seed(3)
    cond = {"encoder_hidden_states": torch.randn(3, 4, 8, dtype=F64, generator=gen),
            "pooled_projections": torch.randn(3, 8, dtype=F64, generator=gen)}
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sde, model = sdekit.interop.from_diffusers(sched, sd3, **cond)
    sched.set_timesteps(6)
    x = _x()
    y = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            y = sched.step(sd3(y, timestep=t.expand(3), **cond).sample, t, y).prev_sample
    grid = sched.sigmas[:-1].double()
    out = sdekit.sample(sde, model, x, solver="ddim", grid=grid, denoise=True)
    assert out.nfe == 6
    assert _rel(out.x, y) < 1e-5


def test_plain_callable_and_output_shape_errors():
    sched = {"beta_schedule": "linear", "prediction_type": "epsilon"}
    seen = {}

    def net(x, t, scale=1.0):
        seen["t"], seen["scale"] = t, scale
        return scale * x

    sde, model = sdekit.interop.from_diffusers(sched, net, scale=0.5)
    x = _x(2)
    eps = model.eps(x, sde.timestep_to_t(999))
    assert torch.equal(eps, 0.5 * x) and seen["scale"] == 0.5
    assert seen["t"].tolist() == [999.0, 999.0]            # the integer timestep, per sample
    # a learned-variance output (2x channels) is cut to its prediction half
    _, model = sdekit.interop.from_diffusers(sched, lambda x, t: torch.cat([x, 7 * x], 1))
    assert torch.equal(model.eps(x, 0.5), x)
    # anything else is an error naming both shapes
    _, model = sdekit.interop.from_diffusers(sched, lambda x, t: x[:, :1])
    with pytest.raises(ValueError, match=r"returned shape \(2, 1, 8, 8\) for an input of shape "
                                         r"\(2, 2, 8, 8\)"):
        model.eps(x, 0.5)
    _, model = sdekit.interop.from_diffusers(sched, lambda x, t: {"out": x})
    with pytest.raises(TypeError, match="returned dict: expected a tensor"):
        model.eps(x, 0.5)
    with pytest.raises(TypeError, match="network must be callable"):
        sdekit.interop.from_diffusers(sched, "unet")


def test_learned_variance_unet_equals_diffusers_ddpm_scheduler_split():
    """A UNet2DModel with 2x output channels (variance_type='learned_range'): the mean half is
    the eps prediction, as DDPMScheduler.step splits it."""
    diffusers = pytest.importorskip("diffusers")
    net = _unet(out_channels=4)
    sched = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    spec = read_scheduler_config(sched)
    assert spec.learned_variance
    sde, model = sdekit.interop.from_diffusers(sched, net)
    x = _x(2)
    with torch.no_grad():
        full = net(x, 500).sample
        eps = model.eps(x, sde.timestep_to_t(500))
    assert torch.equal(eps, full[:, :2])
