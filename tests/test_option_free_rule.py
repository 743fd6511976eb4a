"""The option-free path is one rule everywhere: where the diffusers scheduler, SDEdit and the
replacement methods are given no solver, they take what sdekit.sample takes
(sdekit.solvers.default_config with neither a solver nor a grid, DEFAULT_SOLVER with a grid)."""
from __future__ import annotations

import pytest
import torch

import sdekit
from sdekit.analytic import GaussianData
from sdekit.grids import make_grid
from sdekit.inverse import inpaint, sdedit
from sdekit.solvers import DEFAULT_SOLVER, default_config, get_solver

VP = sdekit.VPSDE()


def _same_solver(a, b) -> None:
    assert type(a) is type(b) and vars(a) == vars(b), (vars(a), vars(b))


@pytest.mark.parametrize("n", [6, 11])   # order 2 without the lower-order final step, order 3
def test_the_scheduler_without_a_solver_takes_default_config(n):
    pytest.importorskip("diffusers")
    from sdekit.interop import SdekitScheduler

    sched = SdekitScheduler()
    sched.set_timesteps(n)
    cfg = default_config(sched.sde, n - 1)         # denoise: n - 1 steps, then the final x0
    _same_solver(sched.solver, get_solver(cfg["solver"], **cfg["options"]))
    assert torch.equal(sched.times, make_grid(sched.sde, cfg["grid"], n - 1,
                                              **cfg["grid_options"]))
    assert sched.config.solver is None   # saved as option-free: from_config keeps the rule
    again = SdekitScheduler.from_config(sched.config)
    again.set_timesteps(n)
    assert torch.equal(again.timesteps, sched.timesteps)

    # the pipeline loop is the option-free sdekit.sample (a network that ignores its time
    # input: the timesteps the pipeline hands it are float32, sample's are float64)
    torch.manual_seed(0)
    W = 0.3 * torch.randn(4, 4, dtype=torch.float64)

    def net(x, t):
        return torch.tanh(x @ W)

    x_T = torch.randn(3, 4, dtype=torch.float64)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t), t, x).prev_sample
    core = sched._core
    model = sdekit.DiffusionModel(net, core.sde, core.prediction, core.time_input)
    ref = sdekit.sample(core.sde, model, x_T, steps=n - 1, denoise=True)
    assert ref.solver == cfg["solver"] and torch.equal(ref.times, sched.times)
    torch.testing.assert_close(x, ref.x, atol=1e-12, rtol=0)


def test_the_scheduler_without_a_solver_on_a_given_grid_takes_the_default_solver():
    pytest.importorskip("diffusers")
    from sdekit.interop import SdekitScheduler

    sched = SdekitScheduler(grid="karras")
    sched.set_timesteps(8)
    _same_solver(sched.solver, get_solver(DEFAULT_SOLVER))
    sched = SdekitScheduler(lower_order_final=True)   # options join the rule's (as sample's)
    sched.set_timesteps(6)
    assert sched.solver.lower_order_final is True and sched.solver.max_order == 2
    with pytest.raises(TypeError, match="unknown options"):   # refused before any work
        SdekitScheduler(bogus=1)


def test_inverse_methods_without_a_solver_take_default_config():
    g = GaussianData.random(VP, dim=3, seed=2)
    y = g.marginal_sample(4, VP.t_min, torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    cfg = default_config(VP, 8)
    explicit = {"solver": cfg["solver"], "grid": cfg["grid"], "grid_options": cfg["grid_options"],
                **cfg["options"]}
    for kw in ({}, {"resample": 2, "jump": 4}):
        out = inpaint(VP, g.model("eps"), y, mask, steps=8, **kw)
        assert out.solver == cfg["solver"]
        assert torch.equal(out.x, inpaint(VP, g.model("eps"), y, mask, steps=8, **kw,
                                          **explicit).x)
        assert torch.equal(out.times, make_grid(VP, cfg["grid"], 8, **cfg["grid_options"]))
    a = sdedit(VP, g.model("eps"), y, 0.5, steps=8)
    ref = sdedit(VP, g.model("eps"), y, 0.5, steps=8, **explicit)
    assert a.solver == cfg["solver"] and torch.equal(a.x, ref.x)
