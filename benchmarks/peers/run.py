#!/usr/bin/env python
"""sdekit's fast samplers versus the established libraries, on a problem with an exact answer.

Problem: 64-dimensional Gaussian data, covariance eigenvalues log-spaced from 1 down to 1e-4 in a
random orthonormal basis (``GaussianData.random(sde, dim=64, seed=0)``), under DDPM's linear
discrete schedule (``DiscreteDDPM()``: betas 1e-4..0.02, 1000 steps). Every sampler starts at its
own first noise level (the first timestep, t = T for all but DDIM's "leading" spacing) from the
exact marginal, and the model is the exact eps oracle at the noise level the sampler gives it
(fractional timesteps: log-sigma interpolation, as diffusers and k-diffusion assume).

Metrics (both exact, no Monte-Carlo noise: every sampler here is a linear map of its starting
state, because the model is linear; this is checked on a random batch for each configuration):
* ``rms``: root-mean-square error per coordinate, in expectation over the starting marginal,
  against the exact probability-flow endpoint at the sampler's own final noise level (sigma = 0
  for samplers that finish with a jump to clean data, sigma_min = sigma(t_min) otherwise);
* ``fd``: the Frechet distance of the law of the outputs to the data law N(0, Sigma).

Configurations: sdekit solver x grid x options and diffusers' schedulers (defaults and the
usual variants), each at the largest step count whose measured NFE fits 5, 10 and 20; the
k-diffusion samplers too if ``k_diffusion`` is importable (``pip install --no-deps k-diffusion``
is enough: only ``k_diffusion.sampling`` is used). Writes results.json, results.md and
results.png next to this script.

    python benchmarks/peers/run.py            # about 2-3 min on 2 CPU cores

``--sde flow`` runs the flow-matching comparison instead (rectified flow, ``FlowSDE()``): the
64-dim Gaussian and the bench's 16-dim Gaussian mixture, exact flow (velocity) model, every
sdekit solver that starts at t = 1 against diffusers' FlowMatchEuler / FlowMatchHeun (shift 1
and 3) and DPMSolverMultistep / UniPCMultistep with ``use_flow_sigmas=True,
prediction_type="flow_prediction"`` (flow_shift 1 and 3, solver_order 2 and 3); writes
flow_results.json and flow_results.md (``--seed 1``: a second draw of both problems, written to
flow_results_seed1.*):

    python benchmarks/peers/run.py --sde flow
    python benchmarks/peers/run.py --sde flow --seed 1
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import platform
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sdekit
from sdekit import DiscreteDDPM, FlowSDE, GaussianData, sample

HERE = Path(__file__).resolve().parent
F64 = torch.float64
BUDGETS = (5, 10, 20)
BASE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

SDE = DiscreteDDPM()
DATA = GaussianData.random(SDE, dim=64, eig_max=1.0, eig_min=1e-4, seed=0)
D, U, EIG = DATA.dim, DATA.eigvecs, DATA.eigvals
# log sigma_tilde at the integer timesteps n = 0..N-1 (t_n = (n + 1) / N)
LOG_SIG = torch.log(SDE.sigma_tilde(SDE.t_table)).double()
SIG_MAX, SIG_MIN = float(LOG_SIG[-1].exp()), float(LOG_SIG[0].exp())


def sigma_of_timestep(n: Any) -> float:
    """The noise level of a (possibly fractional) DDPM timestep: log-sigma interpolation."""
    n = float(n)
    return float(np.exp(np.interp(n, np.arange(SDE.N), LOG_SIG.numpy())))


class Oracle:
    """The exact eps at noise level sigma_tilde, counting calls."""

    def __init__(self) -> None:
        self.nfe = 0

    def eps(self, x: torch.Tensor, sig: float) -> torch.Tensor:
        self.nfe += 1
        # float32 sigma tables (k-diffusion) round the range ends by an ulp: clamp them back
        sig = min(max(sig, SIG_MIN), SIG_MAX)
        t = SDE.t_of_sigma_tilde(torch.tensor(sig, dtype=F64))
        return DATA.eps(x.double(), t).to(x.dtype)


# ----------------------------------------------------------------------------- exact answers
def start_rows(sig0: float, z: torch.Tensor) -> torch.Tensor:
    """States at noise level sig0 with eigen-coordinates ``z * sqrt(c0)`` (z rows)."""
    a0 = 1 / math.sqrt(1 + sig0 ** 2)
    c0 = a0 ** 2 * EIG + (sig0 * a0) ** 2
    return (z * c0.sqrt()) @ U.T


def exact_end(x0: torch.Tensor, sig0: float, sig1: float) -> torch.Tensor:
    """The PF-ODE flow from noise level sig0 to sig1 (0 = clean data), per eigen-direction
    ``x/alpha = sqrt(d + sigma^2) * const``."""
    a0, a1 = 1 / math.sqrt(1 + sig0 ** 2), 1 / math.sqrt(1 + sig1 ** 2)
    y = (x0.double() @ U) / a0 * torch.sqrt((EIG + sig1 ** 2) / (EIG + sig0 ** 2))
    return (a1 * y) @ U.T


def frechet(C: torch.Tensor) -> float:
    """Frechet distance between N(0, C) and the data law N(0, Sigma)."""
    S = DATA.cov
    ev, V = torch.linalg.eigh(S)
    Sh = (V * ev.clamp_min(0).sqrt()) @ V.T
    inner = torch.linalg.eigvalsh(Sh @ C @ Sh).clamp_min(0).sqrt().sum()
    return float(torch.trace(C) + torch.trace(S) - 2 * inner)


def evaluate(runner: dict[str, Any]) -> dict[str, Any]:
    sig0, sig1, run = runner["sig0"], runner["sig1"], runner["run"]
    basis = start_rows(sig0, torch.eye(D, dtype=F64))
    out, nfe = run(basis)
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f"non-finite output ({int(torch.isnan(out).sum())} NaN)")
    ref = exact_end(basis, sig0, sig1)
    rms = math.sqrt(float((out.double() - ref).pow(2).sum()) / D)
    fd = frechet(out.double().T @ out.double())
    # linearity check on a random batch: out(x) = x B^{-1} out(B)
    z = torch.randn(32, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    xb = start_rows(sig0, z)
    ob, _ = run(xb)
    pred = xb @ torch.linalg.solve(basis, out.double())
    lin = float((ob.double() - pred).abs().max() / ob.double().abs().max())
    return {"rms": rms, "fd": fd, "nfe": nfe, "linear_residual": lin, "sig0": sig0, "sig1": sig1}


# ---------------------------------------------------------------------------------- sdekit
def sdekit_runner(solver: str | None, grid: str | None, budget: int,
                  **opts: Any) -> dict[str, Any] | None:
    """sdekit's ``solver`` on ``grid`` (solver None: the option-free call, ``sample(sde, model,
    x, steps=N)``, whose rule picks the solver, its options and the grid)."""
    s = sdekit.get_solver(solver or sdekit.solvers.DEFAULT_SOLVER, **opts)
    steps = budget // s.nfe_per_step
    if steps < max(1, s.min_steps):
        return None
    sig1 = 0.0 if opts.get("final_to_zero") else SIG_MIN
    kw = dict(opts, solver=solver, grid=grid) if solver else {}

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        sol = sample(SDE, DATA.model(), x, steps=steps, **kw)
        return sol.x, sol.nfe

    return {"sig0": SIG_MAX, "sig1": sig1, "run": run, "steps": steps}


# --------------------------------------------------------------------------------- diffusers
def diffusers_runner(cls_name: str, budget: int, **cfg: Any) -> dict[str, Any] | None:
    import diffusers
    cls = getattr(diffusers, cls_name)

    def make(steps: int):
        s = cls(**BASE, **cfg)
        s.set_timesteps(steps)
        return s

    steps = None
    for n in range(budget, 0, -1):      # the largest step count whose NFE fits the budget
        try:
            if len(make(n).timesteps) <= budget:
                steps = n
                break
        except Exception:  # noqa: BLE001  (a configuration that cannot run at this n)
            continue
    if steps is None:
        return None
    s = make(steps)
    ve = hasattr(s, "sigmas") and float(s.init_noise_sigma) > 1.5   # k-diffusion-style x/alpha
    if hasattr(s, "sigmas") and s.sigmas is not None:
        sig0, sig1 = float(s.sigmas[0]), float(s.sigmas[-1])
    else:
        sig0 = sigma_of_timestep(s.timesteps[0])
        ac = float(s.final_alpha_cumprod)
        sig1 = math.sqrt((1 - ac) / ac)
    if not ve and hasattr(s, "sigmas"):
        sig0 = sigma_of_timestep(s.timesteps[0])  # the model is told timesteps[0]

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        sch = make(steps)
        orc = Oracle()
        a0 = 1 / math.sqrt(1 + sig0 ** 2)
        cur = x / a0 if ve else x.clone()
        for t in sch.timesteps:
            inp = sch.scale_model_input(cur, t)
            eps = orc.eps(inp, sigma_of_timestep(t))
            cur = sch.step(eps, t, cur).prev_sample
        a1 = 1 / math.sqrt(1 + sig1 ** 2)
        return (cur * a1 if ve else cur), orc.nfe

    return {"sig0": sig0, "sig1": sig1, "run": run, "steps": steps}


# ------------------------------------------------------------------------------- k-diffusion
def load_kdiffusion() -> types.ModuleType | None:
    try:
        from k_diffusion import sampling
        return sampling
    except Exception:  # noqa: BLE001
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    # ``pip install --no-deps k-diffusion``: load sampling.py with a minimal utils shim
    root = Path(list(spec.submodule_search_locations)[0])
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    try:
        return importlib.import_module("k_diffusion.sampling")
    except Exception:  # noqa: BLE001
        return None


def kdiff_runner(kd: types.ModuleType, fn: str, budget: int,
                 schedule: str) -> dict[str, Any] | None:
    per = {"sample_heun": 2, "sample_dpm_2": 2}.get(fn, 1)
    if fn == "sample_dpm_fast":
        n_sig = None
    else:    # heun / dpm_2: 2 calls per step except the last (Euler to 0): NFE = 2 N - 1
        n = (budget + 1) // 2 if per == 2 else budget
        n_sig = n

    def sigmas(n: int) -> torch.Tensor:
        if schedule == "karras":
            return kd.get_sigmas_karras(n, SIG_MIN, SIG_MAX, rho=7.0, device="cpu").double()
        return kd.get_sigmas_exponential(n, SIG_MIN, SIG_MAX, device="cpu").double()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        orc = Oracle()

        def denoiser(xt: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
            s = float(sig.flatten()[0])
            a = 1 / math.sqrt(1 + s * s)
            return xt - s * orc.eps(xt * a, s)

        xt = x * math.sqrt(1 + SIG_MAX ** 2)
        if fn == "sample_dpm_fast":
            out = kd.sample_dpm_fast(denoiser, xt, SIG_MIN, SIG_MAX, budget, disable=True)
            return out / math.sqrt(1 + SIG_MIN ** 2), orc.nfe
        out = getattr(kd, fn)(denoiser, xt, sigmas(n_sig), disable=True)
        return out, orc.nfe

    sig1 = SIG_MIN if fn == "sample_dpm_fast" else 0.0
    return {"sig0": SIG_MAX, "sig1": sig1, "run": run, "steps": n_sig or budget}


# --------------------------------------------------------------- flow matching (--sde flow)
# Rectified flow x_t = (1 - t) x0 + t eps on [1e-3, 1]: t_min = 1e-3 is the last nonzero sigma of
# diffusers' flow schedules (1 / num_train_timesteps). Every sampler starts from the same states
# x_1 ~ N(0, I) at t = 1; a sampler whose first noise level sigma_0 is below 1 (diffusers' DPM /
# UniPC with flow sigmas start at shift(0.999)) gets them carried exactly (Gaussian) or by the
# converged reference solve (mixture) to sigma_0, at no cost to it.
FLOW = FlowSDE()
FLOW_ENDS = {0.0: "sigma = 0", FLOW.t_min: "t_min"}
REF_TOL = 1e-10          # dopri5 rtol = atol of the mixture's reference
                         # (error estimate: 1e-8 solve)
GMM_N = 512              # mixture: Monte-Carlo batch of starting states (paired across samplers)


class FlowProblem:
    """A flow-matching problem: the exact flow model, the states at t = 1, and the exact (or
    converged) PF-ODE map from t = 1 to any noise level in [0, 1]."""

    def __init__(self, name: str, seed: int = 0, dim: int | None = None,
                 states: int = GMM_N) -> None:
        self.name = name
        if name == "gaussian":
            dim = dim or 64
            self.data = GaussianData.random(FLOW, dim=dim, eig_max=1.0, eig_min=1e-4, seed=seed)
            self.linear = True
            # rows z @ U^T with z = I: a basis whose second moment is the prior's (c(1) = 1)
            self.x1 = self.data.eigvecs.T.clone()
            self.description = (f"{dim}-dim Gaussian, eigenvalues 1..1e-4 (log-spaced, random "
                                f"basis, seed {seed}), exact flow model")
        elif name == "gmm":
            from sdekit.bench.problems import gmm_problem
            dim = dim or 16
            self.model = gmm_problem(FLOW, dim=dim, seed=seed).model
            # the same mixture on a longer range, for the reference endpoint at sigma = 0
            self.model0 = gmm_problem(FlowSDE(t_min=1e-7), dim=dim, seed=seed).model
            self.linear = False
            self.x1 = torch.randn(states, dim, generator=torch.Generator().manual_seed(seed + 1),
                                  dtype=F64)
            self.description = (f"{dim}-dim 8-component Gaussian mixture (sdekit.bench gmm, seed "
                                f"{seed}), exact flow model, {states} paired starting states")
        else:
            raise ValueError(f"problem={name!r} is invalid: expected 'gaussian' or 'gmm'")
        self.dim = dim
        if self.linear:
            self.model = self.data.model("flow")
        self._cache: dict[tuple[float, float], torch.Tensor] = {}
        self.reference = "exact PF-ODE map" if self.linear else (
            f"dopri5 rtol=atol={REF_TOL:g} from t = 1 (to sigma = 0: to t = 1e-7, then x0_hat)")

    def at(self, sig: float) -> torch.Tensor:
        """The PF-ODE image of ``x1`` at noise level ``sig`` (0 = clean data)."""
        return self._at(sig, REF_TOL)

    def _at(self, sig: float, tol: float) -> torch.Tensor:
        key = (sig, tol)
        if key in self._cache:
            return self._cache[key]
        if sig == 1.0:
            out = self.x1
        elif self.linear:   # per eigen-direction x_t = sqrt(c(t)) z, c = alpha^2 d + sigma^2
            d = self.data
            c = (1 - sig) ** 2 * d.eigvals + sig ** 2
            out = ((self.x1 @ d.eigvecs) * c.sqrt()) @ d.eigvecs.T + (1 - sig) * d.mean
        elif sig == 0.0:
            sde0 = self.model0.sde
            x = sample(sde0, self.model0, self.x1, solver="dopri5", rtol=tol, atol=tol).x
            out = self.model0.x0(x, sde0.t_min)
        else:
            out = sample(FLOW, self.model, self.x1, solver="dopri5", t_end=sig, rtol=tol,
                         atol=tol).x
        self._cache[key] = out.double()
        return self._cache[key]

    def reference_error(self) -> float | None:
        """Upper estimate of the mixture reference's RMS error: its distance to a 100x looser
        solve, at both endpoints."""
        if self.linear:
            return None
        return max(math.sqrt(float((self.at(s) - self._at(s, REF_TOL * 100)).pow(2).mean()))
                   for s in FLOW_ENDS)


def gauss_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between the Gaussian fits of two sample sets."""
    ma, mb = a.mean(0), b.mean(0)
    Ca, Cb = torch.cov(a.T), torch.cov(b.T)
    ev, V = torch.linalg.eigh(Cb)
    Sh = (V * ev.clamp_min(0).sqrt()) @ V.T
    inner = torch.linalg.eigvalsh(Sh @ Ca @ Sh).clamp_min(0).sqrt().sum()
    return float((ma - mb).pow(2).sum() + torch.trace(Ca) + torch.trace(Cb) - 2 * inner)


def flow_evaluate(prob: FlowProblem, runner: dict[str, Any]) -> dict[str, Any]:
    sig0, sig1, run = runner["sig0"], runner["sig1"], runner["run"]
    start = prob.at(sig0)
    out, nfe = run(start.clone())
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f"non-finite output ({int(torch.isnan(out).sum())} NaN)")
    out, ref = out.double(), prob.at(sig1)
    # Gaussian: the sum over the basis rows is the expectation over the prior (as in evaluate)
    rows = 1 if prob.linear else out.shape[0]
    rms = math.sqrt(float((out - ref).pow(2).sum()) / (rows * prob.dim))
    if prob.linear:   # exact law: the data law at sig1 vs the output law (second moments)
        cov_ref = prob.data.marginal_cov(sig1) if sig1 > 0 else prob.data.cov
        C = out.T @ out
        ev, V = torch.linalg.eigh(cov_ref)
        Sh = (V * ev.clamp_min(0).sqrt()) @ V.T
        fd = float(torch.trace(C) + torch.trace(cov_ref)
                   - 2 * torch.linalg.eigvalsh(Sh @ C @ Sh).clamp_min(0).sqrt().sum())
        z = torch.randn(32, prob.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
        xb = prob.data.flow(z @ prob.data.eigvecs.T, 1.0, sig0) if sig0 < 1 else \
            z @ prob.data.eigvecs.T    # (the map from t = 1 to sig0 < 1 is linear)
        ob, _ = run(xb)
        pred = xb @ torch.linalg.solve(start, out)
        lin = float((ob.double() - pred).abs().max() / ob.double().abs().max())
    else:             # paired: the output's Gaussian fit vs the reference endpoint's
        fd, lin = gauss_fd(out, ref), None
    res = {"rms": rms, "fd": fd, "nfe": nfe, "linear_residual": lin, "sig0": sig0, "sig1": sig1}
    if not prob.linear:   # how concentrated the error is: states sent towards another mode
        e2 = (out - ref).pow(2).sum(1)
        res["off_by_1"] = int((e2 > 1.0).sum())     # endpoints more than 1 from the reference
        res["worst5_share"] = float(e2.sort(descending=True).values[:5].sum() / e2.sum())
    return res


def flow_sdekit_runner(prob: FlowProblem, solver: str | None, grid: str | None, budget: int,
                       grid_options: dict[str, Any] | None = None,
                       **opts: Any) -> dict[str, Any] | None:
    """sdekit from t = 1 on ``grid`` (None: the option-free call, ``sample(FlowSDE(), model,
    x, steps=N)``)."""
    name = solver or sdekit.solvers.DEFAULT_SOLVER   # the option-free rule's solver
    s = sdekit.get_solver(name, **opts)
    steps = budget // s.nfe_per_step
    if steps < max(1, s.min_steps):
        return None
    kw = dict(opts, grid=grid, grid_options=grid_options) if solver else {}

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        sol = sample(FLOW, prob.model, x, steps=steps, **({"solver": solver} if solver else {}),
                     **kw)
        return sol.x, sol.nfe

    return {"sig0": 1.0, "sig1": 0.0 if opts.get("final_to_zero") else FLOW.t_min, "run": run,
            "steps": steps}


def flow_diffusers_runner(prob: FlowProblem, cls_name: str, budget: int,
                          **cfg: Any) -> dict[str, Any] | None:
    """A diffusers flow scheduler, its natural loop: the model gets the scheduler's current
    sigma (its timestep / 1000) and returns the velocity; ``step`` does the rest."""
    import diffusers
    cls = getattr(diffusers, cls_name)

    def make(steps: int):
        s = cls(**cfg)
        s.set_timesteps(steps)
        return s

    steps = next((n for n in range(budget, 0, -1) if len(make(n).timesteps) <= budget), None)
    if steps is None:
        return None
    s = make(steps)
    sig0, sig1 = float(s.sigmas[0]), float(s.sigmas[-1])

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        sch = make(steps)
        nfe, cur = 0, x.clone()
        for t in sch.timesteps:
            i = sch.step_index if sch.step_index is not None else 0
            u = prob.model.flow(cur.double(), float(sch.sigmas[i])).to(cur.dtype)
            nfe += 1
            cur = sch.step(u, t, cur, return_dict=False)[0]
        return cur, nfe

    return {"sig0": sig0, "sig1": sig1, "run": run, "steps": steps}


FLOW_SDEKIT: list[tuple[str, dict[str, Any]]] = [
    ("ddim", {}), ("dpmpp_2m", {}), ("dpmpp_2m", {"solver_type": "lagrange"}),
    ("dpmpp_2m", {"lower_order_final": False}), ("dpmpp_3m", {}),
    ("dpmpp_3m", {"lower_order_final": False}), ("dpmpp_2s", {}), ("unipc_bh1", {}),
    ("unipc_bh2", {}), ("unipc_bh1", {"order": 3}), ("unipc_bh2", {"order": 3}),
    ("unipc_bh2", {"order": 3, "lower_order_final": False}), ("unic_dpmpp_2m", {}),
]
FLOW_GRIDS: list[tuple[str, dict[str, Any]]] = [
    ("logsnr", {}), ("karras", {}), ("uniform", {}), ("uniform", {"shift": 3.0}),
    ("quadratic", {}), ("logsnr", {"shift": 3.0}),
]
FLOW_PEERS: list[tuple[str, dict[str, Any]]] = [
    ("FlowMatchEulerDiscreteScheduler", {"shift": 1.0}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 1.0}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}),
] + [(cls, {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": s,
            "solver_order": o})
     for cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
     for o in (2, 3) for s in (1.0, 3.0)]


def flow_main(args: argparse.Namespace) -> None:
    import diffusers
    rules = {n: sdekit.solvers.default_config(FLOW, n) for n in (5, 10, 20)}
    default_solver = "default_config: " + ", ".join(
        f"{n} NFE {r['solver']} {r['options']}" for n, r in rules.items())
    default_grid = ", ".join(f"{n} NFE {label(r['grid'], r['grid_options'])}"
                             for n, r in rules.items())
    problems = {}
    for pname in args.problems.split(","):
        prob = FlowProblem(pname, seed=args.seed, states=args.states)
        jobs: list[tuple[str, str, bool, Callable[[int], Any]]] = [
            ("sdekit", (f"default: sample(FlowSDE(), model, x, steps=N) [{default_solver}; "
                        f"grids {default_grid}]"), True,
             lambda b, p=prob: flow_sdekit_runner(p, None, None, b))]
        for name, opts in (FLOW_SDEKIT[:3] if args.quick else FLOW_SDEKIT):
            takes = inspect.signature(type(sdekit.get_solver(name)).__init__).parameters
            for grid, gopts in (FLOW_GRIDS[:3] if args.quick else FLOW_GRIDS):
                for extra in ({}, {"final_to_zero": True}):
                    if extra and "final_to_zero" not in takes:
                        continue
                    o = {**opts, **extra}
                    g = label(grid, gopts)
                    jobs.append(("sdekit", f"{label(name, o)} grid={g}", False,
                                 lambda b, n=name, gr=grid, go=gopts, o=o, p=prob:
                                 flow_sdekit_runner(p, n, gr, b, go or None, **o)))
        for cls, cfg in FLOW_PEERS:
            short = {k: v for k, v in cfg.items() if k not in ("use_flow_sigmas",
                                                              "prediction_type")}
            jobs.append(("diffusers", label(cls, short), False,
                         lambda b, c=cls, f=cfg, p=prob: flow_diffusers_runner(p, c, b, **f)))
        t0 = time.time()
        records = run_jobs(jobs, lambda r, p=prob: flow_evaluate(p, r))
        ref = {"method": prob.reference}
        if not prob.linear:
            ref["error_estimate"] = prob.reference_error()
        problems[pname] = {
            "problem": f"{prob.description}, FlowSDE() (rectified flow, t_min=1e-3), from t = 1",
            "reference": ref, "seconds": round(time.time() - t0, 1), "records": records,
            "default_solver": default_solver, "default_grid": default_grid}
    out = {"sde": "flow", "command": "python benchmarks/peers/run.py " + " ".join(sys.argv[1:]),
           "versions": {"sdekit": sdekit.__version__, "diffusers": diffusers.__version__,
                        "torch": torch.__version__, "python": platform.python_version()},
           "problems": problems}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    stem = ("flow_results" + (f"_states{args.states}" if args.states != GMM_N else "")
            + (f"_seed{args.seed}" if args.seed else ""))
    (dest / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (dest / f"{stem}.md").write_text(flow_report(out))
    print(flow_report(out, summary_only=True))


def flow_report(out: dict[str, Any], summary_only: bool = False) -> str:
    lines = [f"Command: `{out['command']}`; versions {out['versions']}.", ""]
    for pname, res in out["problems"].items():
        ref = res["reference"]
        note = (f"reference: {ref['method']}" + (
            f" (estimated RMS error {ref['error_estimate']:.1e})" if ref.get("error_estimate")
            is not None else ""))
        lines += [f"## {pname}", "", f"{res['problem']}; {note}. FD: "
                  + ("exact Frechet distance of the output law to the data law at the endpoint."
                     if pname == "gaussian" else "Frechet distance between the Gaussian fits of "
                     "the outputs and of the reference endpoints (paired states)."), "",
                  ("| NFE | best sdekit | RMS | best diffusers | RMS | ratio | target <= 0.5 | "
                   "sdekit default | RMS | default / best | target <= 1.25 |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        rec = res["records"]
        for b in BUDGETS:
            s, p = best(rec, ("sdekit",), b), best(rec, ("diffusers",), b)
            d = next((r for r in rec if r.get("default") and r["budget"] == b and "rms" in r),
                     None)
            if not (s and p and d):
                continue
            lines.append(
                f"| {b} | `{s['config']}` | {s['rms']:.2e} | `{p['config']}` | {p['rms']:.2e} | "
                f"{s['rms'] / p['rms']:.2f} | {'met' if s['rms'] <= 0.5 * p['rms'] else 'NOT met'}"
                f" | {d['nfe']} NFE | {d['rms']:.2e} | {d['rms'] / s['rms']:.2f} | "
                f"{'met' if d['rms'] <= 1.25 * s['rms'] else 'NOT met'} |")
        if not any("off_by_1" in r for r in rec):
            lines.append("")
        else:
            lines += ["", "Where the mixture's error sits (the rows above): endpoints more than 1 "
                      "from the reference (of the paired states; mode separation ~ 4-6) and "
                      "the share of the squared error in the worst 5 states:", ""]
            for b in BUDGETS:
                rows = [best(rec, (lib,), b) for lib in ("sdekit", "diffusers")]
                d = next((r for r in rec if r.get("default") and r["budget"] == b
                          and "rms" in r), None)
                parts = [f"{name} {r['off_by_1']} off by > 1, worst 5 {r['worst5_share']:.0%}"
                         for name, r in zip(("best sdekit", "best diffusers", "default"),
                                            rows + [d]) if r and "off_by_1" in r]
                lines.append(f"- NFE {b}: " + "; ".join(parts))
            lines.append("")
        if summary_only:
            continue
        lines += [f"All configurations ({len(rec)} runs, {res['seconds']} s):", "",
                  ("| library | config | NFE budget | steps | NFE | sigma start | sigma end | RMS "
                   "| FD |"), "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rec, key=lambda r: (r["budget"], r.get("rms", math.inf))):
            if "rms" not in r:
                lines.append(f"| {r['library']} | `{r['config']}` | {r['budget']} | | | | | "
                             f"error: {r['error']} | |")
                continue
            lines.append(f"| {r['library']} | `{r['config']}` | {r['budget']} | {r['steps']} | "
                         f"{r['nfe']} | {r['sig0']:.6g} | {r['sig1']:.4g} | {r['rms']:.3e} | "
                         f"{r['fd']:.3e} |")
        lines.append("")
    return "\n".join(lines) + "\n"

# ---------------------------------------------------------------------------- configurations
SDEKIT_SOLVERS: list[tuple[str, dict[str, Any]]] = [
    ("ddim", {}), ("dpmpp_2m", {}), ("dpmpp_2m", {"solver_type": "lagrange"}),
    ("dpmpp_2m", {"lower_order_final": False}), ("dpmpp_3m", {}),
    ("dpmpp_3m", {"solver_type": "midpoint", "warmup": "lower_order"}),
    ("dpm_solver_2m", {}), ("dpm_solver_3m", {}), ("dpm_solver_3m", {"lower_order_final": False}),
    ("dpm_solver_2", {}), ("dpm_solver_3", {}), ("dpm_solver_3", {"lower_order_at": "end"}),
    ("dpmpp_2s", {}), ("unipc_bh1", {}), ("unipc_bh2", {}), ("unipc_bh1", {"order": 3}),
    ("unipc_bh2", {"order": 3}), ("unipc_bh2", {"order": 3, "lower_order_final": False}),
    ("unipc_bh2", {"predict_x0": False}), ("unipc_bh2", {"order": 3, "predict_x0": False}),
    ("unic_dpmpp_2m", {}), ("deis_tab1", {}), ("deis_tab2", {}), ("deis_tab3", {}),
    ("deis_rhoab", {}), ("deis_rhork", {}), ("ipndm", {}),
]
SDEKIT_GRIDS = ("logsnr", "karras", "uniform", "quadratic")

PEERS: list[tuple[str, dict[str, Any]]] = [
    ("DDIMScheduler", {}), ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("DDIMScheduler", {"timestep_spacing": "linspace"}),
    ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    ("PNDMScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True}),
    ("LMSDiscreteScheduler", {}), ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {}), ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", {}), ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("KDPM2DiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", {}), ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
    ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverSinglestepScheduler", {"final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {}), ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    ("UniPCMultistepScheduler", {"solver_order": 3}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}),
    ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min", "solver_order": 3}),
    ("DEISMultistepScheduler", {}), ("DEISMultistepScheduler", {"solver_order": 2}),
    ("DEISMultistepScheduler", {"use_karras_sigmas": True}),
]
KDIFF = [("sample_euler", "karras"), ("sample_heun", "karras"), ("sample_lms", "karras"),
         ("sample_dpm_2", "karras"), ("sample_dpmpp_2m", "karras"),
         ("sample_dpmpp_2m", "exponential"), ("sample_dpm_fast", "-")]


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "loaded (version unknown)"


def label(name: str, opts: dict[str, Any]) -> str:
    return name + ("" if not opts else "(" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")")


def run_jobs(jobs: list[tuple[str, str, bool, Callable[[int], Any]]],
             evaluate_fn: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every job at every budget, in order; failures are recorded, not hidden."""
    records = []
    for lib, name, is_default, make in jobs:
        for b in BUDGETS:
            try:
                r = make(b)
                if r is None:
                    continue
                res = evaluate_fn(r)
            except Exception as e:  # noqa: BLE001  (record, do not hide)
                records.append({"library": lib, "config": name, "default": is_default,
                                "budget": b, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            records.append({"library": lib, "config": name, "default": is_default,
                            "budget": b, "steps": r["steps"], **res})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="defaults and a few configurations only")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--sde", choices=("ddpm", "flow"), default="ddpm",
                    help="ddpm: the VP comparison (results.*); flow: rectified flow against "
                         "diffusers' flow schedulers (flow_results.*)")
    ap.add_argument("--problems", default="gaussian,gmm",
                    help="with --sde flow: comma-separated, from gaussian, gmm")
    ap.add_argument("--seed", type=int, default=0,
                    help="with --sde flow: the problems' draw (a second draw checks that a "
                         "finding is not one problem's; writes flow_results_seed<N>.*)")
    ap.add_argument("--states", type=int, default=GMM_N,
                    help=f"with --sde flow: the mixture's number of paired starting states "
                         f"(default {GMM_N}; another count writes flow_results_states<N>*)")
    args = ap.parse_args()
    if args.states < 2:
        ap.error(f"--states {args.states} is invalid: expected at least 2 starting states")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    if args.sde == "flow":
        flow_main(args)
        return

    default_solver = sdekit.solvers.DEFAULT_SOLVER   # sdekit.solvers.default_config's rule
    jobs: list[tuple[str, str, bool, Callable[[int], Any]]] = []
    jobs.append(("sdekit", f"default: sample(..., steps=N) [{default_solver}, default_config]",
                 True, lambda b: sdekit_runner(None, None, b)))
    solvers = SDEKIT_SOLVERS[:5] if args.quick else SDEKIT_SOLVERS
    for name, opts in solvers:
        takes = inspect.signature(type(sdekit.get_solver(name)).__init__).parameters
        for grid in (SDEKIT_GRIDS[:2] if args.quick else SDEKIT_GRIDS):
            for extra in ({}, {"final_to_zero": True}):
                if extra and "final_to_zero" not in takes:
                    continue
                o = {**opts, **extra}
                jobs.append(("sdekit", f"{label(name, o)} grid={grid}", False,
                             lambda b, n=name, g=grid, o=o: sdekit_runner(n, g, b, **o)))
    for cls, cfg in (PEERS[:1] + PEERS[15:17] if args.quick else PEERS):
        jobs.append(("diffusers", label(cls, cfg), not cfg,
                     lambda b, c=cls, f=cfg: diffusers_runner(c, b, **f)))
    kd = load_kdiffusion()
    if kd is not None and not args.quick:
        for fn, sch in KDIFF:
            jobs.append(("k-diffusion", f"{fn} sigmas={sch}", False,
                         lambda b, f=fn, s=sch: kdiff_runner(kd, f, b, s)))

    t0 = time.time()
    records = run_jobs(jobs, evaluate)
    out = {"problem": "64-dim Gaussian, eigenvalues 1..1e-4 (log-spaced, random basis, seed 0), "
                      "DiscreteDDPM() linear betas 1e-4..0.02, N=1000",
           "versions": {"sdekit": sdekit.__version__, "diffusers": diffusers.__version__,
                        "torch": torch.__version__, "python": platform.python_version(),
                        "k_diffusion": _dist_version("k-diffusion") if kd is not None
                        else "not installed"},
           "default_solver": default_solver, "seconds": round(time.time() - t0, 1),
           "records": records}
    dest = Path(args.out)
    (dest / "results.json").write_text(json.dumps(out, indent=1))
    (dest / "results.md").write_text(report(out))
    plot(out, dest / "results.png")
    print(report(out, summary_only=True))


# ------------------------------------------------------------------------------------ report
def _ok(r: dict[str, Any], b: int) -> bool:
    lin = r.get("linear_residual")   # None: a nonlinear problem (no linearity check)
    return ("rms" in r and r["budget"] == b and r["nfe"] <= b and (lin is None or lin < 1e-4)
            and math.isfinite(r["rms"]) and math.isfinite(r["fd"]))


def best(records: list[dict[str, Any]], libs: tuple[str, ...], b: int, key: str = "rms"):
    rs = [r for r in records if r["library"] in libs and _ok(r, b)]
    return min(rs, key=lambda r: r[key]) if rs else None


def report(out: dict[str, Any], summary_only: bool = False) -> str:
    rec = out["records"]
    peers = ("diffusers", "k-diffusion")
    lines = [f"Problem: {out['problem']}. Exact RMS error per coordinate against the PF-ODE "
             "endpoint at each sampler's own final noise level, and exact Frechet distance (FD) "
             "of the output law to the data law. NFE measured by counting model calls.", "",
             "| NFE | best sdekit config | RMS | FD | best peer config | RMS | FD | RMS ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for b in BUDGETS:
        s, p = best(rec, ("sdekit",), b), best(rec, peers, b)
        if s and p:
            lines.append(f"| {b} | `{s['config']}` | {s['rms']:.2e} | {s['fd']:.2e} | "
                         f"`{p['config']}` ({p['library']}) | {p['rms']:.2e} | {p['fd']:.2e} | "
                         f"{s['rms'] / p['rms']:.2f} |")
    lines += ["", "Lowest FD (may be a different configuration):", "",
              "| NFE | sdekit config | FD | peer config | FD |", "|---|---|---|---|---|"]
    for b in BUDGETS:
        s, p = best(rec, ("sdekit",), b, "fd"), best(rec, peers, b, "fd")
        if s and p:
            lines.append(f"| {b} | `{s['config']}` | {s['fd']:.2e} | `{p['config']}` | "
                         f"{p['fd']:.2e} |")
    lines += ["", "Defaults (no options; RMS / FD / measured NFE):", "",
              "| library default | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |",
              "|---|" + "---|" * len(BUDGETS)]
    for name in dict.fromkeys(r["config"] for r in rec if r.get("default")):
        cells = []
        for b in BUDGETS:
            r = next((r for r in rec if r["config"] == name and r["budget"] == b and "rms" in r),
                     None)
            cells.append(f"{r['rms']:.2e} / {r['fd']:.2e} / {r['nfe']}" if r else "n/a")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if summary_only:
        return "\n".join(lines)
    lines += ["", f"All configurations ({len(rec)} runs, {out['seconds']} s; versions "
              f"{out['versions']}):", "",
              "| library | config | NFE budget | steps | NFE | sigma start | sigma end | RMS "
              "| FD |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rec, key=lambda r: (r["budget"], r.get("rms", math.inf))):
        if "rms" not in r:
            lines.append(f"| {r['library']} | `{r['config']}` | {r['budget']} | | | | | "
                         f"error: {r['error']} | |")
            continue
        flag = "" if r["linear_residual"] < 1e-4 else " (nonlinear)"
        lines.append(f"| {r['library']} | `{r['config']}` | {r['budget']} | {r['steps']} | "
                     f"{r['nfe']} | {r['sig0']:.4g} | {r['sig1']:.4g} | {r['rms']:.3e}{flag} | "
                     f"{r['fd']:.3e} |")
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rec = out["records"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for ax, key in zip(axes, ("rms", "fd")):
        for libs, style, lab in ((("sdekit",), "o-", "sdekit (best config)"),
                                 (("diffusers", "k-diffusion"), "s-", "peers (best config)")):
            pts = [(b, best(rec, libs, b, key)) for b in BUDGETS]
            pts = [(b, r[key]) for b, r in pts if r]
            ax.plot(*zip(*pts), style, lw=2, label=lab)
        for name in dict.fromkeys(r["config"] for r in rec if r.get("default")):
            pts = [(r["nfe"], r[key]) for r in rec if r["config"] == name and "rms" in r]
            if not pts:
                continue
            if name.startswith("default"):
                ax.plot(*zip(*sorted(pts)), "^-", lw=2, color="tab:green",
                        label=f"sdekit default ({out['default_solver']})")
            else:
                ax.plot(*zip(*sorted(pts)), "--", lw=0.8, label=name + " default")
        ax.set(xscale="log", yscale="log", xlabel="NFE (measured)",
               ylabel="RMS error vs exact PF-ODE endpoint" if key == "rms" else
               "Frechet distance to the data law", xticks=list(BUDGETS))
        ax.set_xticklabels([str(b) for b in BUDGETS])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("64-dim Gaussian (eigenvalues 1..1e-4), DDPM linear schedule: sdekit vs peers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
