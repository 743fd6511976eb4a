"""sdekit.interop, models in: diffusers scheduler configs and networks, k-diffusion denoisers and
the k-diffusion sampler signature."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_zero_terminal_snr_sampling_from_alpha_zero_converges_to_the_exact_flow():
    """A v-prediction model sampled from t = 1 (alpha = 0) on the zero-terminal-SNR table: the
    data-prediction solvers converge to the exact probability-flow map of Gaussian data."""
    from helpers import gaussian_problem
    sde = read_scheduler_config({"rescale_betas_zero_snr": True}).sde
    data = gaussian_problem(sde, dim=4)
    x = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = data.flow(x, 1.0, 0.5)
    errs = [float((sdekit.sample(sde, data.model("v"), x, solver="dpmpp_3m", steps=n,
                                 t_end=0.5).x - exact).norm() / exact.norm()) for n in (10, 40)]
    assert errs[1] < 1e-4 and errs[1] < errs[0] / 16, errs


def test_in_memory_scheduler_configs_are_recognised():
    """``scheduler.config`` of a scheduler built in memory has no ``_class_name``: a flow-match
    config is recognised by its fields, a VE / EDM one refused by them."""
    diffusers = pytest.importorskip("diffusers")
    cfg = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    assert "_class_name" not in cfg
    spec = read_scheduler_config(cfg)
    assert spec.kind == "flow" and spec.grid_options() == {"shift": 3.0}
    for sched in (diffusers.EDMEulerScheduler(), diffusers.CMStochasticIterativeScheduler()):
        for obj in (sched, sched.config):
            with pytest.raises(ValueError, match="is not supported: its config has neither a "
                                                 "DDPM beta table"):
                read_scheduler_config(obj)
    for cls in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                "UniPCMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                "DEISMultistepScheduler", "LMSDiscreteScheduler", "PNDMScheduler"):
        assert read_scheduler_config(getattr(diffusers, cls)().config).kind == "ddpm", cls


def test_a_plain_dict_gets_diffusers_defaults():
    diffusers = pytest.importorskip("diffusers")
    spec = read_scheduler_config({})
    assert torch.equal(spec.sde.alphas_cumprod.float(), diffusers.DDIMScheduler().alphas_cumprod)
    assert (spec.prediction, spec.timestep_spacing, spec.steps_offset) == ("eps", "leading", 0)


@pytest.mark.parametrize("ptype,kind", [("epsilon", "eps"), ("v_prediction", "v"),
                                        ("sample", "x0")])
def test_prediction_types(ptype, kind):
    spec = read_scheduler_config({"beta_schedule": "linear", "prediction_type": ptype})
    assert spec.prediction == kind and spec.time_input == "model_time" and spec.kind == "ddpm"
    model = spec.model(lambda x, t: x)
    assert (model.sde, model.prediction, model.time_input) == (spec.sde, kind, "model_time")


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


@pytest.mark.parametrize("kw,mu", [({"flow_shift": 3.0}, None),
                                   ({"use_dynamic_shifting": True}, 0.8)])
def test_flow_grid_options_give_diffusers_flow_sigmas(kw, mu):
    """DPMSolverMultistepScheduler with flow sigmas: uniform sigmas from 1 - 1/N down to
    (1 - 1/N)/steps, shifted by flow_shift or exp(mu); the grid options of
    read_scheduler_config on make_grid's uniform grid over that range are its sigmas (float32)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                  prediction_type="flow_prediction", **kw)
    sched.set_timesteps(8, **({} if mu is None else {"mu": mu}))
    spec = read_scheduler_config(sched)
    opts = spec.grid_options(**({} if mu is None else {"mu": mu}))
    grid = sdekit.make_grid(spec.sde, "uniform", 7, t_start=0.999, t_end=0.999 / 8, **opts)
    torch.testing.assert_close(grid, sched.sigmas[:-1].double(), rtol=0, atol=1e-7)


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
    ({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002},
     "EDMEulerScheduler is not supported"),
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


def test_flux_transformer_is_told_sigma_not_1000_sigma():
    """diffusers' Flux pipeline passes timestep / 1000 (FluxTransformer2DModel multiplies by
    1000 itself); other flow transformers get 1000 sigma."""
    seen = []

    class FluxTransformer2DModel(torch.nn.Module):   # the call signature of diffusers' Flux
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None,
                    guidance=None, return_dict=True):
            seen.append((timestep, guidance))
            return (hidden_states,)

    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    _, model = sdekit.interop.from_diffusers(cfg, FluxTransformer2DModel(),
                                               guidance=torch.tensor([3.5]))
    model.flow(torch.zeros(2, 4, 3), 0.25)
    assert seen[-1][0].tolist() == [0.25, 0.25] and seen[-1][1].tolist() == [3.5]
    seen_t = []
    _, model = sdekit.interop.from_diffusers(cfg, lambda x, timestep: seen_t.append(timestep) or x)
    model.flow(torch.zeros(2, 4, 3), 0.25)
    assert seen_t[-1].tolist() == [250.0, 250.0]


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


# ------------------------------------------------------------------------- k-diffusion
@pytest.fixture(scope="module")
def kd():
    from helpers import load_k_diffusion
    mod = load_k_diffusion()
    if mod is None:
        pytest.skip("k_diffusion.sampling does not load")
    return mod


def _gauss(dim=3, sde=None):
    from helpers import gaussian_problem
    return gaussian_problem(sde or sdekit.EDMSDE(), dim=dim)


@pytest.mark.parametrize("kname,solver", [("sample_dpmpp_2m", "dpmpp_2m"),
                                          ("sample_heun", "edm_heun"),
                                          ("sample_euler", "edm_euler"),
                                          ("sample_euler", "ddim")])
def test_k_sampler_equals_k_diffusion_sampler(kd, kname, solver):
    """Same denoiser, state and Karras sigmas (ending in 0): same samples, same NFE and the same
    callback dicts (x, i, sigma, sigma_hat, denoised) as k-diffusion's own sampler."""
    data = _gauss()
    calls = {"k": 0, "s": 0}

    def denoiser(who):
        def d(y, s, scale=1.0):
            calls[who] += 1
            return scale * data.x0(y, s)
        return d

    sigmas = kd.get_sigmas_karras(8, 0.01, 80.0, rho=7.0).double()
    x = data.marginal_sample(4, 80.0, dtype=F64)
    ref_cb, ours_cb = [], []
    extra = {"scale": 0.9}
    ref = getattr(kd, kname)(denoiser("k"), x, sigmas, extra_args=extra, callback=ref_cb.append,
                             disable=True)
    out = sdekit.interop.k_sampler(solver)(denoiser("s"), x, sigmas, extra_args=extra,
                                           callback=ours_cb.append, disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert calls["s"] == calls["k"]
    assert [c["i"] for c in ours_cb] == [c["i"] for c in ref_cb] == list(range(8))
    for a, b in zip(ours_cb, ref_cb):
        for key in ("x", "sigma", "sigma_hat", "denoised"):
            torch.testing.assert_close(torch.as_tensor(a[key]).double(),
                                       torch.as_tensor(b[key]).double(), rtol=1e-10, atol=1e-10)


def _no_grid(name):
    s = sdekit.get_solver(name)
    return s.adaptive or s.grid_free


@pytest.mark.parametrize("name", sdekit.solver_names())
def test_every_solver_runs_through_the_k_diffusion_signature(kd, name):
    """Every registered solver runs as ``sample(model, x, sigmas, ...)`` on k-diffusion's Karras
    sigmas, or (adaptive / grid-free solvers) says why it cannot. ODE solvers converge to the
    exact flow map of Gaussian data; SDE solvers draw per-sample seeded noise (a sample does not
    depend on its batch)."""
    data = _gauss(dim=2)
    if _no_grid(name):
        with pytest.raises(ValueError, match=rf"solver '{name}' .* cannot follow a k-diffusion "
                                             r"sigmas list: use one of \['ancestral'"):
            sdekit.interop.k_sampler(name)
        return
    sampler = sdekit.interop.k_sampler(name)
    def D(y, s):
        return data.x0(y, s)
    x = data.marginal_sample(64, 80.0, dtype=F64, generator=torch.Generator().manual_seed(0))
    solver = sdekit.get_solver(name)
    if solver.stochastic:
        out = sampler(D, x, kd.get_sigmas_karras(12, 0.01, 80.0).double())
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
        if solver.batch_invariant is True:
            part = sampler(D, x[:5], kd.get_sigmas_karras(12, 0.01, 80.0).double())
            torch.testing.assert_close(part, out[:5])
        return
    errs = []
    for n in (12, 24):
        sigmas = kd.get_sigmas_karras(n, 0.01, 80.0).double()[:-1]   # ends at 0.01: exact flow
        out = sampler(D, x, sigmas)
        exact = data.flow(x, 80.0, 0.01)
        errs.append(float((out - exact).norm() / exact.norm()))
    assert errs[1] < 0.8 * errs[0], errs


def test_k_sampler_takes_a_solver_instance(kd):
    data = _gauss()
    sigmas = kd.get_sigmas_karras(6, 0.01, 80.0).double()
    x = data.marginal_sample(2, 80.0, dtype=F64)
    def D(y, s):
        return data.x0(y, s)
    a = sdekit.interop.k_sampler(sdekit.get_solver("dpmpp_2m", lower_order_final=False))(D, x,
                                                                                        sigmas)
    torch.testing.assert_close(a, sdekit.interop.k_sampler("dpmpp_2m")(D, x, sigmas))
    assert sdekit.interop.k_sampler("unipc_bh2").__name__ == "sample_unipc_bh2"


def test_k_sampler_float32_state_and_single_sigma(kd):
    data = _gauss()
    x = data.marginal_sample(3, 10.0, dtype=F64).float()
    seen = []
    def D(y, s):
        seen.append((y.dtype, s.shape))
        return data.x0(y.double(), s.double()).float()
    out = sdekit.interop.k_sampler("dpmpp_2m")(D, x, torch.tensor([10.0, 1.0, 0.0]))
    assert out.dtype == torch.float32 and seen[0] == (torch.float32, (3,)) and len(seen) == 2
    cb = []
    out = sdekit.interop.k_sampler("dpmpp_2m")(D, x, torch.tensor([10.0, 0.0]), callback=cb.append)
    torch.testing.assert_close(out, D(x, torch.full((3,), 10.0)))
    assert len(cb) == 1 and cb[0]["i"] == 0


@pytest.mark.parametrize("sigmas,match", [
    ([10.0, 1.0, 2.0, 0.0], r"strictly decreasing, but sigmas\[2\]=2\.0 >= sigmas\[1\]=1\.0"),
    ([10.0, 0.0, 0.0], r"sigmas\[1\]=0\.0 is invalid: every sigma must be > 0 except a final 0"),
    ([10.0], "at least 2 noise levels"),
    ([10.0, float("nan"), 0.0], "NaN or Inf"),
])
def test_k_sampler_bad_sigmas(sigmas, match):
    with pytest.raises(ValueError, match=match):
        sdekit.interop.k_sampler("dpmpp_2m")(lambda x, s: x, torch.zeros(2, 3),
                                             torch.tensor(sigmas))


def test_k_sampler_bad_arguments():
    with pytest.raises(ValueError, match="unknown solver 'dpmpp_9m'"):
        sdekit.interop.k_sampler("dpmpp_9m")
    with pytest.raises(TypeError, match=r"got unknown options \['order_of_magnitude'\]"):
        sdekit.interop.k_sampler("dpmpp_2m", order_of_magnitude=3)
    sampler = sdekit.interop.k_sampler("dpmpp_2m")
    with pytest.raises(TypeError, match="model must be a k-diffusion denoiser"):
        sampler(None, torch.zeros(2, 3), torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="extra_args must be a dict"):
        sampler(lambda x, s: x, torch.zeros(2, 3), torch.tensor([1.0, 0.0]), extra_args=[1])


def test_from_k_diffusion_discrete_eps_ddpm_denoiser_is_the_vp_network_on_its_table(unet):
    """k-diffusion's DiscreteEpsDDPMDenoiser around a UNet: from_k_diffusion builds the
    DiscreteDDPM of its sigma table, and sampling the denoiser so is sampling the UNet itself
    (from_diffusers) on the same table; extra_args pass through."""
    diffusers = pytest.importorskip("diffusers")
    from helpers import load_k_diffusion
    ext = load_k_diffusion("external")
    if ext is None:
        pytest.skip("k_diffusion.external does not load")
    sched = diffusers.DDIMScheduler()
    cond_seen = []

    class Eps(torch.nn.Module):     # k-diffusion calls its inner model as model(x, t, **extra)
        def forward(self, x, t, bias=0.0):
            cond_seen.append(bias)
            return unet(x, t).sample + bias

    den = ext.DiscreteEpsDDPMDenoiser(Eps(), sched.alphas_cumprod.double(), quantize=False)
    sde, model = sdekit.interop.from_k_diffusion(den, bias=0.0)
    assert isinstance(sde, sdekit.DiscreteDDPM) and sde.N == 1000
    torch.testing.assert_close(sde.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-12,
                               atol=0)
    sde2, model2 = sdekit.interop.from_diffusers(sched, unet)
    x = _x(2)
    kw = {"solver": "dpmpp_2m", "steps": 6, "grid": "logsnr", "dtype": F64}
    a = sdekit.sample(sde, model, x, **kw).x
    b = sdekit.sample(sde2, model2, x, **kw).x
    assert _rel(a, b) < 1e-9 and cond_seen and set(cond_seen) == {0.0}


def test_k_sampler_on_a_k_diffusion_wrapped_unet_equals_sample_dpmpp_2m(kd, unet):
    """The everyday k-diffusion call: a VP network in DiscreteEpsDDPMDenoiser, its own
    get_sigmas(n) (discrete table sigmas plus 0), sampled by k_sampler and by k-diffusion."""
    diffusers = pytest.importorskip("diffusers")
    from helpers import load_k_diffusion
    ext = load_k_diffusion("external")
    if ext is None:
        pytest.skip("k_diffusion.external does not load")

    class Eps(torch.nn.Module):
        def forward(self, x, t):
            return unet(x, t).sample

    den = ext.DiscreteEpsDDPMDenoiser(Eps(), diffusers.DDPMScheduler().alphas_cumprod.double(),
                                      quantize=True)
    sigmas = den.get_sigmas(8)
    x = _x(2) * sigmas[0]
    with torch.no_grad():
        ref = kd.sample_dpmpp_2m(den, x, sigmas, disable=True)
        out = sdekit.interop.k_sampler("dpmpp_2m")(den, x, sigmas)
    assert _rel(out, ref) < 1e-10


def test_from_k_diffusion_edm_denoiser():
    data = _gauss()

    class EDMDenoiser:
        sigma_min, sigma_max = 0.01, 50.0

        def __call__(self, x, sigma, label=None):
            assert label == 7
            return data.x0(x, sigma)

    sde, model = sdekit.interop.from_k_diffusion(EDMDenoiser(), label=7)
    assert isinstance(sde, sdekit.EDMSDE) and (sde.sigma_min, sde.sigma_max) == (0.01, 50.0)
    x = data.marginal_sample(4, 50.0, dtype=F64)
    out = sdekit.sample(sde, model, x, solver="dpmpp_3m", steps=40, grid="karras")
    torch.testing.assert_close(out.x, data.flow(x, 50.0, 0.01), rtol=1e-3, atol=1e-3)
    sde, _ = sdekit.interop.from_k_diffusion(lambda x, s: x, sigma_min=0.1, sigma_max=5.0)
    assert (sde.sigma_min, sde.sigma_max) == (0.1, 5.0)
    with pytest.raises(ValueError, match="sigma_min / sigma_max apply to a denoiser without"):
        sdekit.interop.from_k_diffusion(type("D", (), {"sigmas": torch.tensor([0.1, 1.0]),
                                                       "__call__": lambda s, x, sig: x})(),
                                        sigma_min=0.1)
    with pytest.raises(TypeError, match="denoiser must be callable"):
        sdekit.interop.from_k_diffusion(3)


# ------------------------------------------------------------------------- docs snippets
ROOT = Path(__file__).resolve().parents[1]
#: the README's "Use sdekit with your model" section (only that section's snippets are taken)
README_INTEROP = ROOT / "README.md"
README_SECTION = "## Use sdekit with your model"


def _snippets(path, section=None):
    """The ``python`` code blocks of ``path`` (within its ``section``: from that heading to the
    next heading of the same level)."""
    text = path.read_text()
    if section is not None:
        start = text.index(section)      # a missing section is an error, not zero snippets
        level = section.split(" ")[0] + " "
        end = text.find("\n" + level, start + len(section))
        text = text[start:end if end >= 0 else None]
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


DOC_SNIPPETS = [(f"{path.relative_to(ROOT)}[{k}]", code)
                for path, section in ((ROOT / "docs" / "interop.md", None),
                                      (README_INTEROP, README_SECTION))
                for k, code in enumerate(_snippets(path, section))]


@pytest.mark.parametrize("name, code", DOC_SNIPPETS, ids=[n for n, _ in DOC_SNIPPETS])
def test_docs_interop_snippet_runs(name, code, capsys):
    if "import diffusers" in code:
        pytest.importorskip("diffusers")
    exec(compile(code, name, "exec"), {"__name__": "__doc_snippet__"})  # noqa: S102
    assert capsys.readouterr().out.strip()      # every snippet prints its result


def test_readme_interop_section_has_its_four_snippets():
    """diffusers model in, diffusers pipeline out, k-diffusion in and out, your own network."""
    assert len(_snippets(README_INTEROP, README_SECTION)) == 4
