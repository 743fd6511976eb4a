"""Per-step overhead: the multistep exponential integrators compute their step coefficients once
per grid (vectorised), not in every step, and the vectorised coefficients are the numbers the
one-step formulas give (bit for bit)."""
import pytest
import torch

import sdekit
from sdekit.solvers import dpm_solver, exp_integrator
from sdekit.solvers.dpm_solver import reference_weights
from sdekit.solvers.exp_integrator import ei_weights, ei_weights_per_step


def _nodes(grid: str, steps: int, order: int):
    sde = sdekit.EDMSDE()
    lam = sde.lambda_(sdekit.make_grid(sde, grid, steps)).double()
    idx = torch.arange(order - 1, steps)
    h = lam[idx + 1] - lam[idx]
    return [(lam[idx - j] - lam[idx]) / h for j in range(order)], h


@pytest.mark.parametrize("grid", ["karras", "logsnr", "uniform"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("k", [1.0, -1.0])
def test_vectorised_weights_equal_one_step_weights(grid, order, k):
    r, h = _nodes(grid, 50, order)
    W = ei_weights_per_step(torch.stack(r, 1), h, k)
    one = torch.stack([ei_weights(torch.stack([q[n] for q in r]), 1.0, h[n], k)
                       for n in range(h.numel())], 1)
    assert torch.equal(W, one)
    if order > 1:
        W = reference_weights(r, h, k)
        one = torch.stack([reference_weights([q[n] for q in r], h[n], k)
                           for n in range(h.numel())], 1)
        assert torch.equal(W, one)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "dpm_solver_3m"])
def test_multistep_coefficients_not_recomputed_per_step(solver, monkeypatch):
    sde = sdekit.EDMSDE()
    model = sdekit.DiffusionModel(lambda x, s: x * 0.5, sde, prediction="denoiser")
    x = torch.randn(4, 2) * 80
    calls = {"phi": 0}
    phi = exp_integrator.phi

    def counted(*a):
        calls["phi"] += 1
        return phi(*a)

    monkeypatch.setattr(exp_integrator, "phi", counted)
    monkeypatch.setattr(dpm_solver, "phi", counted)
    for steps in (50, 200):
        calls["phi"] = 0
        sdekit.sample(sde, model, x, solver=solver, grid=sdekit.make_grid(sde, "karras", steps))
        assert calls["phi"] <= 12  # a few per order, independent of the number of steps


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "edm_euler", "edm_heun"])
@pytest.mark.parametrize("prediction", ["denoiser", "eps"])
def test_model_schedule_factors_computed_once_per_grid_time(solver, prediction, monkeypatch):
    """The model's conditioning and alpha / sigma at a grid time are evaluated (and validated)
    once per time and batch, not on every call; other times still work and are still checked."""
    sde = sdekit.EDMSDE()
    model = sdekit.DiffusionModel(lambda x, s: x * 0.5, sde, prediction=prediction)
    calls = {"time": 0}
    check = type(sde)._time

    def counted(self, *a, **k):
        calls["time"] += 1
        return check(self, *a, **k)

    monkeypatch.setattr(type(sde), "_time", counted)
    x = torch.randn(4, 2) * 80
    grid = sdekit.make_grid(sde, "karras", 50)
    first = sdekit.sample(sde, model, x, solver=solver, grid=grid).x
    calls["time"] = 0
    again = sdekit.sample(sde, model, x, solver=solver, grid=grid).x
    assert torch.equal(first, again)
    assert calls["time"] <= 10  # the grid's schedule, not one check per model call
    assert torch.isfinite(model.x0(x, 3.14159)).all()
    with pytest.raises(ValueError, match="outside the time range"):
        model.x0(x, 1e6)


def test_a_network_that_edits_its_conditioning_in_place_does_not_corrupt_the_cache():
    sde = sdekit.VPSDE()

    def rude(x, t):
        out = torch.zeros_like(x) + t.reshape(-1, 1)
        t.mul_(0)   # modifies its conditioning in place
        return out

    def polite(x, t):
        return torch.zeros_like(x) + t.reshape(-1, 1)

    kw = dict(shape=(2, 3), solver="ddim", steps=4, seed=0)
    model = sdekit.DiffusionModel(rude, sde)   # reused: the second solve meets cached times
    first, second = (sdekit.sample(sde, model, **kw).x for _ in range(2))
    expected = sdekit.sample(sde, polite, **kw).x
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_seeded_noise_draws_blocks_not_one_call_per_sample_per_step(monkeypatch):
    """Per-sample seeds cost one generator call per sample per block of draws, not per step,
    and a sample's stream is the same in any batch and whatever the state's device or block
    position."""
    from sdekit import noise as noise_mod
    calls = []
    real = torch.randn

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(noise_mod.torch, "randn", counting)
    src = noise_mod.SeededNoise([5, 6, 7])
    like = torch.empty(3, 2)
    draws = [src.randn(like) for _ in range(noise_mod.MAX_BLOCK + 1)]
    assert len(calls) == 3 * 2     # one block per sample, then one refill per sample
    monkeypatch.setattr(noise_mod.torch, "randn", real)
    alone = noise_mod.SeededNoise([7])
    mine = [alone.randn(torch.empty(1, 2)) for _ in range(noise_mod.MAX_BLOCK + 1)]
    for a, b in zip(draws, mine):
        assert torch.equal(a[2:], b)
    assert len({tuple(d[0].tolist()) for d in draws}) == len(draws)   # fresh normals each call
