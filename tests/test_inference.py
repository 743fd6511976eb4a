"""Inference-grade sampling (issue 12, sections 1, 2 and 7): no autograd graph unless asked
for, half precision that never rounds times or coefficients, and clear errors for bad
arguments to ``sample()`` and the forward processes, raised before any work."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import gaussian_problem

import sdekit
from sdekit import sample
from sdekit.solvers import for_problem, get_solver, solver_names

NAMES = solver_names()


@functools.cache
def _solver(name: str, sde_name: str):
    """A solver ready for the 4-D Gaussian problem (``fno`` fits a quick operator once)."""
    sde, data = _problem(sde_name)
    return for_problem(get_solver(name), sde, data.model(), (4,))


@functools.cache
def _problem(sde_name: str):
    sde = {"vp": sdekit.VPSDE, "ddpm": sdekit.DiscreteDDPM}[sde_name]()
    return sde, gaussian_problem(sde, dim=4)


class _WithWeights(torch.nn.Module):
    """The exact eps-model plus ``0 * w`` for a weight that requires grad, like a real network:
    in grad mode every output would carry a graph back to ``w``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        return self.fn(x, t) + 0 * self.w


# ------------------------------------------------------------------ 1. no autograd graph
@pytest.mark.parametrize("name", NAMES)
def test_sample_builds_no_graph_by_default(name):
    sde, data = _problem("vp")
    net = _WithWeights(data.eps)
    model = sdekit.DiffusionModel(net, sde, "eps", time_input="t")
    slv = _solver(name, "vp")
    steps = max(6, slv.min_steps)
    sol = sample(sde, model, shape=(3, 4), solver=slv, steps=steps, seed=0, denoise=True)
    assert not sol.x.requires_grad and sol.x.grad_fn is None
    assert torch.is_grad_enabled(), "sample() must restore the caller's grad mode"


def test_grad_full_keeps_the_graph_and_grad_model_gives_gradients_inside_a_call():
    sde, data = _problem("vp")
    net = _WithWeights(data.eps)
    model = sdekit.DiffusionModel(net, sde, "eps", time_input="t")
    sol = sample(sde, model, shape=(3, 4), solver="ddim", steps=4, grad="full")
    assert sol.x.requires_grad  # differentiable end to end (memory grows with the steps)
    sol.x.sum().backward()
    assert net.w.grad is not None

    # "model": a guidance-style wrapper differentiates its output w.r.t. its input
    seen = []

    def guided(x, t):
        assert x.requires_grad and torch.is_grad_enabled()
        e = data.eps(x, t)
        (g,) = torch.autograd.grad((0.5 * x.pow(2)).sum(), x)  # gradient of a toy potential
        seen.append(g.detach())
        return e + 0.0 * g + 0 * net.w

    gm = sdekit.DiffusionModel(guided, sde, "eps", time_input="t")
    out = sample(sde, gm, shape=(3, 4), solver="ddim", steps=4, grad="model", seed=0)
    assert not out.x.requires_grad and out.x.grad_fn is None
    assert len(seen) == 4
    plain = sample(sde, data.model(), shape=(3, 4), solver="ddim", steps=4, seed=0)
    torch.testing.assert_close(out.x, plain.x)


def test_grad_mode_is_validated():
    sde, data = _problem("vp")
    with pytest.raises(ValueError, match="grad='yes' is invalid"):
        sample(sde, data.model(), shape=(2, 4), grad="yes")


# ------------------------------------------------------------------ 2. dtypes
class _Rounding:
    """The float32 reference for a half-precision run: the network sees its input rounded to
    ``dtype`` and its output is rounded to ``dtype``; everything else stays float32."""

    def __init__(self, fn, dtype):
        self.fn, self.dtype = fn, dtype

    def __call__(self, x, t):
        return self.fn(x.to(self.dtype), t).to(self.dtype).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_rounds_only_at_the_network(name, dtype):
    """In half precision the network runs in that dtype while the solver state, the times and the
    coefficients stay float32: the result equals a float32 solve whose network rounds its input
    and output to the half dtype."""
    sde, data = _problem("ddpm")
    slv = _solver(name, "ddpm")
    steps = max(6, slv.min_steps)
    half = sample(sde, sdekit.DiffusionModel(data.eps, sde, "eps", time_input="t"),
                  shape=(5, 4), solver=slv, steps=steps, dtype=dtype, seed=2)
    ref = sample(sde, sdekit.DiffusionModel(_Rounding(data.eps, dtype), sde, "eps",
                                            time_input="t"),
                 shape=(5, 4), solver=slv, steps=steps, dtype=torch.float32, seed=2)
    assert half.x.dtype == dtype and half.nfe == ref.nfe
    torch.testing.assert_close(half.x, ref.x.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_time_input_is_exact(dtype):
    """A DDPM network gets its integer timesteps exactly (bfloat16 used to turn 999 into 1000 and
    round every step to a multiple of 4..8; float16 gave 699.5 for 699)."""
    sde = sdekit.DiscreteDDPM()
    seen = []

    def net(x, t):
        assert x.dtype == dtype and t.dtype == torch.float32
        seen.append(t.clone())
        return torch.zeros_like(x)

    grid = sde.timestep_to_t(torch.arange(999, -1, -111, dtype=torch.float64))
    sample(sde, net, shape=(2, 3), solver="ddim", grid=grid, dtype=dtype)
    got = torch.stack([s[0] for s in seen]).double()
    torch.testing.assert_close(got, torch.arange(999, 0, -111, dtype=torch.float64),
                               rtol=0, atol=0)


def test_heun_runs_in_bfloat16_on_the_gaussian_oracle():
    # used to raise "t=0.00099945 is outside the time range"
    sde = sdekit.VPSDE()
    data = gaussian_problem(sde, dim=4)
    sol = sample(sde, data.model(), shape=(4, 4), solver="heun", steps=5, dtype=torch.bfloat16)
    assert sol.x.dtype == torch.bfloat16 and torch.isfinite(sol.x.float()).all()


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_dtypes_are_rejected(bad):
    sde, data = _problem("vp")
    with pytest.raises(TypeError, match="x_init has dtype .*floating dtype is needed"):
        sample(sde, data.model(), torch.zeros(2, 4, dtype=bad))
    with pytest.raises(TypeError, match="dtype has dtype .*floating dtype is needed"):
        sample(sde, data.model(), shape=(2, 4), dtype=bad)


def test_non_floating_model_output_is_rejected():
    sde, data = _problem("vp")
    with pytest.raises(TypeError, match="the model returned dtype torch.int64"):
        sample(sde, lambda x, t: data.eps(x, t).long(), shape=(2, 4), steps=3)


# ------------------------------------------------------------------ 7. bad arguments
def _count_calls():
    calls = []

    def net(x, t):
        calls.append(1)
        return torch.zeros_like(x)
    return net, calls


BAD_CALLS = {
    "x_init list": (dict(x_init=[[0.0, 1.0]]), TypeError, "x_init must be a torch.Tensor"),
    "x_init numpy": (dict(x_init=np.zeros((2, 3))), TypeError, "x_init must be a torch.Tensor"),
    "x_init 0-d": (dict(x_init=torch.tensor(1.0)), ValueError, r"x_init has shape \(\)"),
    "shape ()": (dict(shape=()), ValueError, r"shape=\(\) is invalid"),
    "shape negative": (dict(shape=(2, -3)), ValueError, r"shape=\(2, -3\) is invalid"),
    "shape empty batch": (dict(shape=(0, 3)), ValueError, r"shape=\(0, 3\) is invalid"),
    "shape float": (dict(shape=(2.0, 3)), ValueError, r"shape=\(2.0, 3\) is invalid"),
    "seed negative": (dict(shape=(2, 3), seed=-1), ValueError, "seed=-1 is invalid"),
    "seed too large": (dict(shape=(2, 3), seed=2 ** 63), ValueError, "seed=9223372036854775808"),
    "seed float": (dict(shape=(2, 3), seed=1.5), TypeError, "seed=1.5 is invalid"),
    "seeds float": (dict(shape=(2, 3), seeds=[1, 2.5]), TypeError, "seeds=2.5 is invalid"),
    "seeds count": (dict(shape=(2, 3), seeds=[1]), ValueError, "seeds has 1 entries"),
    "seeds and noise": (dict(shape=(2, 3), seeds=[1, 2], noise=sdekit.SeededNoise([1, 2])),
                        ValueError, "give seeds or noise, not both"),
    "t_start with grid": (dict(shape=(2, 3), grid=[1.0, 0.5, 0.01], t_start=0.9), ValueError,
                          "t_start=0.9 cannot be combined with an explicit grid"),
    "steps with grid": (dict(shape=(2, 3), grid=[1.0, 0.5, 0.01], steps=10), ValueError,
                        "steps=10 disagrees with the given grid"),
    "grid option typo": (dict(shape=(2, 3), grid="karras", grid_options={"rhoo": 3}),
                         ValueError, r"grid_options \['rhoo'\] do not apply to grid 'karras'"),
    "grid option elsewhere": (dict(shape=(2, 3), grid="logsnr", grid_options={"rho": 3}),
                              ValueError, r"grid_options \['rho'\] do not apply to grid 'logsnr'"),
    "grid option on array": (dict(shape=(2, 3), grid=[1.0, 0.01], grid_options={"rho": 3}),
                             ValueError, "do not apply to an explicit grid"),
    "callback": (dict(shape=(2, 3), callback=3), TypeError, "callback must be callable"),
    "t_end string": (dict(shape=(2, 3), t_end="0.1"), ValueError, "t_end='0.1' is invalid"),
    # each of these used to end in Python's or torch's own error (AttributeError 'int' object
    # has no attribute 'randn', RuntimeError from torch.empty, 'float' object is not iterable)
    # or, for the NaN state, in a ModelOutputError blaming the model after its first call
    "x_init NaN": (dict(x_init=torch.full((2, 3), float("nan"))), ValueError,
                   "x_init contains NaN or Inf"),
    "seeds int": (dict(shape=(2, 3), seeds=5), TypeError, "seeds=5 is invalid"),
    "noise int": (dict(shape=(2, 3), noise=5), TypeError, "noise=5 is invalid"),
    "noise class": (dict(shape=(2, 3), noise=sdekit.BrownianNoise), TypeError,
                    "noise=<class 'sdekit.noise.BrownianNoise'> is invalid"),
    "save_at number": (dict(shape=(2, 3), save_at=0.5), ValueError, "save_at=0.5 is invalid"),
    "save_at None": (dict(shape=(2, 3), save_at=[None]), ValueError,
                     r"save_at=\[None\] is invalid"),
    "grid_options str": (dict(shape=(2, 3), grid="karras", grid_options="rho"), TypeError,
                         "grid_options='rho' is invalid"),
    "device unknown": (dict(shape=(2, 3), device="nope"), ValueError, "device='nope' is invalid"),
    # on/off flags used to be read for their truth: float64='no' ran in float64
    "float64 string": (dict(shape=(2, 3), float64="no"), ValueError, "float64='no' is invalid"),
    "denoise number": (dict(shape=(2, 3), denoise=1), ValueError, "denoise=1 is invalid"),
    "progress None": (dict(shape=(2, 3), progress=None), ValueError, "progress=None is invalid"),
    "solver flag": (dict(shape=(2, 3), solver="dpmpp_2m", final_to_zero="x"), ValueError,
                    "final_to_zero='x' is invalid: expected True or False"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_sample_arguments_fail_before_any_work(case):
    kwargs, exc, msg = BAD_CALLS[case]
    sde = sdekit.VPSDE()
    net, calls = _count_calls()
    with pytest.raises(exc, match=msg):
        sample(sde, net, **kwargs)
    assert calls == [], "the error must come before the first model call"


@pytest.mark.parametrize("sde", [None, "vp"])
def test_sample_refuses_an_sde_that_is_not_a_forward_sde(sde):
    """It used to end in AttributeError: 'NoneType' object has no attribute 'lambda_'."""
    net, calls = _count_calls()
    with pytest.raises(TypeError, match="sde must be an sdekit ForwardSDE"):
        sample(sde, net, shape=(2, 3))
    assert calls == []


def test_sample_refuses_an_unknown_prediction_with_a_diffusion_model():
    """A DiffusionModel carries its own prediction, so sample() used to ignore a misspelt one."""
    sde = sdekit.VPSDE()
    net, calls = _count_calls()
    with pytest.raises(ValueError, match="prediction='epss' is invalid"):
        sample(sde, sdekit.DiffusionModel(net, sde), shape=(2, 3), prediction="epss")
    assert calls == []


def test_save_at_takes_a_tensor_of_grid_times():
    """A tensor of several times used to end in torch's 'Boolean value of Tensor with more than
    one value is ambiguous' (``save_at or []``)."""
    sde = sdekit.VPSDE()
    net, _ = _count_calls()
    times = sdekit.make_grid(sde, "uniform", 4)
    sol = sample(sde, net, shape=(2, 3), solver="ddim", grid=times, save_at=times[1:3])
    assert sorted(sol.trajectory) == sorted(times[1:3].tolist())


def test_consistent_steps_with_an_explicit_grid_is_accepted():
    sde = sdekit.VPSDE()
    net, calls = _count_calls()
    sol = sample(sde, net, shape=(2, 3), solver="ddim", grid=[1.0, 0.5, 0.01], steps=2)
    assert sol.steps == 2 and len(calls) == 2


@pytest.mark.parametrize("make, msg", [
    (lambda: sdekit.VPSDE(beta_min="0.1"), "beta_min='0.1' is invalid"),
    (lambda: sdekit.VPSDE(t_min="0.001"), "t_min='0.001' is invalid"),
    (lambda: sdekit.SubVPSDE(beta_max=True), "beta_max=True is invalid"),
    (lambda: sdekit.CosineVPSDE(s="0.008"), "s='0.008' is invalid"),
    (lambda: sdekit.CosineVPSDE(T="0.99"), "T='0.99' is invalid"),
    (lambda: sdekit.VESDE(sigma_min="0.01"), "sigma_min='0.01' is invalid"),
    (lambda: sdekit.EDMSDE(sigma_data=None), "sigma_data=None is invalid"),
    (lambda: sdekit.DiscreteDDPM(beta_end="0.02"), "beta_end='0.02' is invalid"),
])
def test_forward_process_arguments_are_checked(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction", ["eps", "denoiser"])
def test_sdekit_networks_sample_in_half_precision(dtype, prediction):
    """sdekit's own MLP and U-Net cast to a half dtype sample with ``dtype=`` that dtype; their
    noise-level embedding is computed from float32 noise levels and float64 frequencies, so the
    result is the float32 network's to within the half dtype's rounding."""
    from sdekit.models import MLPScoreNet, UNet, wrap
    torch.manual_seed(0)
    sde = sdekit.VPSDE()
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for net, shape in [(MLPScoreNet(data_shape=(2,), width=32, prediction=prediction), (8, 2)),
                       (UNet(in_channels=1, image_size=8, base_channels=8,
                             prediction=prediction), (2, 1, 8, 8))]:
        ref = sample(sde, wrap(net, sde), shape=shape, solver="ddim", steps=4, seed=0).x
        half = sample(sde, wrap(net.to(dtype), sde), shape=shape, solver="ddim", steps=4,
                      seed=0, dtype=dtype).x
        assert half.dtype == dtype
        err = (half.float() - ref).abs().max() / ref.abs().max()
        assert err < tol, f"{type(net).__name__}: relative error {err:.3g}"
