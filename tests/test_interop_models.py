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
