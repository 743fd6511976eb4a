"""The driver, time grids, injected noise, bad input, and cross-checks of DDIM / EDM Heun."""
from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import gaussian_problem, load_k_diffusion, rms

import sdekit
from sdekit import BrownianNoise, SeededNoise, make_grid, sample
from sdekit.grids import GRIDS
from sdekit.solvers import ModelOutputError

ALL_SDES = [sdekit.VPSDE, sdekit.CosineVPSDE, sdekit.SubVPSDE, sdekit.VESDE, sdekit.EDMSDE,
            sdekit.DiscreteDDPM]


# ------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("sde_cls", ALL_SDES)
def test_grids_are_decreasing_with_exact_endpoints(grid, sde_cls):
    sde = sde_cls()
    opts = {"base": make_grid(sde, "quadratic", 7)} if grid == "interpolated" else {}
    t = make_grid(sde, grid, 10, **opts)
    assert t.shape == (11,) and t.dtype == torch.float64
    assert (t[1:] < t[:-1]).all()
    assert t[0].item() == pytest.approx(sde.T, rel=1e-12)
    assert t[-1].item() == pytest.approx(sde.t_min, rel=1e-9, abs=1e-12)


def test_logsnr_grid_is_uniform_in_lambda_and_karras_matches_formula():
    sde = sdekit.VPSDE()
    lam = sde.lambda_(make_grid(sde, "logsnr", 8))
    d = lam[1:] - lam[:-1]
    torch.testing.assert_close(d, d.mean().expand(8), rtol=1e-9, atol=0)
    s = sde.sigma_tilde(make_grid(sde, "karras", 8, rho=7.0))
    smax, smin = float(s[0]), float(s[-1])
    i = torch.arange(9, dtype=torch.float64) / 8
    expect = (smax ** (1 / 7) + i * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    torch.testing.assert_close(s, expect, rtol=1e-9, atol=0)


def test_grid_bad_input():
    sde = sdekit.VPSDE()
    with pytest.raises(ValueError, match="unknown grid 'nope'.*karras"):
        make_grid(sde, "nope", 10)
    with pytest.raises(ValueError, match="steps=0"):
        make_grid(sde, "uniform", 0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_grid(sde, [1.0, 0.5, 0.6, 0.1])
    with pytest.raises(ValueError, match="outside the time range"):
        make_grid(sde, [1.5, 0.5, 0.1])
    with pytest.raises(ValueError, match="NaN"):
        make_grid(sde, [1.0, float("nan"), 0.1])
    with pytest.raises(ValueError, match="disagrees"):
        make_grid(sde, [1.0, 0.5, 0.1], steps=5)


# ------------------------------------------------------------------------------------ noise
def test_seeded_noise_is_per_sample():
    a = SeededNoise([1, 2, 3]).randn(torch.empty(3, 4))
    b = SeededNoise([3, 1]).randn(torch.empty(2, 4))
    torch.testing.assert_close(b[0], a[2])
    torch.testing.assert_close(b[1], a[0])


@pytest.mark.parametrize("shape", [(2,), (5, 7), (3, 8, 8), (2, 32, 32), (3, 33, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_noise_stream_is_each_samples_generator_in_blocks(shape, dtype):
    """Sample i's k-th draw is the k-th event of the blocks torch.randn((draws, *event),
    generator=manual_seed(seed_i)) draws one after another, also where each step's draw is made
    on its own ((2, 32, 32) and (3, 33, 32): 2,048 or more elements, a multiple of 16)."""
    from sdekit.noise import BLOCK_ELEMENTS, MAX_BLOCK
    seeds, k = [7, 3, 2 ** 40], 70
    draws = max(1, min(MAX_BLOCK, BLOCK_ELEMENTS // math.prod(shape)))
    noise = SeededNoise(seeds)
    got = torch.stack([noise.randn(torch.empty((3,) + shape, dtype=dtype)) for _ in range(k)])
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        ref = torch.cat([torch.randn((draws,) + shape, generator=g, dtype=dtype)
                         for _ in range(-(-k // draws))])[:k]
        assert torch.equal(got[:, i], ref)


def test_image_noise_is_drawn_per_step_with_the_same_results(monkeypatch):
    """Image-sized draws (2,048 or more elements per sample, a multiple of 16) are made step by
    step in place, with no stacked block; the solve's result is bit for bit that of the
    stacked blocks."""
    import sdekit.noise as noise_mod
    sde = sdekit.EDMSDE()
    model = sdekit.DiffusionModel(lambda x, s: x * 0.5, sde, prediction="denoiser")
    x = torch.randn((6, 2, 32, 32), generator=torch.Generator().manual_seed(1)) * 80
    grid = make_grid(sde, "karras", 12)
    stacks = {"n": 0}
    stack = torch.stack

    def counted(*a, **k):
        stacks["n"] += 1
        return stack(*a, **k)

    monkeypatch.setattr(torch, "stack", counted)
    per_step = sample(sde, model, x, solver="ancestral", grid=grid, seed=4).x
    assert stacks["n"] == 0
    monkeypatch.setattr(noise_mod, "PER_STEP_ELEMENTS", 10 ** 9)   # the stacked blocks
    stacked = sample(sde, model, x, solver="ancestral", grid=grid, seed=4).x
    assert stacks["n"] > 0 and torch.equal(per_step, stacked)


def test_brownian_noise_increments_agree_across_grids():
    t = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    bn = BrownianNoise([5, 6], t, (3,))
    like = torch.empty(2, 3, dtype=torch.float64)
    fine = sum(bn.increment(t[k], t[k + 1], like) * math.sqrt(0.125) for k in range(4))
    coarse = bn.increment(t[0], t[4], like) * math.sqrt(0.5)
    torch.testing.assert_close(fine, coarse)
    with pytest.raises(ValueError, match="not a point of the Brownian grid"):
        bn.increment(0.3, 0.2, like)


def test_brownian_increments_have_unit_variance():
    t = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    bn = BrownianNoise(list(range(4000)), t, (1,))
    z = bn.increment(t[1], t[3], torch.empty(4000, 1, dtype=torch.float64))
    assert abs(float(z.var()) - 1) < 0.1 and abs(float(z.mean())) < 0.1


# ----------------------------------------------------------------------------- the driver
def _problem():
    sde = sdekit.VPSDE()
    return sde, gaussian_problem(sde, dim=3)


def test_sample_returns_measured_stats_and_trajectory():
    sde, data = _problem()
    grid = make_grid(sde, "logsnr", 10)
    calls = []
    sol = sample(sde, data.model(), shape=(4, 3), solver="heun", grid=grid,
                 save_at=[float(grid[0]), float(grid[5]), float(grid[-1])],
                 callback=lambda i, t, x: calls.append((i, t)))
    assert sol.nfe == 20 and sol.steps == 10 and torch.equal(sol.times, grid)
    assert sorted(sol.trajectory) == sorted([float(grid[0]), float(grid[5]), float(grid[-1])])
    torch.testing.assert_close(sol.trajectory[float(grid[-1])], sol.x)
    assert [c[0] for c in calls] == list(range(10))


def test_denoise_adds_one_call_and_returns_x0():
    sde, data = _problem()
    x_T = data.marginal_sample(4, sde.T, dtype=torch.float64)
    a = sample(sde, data.model(), x_T, solver="ddim", steps=10)
    b = sample(sde, data.model(), x_T, solver="ddim", steps=10, denoise=True)
    assert b.nfe == a.nfe + 1
    torch.testing.assert_close(b.x, data.x0(a.x, sde.t_min))


def test_float64_state_improves_float32_model_solution():
    sde, data = _problem()
    x_T = data.marginal_sample(8, sde.T, dtype=torch.float64)
    ref = data.flow(x_T, sde.T, sde.t_min)
    lo = sample(sde, data.model(), x_T.float(), solver="rk4", steps=200).x
    hi = sample(sde, data.model(), x_T.float(), solver="rk4", steps=200, float64=True).x
    assert hi.dtype == torch.float32
    assert rms(hi, ref) <= rms(lo, ref)


def test_progress_bar_runs(capsys):
    sde, data = _problem()
    sol = sample(sde, data.model(), shape=(2, 3), solver="euler", steps=3, progress=True)
    assert sol.nfe == 3


def test_sample_accepts_plain_callables_of_any_prediction():
    """A bare net(x, cond) of any output type gives the same DDIM solve as the exact eps model
    (for VP the default conditioning is t itself)."""
    sde, data = _problem()
    x_T = data.marginal_sample(4, sde.T, dtype=torch.float64)
    a = sample(sde, data.model("eps"), x_T, solver="ddim", steps=5).x
    for prediction, fn in [("x0", data.x0), ("score", data.score)]:
        b = sample(sde, lambda x, t: fn(x, t), x_T, solver="ddim", steps=5,
                   prediction=prediction).x
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- bad input
def test_model_returning_nan_names_step_time_and_solver():
    sde, data = _problem()
    calls = {"n": 0}

    def net(x, t):
        calls["n"] += 1
        return x * float("nan") if calls["n"] == 3 else torch.zeros_like(x)

    with pytest.raises(ModelOutputError, match=r"step 2 \(t=.*\) of solver 'euler'"):
        sample(sde, net, shape=(2, 3), solver="euler", steps=5)


def test_deferred_nan_check_raises_the_same_error_after_the_loop(monkeypatch):
    """Off the CPU (CUDA) the fixed-grid loop queues each call's NaN/Inf reduction on the device
    instead of reading it (no host-device sync per call) and raises the first bad call's error,
    with the same step, time and solver, once the loop is done; forced here on the CPU."""
    import sdekit.integrate as integrate
    sde, _ = _problem()
    calls = {"n": 0}

    def net(x, t):
        calls["n"] += 1
        return x * float("nan") if calls["n"] in (3, 4) else torch.zeros_like(x)

    def solve():
        calls["n"] = 0
        with pytest.raises(ModelOutputError) as err:
            sample(sde, net, shape=(2, 3), solver="euler", steps=5)
        return str(err.value), calls["n"]

    now, n_now = solve()
    monkeypatch.setattr(integrate, "_deferred_checks", lambda x: [])
    later, n_later = solve()
    assert re.search(r"step 2 \(t=.*\) of solver 'euler'", now) and later == now
    assert (n_now, n_later) == (3, 5)   # stopped at the bad call / ran to the end, then raised
    calls["n"] = 10   # no bad call: the queued checks pass and are emptied
    assert torch.isfinite(sample(sde, net, shape=(2, 3), solver="euler", steps=5).x).all()


def test_wrong_output_shape_and_unknown_names():
    sde, _ = _problem()
    with pytest.raises(ValueError, match=r"returned shape \(2, 2\).*\(2, 3\)"):
        sample(sde, lambda x, t: x[:, :2], shape=(2, 3), solver="euler", steps=2)
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        sample(sde, lambda x, t: x, shape=(2, 3), solver="nope", steps=2)
    with pytest.raises(ValueError, match="x_init or shape"):
        sample(sde, lambda x, t: x, solver="euler", steps=2)
    with pytest.raises(ValueError, match="not points of the grid"):
        sample(sde, lambda x, t: x, shape=(2, 3), solver="euler", steps=2, save_at=[0.77])
    with pytest.raises(TypeError, match="unknown options"):
        sample(sde, lambda x, t: x, shape=(2, 3), solver="pc", steps=2, bogus=1)


def test_too_few_steps_for_a_multistep_solver():
    sde, _ = _problem()

    class Needs3(sdekit.Solver):
        min_steps = 3

        def step(self, p, i, x, state):
            return x, state

    with pytest.raises(ValueError, match="too few"):
        sample(sde, lambda x, t: x, shape=(2, 3), solver=Needs3(), steps=2)


def test_solver_option_validation():
    for name, kw, match in [("ddim", {"eta": -1}, "eta=-1"), ("pc", {"snr": 0}, "snr=0"),
                            ("pc", {"corrector": "x"}, "corrector='x'"),
                            ("edm_heun", {"S_churn": -1}, "S_churn=-1"),
                            ("dopri5", {"method": "x"}, "method='x'"),
                            ("torchsde", {"method": "x"}, "method='x'")]:
        with pytest.raises(ValueError, match=match):
            sdekit.get_solver(name, **kw)


@pytest.mark.parametrize("name", ["torchsde", "torchsde_milstein"])
def test_torchsde_on_a_nonuniform_grid_converges_to_euler_maruyama(name):
    """On a non-uniform grid the torchsde backend steps the time-changed SDE (PCHIP through the
    grid): a different first-order scheme than Euler-Maruyama on that grid, driven by the same
    Brownian path, so the two agree more closely as the grid is refined."""
    sde, data = _problem()
    fine = make_grid(sde, "quadratic", 256)
    noise = lambda: sdekit.BrownianNoise(range(8), fine, (3,))  # noqa: E731
    x_T = data.marginal_sample(8, sde.T, torch.Generator().manual_seed(0), dtype=torch.float64)
    gaps = []
    for n in (16, 64):
        a = sample(sde, data.model(), x_T, solver=name, grid="quadratic", steps=n, noise=noise())
        b = sample(sde, data.model(), x_T, solver="euler_maruyama", grid="quadratic", steps=n,
                   noise=noise())
        gaps.append(float((a.x - b.x).pow(2).mean().sqrt()))
    assert gaps[1] < gaps[0] / 2, gaps


# ------------------------------------------------------------------------ exact relations
def test_ddim_eta1_is_the_smld_posterior_on_ve():
    """One ancestral step on VE equals SMLD's rule x + (s_t^2 - s_s^2) score + noise."""
    sde = sdekit.VESDE()
    data = gaussian_problem(sde, dim=3)
    grid = torch.tensor([0.8, 0.5], dtype=torch.float64)
    x = data.marginal_sample(4, 0.8, dtype=torch.float64)
    out = sample(sde, data.model(), x, solver="ancestral", grid=grid, seeds=[1, 2, 3, 4]).x
    z = SeededNoise([1, 2, 3, 4]).randn(x)
    st, ss = sde.sigma(0.8), sde.sigma(0.5)
    expect = x + (st ** 2 - ss ** 2) * data.score(x, 0.8) + torch.sqrt(
        ss ** 2 * (st ** 2 - ss ** 2) / st ** 2) * z
    torch.testing.assert_close(out, expect)


def test_edm_heun_matches_karras_algorithm_on_edm_sde():
    """On sigma(t) = t the sampler is Karras et al. Algorithm 1 written out directly."""
    sde = sdekit.EDMSDE()
    data = gaussian_problem(sde, dim=3)
    grid = make_grid(sde, "karras", 6)
    x = data.marginal_sample(4, sde.T, dtype=torch.float64)
    out = sample(sde, data.model(), x, solver="edm_heun", grid=grid).x
    y = x.clone()
    for i in range(6):
        s, sn = float(grid[i]), float(grid[i + 1])
        d = (y - data.x0(y, s)) / s
        y2 = y + (sn - s) * d
        d2 = (y2 - data.x0(y2, sn)) / sn
        y = y + (sn - s) * 0.5 * (d + d2)
    torch.testing.assert_close(out, y)


# -------------------------------------------------------------------- peer cross-checks
def test_ddim_matches_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional peer")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                    beta_start=1e-4, beta_end=0.02, set_alpha_to_one=True,
                                    clip_sample=False)
    sched.set_timesteps(20)
    # diffusers keeps its table in float32; promote it so both sides run in float64
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    sde = sdekit.DiscreteDDPM(alphas_cumprod=sched.alphas_cumprod.double())
    data = gaussian_problem(sde, dim=4)
    x = data.marginal_sample(6, float(sde.timestep_to_t(int(sched.timesteps[0]))),
                             dtype=torch.float64)
    y = x.clone()
    for ts in sched.timesteps:
        eps = data.eps(y, sde.timestep_to_t(int(ts)))
        y = sched.step(eps, ts, y, eta=0.0).prev_sample
    grid = sde.timestep_to_t(sched.timesteps.double())
    ours = sample(sde, data.model(), x, solver="ddim", grid=grid, denoise=True)
    assert ours.nfe == 20
    torch.testing.assert_close(ours.x, y, rtol=1e-11, atol=1e-11)


def _k_diffusion_sampling():
    kd = load_k_diffusion()
    if kd is None:
        pytest.skip("k_diffusion.sampling does not load (pip install --no-deps k-diffusion)")
    return kd


def test_edm_heun_matches_k_diffusion_sample_heun():
    K = _k_diffusion_sampling()
    sde = sdekit.EDMSDE()
    data = gaussian_problem(sde, dim=3)
    sigmas = K.get_sigmas_karras(6, sde.sigma_min, sde.sigma_max, rho=7.0).double()
    x = data.marginal_sample(4, sde.T, dtype=torch.float64)
    # k-diffusion ends with an Euler step to sigma = 0, which returns D: our denoise=True
    ref = K.sample_heun(lambda y, s: data.x0(y, s[0]), x, sigmas, disable=True)
    ours = sample(sde, data.model(), x, solver="edm_heun", grid=sigmas[:-1], denoise=True).x
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)  # exp(log(sigma)) round-off


def test_dpmpp_2m_matches_k_diffusion_sample_dpmpp_2m():
    """Same Karras sigma grid; k-diffusion's last step to sigma = 0 is first order, which is
    sdekit's final_to_zero (the grid's last interval becomes that jump)."""
    K = _k_diffusion_sampling()
    sde = sdekit.EDMSDE()
    data = gaussian_problem(sde, dim=3)
    sigmas = K.get_sigmas_karras(8, 0.01, sde.sigma_max, rho=7.0).double()
    x = data.marginal_sample(4, sde.T, dtype=torch.float64)
    ref = K.sample_dpmpp_2m(lambda y, s: data.x0(y, s[0]), x, sigmas, disable=True)
    grid = torch.cat([sigmas[:-1], torch.tensor([sde.sigma_min], dtype=torch.float64)])
    ours = sample(sde, data.model(), x, solver="dpmpp_2m", grid=grid, final_to_zero=True,
                  lower_order_final=False)
    assert ours.nfe == 8
    torch.testing.assert_close(ours.x, ref, rtol=1e-10, atol=1e-10)


def test_seeded_noise_from_a_seed_is_derived_on_the_first_draw_only(monkeypatch):
    """SeededNoise.from_seed(seed, n) is SeededNoise(sample_seeds(seed, n)) draw for draw, and a
    deterministic solve (no draw) derives no seed and makes no generator."""
    from sdekit.noise import SeededNoise, sample_seeds
    lazy, eager = SeededNoise.from_seed(7, 3), SeededNoise(sample_seeds(7, 3))
    assert lazy._gens is None and lazy._seeds is None
    like = torch.empty(3, 5)
    assert torch.equal(lazy.randn(like), eager.randn(like)) and lazy.seeds == eager.seeds
    sde, _ = _problem()
    made = []
    orig = SeededNoise.from_seed.__func__

    def spy(cls, seed, n):
        made.append(orig(cls, seed, n))
        return made[-1]
    monkeypatch.setattr(SeededNoise, "from_seed", classmethod(spy))
    sample(sde, lambda x, t: torch.zeros_like(x), torch.randn(4, 3), solver="ddim", steps=3)
    assert len(made) == 1 and made[0]._gens is None and made[0]._seeds is None
