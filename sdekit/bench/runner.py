"""The sweep: solvers x time grids x NFE budgets on one problem, cached per cell.

* **Budgets.** A fixed-grid solver gets the most steps whose ``expected_nfe(steps)`` fits the
  budget (``steps = budget // 2`` for a 2-NFE/step solver); a budget below the solver's minimum
  cost is a *skipped* cell with the reason. The NFE reported is always the one the call counter
  measured. Adaptive solvers that take ``rtol``/``atol`` are swept over tolerances instead (one
  cell per tolerance, no grid); adaptive backends without tolerances run ``budget //
  nfe_per_step`` steps and report what they measured.
* **Cache and resume.** Every finished cell is written atomically to
  ``<cache>/<problem>-<hash>/cells/<hash>.json``, keyed by the problem's fingerprint, the
  evaluation settings and the cell id; a rerun (for instance after an interruption) loads those
  cells instead of recomputing them. Cells that raised an unexpected error are not cached. A
  cached reference solution that fails to load or its content hash is recomputed (with a
  warning). One sweep at a time per cache directory: a second process on the same ``--out``
  (or ``--cache-dir``) fails at once, naming the directory and the holder's pid (an
  ``fcntl.flock`` on ``<cache>/.bench.lock``, released however the holder exits).
* **Sharding.** Under ``torchrun`` (or any launcher setting ``RANK``/``WORLD_SIZE``) rank r
  computes the cells ``i % WORLD_SIZE == r``; rank 0 then waits for the other ranks' cell files
  in the shared cache and merges everything into one result. No process group is needed.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .. import __version__
from ..grids import BENCH_GRIDS, GRIDS
from ..integrate import sample
from ..solvers.base import ModelOutputError, Solver
from ..solvers.registry import get_solver, solver_names
from . import metrics as M
from .cost import count_macs, network_macs_per_sample
from .._io import (IntegrityError, LockedError, atomic_write_bytes, exclusive_lock,
                   load_verified, save_verified)
from .problems import BenchError, BenchProblem

BENCH_FORMAT = "sdekit-bench/1"
DEFAULT_NFE = (5, 10, 20, 50)
DEFAULT_TOLS = (1e-2, 1e-3, 1e-4)

METRIC_DOCS = {
    "rms": "per-coordinate RMS error against the reference PF-ODE solution from the same initial "
           "state (exact flow map for Gaussians, else a converged adaptive solve); ODE solvers "
           "only",
    "fd": "Frechet distance (squared 2-Wasserstein between Gaussians) of the output law to the "
          "target law: exact output law for deterministic solvers on Gaussian problems ('exact'), "
          "otherwise a Gaussian fitted to the samples ('fit'); target = exact Gaussian parameters "
          "(or exact mixture moments) where known, else a fit to held-out data",
    "kl": "KL(output || target) in nats, Gaussian target problems only; 'exact' where the output "
          "law is exactly Gaussian and identified, 'fit' (a Gaussian fitted to the samples, biased "
          "upwards by about D(D+3)/(4n) nats) otherwise",
    "sw": "sliced 2-Wasserstein distance to held-out samples of the target law (fixed random "
          "directions)",
    "mmd": "MMD (Gaussian kernel, median-distance bandwidth of the held-out set, biased estimate) "
           "to held-out samples of the target law",
    "nfe": "model evaluations measured by the call counter (never the nominal count)",
    "ms_per_sample": "wall time of the cell's own solve (timed alone, while its MACs are "
                     "counted) divided by the number of samples, in milliseconds",
    "macs_per_sample": "multiply-accumulates per sample of every network pass of the solve, "
                       "counted on the actual input shapes (sdekit.bench.cost: Linear, Conv, "
                       "attention and the operator's spectral and linear-path products)",
    "passes": "compute in teacher passes: macs_per_sample over the MACs of one pass of the "
              "problem's model per sample (= NFE for a solver that calls only the model; None "
              "where the model is not a counted torch network, e.g. an analytic oracle)",
    "ms_min": "wall time per sample [ms], the fastest of timing_repeats solves timed side by "
              "side: every ok cell solved again in rounds, interleaved (rotated order) in one "
              "process, without the MAC counter",
    "ms_median": "wall time per sample [ms], the median of those interleaved solves",
}


@dataclass
class SweepConfig:
    """What to sweep and how to evaluate.

    Attributes:
        solvers: registry names (None: every registered solver).
        grids: grid names (None: :data:`sdekit.grids.BENCH_GRIDS`).
        nfe: NFE budgets for fixed-grid solvers.
        tols: tolerances (rtol = atol) for adaptive solvers.
        n: samples per cell (one batch); n_ref: held-out samples (default n).
        seed: seed of the initial states (and the solvers' per-sample noise).
        solver_options: per-solver options, ``{name: {option: value}}``.
        float64: keep solver states in float64.
        reference_tol: rtol = atol of the converged reference solve where no exact flow map
            exists (default 1e-8 for analytic float64 models, 1e-6 for float32 networks,
            whose own rounding stops tighter tolerances from converging).
        reference_solver: registry name of that adaptive solver.
        projections: directions of the sliced Wasserstein distance.
        timing_repeats: rounds of the side-by-side timing (every ok cell solved again per
            round, interleaved, giving ``ms_min``/``ms_median``); 0 skips it.
    """

    solvers: Sequence[str] | None = None
    grids: Sequence[str] | None = None
    nfe: Sequence[int] = DEFAULT_NFE
    tols: Sequence[float] = DEFAULT_TOLS
    n: int = 500
    n_ref: int | None = None
    seed: int = 0
    solver_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    float64: bool = False
    reference_tol: float | None = None
    reference_solver: str = "dopri5"
    projections: int = 128
    timing_repeats: int = 3

    def validate(self) -> None:
        names = solver_names()
        for s in self.solvers or []:
            if s not in names:
                raise BenchError(f"--solvers: unknown solver {s!r}: expected one of {names}")
        for s in self.solver_options:
            if s not in names:
                raise BenchError(f"--solver-option: unknown solver {s!r}: expected one of {names}")
        for g in self.grids or []:
            if g not in GRIDS and not _is_grid_file(g):
                raise BenchError(f"--grids: unknown grid {g!r}: expected one of {sorted(GRIDS)} "
                                 "or a tuned grid file (.json, made by sdekit tune)")
            if g not in GRIDS:
                tg = _load_tuned(g)
                if tg.solver not in self.solver_list():
                    raise BenchError(f"--grids {g}: the grid was tuned for solver "
                                     f"{tg.solver!r}, which the sweep leaves out: add it to "
                                     "--solvers")
        if not self.nfe or any(not isinstance(b, int) or isinstance(b, bool) or b < 1
                               for b in self.nfe):
            raise BenchError(f"--nfe={list(self.nfe)!r} is invalid: expected integers >= 1")
        if any(not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0) for t in self.tols):
            raise BenchError(f"--tols={list(self.tols)!r} is invalid: expected numbers > 0")
        if not (isinstance(self.n, int) and self.n >= 2):
            raise BenchError(f"--n={self.n!r} is invalid: expected an integer >= 2")
        if self.n_ref is not None and not (isinstance(self.n_ref, int) and self.n_ref >= 2):
            raise BenchError(f"--n-ref={self.n_ref!r} is invalid: expected an integer >= 2")
        if self.reference_tol is not None and not (isinstance(self.reference_tol, (int, float))
                                                   and 0 < self.reference_tol < 1):
            raise BenchError(f"reference_tol={self.reference_tol!r} is invalid: expected a "
                             "number in (0, 1)")
        if not (isinstance(self.timing_repeats, int) and not isinstance(self.timing_repeats, bool)
                and self.timing_repeats >= 0):
            raise BenchError(f"--timing-repeats={self.timing_repeats!r} is invalid: expected an "
                             "integer >= 0")
        if self.reference_solver not in names:
            raise BenchError(f"reference_solver={self.reference_solver!r} is unknown: expected "
                             f"one of {names}")

    def solver_list(self) -> list[str]:
        return list(self.solvers) if self.solvers else solver_names()

    def grid_list(self) -> list[str]:
        """The named grids swept (tuned-grid files are planned separately)."""
        named = [g for g in self.grids or [] if g in GRIDS]
        return named if named or self.grids else list(BENCH_GRIDS)

    def tuned_grids(self) -> list[str]:
        """The tuned-grid files of ``grids``."""
        return [g for g in self.grids or [] if g not in GRIDS]


def _is_grid_file(g: str) -> bool:
    from ..tune import is_grid_file
    return is_grid_file(g)


def _load_tuned(path: str) -> Any:
    from ..tune import TuneError, load_tuned_grid
    try:
        return load_tuned_grid(path)
    except TuneError as e:
        raise BenchError(f"--grids: {e}") from None


def tuned_cells(config: SweepConfig) -> list[dict[str, Any]]:
    """One cell per tuned-grid file of ``config.grids``, for the swept solver configuration it
    was tuned for, at its NFE: its own row (label ``<solver> [tuned]``), marked ``tuned``. A file
    tuned with other options than the sweep gives that solver is a skipped cell saying so."""
    from ..tune import solver_config
    cells = []
    for path in config.tuned_grids():
        tg = _load_tuned(path)
        name = tg.solver
        opts = dict(config.solver_options.get(name, {}))
        digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:8]
        label = _label(name, opts) + " [tuned]"
        meta = get_solver(name, **opts).describe()
        cell = {"solver": name, "label": label, "options": opts, "family": meta.get("family"),
                "kind": meta.get("kind"), "order": meta.get("order"), "adaptive": False,
                "id": f"{label}/tuned:{Path(path).name}@{digest}/nfe={tg.nfe}",
                "grid": f"tuned:{Path(path).name}", "grid_file": str(path), "tuned": True,
                "budget": tg.nfe, "tol": None, "steps": tg.steps,
                "expected_nfe": tg.record.get("measured_nfe"), "status": "planned",
                "note": f"tuned grid {path}"}
        if solver_config(name, opts) != tg.record["solver_options"]:
            cell.update(status="skipped", reason=f"{path} was tuned for {name} with options "
                        f"{tg.solver_options}, the sweep runs it with {opts}")
        cells.append(cell)
    return cells


# ------------------------------------------------------------------ planning
def _label(name: str, options: Mapping[str, Any]) -> str:
    if not options:
        return name
    return name + "(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


def steps_for_budget(solver: Solver, budget: int) -> tuple[int | None, int | None, str]:
    """``(steps, expected_nfe, reason)``: the most steps whose expected NFE fits ``budget``;
    steps None (with the reason) when even the minimum number of steps does not fit."""
    def cost(s: int) -> int:
        e = solver.expected_nfe(s)
        return s * max(int(getattr(solver, "nfe_per_step", 1) or 1), 1) if e is None else int(e)

    lo = max(int(getattr(solver, "min_steps", 1) or 1), 1)
    if cost(lo) > budget:
        return None, None, (f"budget {budget} NFE is below the minimum cost of {solver.name!r}: "
                            f"{cost(lo)} NFE for its minimum of {lo} step(s)")
    hi = lo
    while cost(hi * 2) <= budget and hi < budget:
        hi *= 2
    hi = min(hi * 2, budget)
    while lo < hi:  # largest s in [lo, hi] with cost(s) <= budget (cost is nondecreasing)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    note = "" if cost(lo) == budget else (f"budget {budget} -> {lo} steps = {cost(lo)} NFE "
                                          f"(nfe_per_step={solver.nfe_per_step})")
    return lo, cost(lo), note


def _takes_tolerance(name: str, options: Mapping[str, Any], tol: float) -> bool:
    try:
        get_solver(name, **{**options, "rtol": tol, "atol": tol})
        return True
    except TypeError:
        return False


def plan_cells(config: SweepConfig) -> list[dict[str, Any]]:
    """Every cell of the sweep in a fixed order, with its steps, or skipped with the reason."""
    config.validate()
    cells: list[dict[str, Any]] = []
    for name in config.solver_list():
        opts = dict(config.solver_options.get(name, {}))
        try:
            slv = get_solver(name, **opts)
        except (TypeError, ValueError) as e:
            raise BenchError(f"--solver-option for {name!r}: {e}") from e
        meta = slv.describe()
        base = {"solver": name, "label": _label(name, opts), "options": opts,
                "family": meta.get("family"), "kind": meta.get("kind"),
                "order": meta.get("order"), "adaptive": bool(slv.adaptive)}
        if slv.adaptive and config.tols and "rtol" not in opts and "atol" not in opts \
                and _takes_tolerance(name, opts, config.tols[0]):
            for tol in config.tols:
                cells.append({**base, "id": f"{base['label']}/tol={tol:g}", "grid": None,
                              "budget": None, "tol": float(tol), "steps": None,
                              "expected_nfe": None, "status": "planned", "note": ""})
            continue
        # a grid-free solver (a learned operator) runs once, on its default grid
        for grid in [slv.default_grid] if slv.grid_free else config.grid_list():
            for budget in config.nfe:
                cell = {**base, "id": f"{base['label']}/{grid}/nfe={budget}", "grid": grid,
                        "budget": int(budget), "tol": None, "status": "planned", "note": ""}
                if slv.grid_free and slv.expected_nfe(1) != budget:
                    cell.update(status="skipped", steps=None, expected_nfe=None,
                                reason=f"{name!r} always costs {slv.expected_nfe(1)} NFE")
                elif slv.adaptive:
                    per = max(int(getattr(slv, "nfe_per_step", 1) or 1), 1)
                    steps = budget // per
                    cell.update(steps=steps, expected_nfe=None,
                                note="adaptive backend: steps = budget // nfe_per_step, NFE "
                                     "measured")
                    if steps < max(slv.min_steps, 1):
                        cell.update(status="skipped", reason=f"budget {budget} NFE gives "
                                    f"{steps} steps, below the minimum {max(slv.min_steps, 1)}")
                else:
                    steps, exp, note = steps_for_budget(slv, int(budget))
                    cell.update(steps=steps, expected_nfe=exp, note=note)
                    if steps is None:
                        cell.update(status="skipped", reason=note, note="")
                cells.append(cell)
    return cells + tuned_cells(config)


# ------------------------------------------------------------------ preparation
def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, default=_json_default) + "\n")
                        .encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


@dataclass
class Prepared:
    """A problem made concrete: initial states, reference solution, held-out set, target law."""

    problem: BenchProblem
    x_init: Tensor
    x_ref: Tensor | None
    reference: dict[str, Any]
    heldout: Tensor | None
    target: tuple[Tensor, Tensor] | None
    target_method: str
    bandwidth: float | None
    sliced: M.SlicedReference | None
    cache_dir: Path
    kyy: float | None = None
    teacher_macs: float | None = None


def problem_key(problem: BenchProblem, config: SweepConfig) -> str:
    ident = {"format": BENCH_FORMAT, "problem": problem.fingerprint, "n": config.n,
             "n_ref": config.n_ref, "seed": config.seed, "float64": config.float64,
             "projections": config.projections, "reference_tol": config.reference_tol,
             "reference_solver": config.reference_solver}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _wait_for(paths: Sequence[Path], timeout: float, what: str,
              ok: Callable[[Path], bool] | None = None) -> None:
    t0 = time.monotonic()
    while True:
        missing = [p for p in paths if not (p.exists() and (ok is None or ok(p)))]
        if not missing:
            return
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {len(missing)} {what} from other "
                               f"ranks (e.g. {missing[0]}); did a rank fail?")
        time.sleep(0.5)


def prepare(problem: BenchProblem, config: SweepConfig, cache_dir: Path | str,
            rank: int = 0, world_size: int = 1, timeout: float = 3600.0) -> Prepared:
    """Draw the initial states and held-out data, and get the reference solution (exact, or a
    converged solve loaded from / written to the cache)."""
    cdir = Path(cache_dir) / f"{problem.name}-{problem_key(problem, config)}"
    cdir.mkdir(parents=True, exist_ok=True)
    x_init = problem.sample_init(config.n, torch.Generator().manual_seed(config.seed))
    if not isinstance(x_init, Tensor) or x_init.ndim < 2 or x_init.shape[0] != config.n:
        shape = tuple(x_init.shape) if isinstance(x_init, Tensor) else type(x_init).__name__
        raise BenchError(f"problem {problem.name!r}: sample_init({config.n}, generator) returned "
                         f"{shape}: expected a Tensor of shape ({config.n}, *event_shape)")
    x_init = x_init.to(torch.float32) if not x_init.is_floating_point() else x_init
    # held-out samples of the target law
    n_ref = config.n_ref or config.n
    ho = problem.heldout
    if callable(ho):
        heldout = ho(n_ref, torch.Generator().manual_seed(config.seed + 1))
    elif isinstance(ho, Tensor):
        heldout = ho[:n_ref]
    else:
        heldout = None
    # the reference PF-ODE solution from the same initial states
    if problem.flow is not None:
        x_ref = problem.flow(x_init.double()).double()
        reference = {"method": "exact PF-ODE flow map"}
    else:
        path = cdir / "reference.pt"
        if not path.exists() and rank != 0 and world_size > 1:
            _wait_for([path], timeout, "reference solution")
        x_ref = None
        if path.exists():
            try:  # a cache that fails to load is rebuilt, never trusted
                saved = load_verified(path, "cached reference solution", legacy_ok=False)
                x_ref, reference = saved["x"], json.loads(saved["info"])
                if not (isinstance(x_ref, Tensor) and x_ref.shape == x_init.shape):
                    raise ValueError(f"cached reference solution {str(path)!r} does not hold "
                                     f"{tuple(x_init.shape)} states")
            except (IntegrityError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"{e}; recomputing it", stacklevel=2)
                x_ref = None
        if x_ref is None:
            x_ref, reference = _reference_solve(problem, config, x_init)
            save_verified(path, {"x": x_ref, "info": json.dumps(reference)})
        reference = {**reference, "cached_at": str(path)}
    # the target law for the Frechet distance and KL
    target, method = None, "none"
    if problem.target_gaussian is not None and problem.features is None:
        target = tuple(torch.as_tensor(v, dtype=torch.float64) for v in problem.target_gaussian)
        method = "exact Gaussian" if problem.gaussian_target else "exact moments"
    elif heldout is not None and heldout.shape[0] >= 2:
        feats = problem.features(heldout) if problem.features is not None else heldout
        target, method = M.fit_gaussian(feats), "fit to held-out samples"
    bandwidth = sliced = kyy = None
    if heldout is not None:
        heldout = heldout.reshape(heldout.shape[0], -1).double()
        bandwidth = M.median_bandwidth(heldout)
        kyy = M.mmd_self_term(heldout, bandwidth)
        sliced = M.SlicedReference(heldout, config.projections, config.seed + 2)
    teacher_macs = network_macs_per_sample(problem.model, x_init, problem.sde.T)
    return Prepared(problem, x_init, x_ref, reference, heldout, target, method, bandwidth,
                    sliced, cdir, kyy, teacher_macs)


def _reference_solve(problem: BenchProblem, config: SweepConfig,
                     x_init: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """A converged adaptive solve, and an error estimate from one 100x looser."""
    x = x_init.double() if problem.exact_model else x_init
    f64 = not problem.exact_model

    def solve(tol: float) -> tuple[Tensor, int]:
        sol = sample(problem.sde, problem.model, x, solver=config.reference_solver, rtol=tol,
                     atol=tol, seed=config.seed, float64=f64)
        return sol.x.double(), sol.nfe

    t0 = time.perf_counter()
    tol = config.reference_tol or (1e-8 if problem.exact_model else 1e-6)
    tight, nfe = solve(tol)
    loose, nfe_loose = solve(tol * 100)
    return tight, {"method": f"{config.reference_solver} rtol=atol={tol:g}"
                             f" ({'float64' if problem.exact_model else 'float64 state'})",
                   "nfe": nfe, "error_estimate": M.rms_error(loose, tight),
                   "error_estimate_method": f"RMS difference to a solve at rtol=atol="
                                            f"{tol * 100:g} ({nfe_loose} NFE)",
                   "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------ one cell
#: A cell counts as diverged when its output has NaN/Inf or its error is this many times the
#: data's own scale (see :func:`divergence`).
DIVERGENCE_FACTOR = 10.0
DIVERGENCE_RULE = (f"diverged = NaN/Inf, or RMS error > {DIVERGENCE_FACTOR:g}x the reference's RMS "
                   f"size, or FD > {DIVERGENCE_FACTOR ** 2:g}x the target's E|x|^2")


def divergence(prep: Prepared, metrics: Mapping[str, Any]) -> str | None:
    """Why finite output counts as diverged, or None: an error far above the data's scale,
    ``DIVERGENCE_FACTOR`` (10) times it. For the RMS error the scale is the reference solution's
    per-coordinate RMS size; the FD is a squared distance, so it is compared with 10^2 times the
    target's second moment ``E|x|^2`` (a sampler returning zeros has FD about ``E|x|^2``; at 100x
    the law is ten times further from the target than the data from the origin)."""
    f = DIVERGENCE_FACTOR
    if metrics.get("rms") is not None and prep.x_ref is not None:
        scale = float(prep.x_ref.double().pow(2).mean().sqrt())
        if metrics["rms"] > f * scale:
            return (f"RMS error {metrics['rms']:.3g} > {f:g}x the reference's RMS size "
                    f"{scale:.3g}")
    if metrics.get("fd") is not None and prep.target is not None:
        mean, cov = prep.target
        second = float(mean.double().pow(2).sum() + torch.diagonal(cov.double()).sum())
        if metrics["fd"] > f * f * second:
            return f"FD {metrics['fd']:.3g} > {f * f:g}x the target's E|x|^2 {second:.3g}"
    return None


def evaluate(prep: Prepared, x: Tensor, stochastic: bool) -> dict[str, Any]:
    """All metrics of the samples ``x`` (same rows as ``prep.x_init``)."""
    p = prep.problem
    out: dict[str, Any] = {"rms": None, "fd": None, "fd_method": None, "kl": None,
                           "kl_method": None, "sw": None, "mmd": None}
    if prep.x_ref is not None and not stochastic:
        out["rms"] = M.rms_error(x, prep.x_ref)
    flat = x.reshape(x.shape[0], -1).double()
    if prep.target is not None:
        law, how = None, "fit"
        if p.linear and p.init_gaussian is not None and p.features is None and not stochastic:
            law = M.affine_gaussian_law(prep.x_init, flat, *p.init_gaussian)
            how = "exact"
        if law is None:
            feats = p.features(x).reshape(x.shape[0], -1).double() if p.features else flat
            law, how = M.fit_gaussian(feats), "fit"
        m, S = law[0], law[1]
        out["fd"], out["fd_method"] = M.frechet_distance(m, S, *prep.target), how
        if p.gaussian_target and (how == "exact" or flat.shape[0] > flat.shape[1] + 1):
            out["kl"], out["kl_method"] = _finite(M.gaussian_kl(m, S, *prep.target)), how
    if prep.heldout is not None:
        out["sw"] = prep.sliced.distance(flat)
        out["mmd"] = M.mmd(flat, prep.heldout, prep.bandwidth, prep.kyy)
    return out


def compute_cell(prep: Prepared, cell: Mapping[str, Any], config: SweepConfig) -> dict[str, Any]:
    """Run one cell's solve and measure it. Bad combinations (e.g. a grid a solver rejects) give
    status ``skipped`` with the solver's message; NaN/Inf or an error far above the data's scale
    (:func:`divergence`) gives ``diverged`` (metrics kept); anything else unexpected ``error``."""
    res = dict(cell)
    try:
        slv, solve = cell_solve(prep, cell, config)
        with count_macs() as macs:
            t0 = time.perf_counter()
            sol = solve()
            wall = time.perf_counter() - t0
    except ModelOutputError as e:
        res.update(status="diverged", reason=str(e))
        return res
    except ValueError as e:
        res.update(status="skipped", reason=f"{type(e).__name__}: {e}")
        return res
    except Exception as e:  # noqa: BLE001  (one bad cell must not end the sweep)
        res.update(status="error", reason=f"{type(e).__name__}: {e}")
        return res
    n = prep.x_init.shape[0]
    res.update(status="ok", nfe=int(sol.nfe), steps=int(sol.steps), wall_s=wall,
               ms_per_sample=1000.0 * wall / n, macs_per_sample=macs.macs / n,
               passes=macs.macs / n / prep.teacher_macs if prep.teacher_macs else None)
    notes = [cell.get("note") or ""]
    if res.get("expected_nfe") is not None and sol.nfe != res["expected_nfe"]:
        notes.append(f"measured NFE {sol.nfe} != declared {res['expected_nfe']}")
    if res.get("budget") is not None and sol.nfe > res["budget"]:
        notes.append(f"measured NFE {sol.nfe} exceeds the budget {res['budget']}")
    res["note"] = "; ".join(n for n in notes if n)
    if not bool(torch.isfinite(sol.x).all()):
        res.update(status="diverged", reason="the solution contains NaN or Inf")
        return res
    res.update(evaluate(prep, sol.x, bool(slv.stochastic)))
    why = divergence(prep, res)
    if why:
        res.update(status="diverged", reason=why)
    return res


def cell_solve(prep: Prepared, cell: Mapping[str, Any], config: SweepConfig
               ) -> tuple[Solver, Callable[[], Any]]:
    """The cell's solver and a function running its solve (the Solution)."""
    opts = dict(cell["options"])
    if cell["tol"] is not None:
        opts.update(rtol=cell["tol"], atol=cell["tol"])
    slv = get_solver(cell["solver"], **opts)
    p = prep.problem
    return slv, lambda: sample(p.sde, p.model, prep.x_init, solver=slv, seed=config.seed,
                               float64=config.float64, steps=cell["steps"] or 1,
                               grid=cell.get("grid_file") or cell["grid"])


def time_cells(prep: Prepared, cells: Sequence[dict[str, Any]], config: SweepConfig,
               progress: bool = False) -> None:
    """Side-by-side wall time: ``config.timing_repeats`` rounds, each solving every ok cell
    once more (the order rotated by one cell per round, so no cell always runs first or after
    the same neighbour), in this process, without the MAC counter; sets ``ms_min`` and
    ``ms_median`` (per sample) and ``timing_repeats`` on each timed cell."""
    ok = [c for c in cells if c.get("status") == "ok"]
    if not ok or config.timing_repeats <= 0:
        return
    times: dict[str, list[float]] = {c["id"]: [] for c in ok}
    failed: dict[str, str] = {}
    from tqdm.auto import tqdm
    bar = tqdm(total=len(ok) * config.timing_repeats, disable=not progress, unit="solve",
               desc=f"timing {prep.problem.name} side by side", dynamic_ncols=True)
    n = prep.x_init.shape[0]
    try:
        for r in range(config.timing_repeats):
            k = r % len(ok)
            for c in ok[k:] + ok[:k]:
                try:
                    _, solve = cell_solve(prep, c, config)
                    t0 = time.perf_counter()
                    solve()
                    times[c["id"]].append(1000.0 * (time.perf_counter() - t0) / n)
                except Exception as e:  # noqa: BLE001  (it ran once already: note it, go on)
                    failed[c["id"]] = f"{type(e).__name__}: {e}"
                bar.update(1)
    finally:
        bar.close()
    for c in ok:
        ts = sorted(times[c["id"]])
        if c["id"] in failed:
            c["timing_error"] = failed[c["id"]]
        if ts:
            c.update(ms_min=ts[0], ms_median=statistics.median(ts), timing_repeats=len(ts))


# ------------------------------------------------------------------ the sweep
def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise BenchError(f"environment variable {name}={v!r} is invalid: expected an integer")


def fingerprint_files(name: str) -> list[str]:
    """The source files a cell of solver ``name`` depends on: the solver's module and its base
    classes' modules, the driver, the metrics, and what every solve runs through: the noise
    sources, the grids, the forward processes and the model contract."""
    cls = type(get_solver(name))
    files = {inspect.getsourcefile(k) for k in cls.__mro__ if k.__module__.startswith("sdekit")}
    files |= {inspect.getsourcefile(sample), inspect.getsourcefile(M)}
    root = Path(inspect.getsourcefile(sample) or ".").parent
    files |= {str(root / f) for f in ("noise.py", "grids.py", "_utils.py")}
    files |= {str(f) for d in ("sde", "dynamics") for f in (root / d).glob("*.py")}
    return sorted(f for f in files if f)


def solver_code_fingerprint(name: str, options: Mapping[str, Any] | None = None) -> str:
    """A hash of the code a cell's result depends on: the solver's module (and its base
    classes' modules), the driver, the metrics and the cell evaluation, plus the contents of any
    file an option names (a learned operator's checkpoint), so a cached cell is recomputed when
    any of them changes."""
    h = hashlib.sha1(__version__.encode())
    h.update((inspect.getsource(evaluate) + inspect.getsource(compute_cell)
              + inspect.getsource(divergence)).encode())
    for f in fingerprint_files(name):
        try:
            h.update(Path(f).read_bytes())
        except OSError:
            h.update(f.encode())
    for v in (options or {}).values():
        if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
            h.update(Path(v).read_bytes())
    return h.hexdigest()[:16]


def environment() -> dict[str, Any]:
    return {"sdekit": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


@contextlib.contextmanager
def _phase(desc: str, progress: bool,
           nfe_of: Callable[[], int] | None) -> Iterator[dict[str, float]]:
    """Progress of a phase without steps of its own (drawing data, the reference solve): a
    tqdm bar on stderr counting the model evaluations ``nfe_of()`` so far, refreshed every
    second from a background thread; ``progress=False`` shows nothing. The yielded dict gets
    ``elapsed`` (seconds) on exit."""
    info: dict[str, float] = {}
    t0 = time.perf_counter()
    if not progress:
        try:
            yield info
        finally:
            info["elapsed"] = time.perf_counter() - t0
        return
    from tqdm.auto import tqdm
    start = nfe_of() if nfe_of else 0
    bar = tqdm(desc=desc, unit=" NFE", total=None, dynamic_ncols=True, file=sys.stderr,
               leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            n = (nfe_of() - start) if nfe_of else 0
            bar.update(n - bar.n) if n > bar.n else bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield info
    finally:
        stop.set()
        thread.join()
        bar.close()
        info["elapsed"] = time.perf_counter() - t0


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def describe_reference(ref: Mapping[str, Any]) -> str:
    """One line on the reference solution and what its estimated error means."""
    s = f"reference: {ref.get('method', '?')}"
    if ref.get("nfe") is not None:
        s += f", {ref['nfe']} NFE"
    if ref.get("error_estimate") is not None:
        s += (f"; estimated RMS error of the reference itself {ref['error_estimate']:.2e} "
              f"({ref.get('error_estimate_method', 'vs a looser solve')}, so an upper "
              "estimate): solvers' RMS errors below it are not resolved")
    return s


def run_sweep(problem: BenchProblem, config: SweepConfig, cache_dir: Path | str, *,
              resume: bool = True, progress: bool = True, rank: int | None = None,
              world_size: int | None = None, timeout: float = 3600.0) -> dict[str, Any] | None:
    """Run (or resume) the sweep; returns the merged results on rank 0 and None on other ranks.

    ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment variables.
    A learned operator given as a solver option is checked against the problem's model (its
    teacher) before any work. Each rank holds an exclusive lock on the cache directory
    (``.bench.lock``, ``.bench.rank<r>.lock`` for rank r > 0) while it runs: a second sweep
    on the same cache raises a :class:`BenchError` naming the directory and the holder."""
    config.validate()
    for name in config.solver_list():
        try:
            slv = get_solver(name, **dict(config.solver_options.get(name, {})))
        except (TypeError, ValueError):
            continue  # plan_cells reports bad options
        if hasattr(slv, "check_teacher"):
            try:
                slv.check_teacher(problem.model)
            except ValueError as e:
                raise BenchError(f"--solver-option {name}.operator: {e}") from None
    r = _env_int("RANK", 0) if rank is None else rank
    lock = Path(cache_dir) / (".bench.lock" if not r else f".bench.rank{r}.lock")
    try:
        with exclusive_lock(lock):
            return _run_sweep(problem, config, cache_dir, resume=resume, progress=progress,
                              rank=rank, world_size=world_size, timeout=timeout)
    except LockedError as e:
        raise BenchError(f"the cache directory {str(cache_dir)!r} is in use by another sdekit "
                         f"bench ({e}): wait for it to finish, or use another --out / "
                         "--cache-dir") from None


def _run_sweep(problem: BenchProblem, config: SweepConfig, cache_dir: Path | str, *,
               resume: bool = True, progress: bool = True, rank: int | None = None,
               world_size: int | None = None, timeout: float = 3600.0) -> dict[str, Any] | None:
    config.validate()
    rank = _env_int("RANK", 0) if rank is None else rank
    world = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    if not (world >= 1 and 0 <= rank < world):
        raise BenchError(f"RANK={rank}, WORLD_SIZE={world} is invalid: expected 0 <= RANK < "
                         "WORLD_SIZE")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    t_start = time.perf_counter()
    cells = plan_cells(config)
    show = progress and rank == 0
    nfe = getattr(problem.model, "nfe", None)
    how = ("the exact reference (flow map)" if problem.flow is not None else
           f"the reference solution ({config.reference_solver}: a converged solve plus one 100x "
           "looser to estimate its error; loaded instead when cached)")
    _say(show, f"bench {problem.name}: n={config.n} samples per cell; preparing the initial "
               f"states, held-out data and {how}")
    with _phase(f"prepare {problem.name}", show,
                (lambda: int(problem.model.nfe)) if isinstance(nfe, int) else None) as phase:
        prep = prepare(problem, config, cache_dir, rank, world, timeout)
    _say(show, describe_reference(prep.reference) + f" [{phase['elapsed']:.1f} s]")
    cell_dir = prep.cache_dir / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)

    codes: dict[str, str] = {}

    def code_of(c: Mapping[str, Any]) -> str:
        if c["label"] not in codes:
            codes[c["label"]] = solver_code_fingerprint(c["solver"], c["options"])
        return codes[c["label"]]

    def path_of(c: Mapping[str, Any]) -> Path:
        return cell_dir / (hashlib.sha1(c["id"].encode()).hexdigest()[:16] + ".json")

    def load(c: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            with open(path_of(c)) as f:
                d = json.load(f)
        except (OSError, ValueError):
            return None
        if d.get("id") != c["id"] or (not resume and d.get("run_id") != run_id) \
                or d.get("code") != code_of(c):
            return None  # another cell, a stale run, or the solver's code changed since
        return d

    runnable = [c for c in cells if c["status"] == "planned"]
    mine = [c for i, c in enumerate(runnable) if i % world == rank]
    todo = [c for c in mine if not resume or load(c) is None]
    computed = 0
    done: dict[str, dict[str, Any]] = {}
    from tqdm.auto import tqdm
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress,
               desc=f"bench {problem.name}" + (f" [rank {rank}/{world}]" if world > 1 else ""),
               unit="cell", dynamic_ncols=True)
    try:
        for c in todo:
            bar.set_postfix_str(c["id"], refresh=False)
            res = compute_cell(prep, c, config)
            computed += 1
            if res["status"] != "error":
                atomic_write_json(path_of(c), {**res, "run_id": run_id,
                                               "code": code_of(c)})
            else:
                bar.write(f"error in cell {c['id']}: {res.get('reason')}")
            done[c["id"]] = res
            bar.update(1)
    finally:
        bar.close()
    if rank != 0:
        return None
    if world > 1:
        others = [c for i, c in enumerate(runnable) if i % world != 0]
        _wait_for([path_of(c) for c in others], timeout, "cell results",
                  ok=lambda p: p.stat().st_size > 0)
        if not resume:  # fresh run: wait for this run's results, not stale ones
            t0 = time.monotonic()
            while any(load(c) is None for c in others):
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError("timed out waiting for the other ranks' cells")
                time.sleep(0.5)
    out_cells = []
    for c in cells:
        if c["status"] != "planned":
            out_cells.append(dict(c))
            continue
        r = done.get(c["id"]) or load(c)
        if r is None:
            r = {**c, "status": "error", "reason": "no result (cell failed on another rank?)"}
        r.pop("run_id", None)
        r.pop("code", None)
        out_cells.append(r)
    time_cells(prep, out_cells, config, show)
    ref_metrics = evaluate(prep, prep.x_ref.to(prep.x_init.dtype), False) \
        if prep.x_ref is not None else {}
    floors = _fit_floors(prep)
    status = [c["status"] for c in out_cells]
    p = prep.problem
    return {
        "format": BENCH_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "problem": {"name": p.name, "description": p.description, "fingerprint": p.fingerprint,
                    "sde": repr(p.sde), "shape": list(prep.x_init.shape[1:]),
                    "dim": int(prep.x_init[0].numel()), "t_start": p.sde.T, "t_end": p.sde.t_min,
                    "n": config.n, "n_ref": None if prep.heldout is None else
                    int(prep.heldout.shape[0]), "target": prep.target_method},
        "reference": {**prep.reference, "exact_model": p.exact_model, "metrics": ref_metrics,
                      "fit_floors": floors},
        "metrics": METRIC_DOCS,
        "cost": {"teacher_macs_per_sample": prep.teacher_macs,
                 "unit": "passes = MACs per sample / MACs of one pass of the problem's model "
                         "per sample (sdekit.bench.cost)",
                 "timing_repeats": config.timing_repeats},
        "config": {**{k: v for k, v in asdict(config).items() if k != "solver_options"},
                   "solvers": config.solver_list(), "grids": config.grid_list(),
                   "solver_options": {k: dict(v) for k, v in config.solver_options.items()}},
        "solvers": {n: get_solver(n, **dict(config.solver_options.get(n, {}))).describe()
                    for n in config.solver_list()},
        "environment": {**environment(), "world_size": world},
        "summary": {"cells": len(out_cells), **{s: status.count(s) for s in
                    ("ok", "skipped", "diverged", "error")},
                    "computed_on_rank0": computed, "wall_s": time.perf_counter() - t_start},
        "cells": out_cells,
    }


def _fit_floors(prep: Prepared) -> dict[str, Any]:
    """The Monte-Carlo floors of the sample-based metrics: the same metrics for the reference
    solution (exact samples of the target law on Gaussian problems) with fitted Gaussians."""
    if prep.x_ref is None or prep.target is None or prep.problem.features is not None:
        return {}
    flat = prep.x_ref.reshape(prep.x_ref.shape[0], -1)
    m, S = M.fit_gaussian(flat)
    out = {"fd_fit": M.frechet_distance(m, S, *prep.target)}
    if prep.problem.gaussian_target and flat.shape[0] > flat.shape[1] + 1:
        out["kl_fit"] = _finite(M.gaussian_kl(m, S, *prep.target))
    return out


__all__ = ["SweepConfig", "plan_cells", "steps_for_budget", "prepare", "Prepared", "evaluate",
           "compute_cell", "cell_solve", "time_cells", "divergence", "DIVERGENCE_RULE",
           "run_sweep", "atomic_write_json", "BENCH_FORMAT", "DEFAULT_NFE", "DEFAULT_TOLS",
           "METRIC_DOCS"]
