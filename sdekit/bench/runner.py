"""The sweep: solvers x time grids x NFE budgets on one problem, cached per cell.

The pieces, in the order :func:`run_sweep` runs them: **planning** (:func:`make_plan`: one
configured solver per swept name and every :class:`~sdekit.bench.cells.Cell`, each holding the
solver it runs), **preparation** (:func:`prepare`: initial states, held-out data, reference
solution, target law), **one cell** (:func:`compute_cell`), the **cache** (:class:`CellCache`),
the **shard merge** (:func:`merge_cells`), the side-by-side **timing** (:func:`time_cells`) and
the output **document** (:func:`sweep_document`, the JSON of ``bench.json``).

* **Budgets.** A fixed-grid solver gets the most steps whose ``expected_nfe(steps)`` fits the
  budget (``steps = budget // 2`` for a 2-NFE/step solver); a budget below the solver's minimum
  cost is a *skipped* cell with the reason. The NFE reported is always the one the call counter
  measured. Adaptive solvers (``solver.adaptive``: integrators controlled by ``rtol``/``atol``)
  are swept over tolerances instead (one cell per tolerance, no grid); given their own
  ``rtol``/``atol`` as options (or no tolerances to sweep) they run ``budget // nfe_per_step``
  steps and report what they measured.
* **Cache and resume.** Every finished cell is written atomically to
  ``<cache>/<problem>-<hash>/cells/<hash>.json``, keyed by the problem's fingerprint, the
  evaluation settings and the cell id; a rerun (for instance after an interruption) loads those
  cells instead of recomputing them. Cells that raised an unexpected error are not cached. A
  cached reference solution that fails to load or its content hash is recomputed (with a
  warning). One sweep at a time per cache directory: a second process on the same cache
  directory fails at once, naming the directory and the holder's pid (an ``fcntl.flock`` on
  ``<cache>/.bench.lock``, released however the holder exits).
* **Sharding.** Under ``torchrun`` (or any launcher setting ``RANK``/``WORLD_SIZE``) rank r
  computes the cells ``i % WORLD_SIZE == r``; rank 0 then waits for the other ranks' cell files
  in the shared cache and merges everything into one result. No process group is needed.
* **Errors.** Bad settings raise :class:`ConfigError`, naming the :class:`SweepConfig` field
  (``nfe=[0] is invalid: ...``), before any work; the command line names its flag instead.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from .. import integrate as _driver
from .._io import (
    IntegrityError,
    LockedError,
    atomic_write_bytes,
    exclusive_lock,
    load_verified,
    save_verified,
)
from ..grids import BENCH_GRIDS, is_grid_spec, parse_grid
from ..integrate import sample
from ..solvers.base import ModelOutputError, Solver
from ..solvers.registry import DEFAULT_SOLVER, default_config, get_solver, solver_names
from . import cells as _schema
from . import metrics as M
from .cells import Cell, Metrics, Run, Timing
from .cost import count_macs, network_macs_per_sample
from .problems import BenchError, BenchProblem

BENCH_FORMAT = "sdekit-bench/1"
DEFAULT_NFE = (5, 10, 20, 50)
DEFAULT_TOLS = (1e-2, 1e-3, 1e-4)
#: the name of the option-free row (``--solvers default``): at each budget N the call
#: ``sample(sde, model, x, steps=N)`` with no solver and no grid, whose rule
#: (:func:`sdekit.solvers.default_config`) picks them from the forward process and N
DEFAULT_ROW = "default"
DEFAULT_ROW_DESCRIPTION = {
    "name": DEFAULT_ROW, "family": "option-free default",
    "description": "sample(sde, model, x, steps=N) with no solver or grid: the rule of "
                   "sdekit.solvers.default_config picks the solver, its options and the grid "
                   "(each cell's note says which)"}

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


class ConfigError(BenchError):
    """A bad setting of a sweep or of its reports. ``field`` is the setting's name (a
    :class:`SweepConfig` field, or ``formats``/``metrics``/``exclude``); the message is
    ``field + detail``, so a caller with other names for the settings (the command line's
    flags) can say ``its_name + detail``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(field + detail)
        self.field = field
        self.detail = detail


class CacheBusyError(BenchError):
    """Another sweep holds the cache directory."""


def check_solver_names(names: Iterable[str], field: str, default_row: bool = False) -> None:
    """Raise a :class:`ConfigError` on ``field`` for the first name that is not registered
    (``default_row``: :data:`DEFAULT_ROW` is valid too)."""
    valid = solver_names() + ([DEFAULT_ROW] if default_row else [])
    for s in names:
        if s not in valid:
            raise ConfigError(field, f": unknown solver {s!r}: expected one of {valid}")


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how to evaluate; checked when made (a :class:`ConfigError` naming the
    field), so every ``SweepConfig`` is a valid one.

    Attributes:
        solvers: registry names (None: every registered solver).
        grids: grid names, optionally with options (``"logsnr(lambda_floor=-2.5)"``,
            :func:`sdekit.grids.parse_grid`; None: :data:`sdekit.grids.BENCH_GRIDS`) and tuned
            grid files.
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a :class:`ConfigError` (a ``ValueError``) naming the first bad field."""
        check_solver_names(self.solvers or [], "solvers", default_row=True)
        if DEFAULT_ROW in self.solver_options:
            raise ConfigError("solver_options", f": the {DEFAULT_ROW!r} row takes no options "
                              "(it is the option-free call; sweep the solver it picks, with "
                              "options, beside it)")
        check_solver_names(self.solver_options, "solver_options")
        self._validate_grids()
        if not self.nfe or not all(_is_int(b, 1) for b in self.nfe):
            raise ConfigError("nfe", f"={list(self.nfe)!r} is invalid: expected integers >= 1")
        if any(not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0) for t in self.tols):
            raise ConfigError("tols", f"={list(self.tols)!r} is invalid: expected numbers > 0")
        if not _is_int(self.n, 2):
            raise ConfigError("n", f"={self.n!r} is invalid: expected an integer >= 2")
        if self.n_ref is not None and not _is_int(self.n_ref, 2):
            raise ConfigError("n_ref", f"={self.n_ref!r} is invalid: expected an integer >= 2")
        if self.reference_tol is not None and not (isinstance(self.reference_tol, (int, float))
                                                   and 0 < self.reference_tol < 1):
            raise ConfigError("reference_tol", f"={self.reference_tol!r} is invalid: expected "
                              "a number in (0, 1)")
        if not _is_int(self.timing_repeats, 0):
            raise ConfigError("timing_repeats", f"={self.timing_repeats!r} is invalid: "
                              "expected an integer >= 0")
        if self.reference_solver not in solver_names():
            raise ConfigError("reference_solver", f"={self.reference_solver!r} is unknown: "
                              f"expected one of {solver_names()}")

    def _validate_grids(self) -> None:
        for g in self.grids or []:
            if is_grid_spec(g):
                continue
            if not _is_grid_file(g):
                try:
                    parse_grid(str(g))   # raises, naming what is wrong with it
                except ValueError as e:
                    raise ConfigError("grids", f": {e}") from None
            tg = _load_tuned(g)
            if tg.solver not in self.solver_list():
                raise ConfigError("grids", f": {g} was tuned for solver {tg.solver!r}, "
                                  "which is not among the swept solvers: add it")

    def solver_list(self) -> list[str]:
        return list(self.solvers) if self.solvers else solver_names()

    def grid_list(self) -> list[str]:
        """The named grids swept (tuned-grid files are planned separately)."""
        named = [g for g in self.grids or [] if is_grid_spec(g)]
        return named if named or self.grids else list(BENCH_GRIDS)

    def tuned_grids(self) -> list[str]:
        """The tuned-grid files of ``grids``."""
        return [g for g in self.grids or [] if not is_grid_spec(g)]

    def options_of(self, name: str) -> dict[str, Any]:
        """The options the sweep gives solver ``name`` (a copy)."""
        return dict(self.solver_options.get(name, {}))


def _is_grid_file(g: str) -> bool:
    from ..tune import is_grid_file
    return bool(is_grid_file(g))


def _load_tuned(path: str) -> Any:
    from ..tune import TuneError, load_tuned_grid
    try:
        return load_tuned_grid(path)
    except TuneError as e:
        raise ConfigError("grids", f": {e}") from None


# ------------------------------------------------------------------ planning
@dataclass
class Plan:
    """The planned sweep: the configured solver of each swept name (built once; the cells of
    that configuration run it) and every cell, in a fixed order."""

    solvers: dict[str, Solver]
    cells: list[Cell]


def _label(name: str, options: Mapping[str, Any]) -> str:
    if not options:
        return name
    return name + "(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


def _build(name: str, options: Mapping[str, Any], **tolerance: float) -> Solver:
    try:
        return get_solver(name, **options, **tolerance)
    except (TypeError, ValueError) as e:
        raise ConfigError("solver_options", f" for {name!r}: {e}") from e


def steps_for_budget(solver: Solver, budget: int) -> tuple[int | None, int | None, str]:
    """``(steps, expected_nfe, reason)``: the most steps whose expected NFE fits ``budget``;
    steps None (with the reason) when even the minimum number of steps does not fit."""
    def cost(s: int) -> int:
        e = solver.expected_nfe(s)
        return s * max(solver.nfe_per_step, 1) if e is None else int(e)

    lo = max(solver.min_steps, 1)
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


def _identity(name: str, options: dict[str, Any], slv: Solver) -> dict[str, Any]:
    """The fields a configuration's cells share."""
    meta = slv.describe()
    return {"solver": name, "label": _label(name, options), "options": options,
            "family": meta.get("family"), "kind": meta.get("kind"), "order": meta.get("order"),
            "adaptive": bool(slv.adaptive)}


def _solver_cells(config: SweepConfig, name: str, slv: Solver) -> list[Cell]:
    """The cells of one solver configuration: one per tolerance for an adaptive solver (unless
    its options fix the tolerance), else one per grid and budget (a grid-free solver, a learned
    operator, runs on its own default grid only)."""
    opts = config.options_of(name)
    base = _identity(name, opts, slv)
    if slv.adaptive and config.tols and "rtol" not in opts and "atol" not in opts:
        return [Cell(**base, id=f"{base['label']}/tol={tol:g}", grid=None, budget=None,
                     tol=float(tol), steps=None, expected_nfe=None,
                     built=_build(name, opts, rtol=float(tol), atol=float(tol)))
                for tol in config.tols]
    grids = [slv.default_grid] if slv.grid_free else config.grid_list()
    return [_budget_cell(base, slv, grid, int(budget)) for grid in grids for budget in config.nfe]


def _budget_cell(base: dict[str, Any], slv: Solver, grid: str, budget: int) -> Cell:
    cell = Cell(**base, id=f"{base['label']}/{grid}/nfe={budget}", grid=grid, budget=budget,
                tol=None, steps=None, expected_nfe=None, built=slv)
    if slv.grid_free and slv.expected_nfe(1) != budget:
        cell.status = "skipped"
        cell.reason = f"{base['solver']!r} always costs {slv.expected_nfe(1)} NFE"
    elif slv.adaptive:  # its tolerance fixed by its options: steps from the budget
        steps = budget // max(slv.nfe_per_step, 1)
        cell.steps = steps
        cell.note = "adaptive backend: steps = budget // nfe_per_step, NFE measured"
        if steps < max(slv.min_steps, 1):
            cell.status = "skipped"
            cell.reason = (f"budget {budget} NFE gives {steps} steps, below the minimum "
                           f"{max(slv.min_steps, 1)}")
    else:
        cell.steps, cell.expected_nfe, cell.note = steps_for_budget(slv, budget)
        if cell.steps is None:
            cell.status, cell.reason, cell.note = "skipped", cell.note, ""
    return cell


def default_cells(config: SweepConfig) -> list[Cell]:
    """The option-free row (:data:`DEFAULT_ROW`): one cell per budget N, running ``sample(sde,
    model, x, steps=N)`` (the rule's solver, ``unipc_bh2``, costs one NFE a step); its grid
    column reads ``rule``, and its note, once run, what the rule picked."""
    slv = _build(DEFAULT_SOLVER, {})
    base = {**_identity(DEFAULT_ROW, {}, slv), "family": DEFAULT_ROW_DESCRIPTION["family"],
            "order": None}
    return [Cell(**base, id=f"{DEFAULT_ROW}/rule/nfe={b}", grid="rule", budget=int(b), tol=None,
                 steps=int(b) // slv.nfe_per_step, expected_nfe=int(b), built=slv)
            for b in config.nfe]


def _rule_note(sde: Any, steps: int) -> str:
    """What the option-free rule runs at ``steps`` steps on ``sde``."""
    r = default_config(sde, steps)
    return (f"option-free rule: {_label(r['solver'], r['options'])} on "
            f"{_label(r['grid'], r['grid_options'])}")


def tuned_cells(config: SweepConfig, solvers: Mapping[str, Solver] | None = None) -> list[Cell]:
    """One cell per tuned-grid file of ``config.grids``, for the swept solver configuration it
    was tuned for (``solvers[name]`` where given), at its NFE: its own row (label
    ``<solver> [tuned]``), marked ``tuned``. A file tuned with other options than the sweep
    gives that solver is a skipped cell saying so."""
    from ..tune import solver_config
    cells = []
    for path in config.tuned_grids():
        tg = _load_tuned(path)
        name = tg.solver
        opts = config.options_of(name)
        slv = solvers[name] if solvers is not None else _build(name, opts)
        digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:8]
        base = {**_identity(name, opts, slv), "adaptive": False}
        base["label"] += " [tuned]"
        cell = Cell(**base, id=f"{base['label']}/tuned:{Path(path).name}@{digest}/nfe={tg.nfe}",
                    grid=f"tuned:{Path(path).name}", grid_file=str(path), tuned=True,
                    budget=tg.nfe, tol=None, steps=tg.steps,
                    expected_nfe=tg.record.get("measured_nfe"), note=f"tuned grid {path}",
                    built=slv)
        if solver_config(name, opts) != tg.record["solver_options"]:
            cell.status = "skipped"
            cell.reason = (f"{path} was tuned for {name} with options {tg.solver_options}, the "
                           f"sweep runs it with {opts}")
        cells.append(cell)
    return cells


def make_plan(config: SweepConfig) -> Plan:
    """Build each swept solver configuration once (a :class:`ConfigError` on bad options) and
    plan every cell: its steps, or skipped with the reason."""
    solvers = {name: _build(name, config.options_of(name)) for name in config.solver_list()
               if name != DEFAULT_ROW}
    cells = [c for name in config.solver_list() for c in (
        default_cells(config) if name == DEFAULT_ROW else _solver_cells(config, name,
                                                                        solvers[name]))]
    return Plan(solvers, cells + tuned_cells(config, solvers))


def plan_cells(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep in a fixed order (:func:`make_plan`'s cells)."""
    return make_plan(config).cells


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
    x_init = _initial_states(problem, config)
    heldout = _heldout(problem, config)
    if problem.flow is not None:  # the reference PF-ODE solution from the same initial states
        x_ref = problem.flow(x_init.double()).double()
        reference: dict[str, Any] = {"method": "exact PF-ODE flow map"}
    else:
        x_ref, reference = _cached_reference(problem, config, x_init, cdir / "reference.pt",
                                             rank, world_size, timeout)
    target, method = _target(problem, heldout)
    bandwidth = sliced = kyy = None
    if heldout is not None:
        heldout = heldout.reshape(heldout.shape[0], -1).double()
        bandwidth = M.median_bandwidth(heldout)
        kyy = M.mmd_self_term(heldout, bandwidth)
        sliced = M.SlicedReference(heldout, config.projections, config.seed + 2)
    teacher_macs = network_macs_per_sample(problem.model, x_init, problem.sde.T)
    return Prepared(problem, x_init, x_ref, reference, heldout, target, method, bandwidth,
                    sliced, cdir, kyy, teacher_macs)


def _initial_states(problem: BenchProblem, config: SweepConfig) -> Tensor:
    x_init = problem.sample_init(config.n, torch.Generator().manual_seed(config.seed))
    if not isinstance(x_init, Tensor) or x_init.ndim < 2 or x_init.shape[0] != config.n:
        shape = tuple(x_init.shape) if isinstance(x_init, Tensor) else type(x_init).__name__
        raise BenchError(f"problem {problem.name!r}: sample_init({config.n}, generator) returned "
                         f"{shape}: expected a Tensor of shape ({config.n}, *event_shape)")
    return x_init.to(torch.float32) if not x_init.is_floating_point() else x_init


def _heldout(problem: BenchProblem, config: SweepConfig) -> Tensor | None:
    """Held-out samples of the target law (None where the problem has none)."""
    n_ref = config.n_ref or config.n
    ho = problem.heldout
    if callable(ho):
        return ho(n_ref, torch.Generator().manual_seed(config.seed + 1))
    if isinstance(ho, Tensor):
        return ho[:n_ref]
    return None


def _target(problem: BenchProblem, heldout: Tensor | None
            ) -> tuple[tuple[Tensor, Tensor] | None, str]:
    """The target law (mean, covariance) of the Frechet distance and KL, and where it is from."""
    if problem.target_gaussian is not None and problem.features is None:
        mean, cov = (torch.as_tensor(v, dtype=torch.float64) for v in problem.target_gaussian)
        return (mean, cov), "exact Gaussian" if problem.gaussian_target else "exact moments"
    if heldout is not None and heldout.shape[0] >= 2:
        feats = problem.features(heldout) if problem.features is not None else heldout
        return M.fit_gaussian(feats), "fit to held-out samples"
    return None, "none"


def _cached_reference(problem: BenchProblem, config: SweepConfig, x_init: Tensor, path: Path,
                      rank: int, world_size: int, timeout: float
                      ) -> tuple[Tensor, dict[str, Any]]:
    """The converged reference solve, loaded from ``path`` (written by rank 0, which the other
    ranks wait for) or computed and saved there; a file that fails to load is recomputed."""
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
            warnings.warn(f"{e}; recomputing it", stacklevel=3)
            x_ref = None
    if x_ref is None:
        x_ref, reference = _reference_solve(problem, config, x_init)
        save_verified(path, {"x": x_ref, "info": json.dumps(reference)})
    return x_ref, {**reference, "cached_at": str(path)}


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


def divergence(prep: Prepared, metrics: Metrics) -> str | None:
    """Why finite output counts as diverged, or None: an error far above the data's scale,
    ``DIVERGENCE_FACTOR`` (10) times it. For the RMS error the scale is the reference solution's
    per-coordinate RMS size; the FD is a squared distance, so it is compared with 10^2 times the
    target's second moment ``E|x|^2`` (a sampler returning zeros has FD about ``E|x|^2``; at 100x
    the law is ten times further from the target than the data from the origin)."""
    f = DIVERGENCE_FACTOR
    if metrics.rms is not None and prep.x_ref is not None:
        scale = float(prep.x_ref.double().pow(2).mean().sqrt())
        if metrics.rms > f * scale:
            return (f"RMS error {metrics.rms:.3g} > {f:g}x the reference's RMS size "
                    f"{scale:.3g}")
    if metrics.fd is not None and prep.target is not None:
        mean, cov = prep.target
        second = float(mean.double().pow(2).sum() + torch.diagonal(cov.double()).sum())
        if metrics.fd > f * f * second:
            return f"FD {metrics.fd:.3g} > {f * f:g}x the target's E|x|^2 {second:.3g}"
    return None


def evaluate(prep: Prepared, x: Tensor, stochastic: bool) -> Metrics:
    """All metrics of the samples ``x`` (same rows as ``prep.x_init``)."""
    p = prep.problem
    out = Metrics()
    if prep.x_ref is not None and not stochastic:
        out.rms = M.rms_error(x, prep.x_ref)
    flat = x.reshape(x.shape[0], -1).double()
    if prep.target is not None:
        exact = None  # the output law exactly: a linear map of Gaussian initial states
        if p.linear and p.init_gaussian is not None and p.features is None and not stochastic:
            exact = M.affine_gaussian_law(prep.x_init, flat, *p.init_gaussian)
        if exact is not None:
            m, S, how = exact[0], exact[1], "exact"
        else:
            feats = p.features(x).reshape(x.shape[0], -1).double() if p.features else flat
            (m, S), how = M.fit_gaussian(feats), "fit"
        out.fd, out.fd_method = M.frechet_distance(m, S, *prep.target), how
        if p.gaussian_target and (how == "exact" or flat.shape[0] > flat.shape[1] + 1):
            out.kl, out.kl_method = _finite(M.gaussian_kl(m, S, *prep.target)), how
    if prep.heldout is not None and prep.sliced is not None:
        out.sw = prep.sliced.distance(flat)
        out.mmd = M.mmd(flat, prep.heldout, prep.bandwidth, prep.kyy)
    return out


def _notes(cell: Cell, nfe: int) -> str:
    """The planned note, plus where the measured NFE is not the declared one or over budget."""
    notes = [cell.note]
    if cell.expected_nfe is not None and nfe != cell.expected_nfe:
        notes.append(f"measured NFE {nfe} != declared {cell.expected_nfe}")
    if cell.budget is not None and nfe > cell.budget:
        notes.append(f"measured NFE {nfe} exceeds the budget {cell.budget}")
    return "; ".join(n for n in notes if n)


def compute_cell(prep: Prepared, cell: Cell | Mapping[str, Any], config: SweepConfig) -> Cell:
    """Run one cell's solve and measure it: the cell with its :class:`~sdekit.bench.cells.Run`
    and :class:`~sdekit.bench.cells.Metrics`. Bad combinations (e.g. a grid a solver rejects)
    give status ``skipped`` with the solver's message; NaN/Inf or an error far above the data's
    scale (:func:`divergence`) gives ``diverged`` (metrics kept); anything else unexpected
    ``error``."""
    cell = Cell.from_dict(cell)
    if cell.solver == DEFAULT_ROW:
        cell = replace(cell, note=_rule_note(prep.problem.sde, cell.steps or 1))
    try:
        slv, solve = cell_solve(prep, cell, config)
        with count_macs() as macs:
            t0 = time.perf_counter()
            sol = solve()
            wall = time.perf_counter() - t0
    except ModelOutputError as e:
        return replace(cell, status="diverged", reason=str(e))
    except ValueError as e:
        return replace(cell, status="skipped", reason=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001  (one bad cell must not end the sweep)
        return replace(cell, status="error", reason=f"{type(e).__name__}: {e}")
    n = prep.x_init.shape[0]
    run = Run(nfe=int(sol.nfe), wall_s=wall, ms_per_sample=1000.0 * wall / n,
              macs_per_sample=macs.macs / n,
              passes=macs.macs / n / prep.teacher_macs if prep.teacher_macs else None)
    res = replace(cell, status="ok", steps=int(sol.steps), run=run, note=_notes(cell, run.nfe))
    if not bool(torch.isfinite(sol.x).all()):
        res.status, res.reason = "diverged", "the solution contains NaN or Inf"
        return res
    res.metrics = evaluate(prep, sol.x, bool(slv.stochastic))
    why = divergence(prep, res.metrics)
    if why:
        res.status, res.reason = "diverged", why
    return res


def build_solver(cell: Cell) -> Solver:
    """A cell's solver from its name, options and tolerance (for a cell read back from JSON;
    planned cells hold theirs)."""
    tol = {} if cell.tol is None else {"rtol": cell.tol, "atol": cell.tol}
    if cell.solver == DEFAULT_ROW:
        return _build(DEFAULT_SOLVER, {})
    return _build(cell.solver, cell.options, **tol)


def cell_solve(prep: Prepared, cell: Cell | Mapping[str, Any], config: SweepConfig
               ) -> tuple[Solver, Callable[[], Any]]:
    """The cell's solver and a function running its solve (the Solution)."""
    cell = Cell.from_dict(cell)
    slv = cell.built if cell.built is not None else build_solver(cell)
    p = prep.problem
    if cell.solver == DEFAULT_ROW:   # the option-free call itself
        return slv, lambda: sample(p.sde, p.model, prep.x_init, seed=config.seed,
                                   float64=config.float64, steps=cell.steps or 1)
    return slv, lambda: sample(p.sde, p.model, prep.x_init, solver=slv, seed=config.seed,
                               float64=config.float64, steps=cell.steps or 1,
                               grid=cell.grid_file or cell.grid)


def time_cells(prep: Prepared, cells: Sequence[Cell], config: SweepConfig,
               progress: bool = False) -> None:
    """Side-by-side wall time: ``config.timing_repeats`` rounds, each solving every ok cell
    once more (the order rotated by one cell per round, so no cell always runs first or after
    the same neighbour), in this process, without the MAC counter; sets each timed cell's
    :class:`~sdekit.bench.cells.Timing` (``ms_min``, ``ms_median`` per sample,
    ``timing_repeats``) and ``timing_error`` where a solve failed."""
    ok = [c for c in cells if c.status == "ok"]
    if not ok or config.timing_repeats <= 0:
        return
    times: dict[str, list[float]] = {c.id: [] for c in ok}
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
                    times[c.id].append(1000.0 * (time.perf_counter() - t0) / n)
                except Exception as e:  # noqa: BLE001  (it ran once already: note it, go on)
                    failed[c.id] = f"{type(e).__name__}: {e}"
                bar.update(1)
    finally:
        bar.close()
    for c in ok:
        ts = sorted(times[c.id])
        if c.id in failed:
            c.timing_error = failed[c.id]
        if ts:
            c.timing = Timing(ms_min=ts[0], ms_median=statistics.median(ts),
                              timing_repeats=len(ts))


# ------------------------------------------------------------------ the cell cache
class CellCache:
    """Finished cells on disk, one JSON file each: ``<directory>/<sha1(id)[:16]>.json``, the
    cell's :meth:`~sdekit.bench.cells.Cell.to_dict` plus the ``run_id`` and the ``code``
    fingerprint (:func:`solver_code_fingerprint`) it was computed with. A file is used only
    for the same cell id and code, and (with ``resume=False``) from this run."""

    def __init__(self, directory: Path, run_id: str, resume: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.run_id, self.resume = directory, run_id, resume
        self._codes: dict[str, str] = {}

    def path(self, cell: Cell) -> Path:
        return self.directory / (hashlib.sha1(cell.id.encode()).hexdigest()[:16] + ".json")

    def code(self, cell: Cell) -> str:
        if cell.label not in self._codes:
            self._codes[cell.label] = solver_code_fingerprint(cell.solver, cell.options)
        return self._codes[cell.label]

    def load(self, cell: Cell) -> Cell | None:
        """The cached result of ``cell`` (running the planned cell's solver), or None."""
        try:
            with open(self.path(cell)) as f:
                d = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict) or d.get("id") != cell.id \
                or (not self.resume and d.get("run_id") != self.run_id) \
                or d.get("code") != self.code(cell):
            return None  # another cell, a stale run, or the solver's code changed since
        try:
            res = Cell.from_dict({k: v for k, v in d.items() if k not in ("run_id", "code")})
        except ValueError:
            return None
        res.built = cell.built
        return res

    def store(self, res: Cell) -> None:
        atomic_write_json(self.path(res), {**res.to_dict(), "run_id": self.run_id,
                                           "code": self.code(res)})


# ------------------------------------------------------------------ the sweep
def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise BenchError(f"environment variable {name}={v!r} is invalid: expected an "
                         "integer") from None


def fingerprint_files(name: str) -> list[str]:
    """The source files a cell of solver ``name`` depends on: the solver's module and its base
    classes' modules, the driver, the metrics, and what every solve runs through: the noise
    sources, the grids, the forward processes and the model contract."""
    cls = type(get_solver(DEFAULT_SOLVER if name == DEFAULT_ROW else name))
    files = {inspect.getsourcefile(k) for k in cls.__mro__ if k.__module__.startswith("sdekit")}
    if name == DEFAULT_ROW:   # the rule lives beside the registry
        files.add(inspect.getsourcefile(default_config))
    files |= {inspect.getsourcefile(_driver), inspect.getsourcefile(M)}
    root = Path(inspect.getsourcefile(_driver) or ".").parent
    files |= {str(root / f) for f in ("noise.py", "grids.py", "_utils.py")}
    files |= {str(f) for d in ("sde", "dynamics") for f in (root / d).glob("*.py")}
    return sorted(f for f in files if f)


def solver_code_fingerprint(name: str, options: Mapping[str, Any] | None = None) -> str:
    """A hash of the code a cell's result depends on: the solver's module (and its base
    classes' modules), the driver, the metrics, the cell's solve and evaluation and the cell
    schema, plus the contents of any file an option names (a learned operator's checkpoint), so
    a cached cell is recomputed when any of them changes."""
    h = hashlib.sha1(__version__.encode())
    h.update("".join(inspect.getsource(f) for f in (evaluate, compute_cell, divergence, _notes,
                                                    cell_solve, build_solver, _schema)).encode())
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
    """Run (or resume) the sweep; returns the merged results (the JSON document of
    :func:`sweep_document`) on rank 0 and None on other ranks.

    ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment variables.
    Before any work: the plan (a :class:`ConfigError` for bad solver options), and a learned
    operator given as a solver option is checked against the problem's model (its teacher).
    Each rank holds an exclusive lock on the cache directory (``.bench.lock``,
    ``.bench.rank<r>.lock`` for rank r > 0) while it runs: a second sweep on the same cache
    raises a :class:`CacheBusyError` naming the directory and the holder."""
    plan = make_plan(config)
    _check_teachers(plan, problem)
    rank, world = _ranks(rank, world_size)
    lock = Path(cache_dir) / (".bench.lock" if not rank else f".bench.rank{rank}.lock")
    try:
        with exclusive_lock(lock):
            return _sweep(problem, config, plan, Path(cache_dir), resume=resume,
                          progress=progress, rank=rank, world=world, timeout=timeout)
    except LockedError as e:
        raise CacheBusyError(f"the cache directory {str(cache_dir)!r} is in use by another "
                             f"sdekit bench ({e}): wait for it to finish, or use another cache "
                             "directory") from None


def _check_teachers(plan: Plan, problem: BenchProblem) -> None:
    for name, slv in plan.solvers.items():
        if hasattr(slv, "check_teacher"):   # a learned operator: distilled from this model?
            try:
                slv.check_teacher(problem.model)
            except ValueError as e:
                raise ConfigError("solver_options", f" of {name!r} (its operator): {e}") \
                    from None


def _ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    r = _env_int("RANK", 0) if rank is None else rank
    w = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    if not (w >= 1 and 0 <= r < w):
        raise BenchError(f"RANK={r}, WORLD_SIZE={w} is invalid: expected 0 <= RANK < "
                         "WORLD_SIZE")
    return r, w


def _sweep(problem: BenchProblem, config: SweepConfig, plan: Plan, cache_dir: Path, *,
           resume: bool, progress: bool, rank: int, world: int, timeout: float
           ) -> dict[str, Any] | None:
    """prepare -> this rank's cells (cache) -> [rank 0] merge -> timing -> document."""
    t_start = time.perf_counter()
    prep = _prepare_shown(problem, config, cache_dir, rank, world, timeout, progress and rank == 0)
    cache = CellCache(prep.cache_dir / "cells", os.environ.get("TORCHELASTIC_RUN_ID", "local"),
                      resume)
    runnable = [c for c in plan.cells if c.status == "planned"]
    desc = f"bench {problem.name}" + (f" [rank {rank}/{world}]" if world > 1 else "")
    done = compute_cells(prep, config, runnable[rank::world], cache, progress, desc)
    if rank != 0:
        return None
    if world > 1:
        _wait_for_ranks([c for i, c in enumerate(runnable) if i % world != 0], cache, timeout)
    cells = merge_cells(plan.cells, done, cache)
    time_cells(prep, cells, config, progress)
    return sweep_document(prep, config, plan, cells, world=world, computed=len(done),
                          t_start=t_start)


def _prepare_shown(problem: BenchProblem, config: SweepConfig, cache_dir: Path, rank: int,
                   world: int, timeout: float, show: bool) -> Prepared:
    """:func:`prepare`, saying what it does and how long it took (``show``)."""
    nfe = getattr(problem.model, "nfe", None)  # a model without a call counter shows no count
    how = ("the exact reference (flow map)" if problem.flow is not None else
           f"the reference solution ({config.reference_solver}: a converged solve plus one 100x "
           "looser to estimate its error; loaded instead when cached)")
    _say(show, f"bench {problem.name}: n={config.n} samples per cell; preparing the initial "
               f"states, held-out data and {how}")
    with _phase(f"prepare {problem.name}", show,
                (lambda: int(problem.model.nfe)) if isinstance(nfe, int) else None) as phase:
        prep = prepare(problem, config, cache_dir, rank, world, timeout)
    _say(show, describe_reference(prep.reference) + f" [{phase['elapsed']:.1f} s]")
    return prep


def compute_cells(prep: Prepared, config: SweepConfig, cells: Sequence[Cell], cache: CellCache,
                  progress: bool = False, desc: str = "bench") -> dict[str, Cell]:
    """Compute the ``cells`` not in the cache (all of them with ``cache.resume`` False),
    caching each result except errors; returns the computed results by cell id."""
    todo = [c for c in cells if not cache.resume or cache.load(c) is None]
    done: dict[str, Cell] = {}
    from tqdm.auto import tqdm
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), disable=not progress,
               desc=desc, unit="cell", dynamic_ncols=True)
    try:
        for c in todo:
            bar.set_postfix_str(c.id, refresh=False)
            res = compute_cell(prep, c, config)
            if res.status != "error":
                cache.store(res)
            else:
                bar.write(f"error in cell {c.id}: {res.reason}")
            done[c.id] = res
            bar.update(1)
    finally:
        bar.close()
    return done


def _wait_for_ranks(others: Sequence[Cell], cache: CellCache, timeout: float) -> None:
    """Wait until the other ranks' cells are in the cache (this run's, with ``resume`` False)."""
    _wait_for([cache.path(c) for c in others], timeout, "cell results",
              ok=lambda p: p.stat().st_size > 0)
    if not cache.resume:  # fresh run: wait for this run's results, not stale ones
        t0 = time.monotonic()
        while any(cache.load(c) is None for c in others):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("timed out waiting for the other ranks' cells")
            time.sleep(0.5)


def merge_cells(planned: Sequence[Cell], done: Mapping[str, Cell], cache: CellCache
                ) -> list[Cell]:
    """Every cell of the plan, in its order: cells skipped at planning as they are, the others
    computed here (``done``) or by another rank or an earlier run (the cache); an error cell
    where neither has it."""
    out = []
    for c in planned:
        if c.status != "planned":
            out.append(c)
            continue
        r = done.get(c.id) or cache.load(c)
        out.append(r if r is not None else
                   replace(c, status="error", reason="no result (cell failed on another rank?)"))
    return out


def sweep_document(prep: Prepared, config: SweepConfig, plan: Plan, cells: Sequence[Cell], *,
                   world: int = 1, computed: int = 0, t_start: float | None = None
                   ) -> dict[str, Any]:
    """The results of a sweep as one JSON document (``bench.json``, read by
    :mod:`sdekit.bench.report`): format, problem, reference, metric docs, cost, config,
    solvers, environment, summary and the cells (:meth:`~sdekit.bench.cells.Cell.to_dict`)."""
    ref_metrics = asdict(evaluate(prep, prep.x_ref.to(prep.x_init.dtype), False)) \
        if prep.x_ref is not None else {}
    status = [c.status for c in cells]
    p = prep.problem
    settings = {f.name: getattr(config, f.name) for f in fields(config)
                if f.name != "solver_options"}
    return {
        "format": BENCH_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "problem": {"name": p.name, "description": p.description, "fingerprint": p.fingerprint,
                    "sde": repr(p.sde), "shape": list(prep.x_init.shape[1:]),
                    "dim": int(prep.x_init[0].numel()), "t_start": p.sde.T, "t_end": p.sde.t_min,
                    "n": config.n, "n_ref": None if prep.heldout is None else
                    int(prep.heldout.shape[0]), "target": prep.target_method},
        "reference": {**prep.reference, "exact_model": p.exact_model, "metrics": ref_metrics,
                      "fit_floors": _fit_floors(prep)},
        "metrics": METRIC_DOCS,
        "cost": {"teacher_macs_per_sample": prep.teacher_macs,
                 "unit": "passes = MACs per sample / MACs of one pass of the problem's model "
                         "per sample (sdekit.bench.cost)",
                 "timing_repeats": config.timing_repeats},
        "config": {**settings, "solvers": config.solver_list(), "grids": config.grid_list(),
                   "solver_options": {k: dict(v) for k, v in config.solver_options.items()}},
        "solvers": {n: plan.solvers[n].describe() if n != DEFAULT_ROW else DEFAULT_ROW_DESCRIPTION
                    for n in config.solver_list()},
        "environment": {**environment(), "world_size": world},
        "summary": {"cells": len(cells), **{s: status.count(s) for s in
                    ("ok", "skipped", "diverged", "error")},
                    "computed_on_rank0": computed,
                    "wall_s": 0.0 if t_start is None else time.perf_counter() - t_start},
        "cells": [c.to_dict() for c in cells],
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


__all__ = ["SweepConfig", "ConfigError", "CacheBusyError", "check_solver_names", "Plan",
           "make_plan", "plan_cells", "tuned_cells", "steps_for_budget", "prepare", "Prepared",
           "evaluate", "compute_cell", "build_solver", "cell_solve", "time_cells", "divergence",
           "DIVERGENCE_RULE", "CellCache", "compute_cells", "merge_cells", "sweep_document",
           "run_sweep", "atomic_write_json", "BENCH_FORMAT", "DEFAULT_NFE", "DEFAULT_TOLS",
           "METRIC_DOCS", "Cell"]
