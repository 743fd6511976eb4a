"""Recycled memory: the fixed-grid driver's spare states (`Problem.spare`), into which a step
writes its result, are states of the solve that nothing references any more, and only those;
a data-prediction exponential integrator converts a network's eps output to x0 in place only
where nothing else holds that output (`sdekit.solvers.base.unshared`). The numbers are those
of a solve without recycling; a tensor that anyone still holds (the caller, a network that
kept its input or output or a view of it, a callback, a solver's history) is never written
into."""
import pytest
import torch

import sdekit
import sdekit.solvers.base as base
from sdekit.solvers.base import Problem

SOLVERS = ["ddim", "ancestral", "dpmpp_2m", "dpmpp_3m", "deis_tab3", "unipc_bh2", "edm_euler"]
SDES = {"ddpm": sdekit.DiscreteDDPM, "edm": sdekit.EDMSDE, "flow": sdekit.FlowSDE}


def _solve(sde, net, x, solver, prediction, recycle, monkeypatch, **kw):
    monkeypatch.setattr(base, "_CAN_COUNT", recycle)
    return sdekit.sample(sde, net, x, solver=solver, steps=8, seed=3, prediction=prediction,
                         **kw).x


def _spares_taken(monkeypatch) -> list[int]:
    """Counts, in a list of one, the spare states handed to a step."""
    taken, take = [0], Problem.take_spare

    def counting(self, like):
        z = take(self, like)
        taken[0] += z is not None
        return z
    monkeypatch.setattr(Problem, "take_spare", counting)
    return taken


@pytest.mark.parametrize("sde_name,prediction", [("ddpm", "eps"), ("edm", "denoiser"),
                                                 ("flow", "flow")])
@pytest.mark.parametrize("solver", SOLVERS)
def test_recycling_gives_the_same_numbers(sde_name, prediction, solver, monkeypatch):
    sde = SDES[sde_name]()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * sde.prior_std
    x_before = x.clone()
    net = lambda y, t: 0.3 * y  # noqa: E731
    kw = {} if sdekit.get_solver(solver).starts_at_alpha_zero else {"t_start": 0.99 * sde.T}
    on = _solve(sde, net, x, solver, prediction, True, monkeypatch, **kw)
    off = _solve(sde, net, x, solver, prediction, False, monkeypatch, **kw)
    assert torch.equal(on, off)
    assert torch.equal(x, x_before)   # the caller's state is never written into


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "deis_tab3", "ancestral", "unipc_bh2"])
def test_a_plain_solve_recycles_its_states(solver, monkeypatch):
    """The check above is not vacuous: a solve with nothing holding its states hands every
    step after the second one the state of two steps before."""
    taken = _spares_taken(monkeypatch)
    x = torch.randn(3, 8)
    sdekit.sample(sdekit.DiscreteDDPM(), lambda y, t: 0.3 * y, x, solver=solver, steps=8, seed=0)
    assert taken[0] == 6


KEEPERS = {   # what a network may keep of its input after the call
    "the tensor": lambda y: y,
    "a view": lambda y: y[0],
    "a detached alias": lambda y: y.detach(),
    "a numpy array": lambda y: y.numpy(),
}


@pytest.mark.parametrize("keep", list(KEEPERS))
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_states_a_network_kept_are_never_written_into(keep, solver, monkeypatch):
    kept, copies = [], []

    def net(y, t):
        kept.append(KEEPERS[keep](y))
        copies.append(torch.as_tensor(kept[-1]).clone())
        return 0.3 * y
    taken = _spares_taken(monkeypatch)
    x = torch.randn(3, 8)
    sdekit.sample(sdekit.DiscreteDDPM(), net, x, solver=solver, steps=8, seed=0)
    assert taken[0] == 0
    for k, c in zip(kept, copies):
        assert torch.equal(torch.as_tensor(k), c)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_2m_sde"])
def test_outputs_a_network_kept_are_never_converted_in_place(solver, monkeypatch):
    """An eps network that keeps its outputs (or returns a cached tensor) sees them unchanged;
    one that does not gets the same numbers with its outputs converted to x0 in place."""
    kept, copies = [], []

    def keeping(y, t):
        kept.append(0.3 * y)
        copies.append(kept[-1].clone())
        return kept[-1]
    sde, x = sdekit.DiscreteDDPM(), torch.randn(3, 8)
    ref = _solve(sde, lambda y, t: 0.3 * y, x, solver, "eps", False, monkeypatch)
    assert torch.equal(_solve(sde, keeping, x, solver, "eps", True, monkeypatch), ref)
    assert all(torch.equal(k, c) for k, c in zip(kept, copies))
    assert torch.equal(_solve(sde, lambda y, t: 0.3 * y, x, solver, "eps", True, monkeypatch), ref)


def test_a_network_that_returns_its_input_is_not_corrupted(monkeypatch):
    """An x0 "network" returning its input: the history holds the state itself, so that state
    is not recycled while the history needs it."""
    sde = sdekit.EDMSDE()
    x = torch.randn(3, 8) * sde.prior_std
    on = _solve(sde, lambda y, t: y, x, "dpmpp_3m", "denoiser", True, monkeypatch)
    off = _solve(sde, lambda y, t: y, x, "dpmpp_3m", "denoiser", False, monkeypatch)
    assert torch.equal(on, off)


def test_states_seen_by_a_callback_or_saved_stay_as_they_were(monkeypatch):
    seen, copies = [], []

    def callback(i, t, y):
        seen.append(y)
        copies.append(y.clone())
    taken = _spares_taken(monkeypatch)
    x = torch.randn(3, 8)
    sol = sdekit.sample(sdekit.DiscreteDDPM(), lambda y, t: 0.3 * y, x, solver="ddim", steps=8,
                        callback=callback)
    assert taken[0] == 0
    assert all(torch.equal(s, c) for s, c in zip(seen, copies))
    grid = sol.times.tolist()
    ref = sdekit.sample(sdekit.DiscreteDDPM(), lambda y, t: 0.3 * y, x, solver="ddim", steps=8,
                        save_at=grid)
    assert torch.equal(ref.trajectory[grid[4]], copies[3])


def test_full_gradient_mode_does_not_recycle(monkeypatch):
    taken = _spares_taken(monkeypatch)
    x = torch.randn(3, 8, requires_grad=True)
    out = sdekit.sample(sdekit.DiscreteDDPM(), lambda y, t: 0.3 * y, x, solver="ddim", steps=6,
                        grad="full").x
    out.sum().backward()
    assert taken[0] == 0 and x.grad is not None and torch.isfinite(x.grad).all()


def test_take_spare_refuses_a_mismatch():
    p = Problem(sdekit.EDMSDE(), sdekit.DiffusionModel(lambda y, t: y, sdekit.EDMSDE(),
                                                       prediction="denoiser"),
                torch.tensor([80.0, 1.0], dtype=torch.float64))
    like = torch.zeros(2, 3)
    for spare in (torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.float64),
                  torch.zeros(2, 3, requires_grad=True)):
        p.spare = spare
        assert p.take_spare(like) is None and p.spare is None
    p.spare = z = torch.zeros(2, 3)
    assert p.take_spare(like) is z and p.spare is None
