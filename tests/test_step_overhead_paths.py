"""The image-sized step paths: how many passes over the state a step makes (allocations,
updates, the NaN/Inf check), the cheap NaN/Inf check's exactness (no false positive from an
overflowing reduction, e.g. float16), and the fused updates' numbers."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdekit
from sdekit.solvers import ModelOutputError
from sdekit.solvers.base import Problem, check_model_output, raise_pending

VIEWS = {"aten.view.default", "aten.unbind.int", "aten.select.int", "aten.slice.Tensor",
         "aten.detach.default", "aten.alias.default", "aten.empty.memory_format",
         "aten.empty_like.default", "aten._to_copy.default", "aten.expand.default"}


class _StatePasses(TorchDispatchMode):
    """Counts the tensor operations that read or write a tensor of ``numel`` elements (a pass
    over the state), by name, and among them those that allocate a new one (``allocations``);
    views and allocations without a pass are left out."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops, self.allocations = numel, collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in (*args, *(kwargs or {}).values(), out) if isinstance(a, torch.Tensor)]
        if str(func) not in VIEWS and any(t.numel() == self.numel for t in tensors):
            self.ops[str(func)] += 1
            in_place = func._schema.name.endswith("_") or "out" in (kwargs or {})
            self.allocations += (isinstance(out, torch.Tensor) and out.numel() == self.numel
                                 and not in_place)
        return out


def _passes_per_step(sde, net, prediction, solver, steps=10, shape=(4, 3, 16, 16), **kw):
    """Passes over the state and allocations of a state per step of a solve, the network's
    own (one of each per call) taken off, and the op counts: the difference between a solve of
    ``2 steps`` and one of ``steps`` steps, over ``steps``, so what a call does once (checking
    its input) is not spread over its steps."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * sde.prior_std
    counts = []
    for n in (steps, 2 * steps):
        sdekit.sample(sde, net, x, solver=solver, steps=n, prediction=prediction, **kw)  # warm
        with _StatePasses(x.numel()) as c:
            sol = sdekit.sample(sde, net, x, solver=solver, steps=n, prediction=prediction, **kw)
        counts.append((sum(c.ops.values()) - sol.nfe, c.allocations - sol.nfe, c.ops))
    (p1, a1, ops1), (p2, a2, ops2) = counts
    return (p2 - p1) / steps, (a2 - a1) / steps, ops2 - ops1


@pytest.mark.parametrize("sde_name,prediction,solver,most,allocations", [
    # network's output in the solver's form: the update (1 allocation + 1 in place per further
    # term) and the one reading check
    ("ddpm", "x0", "dpmpp_2m", 4, 1),          # c_x x + c_0 m_0 + c_1 m_1, the check
    ("ddpm", "eps", "ddim", 3, 1),             # a x + b eps, the check
    ("ddpm", "eps", "dpmpp_2m", 6, 2),         # eps -> x0 (2 passes), the update, the check
    ("ddpm", "eps", "unipc_bh2", 9, 4),        # eps -> x0, UniP (3), UniC (3), the check
    ("edm", "denoiser", "unipc_bh2", 7, 3),    # UniP, UniC, the check: no conversion
    # alpha = 1 (VE, EDM): the data-prediction updates are affine, one lerp per output
    ("edm", "denoiser", "dpmpp_2m", 3, 1),     # lerp(m_0, m_1), lerp with x, the check
    ("edm", "denoiser", "dpmpp_3m", 4, 1),
    ("edm", "denoiser", "ddim", 2, 1),         # lerp(x0, x), the check
    # c_x = 1: x + sum_j c_j eps_j over tAB3's last 4 eps (one add per term), no scaling pass,
    # the check (its warm-up steps have fewer terms: the 10-step average, taken before
    # per-step counts were separated from the call's own passes, was 3.9)
    ("edm", "eps", "deis_tab3", 5, 1),
])
def test_passes_over_the_state_per_step(sde_name, prediction, solver, most, allocations):
    """A step of the image-path solvers reads and writes the state no more often, and
    allocates no more new states, than its update's terms need (UniPC made 15 passes and 7
    allocations per step with its differences D_k, a scaled copy, a clone, and an eps -> x0
    round trip for x0 networks; DDIM allocated twice)."""
    sde = {"edm": sdekit.EDMSDE(), "ddpm": sdekit.DiscreteDDPM()}[sde_name]
    per_step, allocated, ops = _passes_per_step(sde, lambda x, t: x * 0.5, prediction, solver)
    assert per_step <= most and allocated <= allocations, (allocated, ops)


def test_lin_is_one_allocation_and_the_numbers_of_the_out_of_place_form():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    x0, y0 = x.clone(), y.clone()
    for a, b in ((0.75, -0.3), (1.0, 0.2)):
        with _StatePasses(x.numel()) as c:
            out = Problem.lin(a, x, b, y)
        assert torch.equal(out, torch.add(x * a, y, alpha=b))
        assert sum(c.ops.values()) == (1 if a == 1.0 else 2) and c.allocations == 1
        assert torch.equal(x, x0) and torch.equal(y, y0)   # the inputs are left as they were


# ------------------------------------------------------------------- the NaN/Inf check's paths
def _check(out, pending):
    check_model_output(out, torch.tensor(0.5, dtype=torch.float64), "dpmpp_2m", lambda t: 7,
                       pending)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("deferred", [False, True], ids=["at_once", "deferred"])
def test_large_but_finite_output_is_no_error(dtype, deferred):
    """A finite output whose sum overflows (float16: 60000 x 1024 > 65504) is no NaN/Inf: the
    sum's overflow is confirmed by the exact test before raising (it raised before)."""
    big = torch.finfo(dtype).max / 2
    out = torch.full((4, 256), big, dtype=dtype)
    assert not torch.isfinite(out.sum())   # the cheap reduction overflows
    pending = [] if deferred else None
    _check(out, pending)
    _check(-out, pending)
    if deferred:
        assert len(pending) == 2
        raise_pending(pending)
        assert pending == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("deferred", [False, True], ids=["at_once", "deferred"])
def test_one_bad_element_is_an_error_naming_step_time_and_solver(dtype, bad, deferred):
    out = torch.zeros(4, 256, dtype=dtype)
    out[3, 17] = bad
    pending = [] if deferred else None
    with pytest.raises(ModelOutputError, match=r"step 7 \(t=0\.5\) of solver 'dpmpp_2m'"):
        _check(torch.zeros_like(out), pending)
        _check(out, pending)
        if deferred:
            raise_pending(pending)
    if deferred:
        assert pending == []


def test_a_solve_with_large_finite_outputs_runs_and_one_with_inf_stops():
    """Through sample(): outputs of 1e35 (finite; their float32 sum, 6e38, is not) no longer
    stop the solve; an Inf at the 4th call still names its step."""
    sde = sdekit.VPSDE()
    calls = {"n": 0}

    def net(x, t):
        calls["n"] += 1
        return torch.full_like(x, 1e35 if calls["n"] == 2 else 0.0)

    x = sdekit.sample(sde, net, shape=(2, 3, 32, 32), solver="ddim", steps=5).x
    assert torch.isfinite(x).all() and x.abs().max() > 1e30

    def inf_net(x, t):
        calls["n"] += 1
        return torch.full_like(x, float("inf") if calls["n"] == 4 else 0.0)

    calls["n"] = 0
    with pytest.raises(ModelOutputError, match=r"step 3 \(t=.*\) of solver 'ddim'"):
        sdekit.sample(sde, inf_net, shape=(2, 3, 32, 32), solver="ddim", steps=5)


# --------------------------------------------------------------------------- UniPC's combination
@pytest.mark.parametrize("opts", [{}, {"order": 1}, {"order": 3}, {"variant": "bh1"},
                                  {"predict_x0": False}, {"order": 3, "variant": "bh1"}],
                         ids=str)
def test_unipc_combination_equals_the_difference_form(opts):
    """UniP / UniC as one linear combination of the state and the outputs equal the papers'
    form through the differences ``D_k = (m_{s-k} - m_s) / r_k`` (evaluated here in float64)
    to float64 rounding."""
    from sdekit.solvers import get_solver
    opts = dict(opts)
    slv = get_solver("unipc_" + opts.pop("variant", "bh2"), **opts)
    sde = sdekit.VPSDE()
    p = Problem(sde, sdekit.DiffusionModel(lambda x, t: x, sde), sdekit.make_grid(sde, "logsnr", 8))
    st = slv.init(p, torch.zeros(2, 3))
    g = torch.Generator().manual_seed(1)
    x, m_t = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    outputs = tuple(torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(4))
    st = st._replace(outputs=outputs)
    for s in range(2, 6):
        c_x, c_0, rks, w_p, w_c = c = st.table[s]
        D = [(outputs[k] - outputs[0]) / r for k, r in enumerate(rks, 1)]
        ref_p = c_x * x + c_0 * outputs[0] - sum((w * d for w, d in zip(w_p, D)), torch.zeros(2, 3))
        ref_c = c_x * x + c_0 * outputs[0] - sum(
            (w * d for w, d in zip(w_c, D + [m_t - outputs[0]])), torch.zeros(2, 3))
        pred, kept = slv._update(x, st, s, c, None, True)
        fresh = slv._update(x, st, s, c, m_t)[0]
        shared = slv._update(x, st._replace(shared=kept), s, c, m_t)[0]
        scale = float(sum(v.abs().max() for v in (x, *outputs, m_t)))
        torch.testing.assert_close(pred, ref_p, rtol=0, atol=1e-14 * scale)
        torch.testing.assert_close(fresh, ref_c, rtol=0, atol=1e-14 * scale)
        assert torch.equal(shared, fresh)


@pytest.mark.parametrize("c_x,cs", [
    (0.6, [0.5, -0.1]),               # affine (DPM-Solver++(2M) on alpha = 1)
    (0.55, [0.6, -0.2, 0.05]),        # affine, three outputs
    (0.3, [0.7]),                     # affine, one output (DDIM's x0 form on alpha = 1)
    (0.9, [0.4, -0.1]),               # not affine
    (1.0, [-0.2, 0.05]),              # c_x = 1 (noise prediction on alpha = 1)
    (0.5, [0.3, -0.2999, 0.4999]),    # affine with a vanishing partial sum: the general form
    (0.5, [1e-4, 0.4999]),
])
def test_linear_combination_equals_the_sum_it_stands_for(c_x, cs):
    from sdekit.solvers.base import linear_combination
    g = torch.Generator().manual_seed(2)
    x, *ms = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(len(cs) + 1))
    before = [t.clone() for t in (x, *ms)]
    with _StatePasses(x.numel()) as c:
        out = linear_combination(c_x, x, cs, ms)
    ref = c_x * x + sum(cj * m for cj, m in zip(cs, ms))
    torch.testing.assert_close(out, ref, rtol=0, atol=4e-16 * float(ref.abs().max()) * len(cs))
    assert all(torch.equal(a, b) for a, b in zip(before, (x, *ms)))   # inputs untouched
    affine = (abs(c_x + sum(cs) - 1) < 1e-12
              and min(abs(sum(cs[:k + 1])) for k in range(len(cs))) > 1e-3)
    assert sum(c.ops.values()) == len(cs) + (0 if affine or c_x == 1.0 else 1)
    assert c.allocations == 1


def test_sample_seeds_are_derived_once_per_seed_and_count(monkeypatch):
    """The per-sample seeds of ``(seed, n)`` are the SeedSequence numbers, derived once (a
    solve of 256 samples spent ~2.5 ms on them every call); each call gets its own list."""
    import numpy as np

    from sdekit import noise as noise_mod
    expected = [int(np.random.SeedSequence([123457, i]).generate_state(1, np.uint64)[0]) >> 1
                for i in range(5)]
    calls = []
    real = np.random.SeedSequence

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(noise_mod.np.random, "SeedSequence", counted)
    first = noise_mod.sample_seeds(123457, 5)
    first.append(0)   # the caller's list: the next call is not affected
    assert noise_mod.sample_seeds(123457, 5) == expected and first[:5] == expected
    assert len(calls) == 5
