"""Per-step overhead: the multistep exponential integrators compute their step coefficients once
per grid (vectorised), not in every step, and the vectorised coefficients are the numbers the
one-step formulas give (bit for bit)."""
import math

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


# ---------------------------------------------------------------- UniPC and DEIS: tables at init
EPS = torch.finfo(torch.float64).eps


def _problem(sde, grid, steps, prediction="eps"):
    from sdekit.solvers.base import Problem
    model = sdekit.DiffusionModel(lambda x, t: x * 0.5, sde, prediction=prediction)
    return Problem(sde, model, sdekit.make_grid(sde, grid, steps), None)


def _unipc_one_step(p, s, order, variant, prediction, corrector):
    """UniPC's per-step coefficients as the step used to compute them (0-d tensors, one solve
    per step): ``(c_x, c_0, r, w)``, the reference of ``UniPC.step_table``."""
    from sdekit.solvers.exp_integrator import phi
    k = 1.0 if prediction == "eps" else -1.0
    h = p.lam[s + 1] - p.lam[s]
    hh = k * h
    W = (h * phi(1, hh)).reshape(1)
    if prediction == "eps":
        c_x, c_0 = p.alpha[s + 1] / p.alpha[s], -1.0 * p.sigma[s + 1] * W[0]
    else:
        c_x, c_0 = p.sigma[s + 1] / p.sigma[s], 1.0 * p.alpha[s + 1] * W[0]
    rks = [(p.lam[s - j] - p.lam[s]) / h for j in range(1, order)]
    B = hh if variant == "bh1" else torch.expm1(hh)
    b = torch.stack([math.factorial(q) * hh * phi(q + 1, hh) / B for q in range(1, order + 1)])
    nodes = rks + ([torch.ones((), dtype=torch.float64)] if corrector else [])
    n = len(nodes)
    if n == 0:
        rho = []
    elif (not corrector and order == 2) or (corrector and order == 1):
        rho = torch.full((n,), 0.5, dtype=torch.float64)
    else:
        R = torch.stack([torch.stack(nodes) ** q for q in range(n)])
        rho = torch.linalg.solve(R, b[:n])
    c = p.alpha[s + 1] if prediction == "x0" else p.sigma[s + 1]
    return float(c_x), float(c_0), [float(r) for r in rks], [float(c * B * r) for r in rho]


UNIPC_CASES = [{"order": o, "variant": v, "predict_x0": px} for o in (1, 2, 3)
               for v in ("bh1", "bh2") for px in (True, False)]


@pytest.mark.parametrize("ends", [{}, {"lower_order_final": True}, {"final_to_zero": True},
                                  {"lower_order_final": False, "final_to_zero": True}], ids=str)
@pytest.mark.parametrize("opts,sde_name,grid,steps", [
    (o, *g) for o in UNIPC_CASES
    for g in [("vp", "quadratic", 7), ("edm", "karras", 30), ("flow", "uniform", 9)]
    if o["predict_x0"] or g[0] != "flow"], ids=str)   # noise prediction cannot start at alpha = 0
def test_unipc_step_table_equals_one_step_formulas(opts, ends, sde_name, grid, steps):
    """UniP's and UniC's coefficients of every step, tabulated at init (vectorised over the
    steps of each order), are the numbers the one-step formulas give, bit for bit, at every
    step's order (warm-up, lower_order_final, final_to_zero, and the start at alpha = 0)."""
    from sdekit.solvers import get_solver
    sde = {"vp": sdekit.VPSDE(), "edm": sdekit.EDMSDE(), "flow": sdekit.FlowSDE()}[sde_name]
    slv = get_solver("unipc_" + opts["variant"],
                     **{k: v for k, v in opts.items() if k != "variant"}, **ends)
    p = _problem(sde, grid, steps, "x0" if sde_name == "flow" else "eps")
    st = slv.init(p, torch.zeros(2, 2))
    start = slv.start_index(p)
    assert start == (1 if sde_name == "flow" else 0)
    last = steps - 1 if slv.final_to_zero else steps
    assert sorted(st.table) == list(range(start, last))
    for s, (c_x, c_0, r, w_p, w_c) in st.table.items():
        o = slv.step_order(p, s, opts["order"], start)
        for corrector, w in ((False, w_p), (True, w_c)):
            ref = _unipc_one_step(p, s, o, opts["variant"], slv.prediction, corrector)
            assert (c_x, c_0, r, w) == ref, (s, o, corrector)


def _deis_one_step(slv, p):
    """DEIS's weights step by step, as the steps used to compute them (the reference of the
    vectorised ``DEISMultistep.coefficients``)."""
    from sdekit.solvers.exp_integrator import gauss_legendre, lagrange_eval
    rho = torch.exp(-p.lam)
    gx, gw = gauss_legendre(slv.quad_points)
    out = []
    for i in range(p.steps):
        o = slv.step_order(p, i, slv.ab_order + 1)
        while True:
            if slv.interp == "logrho":
                h = p.lam[i + 1] - p.lam[i]
                r = torch.stack([(p.lam[i - j] - p.lam[i]) / h for j in range(o)])
                w = ei_weights(r, 1.0, h, 1.0)
            else:
                half = (rho[i] - rho[i + 1]) / 2
                nodes_rho = rho[i + 1] + half * (gx + 1)
                if slv.interp == "t":
                    u, nodes = p.sde.t_of_sigma_tilde(nodes_rho), p.times[i - o + 1:i + 1]
                else:
                    u, nodes = nodes_rho, rho[i - o + 1:i + 1]
                ell = lagrange_eval(nodes.flip(0), u)
                w = (ell * gw).sum(1) * half * torch.exp(p.lam[i + 1])
            if o == 1 or float(w.abs().sum() / w.sum().abs()) <= slv.MAX_AMPLIFICATION:
                break
            o -= 1
        out.append(w)
    return out


@pytest.mark.parametrize("interp", ["t", "rho", "logrho"])
@pytest.mark.parametrize("ab_order", [0, 1, 2, 3])
@pytest.mark.parametrize("sde_name,grid,steps", [
    ("vp", "quadratic", 12), ("cosine", "quadratic", 40), ("edm", "karras", 9),
    ("squaredcos", "logsnr", 10), ("squaredcos", "karras", 25)])
def test_deis_vectorised_weights_equal_one_step_weights(interp, ab_order, sde_name, grid, steps):
    """DEIS's weights computed for all steps of an order at once are the one-step numbers,
    bit for bit, including the steps whose order the amplification cap lowers (the
    squared-cosine DDPM table on logsnr / Karras grids), and so are combine's coefficients."""
    from sdekit.solvers import get_solver
    from sdekit.solvers.exp_integrator import ExpIntegrator
    sde = {"vp": sdekit.VPSDE(), "cosine": sdekit.CosineVPSDE(), "edm": sdekit.EDMSDE(),
           "squaredcos": sdekit.DiscreteDDPM.squaredcos()}[sde_name]
    slv = get_solver("deis_tab3", ab_order=ab_order, interp=interp)
    p = _problem(sde, grid, steps)
    W, ref = slv.coefficients(p), _deis_one_step(slv, p)
    assert [len(w) for w in W] == [len(r) for r in ref]      # the same order at every step
    for w, r in zip(W, ref):
        if interp == "t":   # t(rho) over all steps at once: its log rounds as SIMD or scalar
            torch.testing.assert_close(w, r, rtol=0, atol=4 * EPS * float(r.abs().sum()))
        else:
            assert torch.equal(w, r)
    if sde_name == "squaredcos" and interp == "t" and ab_order == 3:   # the cap is exercised
        assert any(len(r) < slv.step_order(p, i, 4) for i, r in enumerate(ref))
    table = slv.init(p, torch.zeros(2, 2)).table
    for i, w in enumerate(W):
        assert table[i] == ExpIntegrator.coefficients(slv, p, torch.tensor([i]), w[:, None])[0]


@pytest.mark.parametrize("solver,opts", [
    ("unipc_bh2", {}), ("unipc_bh1", {"order": 3}), ("unipc_bh2", {"predict_x0": False}),
    ("unic_dpmpp_2m", {}), ("deis_tab3", {}), ("deis_rhoab", {}),
    ("deis_tab2", {"interp": "logrho"})])
def test_unipc_and_deis_coefficients_not_recomputed_per_step(solver, opts, monkeypatch):
    """UniPC and DEIS evaluate phi, the Lagrange basis and UniPC's linear solve a few times per
    grid (vectorised over steps), not in every step."""
    from sdekit.solvers import deis, unipc
    sde = sdekit.VPSDE()
    model = sdekit.DiffusionModel(lambda x, t: x * 0.5, sde)
    x = torch.randn(4, 2)
    calls = {"n": 0}

    def counted(f):
        def g(*a, **k):
            calls["n"] += 1
            return f(*a, **k)
        return g

    for mod in (exp_integrator, unipc, dpm_solver):
        monkeypatch.setattr(mod, "phi", counted(exp_integrator.phi))
    monkeypatch.setattr(deis, "lagrange_eval", counted(exp_integrator.lagrange_eval))
    monkeypatch.setattr(torch.linalg, "solve", counted(torch.linalg.solve))
    counts = []
    for steps in (50, 200):
        calls["n"] = 0
        sdekit.sample(sde, model, x, solver=solver, steps=steps, **opts)
        counts.append(calls["n"])
    assert counts[0] == counts[1] <= 24, counts   # a few per order, whatever the steps


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
@pytest.mark.parametrize("sde_name,grid", [("vp", "quadratic"), ("edm", "karras")])
def test_ipndm_step_table_equals_one_step_formulas(max_order, sde_name, grid):
    """iPNDM's ``(alpha_i, [d a_j], alpha_{i+1})``, tabulated at init, are the numbers its step
    computed from 0-d tensors (``d = e^{-lambda_{i+1}} - e^{-lambda_i}``)."""
    from sdekit.solvers import get_solver
    from sdekit.solvers.deis import IPNDM_COEFFS
    sde = sdekit.VPSDE() if sde_name == "vp" else sdekit.EDMSDE()
    p = _problem(sde, grid, 15)
    table = get_solver("ipndm", max_order=max_order).init(p, torch.zeros(2, 2)).table
    assert len(table) == 15
    for i, (a_s, w, a_t) in enumerate(table):
        d = torch.exp(-p.lam[i + 1]) - torch.exp(-p.lam[i])
        a = IPNDM_COEFFS[min(max_order, i + 1) - 1]
        assert (a_s, w, a_t) == (float(p.alpha[i]), [float(d * aj) for aj in a],
                                 float(p.alpha[i + 1]))


@pytest.mark.parametrize("opts", [{}, {"order": 3}, {"predict_x0": False}, {"variant": "bh1"},
                                  {"disable_corrector": [2, 3]}, {"final_to_zero": True}],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unipc_corrector_reuses_the_predictors_terms_bit_for_bit(opts, dtype, monkeypatch):
    """UniC from grid point s takes ``c_x x_s + c_0 m_s`` and the ``D_k`` from UniP's step from
    s instead of computing them again: the same samples, bit for bit."""
    from sdekit.solvers.unipc import UniPC
    sde = sdekit.VPSDE()
    model = sdekit.DiffusionModel(lambda x, t: torch.sin(3 * x) * 0.5, sde)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    opts = dict(opts)
    solver = "unipc_" + opts.pop("variant", "bh2")
    update, kept = UniPC._update, []

    def recording(self, *a, **kw):   # kw: the result's buffer (out=)
        kept.append(a[5] if len(a) > 5 else False)
        return update(self, *a, **kw)

    monkeypatch.setattr(UniPC, "_update", recording)
    shared = sdekit.sample(sde, model, x, solver=solver, steps=9, **opts).x
    assert any(kept)     # the predictor left its terms to the corrector
    monkeypatch.setattr(UniPC, "_update",
                        lambda self, *a, **kw: update(self, *a[:5], keep=False, **kw))
    fresh = sdekit.sample(sde, model, x, solver=solver, steps=9, **opts).x
    assert torch.equal(shared, fresh)
