"""Tuned sampling: a time grid optimised for one solver at one NFE budget, and a solver search.

:func:`tune` finds the grid of a deterministic fixed-grid ODE solver that minimises the RMS error
of its end point against a converged reference solve, on a calibration batch of initial states
drawn from the prior with per-sample seeds:

1. **Reference** of the calibration and of a held-out batch (different seeds): a converged
   adaptive solve (``dopri5``) or an exact flow map.
2. **Named grids**: the solver's error on every grid of :data:`NAMED_GRIDS` (the baselines).
3. **Teacher**: a fine solve (``dpmpp_3m`` on the union of fine named grids, the *candidate*
   times) that records the calibration states at every candidate time.
4. **Dynamic programming** over the candidates, in the way of GITS (Chen et al. 2024) and
   OptimalSteps (Pei et al. 2025): the grid of ``steps`` intervals that minimises the summed local
   error of a first-order (DDIM / DPM-Solver++(1)) step between teacher states. First order is a
   proxy for every solver (a multistep solver's local error depends on its history); stage 5
   optimises the true error.
5. **Refinement** of the true end-point error by coordinate search (:func:`_coordinate_search`),
   from the DP grid and from the best named grid, keeping the better result: each interior
   point moves a fraction ``f_k`` of the way to a neighbour (in the half-logSNR lambda; in t
   towards a start where lambda = -inf), so the grid stays monotone with its ends fixed; a move is
   kept where it lowers the error, ``f_k`` doubles after a kept move and halves after a point fails
   in both directions.
6. **Selection** on the validation part of the calibration batch (``validation``, default the
   last half; stages 3-5 use the first half): the better refined grid or the best named grid.
7. **Held-out evaluation**: every number the result reports as *the* error is measured on the
   held-out batch; calibration errors are recorded beside them, and the ratio to the best named
   grid carries its paired-bootstrap 95% interval over the held-out states
   (:func:`ratio_interval`; wide on mixtures, whose RMS rests on a few states near a boundary
   between modes).

Every stage's result is saved atomically (:func:`sdekit._io.save_verified`) to a state file, and
after every refinement sweep, so an interrupted run resumes where it stopped and ends with the
same grid. The result (:class:`TunedGrid`) is a small JSON file that records the solver, its
options, the NFE, the forward process and the model it was tuned for; ``sample(grid=PATH)``,
``sdekit sample --grid FILE`` and ``sdekit bench --grids FILE`` accept it and refuse a mismatch.

:func:`search` ranks solvers x options x named grids (optionally with tuned grids for the best
few) on the calibration batch and reports each candidate's held-out error.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import content_hash, load_verified, save_verified
from ._utils import check_flags, check_float_dtype, check_seed, is_collection, is_int
from .dynamics.parameterization import DiffusionModel, as_model
from .grids import GRIDS, make_grid, validate_grid
from .integrate import sample
from .noise import SeededNoise, sample_seeds
from .sde.base import ForwardSDE
from .solvers.base import ModelOutputError, Solver
from .solvers.registry import (
    _REGISTRY,
    DEFAULT_LAMBDA_FLOOR,
    get_solver,
    option_parameters,
    solver_names,
)
from .tuned_grid import (  # noqa: F401
    TUNED_FORMAT,
    TunedGrid,
    TuneError,
    _diff,
    _json_norm,
    is_grid_file,
    load_tuned_grid,
    model_identity,
    sde_fingerprint,
    solver_config,
)

STATE_FORMAT = "sdekit-tune-state/1"
SEARCH_FORMAT = "sdekit-solver-search/1"

#: the named grids every tuned grid is compared with (and the solver search sweeps)
NAMED_GRIDS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("uniform", {}), ("quadratic", {}), ("logsnr", {}), ("karras", {}),
    ("polyexponential", {"rho": 2.0}), ("kl_optimal", {}),
    ("logsnr", {"lambda_floor": DEFAULT_LAMBDA_FLOOR}))   # the option-free default's grid
#: the fine grids whose union is the teacher's candidate times
CANDIDATE_GRIDS = ("uniform", "quadratic", "logsnr", "karras", "kl_optimal")


def _steps_for(slv: Solver, nfe: int) -> int:
    from .bench.runner import steps_for_budget
    steps, _, reason = steps_for_budget(slv, nfe)
    if steps is None:
        raise TuneError(f"nfe={nfe}: {reason}")
    return steps


def check_tunable(slv: Solver) -> None:
    """Only deterministic fixed-grid solvers have a grid whose end-point error can be tuned."""
    why = ("stochastic (its error against the probability-flow ODE is not a function of the "
           "grid alone)" if slv.stochastic else "adaptive (it picks its own steps)"
           if slv.adaptive else "grid-free (a learned operator)" if slv.grid_free else
           "runs its own loop" if slv.external_loop else None)
    if why:
        ok = [n for n in solver_names() if _tunable(n)]
        raise TuneError(f"solver {slv.name!r} cannot be tuned: it is {why}; tunable solvers: {ok}")


def _tunable(name: str) -> bool:
    s = get_solver(name)
    return not (s.stochastic or s.adaptive or s.grid_free or s.external_loop)


def _init_states(x: int | Tensor, seeds: Sequence[int] | None, seed: int, sde: ForwardSDE,
                 shape: Sequence[int] | None, dtype: torch.dtype, what: str
                 ) -> tuple[Tensor, list[int] | None]:
    """Initial states: a tensor as given, or ``x`` prior draws with per-sample seeds (as
    ``sample(shape=..., seeds=...)`` draws them)."""
    if isinstance(x, Tensor):
        if x.ndim < 2 or x.shape[0] < 2 or not x.is_floating_point():
            raise TuneError(f"{what}: expected a floating tensor of shape (n >= 2, ...), got "
                            f"{x.dtype} {tuple(x.shape)}")
        return x.to(dtype), None
    if not (isinstance(x, int) and not isinstance(x, bool) and x >= 2):
        raise TuneError(f"{what}={x!r} is invalid: expected an integer >= 2 (batch size) or a "
                        "tensor of initial states")
    if shape is None:
        raise TuneError(f"{what}={x}: give shape= (the event shape of one sample, e.g. (16,))")
    if not (is_collection(shape) and all(is_int(d) and d >= 1 for d in shape)):
        raise TuneError(f"shape={shape!r} is invalid: expected the event shape of one sample, a "
                        "tuple of integers >= 1 (e.g. (16,))")
    if seeds is not None and not is_collection(seeds):
        raise TuneError(f"{what} seeds={seeds!r} are invalid: expected a list of integer seeds, "
                        "one per sample")
    seeds = list(seeds) if seeds is not None else sample_seeds(seed, x)
    if len(seeds) != x:
        raise TuneError(f"{what}: {len(seeds)} seeds for a batch of {x}: expected one per sample")
    z = SeededNoise(seeds).randn(torch.empty((x, *shape), dtype=dtype))
    return z * sde.prior_std, seeds


def _check_reference(reference: Any) -> None:
    if not (callable(reference) or (isinstance(reference, str) and reference in solver_names()
                                    and get_solver(reference).adaptive)):
        raise TuneError(f"reference={reference!r} is invalid: expected an adaptive registry "
                        "solver (e.g. 'dopri5') or a callable exact flow map")


def _batches(sde: ForwardSDE, calibration: int | Tensor, seeds: Sequence[int] | None, seed: int,
             heldout: int | Tensor, heldout_seeds: Sequence[int] | None,
             heldout_seed: int | None, shape: Sequence[int] | None, dtype: torch.dtype
             ) -> tuple[Tensor, list[int] | None, Tensor, list[int] | None]:
    """The calibration and held-out batches of :func:`tune` and :func:`search` (held-out seeds
    default to ``seed + 1`` and must differ from the calibration ones, the event shapes must
    agree): ``(x_cal, cal_seeds, x_ho, ho_seeds)``."""
    check_float_dtype("dtype", dtype)
    check_seed("seed", seed)
    if heldout_seed is not None:
        check_seed("heldout_seed", heldout_seed)
    x_cal, cal_seeds = _init_states(calibration, seeds, seed, sde, shape, dtype, "calibration")
    ho_seed = seed + 1 if heldout_seed is None else heldout_seed
    x_ho, ho_seeds = _init_states(heldout, heldout_seeds, ho_seed, sde,
                                  shape if shape is not None else tuple(x_cal.shape[1:]),
                                  dtype, "heldout")
    if cal_seeds and ho_seeds and set(cal_seeds) & set(ho_seeds):
        raise TuneError("heldout seeds overlap the calibration seeds: held-out states must differ "
                        "(use another heldout_seed)")
    if x_ho.shape[1:] != x_cal.shape[1:]:
        raise TuneError(f"heldout states have event shape {tuple(x_ho.shape[1:])}, the "
                        f"calibration states {tuple(x_cal.shape[1:])}")
    return x_cal, cal_seeds, x_ho, ho_seeds


def prior_states(sde: ForwardSDE, n: int, shape: Sequence[int], seed: int = 0,
                 seeds: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``n`` initial states :func:`tune` draws for a batch: prior draws with per-sample seeds
    (``seeds``, default derived from ``seed``), as ``sample(shape=(n, *shape), seeds=...)``."""
    check_seed("seed", seed)
    return _init_states(n, seeds, seed, sde, shape, dtype, "n")[0]


def candidate_times(sde: ForwardSDE, per_grid: int) -> Tensor:
    """The union of the fine grids :data:`CANDIDATE_GRIDS` of ``per_grid`` steps, strictly
    decreasing in t and lambda (points closer than 1e-6 in lambda merged)."""
    ts = []
    for g in CANDIDATE_GRIDS:
        try:
            ts.append(make_grid(sde, g, per_grid))
        except ValueError:
            continue
    t = torch.unique(torch.cat(ts)).flip(0)
    lam = sde.lambda_(t).double()
    keep = [0]
    for i in range(1, t.numel()):
        if lam[i] - lam[keep[-1]] > 1e-6:
            keep.append(i)
        elif i == t.numel() - 1 and len(keep) > 1:  # keep the end point, drop its neighbour
            keep[-1] = i
    out = t[keep]
    out[0], out[-1] = sde.T, sde.t_min
    validate_grid(sde, out)
    return out


def dp_grid(alpha: Tensor, sigma: Tensor, states: Tensor, x0: Tensor, steps: int) -> list[int]:
    """Indices of the ``steps + 1`` candidate points (first and last included) minimising the
    summed RMS local error of a first-order data-prediction step (DPM-Solver++(1) = DDIM,
    ``x_j = sigma_j / sigma_i x_i + (alpha_j - sigma_j alpha_i / sigma_i) x0_i``) from teacher
    state ``states[i]`` to ``states[j]``: dynamic programming over ``cost[i, j]``."""
    M = states.shape[0]
    if steps > M - 1:
        raise TuneError(f"{steps} steps need more than the {M} candidate times: raise candidates")
    flat, x0f = states.reshape(M, -1), x0.reshape(M, -1)
    cost = torch.full((M, M), math.inf, dtype=torch.float64)
    for i in range(M - 1):
        r = (sigma[i + 1:] / sigma[i])[:, None]
        b = (alpha[i + 1:] - sigma[i + 1:] * alpha[i] / sigma[i])[:, None]
        pred = r * flat[i][None] + b * x0f[i][None]
        cost[i, i + 1:] = (pred - flat[i + 1:]).pow(2).mean(1).sqrt()
    best = torch.full((M,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(steps):
        tot = best[:, None] + cost
        best, arg = tot.min(0)
        back.append(arg)
    idx = [M - 1]
    for arg in reversed(back):
        idx.append(int(arg[idx[-1]]))
    return idx[::-1]


def _move(sde: ForwardSDE, times: Tensor, k: int, direction: int, f: float) -> Tensor:
    """Interior point ``k`` moved the fraction ``f`` of the way to its neighbour ``k + direction``
    in lambda (in t towards a neighbour where lambda = -inf)."""
    out = times.clone()
    nb = times[k + direction]
    lam = sde.lambda_(torch.stack([times[k], nb])).double()
    if math.isfinite(float(lam[1])):
        new = lam[0] + f * (lam[1] - lam[0])
        out[k] = sde.t_of_lambda(new.reshape(1)).reshape(())
    else:
        out[k] = times[k] + f * (nb - times[k])
    return out


# ------------------------------------------------------------------ tuning
class _NoNoise:
    """The noise source of the deterministic solves: drawing from it is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("a deterministic solver drew noise during tuning")

    def randn(self, *args: Any) -> Any:   # declared, so sample() sees a noise source
        return self.__getattr__("randn")

    def increment(self, *args: Any) -> Any:
        return self.__getattr__("increment")


_NO_NOISE = _NoNoise()


@dataclass
class _Run:
    """One tuning run's fixed inputs."""

    sde: ForwardSDE
    model: DiffusionModel
    solver: str
    options: dict[str, Any]
    steps: int
    dtype: torch.dtype
    progress: bool
    nfe_spent: int = 0
    evals: int = 0
    last_nfe: int = 0

    def solve(self, x: Tensor, times: Tensor) -> Tensor:
        n0 = self.model.nfe
        try:   # a deterministic solver draws no noise: one source for all solves
            return sample(self.sde, self.model, x, solver=self.solver, grid=times,
                          noise=_NO_NOISE, **self.options).x
        finally:
            self.last_nfe = self.model.nfe - n0
            self.nfe_spent += self.last_nfe
            self.evals += 1

    def error(self, x: Tensor, ref: Tensor, times: Tensor) -> float:
        """RMS error of the solver's end point on ``times`` (inf where it fails)."""
        e2 = self.state_errors(x, ref, times)
        return math.inf if e2 is None else float(e2.mean().sqrt())

    def state_errors(self, x: Tensor, ref: Tensor, times: Tensor) -> Tensor | None:
        """Each state's mean squared error of the end point on ``times`` (None where the solve
        fails or is not finite); :meth:`error` is the root of their mean."""
        try:
            out = self.solve(x, times)
        except (ModelOutputError, ValueError):
            return None
        e2 = (out.double() - ref.double()).pow(2).flatten(1).mean(1)
        return e2 if bool(torch.isfinite(e2).all()) else None


def _reference(run: _Run, x: Tensor, reference: str | Callable[[Tensor], Tensor],
               tol: float | None) -> tuple[Tensor, dict[str, Any]]:
    if callable(reference):
        return reference(x).double(), {"method": getattr(reference, "description",
                                                         "exact flow map (given)")}
    tol = tol or (1e-8 if x.dtype == torch.float64 else 1e-6)
    n0 = run.model.nfe
    out = sample(run.sde, run.model, x, solver=reference, rtol=tol, atol=tol, float64=True).x
    run.nfe_spent += run.model.nfe - n0
    return out.double(), {"method": f"{reference} rtol=atol={tol:g}", "nfe": run.model.nfe - n0}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _int_at_least(name: str, v: Any, lo: int) -> None:
    """Raise a :class:`TuneError` unless ``v`` is an integer (not a bool) >= ``lo``."""
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
        raise TuneError(f"{name}={v!r} is invalid: expected an integer >= {lo}")


def _tune_solver(solver: str, opts: dict[str, Any], nfe: int) -> tuple[dict[str, Any], int]:
    """The checked solver of :func:`tune`: its effective options and its steps at ``nfe``."""
    try:
        slv = get_solver(solver, **opts)
        cfg = solver_config(solver, opts)
    except (TypeError, ValueError) as e:
        raise TuneError(str(e)) from None
    check_tunable(slv)
    _int_at_least("nfe", nfe, 1)
    steps = _steps_for(slv, nfe)
    if steps < 2:
        raise TuneError(f"nfe={nfe} gives solver {solver!r} {steps} step: a grid of one step has "
                        "nothing to tune (its ends are fixed); expected a budget of >= 2 steps")
    return cfg, steps


def _check_files(**paths: str | os.PathLike | None) -> None:
    """Raise a TuneError for a path that is a directory where a file is written."""
    for name, path in paths.items():
        if path is not None and os.path.isdir(path):
            raise TuneError(f"{name}={str(path)!r} is a directory: expected the path of a file "
                            "(e.g. grid.json)")


def _check_tune_limits(candidates: int, max_sweeps: int, teacher_factor: int, min_move: float,
                       validation: float, polish: int = 0) -> None:
    """Check the search limits and the validation fraction of :func:`tune`."""
    for name, v, lo in (("candidates", candidates, 4), ("max_sweeps", max_sweeps, 0),
                        ("teacher_factor", teacher_factor, 1), ("polish", polish, 0)):
        _int_at_least(name, v, lo)
    if not (isinstance(min_move, (int, float)) and 0 < min_move < 0.5):
        raise TuneError(f"min_move={min_move!r} is invalid: expected a number in (0, 0.5)")
    if not (isinstance(validation, (int, float)) and 0 <= validation < 1):
        raise TuneError(f"validation={validation!r} is invalid: expected a fraction in [0, 1)")


def _split_calibration(x_cal: Tensor, x_ho: Tensor, validation: float) -> tuple[int, int]:
    """The checked split of the calibration batch: ``(n_fit, n_val)`` states."""
    if x_cal.shape == x_ho.shape and bool((x_cal == x_ho).all(dim=tuple(range(1, x_cal.ndim)))
                                           .any()):
        raise TuneError("heldout and calibration batches share initial states: they must differ")
    n_val = round(validation * x_cal.shape[0])
    n_fit = x_cal.shape[0] - n_val
    if n_fit < 2 or (validation and n_val < 2):
        raise TuneError(f"calibration batch of {x_cal.shape[0]} with validation={validation:g} "
                        f"leaves {n_fit} states to fit and {n_val} to validate: expected >= 2 "
                        "each (a larger calibration batch, or validation=0)")
    return n_fit, n_val


def _load_state(state: str | os.PathLike | None, fresh: bool, key: dict[str, Any],
                key_json: str, progress: bool) -> dict[str, Any]:
    """The saved state of this tuning run (empty when there is none or ``fresh``)."""
    if state is None or not os.path.exists(state) or fresh:
        return {}
    st: dict[str, Any] = load_verified(state, "tuning state")
    if st.get("key") != key_json:
        old = json.loads(st.get("key", "{}"))
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != _json_norm(key).get(k))
        raise TuneError(f"state file {str(state)!r} belongs to another tuning run (it "
                        f"differs in {diff}): delete it, pass another state/out, or fresh="
                        "True (--fresh)")
    _say(progress, f"tune: resuming from {state} (stage {st.get('stage')})")
    return st


@dataclass
class _Tuning:
    """One tuning run's batches and resumable state ``st`` (``save`` writes it per stage)."""

    run: _Run
    nfe: int
    x_cal: Tensor
    x_ho: Tensor
    n_fit: int
    n_val: int
    st: dict[str, Any]
    key_json: str
    state: str | os.PathLike | None
    t_wall: float

    def __post_init__(self) -> None:
        self.spent = dict(self.st.get("spent", {"nfe": 0, "wall_s": 0.0, "evals": 0}))
        self.fit, self.val = slice(0, self.n_fit), slice(self.n_fit, None)

    def save(self, stage: str, **kw: Any) -> None:
        """Record ``kw`` and the cost so far as ``stage`` and write the state file (if any)."""
        st, spent, run = self.st, self.spent, self.run
        st.update(kw, stage=stage, key=self.key_json)
        st["spent"] = {"nfe": spent["nfe"] + run.nfe_spent, "evals": spent["evals"] + run.evals,
                       "wall_s": spent["wall_s"] + time.perf_counter() - self.t_wall}
        if self.state is not None:
            save_verified(self.state, st)


def _stage_references(tu: _Tuning, reference: str | Callable[[Tensor], Tensor],
                      reference_tol: float | None) -> None:
    """Stage 1: the converged reference solves of the calibration and held-out batches."""
    if "ref_cal" in tu.st:
        return
    run = tu.run
    _say(run.progress, f"tune {run.solver} @ {tu.nfe} NFE ({run.steps} steps): reference solves")
    ref_cal, rinfo = _reference(run, tu.x_cal, reference, reference_tol)
    ref_ho, _ = _reference(run, tu.x_ho, reference, reference_tol)
    tu.save("reference", ref_cal=ref_cal, ref_ho=ref_ho, ref_info=json.dumps(rinfo))


def _stage_named(tu: _Tuning) -> dict[str, Any]:
    """Stage 2: the solver's errors on every grid of :data:`NAMED_GRIDS` (by label)."""
    if "named" not in tu.st:
        run, st, fit, val = tu.run, tu.st, tu.fit, tu.val
        x_cal, ref_cal = tu.x_cal, st["ref_cal"]
        named = {}
        for g, gopt in NAMED_GRIDS:
            label = g if not gopt else g + "(" + ",".join(f"{k}={v}" for k, v in gopt.items()) + ")"
            try:
                t = make_grid(run.sde, g, run.steps, **gopt)
            except ValueError:
                continue
            named[label] = {"grid": g, "options": gopt,
                            "fit_rms": run.error(x_cal[fit], ref_cal[fit], t),
                            "validation_rms": run.error(x_cal[val], ref_cal[val], t)
                            if tu.n_val else None,
                            "heldout_rms": run.error(tu.x_ho, st["ref_ho"], t),
                            "times": t.tolist()}
        tu.save("named", named=json.dumps(named))
    out: dict[str, Any] = json.loads(tu.st["named"])
    return out


def _stage_teacher(tu: _Tuning, teacher: str, candidates: int, teacher_factor: int) -> None:
    """Stage 3: the teacher's states and x0 predictions at the candidate times."""
    if "teacher_states" in tu.st or "dp_times" in tu.st:
        return
    run, sde, dm, x = tu.run, tu.run.sde, tu.run.model, tu.x_cal[tu.fit]
    _say(run.progress, f"tune: teacher ({teacher}) on the candidate times")
    cand = candidate_times(sde, candidates)
    fine = _refine_times(sde, cand, teacher_factor)
    n0 = dm.nfe
    sol = sample(sde, dm, x, solver=teacher, grid=fine, save_at=cand.tolist(), float64=True)
    states = torch.stack([sol.trajectory[float(t)] for t in cand]).double()
    with torch.no_grad():
        x0 = torch.stack([dm.predict(states[i].to(run.dtype), torch.tensor(float(t)), "x0")
                          .double() for i, t in enumerate(cand)])
    run.nfe_spent += dm.nfe - n0
    teacher_rms = float((states[-1] - tu.st["ref_cal"][tu.fit]).pow(2).mean().sqrt())
    tu.save("teacher", teacher_states=states, teacher_x0=x0, cand=cand, teacher_rms=teacher_rms)


def _stage_dp(tu: _Tuning, named: dict[str, Any], best_label: str) -> None:
    """Stage 4: the DP grid, and the two starts of the refinement (DP and best named grid)."""
    st, run, steps, sde = tu.st, tu.run, tu.run.steps, tu.run.sde
    if "dp_times" in st:
        return
    cand = st["cand"]
    idx = dp_grid(sde.alpha(cand).double(), sde.sigma(cand).double(), st["teacher_states"],
                  st["teacher_x0"], steps)
    dp_times = cand[idx].clone()
    dp_err = run.error(tu.x_cal[tu.fit], st["ref_cal"][tu.fit], dp_times)
    named_t = torch.tensor(named[best_label]["times"], dtype=torch.float64)
    _say(run.progress, f"tune: DP grid fit RMS {dp_err:.3e}, best named grid "
                       f"{best_label} {named[best_label]['fit_rms']:.3e}")
    st.pop("teacher_states"), st.pop("teacher_x0")   # not needed any more: keep it small
    # two starts, each refined: the DP grid and the best named grid
    starts = [(dp_times, dp_err), (named_t, named[best_label]["fit_rms"])]
    runs = [{"cur": t, "cur_err": e, "start_err": e, "fk": [0.25] * (steps - 1),
             "dk": [1] * (steps - 1), "sweeps": 0, "trace": []} for t, e in starts]
    tu.save("dp", dp_times=dp_times, dp_err=dp_err, runs=runs)


def _stage_refine(tu: _Tuning, max_sweeps: int, min_move: float) -> None:
    """Stage 5: the coordinate search from each start (with a tqdm bar each)."""
    from tqdm.auto import tqdm
    run, runs = tu.run, tu.st["runs"]
    for i, r in enumerate(runs):
        bar = tqdm(total=max_sweeps, initial=r["sweeps"], unit="sweep", leave=False,
                   desc=f"tune {run.solver}@{tu.nfe} start {i + 1}/{len(runs)}",
                   disable=not run.progress, file=sys.stderr)
        try:
            _coordinate_search(run, tu.x_cal[tu.fit], tu.st["ref_cal"][tu.fit], r, max_sweeps,
                               min_move, bar, lambda: tu.save("refine"))
        finally:
            bar.close()


def _stage_polish(tu: _Tuning, named: dict[str, Any], evals: int) -> None:
    """Stage 5b: a multi-start Nelder-Mead search (:func:`_simplex_search`) of at most ``evals``
    solves in all. Half screens every start (the refined grids, the DP grid and every named grid)
    by successive halving: each round runs its alive starts on equal shares of the round's
    budget, and the better half goes on from where it stopped; the other half continues the one
    left. The coordinate search moves one point at a time and stalls in curved valleys, and the
    error has several basins (the best is often reached from a named grid that is not the best
    itself): a start is judged after some descent, not by where it begins."""
    st, run = tu.st, tu.run
    if evals <= 0 or "polished" in st:
        return
    x, ref = tu.x_cal[tu.fit], st["ref_cal"][tu.fit]
    alive = [r["cur"] for r in st["runs"]] + [st["dp_times"]] + [
        torch.tensor(v["times"], dtype=torch.float64) for v in named.values()]
    rounds = max(1, math.ceil(math.log2(len(alive))))
    _say(run.progress, f"tune: simplex search from {len(alive)} starts")
    spent, screen = 0, evals // 2
    for k in range(rounds):
        share = max(1, (screen - spent) // (rounds - k) // len(alive))
        found = sorted((_simplex_search(run, x, ref, t, share) for t in alive),
                       key=lambda q: q[1])
        spent += sum(q[2] for q in found)
        alive = [q[0] for q in found[:max(1, math.ceil(len(found) / 2))]]
    t, e, more = _simplex_search(run, x, ref, alive[0], max(1, evals - spent))
    tu.save("polish", polished={"cur": t, "cur_err": e,   # the solves spent, not the budget
                                "evals": spent + more})


def _simplex_search(run: _Run, x: Tensor, ref: Tensor, start: Tensor, evals: int
                    ) -> tuple[Tensor, float, int]:
    """Nelder-Mead (scipy) over the grid's log step lengths in t, relative to the last step (so
    every candidate is a decreasing grid with the same ends), from ``start``, at most ``evals``
    solves; returns ``(times, fit error, solves)`` of the best grid found."""
    import numpy as np
    from scipy.optimize import minimize
    start = start.double()
    t0, t1 = float(start[0]), float(start[-1])
    z_cur = torch.log(torch.abs(start.diff()))
    z0 = (z_cur[:-1] - z_cur[-1]).numpy()

    def times_of(z: Any) -> Tensor:
        w = torch.cat([torch.as_tensor(z, dtype=torch.float64), torch.zeros(1,
                                                                          dtype=torch.float64)])
        t = torch.cat([torch.tensor([t0], dtype=torch.float64),
                       t0 + (t1 - t0) * torch.softmax(w, 0).cumsum(0)])
        t[-1] = t1
        return t

    def f(z: Any) -> float:
        e = run.error(x, ref, times_of(z))
        return e if math.isfinite(e) else 1e300

    simplex = np.array([z0] + [z0 + 0.5 * e for e in np.eye(len(z0))])
    res = minimize(f, z0, method="Nelder-Mead",
                   options={"maxfev": evals, "initial_simplex": simplex, "xatol": 1e-3,
                            "fatol": 0.0})
    return times_of(res.x), float(res.fun), int(res.nfev)


def _stage_select(tu: _Tuning, named: dict[str, Any], best_label: str) -> None:
    """Stage 6: the grid kept, chosen on the validation part of the calibration batch among the
    refined grids and the best named grid (a refined grid that only fits the fitted states loses
    there)."""
    if "selected" in tu.st:
        return
    run, x_cal, ref_cal, val = tu.run, tu.x_cal, tu.st["ref_cal"], tu.val
    picks = [(f"refined from {w}", r["cur"], r["cur_err"])
             for w, r in zip(("the DP grid", best_label), tu.st["runs"])]
    if "polished" in tu.st:
        p = tu.st["polished"]
        picks.append(("simplex search", p["cur"], p["cur_err"]))
    picks.append((f"named grid {best_label}", torch.tensor(
        named[best_label]["times"], dtype=torch.float64), named[best_label]["fit_rms"]))
    if tu.n_val:
        scores = [run.error(x_cal[val], ref_cal[val], t) for _, t, _ in picks]
    else:
        scores = [e for _, _, e in picks]
    i = min(range(len(picks)), key=lambda j: scores[j])
    tu.save("selected", selected=picks[i][0], cur=picks[i][1], cur_fit=picks[i][2],
            cur_val=scores[i] if tu.n_val else None,
            cur_cal=run.error(x_cal, ref_cal, picks[i][1]))


def _tune_errors(st: Mapping[str, Any], named: dict[str, Any], best_label: str) -> dict[str, Any]:
    """The ``errors`` part of a tuned grid's record."""
    ho_err = float(st["heldout_rms"])
    best_ho = min(named, key=lambda k: named[k]["heldout_rms"])
    return {
        "heldout_rms": ho_err, "calibration_rms": float(st["cur_cal"]),
        "fit_rms": float(st["cur_fit"]), "validation_rms": st["cur_val"],
        "heldout_over_fit": ho_err / float(st["cur_fit"]) if float(st["cur_fit"]) > 0
        and math.isfinite(ho_err) else None,
        "selected": st["selected"], "dp_calibration_rms": float(st["dp_err"]),
        "best_named_grid": {"by": "fit_rms", "grid": best_label,
                            "fit_rms": named[best_label]["fit_rms"],
                            "heldout_rms": named[best_label]["heldout_rms"]},
        "best_named_grid_heldout": {"grid": best_ho,
                                    "heldout_rms": named[best_ho]["heldout_rms"]},
        "ratio_heldout": ho_err / named[best_ho]["heldout_rms"]
        if named[best_ho]["heldout_rms"] > 0 else None,
        "ratio_heldout_ci95": json.loads(st["ratio_ci"]),   # None where a solve failed
        "ratio_ci_method": f"paired bootstrap over the held-out states ({BOOTSTRAP_RESAMPLES} "
                           "resamples, 2.5% and 97.5% quantiles)",
        "named_grids": {k: {kk: v[kk] for kk in ("fit_rms", "validation_rms", "heldout_rms")}
                        for k, v in named.items()}}


def _tune_record(tu: _Tuning, cfg: dict[str, Any], ident: Any, seeds: tuple[Any, Any],
                 teacher: str, named: dict[str, Any], best_label: str) -> dict[str, Any]:
    """The record of a finished tuning run (:attr:`TunedGrid.record`)."""
    from . import __version__
    st, run, x_cal, x_ho = tu.st, tu.run, tu.x_cal, tu.x_ho
    best_run = min(st["runs"], key=lambda r: r["cur_err"])
    return {
        "format": TUNED_FORMAT, "created": _dt.datetime.now(_dt.timezone.utc)
        .isoformat(timespec="seconds"), "sdekit": __version__,
        "solver": run.solver, "solver_options": cfg,
        "solver_options_given": _json_norm(run.options),
        "nfe": tu.nfe, "measured_nfe": int(st["measured_nfe"]), "steps": run.steps,
        "sde": sde_fingerprint(run.sde), "model": ident,
        "calibration": {"n": int(x_cal.shape[0]), "seeds": seeds[0],
                        "states_sha256": content_hash(x_cal)},
        "heldout": {"n": int(x_ho.shape[0]), "seeds": seeds[1],
                    "states_sha256": content_hash(x_ho)},
        "dtype": str(run.dtype).replace("torch.", ""),
        "reference": json.loads(st["ref_info"]),
        "teacher": {"solver": teacher, "candidates": int(st["cand"].numel()),
                    "rms_vs_reference": float(st["teacher_rms"])},
        "errors": _tune_errors(st, named, best_label),
        "cost": {"wall_s": st["spent"]["wall_s"], "nfe": st["spent"]["nfe"],
                 "solves": st["spent"]["evals"], "sweeps": best_run["sweeps"],
                 "trace": best_run["trace"],
                 "starts": [{"fit_rms_start": r["start_err"],
                             "fit_rms": r["cur_err"], "sweeps": r["sweeps"]}
                            for r in st["runs"]],
                 "batch": int(x_cal.shape[0]), "fit": tu.n_fit, "validation": tu.n_val,
                 **({"simplex": {"solves": int(st["polished"]["evals"]),
                                 "fit_rms": float(st["polished"]["cur_err"])}}
                    if "polished" in st else {})},
    }


def _stages(tu: _Tuning, reference: str | Callable[[Tensor], Tensor],
            reference_tol: float | None, teacher: str, candidates: int, teacher_factor: int,
            max_sweeps: int, min_move: float, polish: int) -> tuple[dict[str, Any], str]:
    """Run (or resume) :func:`tune`'s stages; returns the named grids' errors and the label of
    the best on the fitted states."""
    _stage_references(tu, reference, reference_tol)           # 1. references
    named = _stage_named(tu)                                   # 2. named grids
    best_label = min(named, key=lambda k: named[k]["fit_rms"])
    _stage_teacher(tu, teacher, candidates, teacher_factor)    # 3. teacher trajectory
    _stage_dp(tu, named, best_label)                           # 4. dynamic programming
    _stage_refine(tu, max_sweeps, min_move)                    # 5. refinement of each start
    _stage_polish(tu, named, polish)                           # 5b. simplex search
    _stage_select(tu, named, best_label)                       # 6. selection
    if "ratio_ci" not in tu.st:                                # 7. held-out evaluation
        _stage_heldout(tu, named)
    return named, best_label


#: resamples of the paired bootstrap interval of the held-out ratio
BOOTSTRAP_RESAMPLES = 2000


def ratio_interval(e_a: Tensor, e_b: Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> tuple[float, float]:
    """The 95% paired-bootstrap interval of the RMS ratio ``sqrt(mean(e_a) / mean(e_b))`` of two
    grids' per-state squared errors on the same states (resampling the states, both grids
    together): how far the ratio measured on this batch can be trusted. On a Gaussian mixture,
    whose RMS over a few hundred states rests on the few near a boundary between modes, it is
    wide. It only resamples the states drawn: an event too rare to be among them (a state sent
    to another mode by one grid and not the other) is in neither end, so a narrow interval on a
    small batch is not proof."""
    g = torch.Generator().manual_seed(seed)
    n, chunk = e_a.shape[0], max(1, 2 ** 22 // max(e_a.shape[0], 1))   # ~32 MB of indices a chunk
    ratios = []
    for k in range(0, resamples, chunk):
        idx = torch.randint(0, n, (min(chunk, resamples - k), n), generator=g)
        ratios.append((e_a.double()[idx].mean(1)
                       / e_b.double()[idx].mean(1).clamp_min(1e-300)).sqrt())
    lo, hi = torch.quantile(torch.cat(ratios), torch.tensor([0.025, 0.975],
                                                            dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def _paired_ratio(e_a: Tensor | None, e_b: Tensor | None
                  ) -> tuple[float, tuple[float, float]] | None:
    """The RMS ratio of two grids' per-state squared errors on the same states and its
    :func:`ratio_interval`; None where either solve failed or ``e_b`` is all zero."""
    if e_a is None or e_b is None or float(e_b.sum()) == 0:
        return None
    return float((e_a.mean() / e_b.mean()).sqrt()), ratio_interval(e_a, e_b)


def _stage_heldout(tu: _Tuning, named: dict[str, Any]) -> None:
    """Stage 7: the kept grid's held-out error, and the paired-bootstrap interval of its ratio to
    the best named grid on the held-out states (one more held-out solve of that grid)."""
    run, ref_ho = tu.run, tu.st["ref_ho"]
    e_t = run.state_errors(tu.x_ho, ref_ho, tu.st["cur"])
    nfe = run.last_nfe
    best_ho = min(named, key=lambda k: named[k]["heldout_rms"])
    e_n = run.state_errors(tu.x_ho, ref_ho, torch.tensor(named[best_ho]["times"],
                                                         dtype=torch.float64))
    paired = _paired_ratio(e_t, e_n)
    tu.save("done", heldout_rms=math.inf if e_t is None else float(e_t.mean().sqrt()),
            measured_nfe=nfe, ratio_ci=json.dumps(None if paired is None else paired[1]))


def tune(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor], solver: str = "dpmpp_2m",
         nfe: int = 10, *, solver_options: Mapping[str, Any] | None = None,
         calibration: int | Tensor = 64, seeds: Sequence[int] | None = None, seed: int = 0,
         heldout: int | Tensor = 64, heldout_seeds: Sequence[int] | None = None,
         heldout_seed: int | None = None, shape: Sequence[int] | None = None,
         prediction: str = "eps", dtype: torch.dtype = torch.float32,
         reference: str | Callable[[Tensor], Tensor] = "dopri5",
         reference_tol: float | None = None, candidates: int = 48, teacher: str = "dpmpp_3m",
         teacher_factor: int = 4, max_sweeps: int = 40, min_move: float = 1 / 64,
         validation: float = 0.5, state: str | os.PathLike | None = None,
         out: str | os.PathLike | None = None,
         fresh: bool = False, progress: bool = True, model_tag: str | None = None,
         polish: int = 1000) -> TunedGrid:
    """Tune the time grid of ``solver`` for ``model`` at ``nfe`` model evaluations.

    Args:
        sde, model: the forward process and the model (a :class:`DiffusionModel`, or a callable
            whose output is ``prediction``).
        solver, solver_options: a deterministic fixed-grid ODE solver of the registry.
        nfe: the NFE budget; the grid has the most steps whose cost fits it (measured).
        calibration: the calibration batch: a size (prior draws with per-sample ``seeds``,
            default derived from ``seed``; then ``shape`` is the event shape) or initial states.
        heldout: the held-out batch, likewise (seeds default derived from ``heldout_seed``,
            ``seed + 1``); it must differ from the calibration batch. Every error the result
            reports as *the* error is measured on it.
        dtype: dtype of the initial states and of the solves (float64 for analytic models).
        reference: registry name of the adaptive solver of the converged reference (at
            ``reference_tol``, default 1e-8 in float64, 1e-6 otherwise) or an exact flow map
            ``x_T -> x_end``.
        candidates: steps of each fine grid whose union holds the candidate times;
            ``teacher`` solves there on a grid ``teacher_factor`` times finer.
        validation: the fraction of the calibration batch (its last states) held back from the
            optimisation: the grid kept is the best there among the refined grids and the best
            named grid, so a grid that only fits the fitted states is not chosen (mixtures,
            whose RMS is dominated by the few states near a boundary between modes).
        max_sweeps, min_move: limits of the coordinate search (sweeps; the smallest move as a
            fraction of a neighbour's distance); it also stops once three sweeps together
            lowered the error by less than 0.1%.
        polish: solves of the multi-start simplex search that follows (0: none): half of them
            screen every start (the refined grids, the DP grid and each named grid) by
            successive halving, the rest continue the best one; it finds grids the coordinate
            search cannot reach (on the 16-dim Gaussian under the squared-cosine table,
            ``unipc_bh2`` at NFE 5: 0.24x the best named grid, the equal-share screen before it
            0.50x; benchmarks/results/tune_targets.md).
        state: the resumable state file (default ``<out>.state.pt``; none without ``out``);
            ``fresh`` ignores an existing one.
        out: write the tuned grid (JSON) there.
        progress: stage messages and a tqdm bar on stderr.
        model_tag: identifies a model that cannot be hashed (see :func:`model_identity`).
    Returns:
        the :class:`TunedGrid` (``record`` holds the errors, the baselines and the cost).
    """
    t_wall = time.perf_counter()
    dm = as_model(model, sde, prediction)
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TuneError(f"solver_options={solver_options!r} is invalid: expected a dict of the "
                        "solver's options, e.g. {'order': 3}")
    opts = dict(solver_options or {})
    cfg, steps = _tune_solver(solver, opts, nfe)
    _check_tune_limits(candidates, max_sweeps, teacher_factor, min_move, validation, polish)
    _check_reference(reference)
    _check_files(out=out, state=state)
    check_flags(fresh=fresh, progress=progress)
    ident = model_identity(dm, model_tag)
    x_cal, cal_seeds, x_ho, ho_seeds = _batches(sde, calibration, seeds, seed, heldout,
                                                heldout_seeds, heldout_seed, shape, dtype)
    n_fit, n_val = _split_calibration(x_cal, x_ho, validation)
    run = _Run(sde, dm, solver, opts, steps, dtype, progress)
    key = {"format": STATE_FORMAT, "solver": solver, "solver_options": cfg, "nfe": nfe,
           "steps": steps, "sde": sde_fingerprint(sde), "model": ident,
           "calibration": content_hash(x_cal), "heldout": content_hash(x_ho),
           "reference": reference if isinstance(reference, str) else "callable",
           "reference_tol": reference_tol, "candidates": candidates, "teacher": teacher,
           "teacher_factor": teacher_factor, "max_sweeps": max_sweeps, "min_move": min_move,
           "validation": validation, **({"polish": polish} if polish else {})}
    key_json = json.dumps(key, sort_keys=True, default=str)
    if state is None and out is not None:
        state = str(out) + ".state.pt"
    st = _load_state(state, fresh, key, key_json, progress)
    tu = _Tuning(run, nfe, x_cal, x_ho, n_fit, n_val, st, key_json, state, t_wall)
    named, best_label = _stages(tu, reference, reference_tol, teacher, candidates,
                                teacher_factor, max_sweeps, min_move, polish)
    record = _tune_record(tu, cfg, ident, (cal_seeds, ho_seeds), teacher, named, best_label)
    tg = TunedGrid(st["cur"].clone(), record)
    if out is not None:
        tg.save(out)
    _say_result(progress, solver, nfe, record)
    return tg


#: the held-out RMS of the kept grid over its RMS on the fitted states above which ``tune`` says
#: the calibration batch is too small (on sdekit bench's 8-mode mixture at NFE 10 under VP:
#: 3.7x with 256 calibration states, 1.5x with 8192; benchmarks/tune_targets.py)
FIT_GAP_WARN = 2.0


def _say_result(progress: bool, solver: str, nfe: int, record: Mapping[str, Any]) -> None:
    """The closing progress lines of :func:`tune`: the held-out result, and what the batches
    cannot tell."""
    errs = record["errors"]
    best_ho = errs["best_named_grid_heldout"]
    ci = errs["ratio_heldout_ci95"]
    _say(progress, f"tune {solver} @ {nfe} NFE: held-out RMS {errs['heldout_rms']:.3e} (best "
                   f"named grid {best_ho['grid']}: {best_ho['heldout_rms']:.3e}"
                   + (f"; ratio {errs['ratio_heldout']:.3g}, 95% interval {ci[0]:.3g}-{ci[1]:.3g}"
                      if ci else "") + "); "
                   f"{record['cost']['nfe']} NFE spent, {record['cost']['wall_s']:.1f} s")
    if ci and ci[0] < 1 < ci[1] and ci[1] > 1.25 * ci[0]:
        _say(progress, "tune: the held-out batch cannot tell the tuned grid from the named one "
                       "(the interval holds 1): its error rests on a few states; larger "
                       "calibration= and heldout= batches would tell them apart")
    gap = errs.get("heldout_over_fit")
    if gap is not None and gap > FIT_GAP_WARN:
        _say(progress, f"tune: the grid's held-out RMS is {gap:.3g}x its RMS on the fitted "
                       "calibration states: it fits states the others do not share, so the "
                       f"calibration batch ({record['calibration']['n']} states) is likely too "
                       "small for this model; a larger calibration= is likely to find a better "
                       "grid")


def _coordinate_search(run: _Run, x: Tensor, ref: Tensor, r: dict[str, Any], max_sweeps: int,
                       min_move: float, bar: Any, save: Callable[[], None]) -> None:
    """Coordinate search from ``r['cur']`` (updated in place, ``save()`` after each sweep): each
    interior point ``k`` moves the fraction ``fk[k]`` of the way to a neighbour, in its preferred
    direction ``dk[k]`` first; a move is kept where it lowers the error, and then the fraction
    doubles (at most 1/2) and that direction is preferred; a point that fails both ways halves
    its fraction. Stops at ``max_sweeps``, when every fraction is below ``min_move``, or when
    three sweeps together lowered the error by less than 0.1%."""
    sde, f, dirs, trace = run.sde, r["fk"], r["dk"], r["trace"]
    cur, err = r["cur"], float(r["cur_err"])
    while max(f) >= min_move and r["sweeps"] < max_sweeps and not (
            len(trace) > 3 and trace[-4] - err < 1e-3 * err):
        for j in range(len(f)):
            if f[j] < min_move:
                continue
            for d in (dirs[j], -dirs[j]):
                cand = _move(sde, cur, j + 1, d, f[j])
                e = run.error(x, ref, cand)
                if e < err * (1 - 1e-9):
                    cur, err, dirs[j], f[j] = cand, e, d, min(2 * f[j], 0.5)
                    break
            else:
                f[j] /= 2
        trace.append(err)
        r.update(cur=cur, cur_err=err, sweeps=r["sweeps"] + 1)
        bar.update(1)
        bar.set_postfix_str(f"rms {err:.3e} move {max(f):g}", refresh=False)
        save()


def _refine_times(sde: ForwardSDE, t: Tensor, factor: int) -> Tensor:
    """``t`` with ``factor - 1`` points inserted in each interval (uniform in lambda; in t for
    an interval from lambda = -inf)."""
    if factor == 1:
        return t
    lam = sde.lambda_(t).double()
    parts = []
    w = torch.arange(factor, dtype=torch.float64) / factor
    for i in range(t.numel() - 1):
        if math.isfinite(float(lam[i])):
            seg = sde.t_of_lambda(lam[i] + w * (lam[i + 1] - lam[i])).double()
        else:
            seg = t[i] + w * (t[i + 1] - t[i])
        seg[0] = t[i]
        parts.append(seg)
    parts.append(t[-1:])
    return torch.cat(parts)


# ------------------------------------------------------------------ solver search
#: the solver options the search varies, where a solver has them (values it rejects are skipped)
OPTION_SPACE: dict[str, tuple[Any, ...]] = {
    "warmup": ("lower_order", "singlestep"), "lower_order_final": (True, False),
    "solver_type": ("lagrange", "midpoint"), "corrector": (True, False),
    "max_order": (2, 3, 4)}


def solver_variants(name: str) -> list[dict[str, Any]]:
    """The option sets of registry solver ``name`` that the search tries: the product of the
    :data:`OPTION_SPACE` values of the options it has, without sets it rejects and without
    duplicates (sets with equal effective options)."""
    cls, _ = _REGISTRY[name]
    have = [p.name for p in option_parameters(cls) if p.name in OPTION_SPACE]
    out, seen = [], set()
    for values in itertools.product(*(OPTION_SPACE[k] for k in have)):
        opts = dict(zip(have, values))
        try:
            eff = json.dumps(solver_config(name, opts), sort_keys=True)
        except (TypeError, ValueError):
            continue
        if eff not in seen:
            seen.add(eff)
            out.append(opts)
    return out


class CachedReference:
    """A reference map that returns solves computed once (keyed by the states' content hash)."""

    def __init__(self, refs: dict[str, Tensor], description: str) -> None:
        self.refs, self.description = refs, description

    def __call__(self, x: Tensor) -> Tensor:
        return self.refs[content_hash(x)]


def _search_space(solvers: Sequence[str] | None,
                  grids: Sequence[tuple[str, Mapping[str, Any]]] | None, nfe: int, tune_top: int
                  ) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """The checked solvers and grids of :func:`search` (and its checked ``nfe``, ``tune_top``)."""
    if solvers is not None and not (is_collection(solvers) and len(list(solvers)) > 0):
        raise TuneError(f"solvers={solvers!r} is invalid: expected a non-empty list of solver "
                        "names, e.g. ['dpmpp_2m', 'unipc_bh2'] (None: every tunable solver)")
    if grids is not None and not (is_collection(grids) and all(
            isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[1], Mapping)
            for e in grids)):
        raise TuneError(f"grids={grids!r} is invalid: expected a list of (grid name, options) "
                        "pairs, e.g. [('karras', {'rho': 7.0}), ('logsnr', {})]")
    names = list(solvers) if solvers is not None else [n for n in solver_names() if _tunable(n)]
    for n in names:
        if n not in solver_names():
            raise TuneError(f"unknown solver {n!r}: expected one of {solver_names()}")
        check_tunable(get_solver(n))
    grid_list = [(g, dict(o)) for g, o in (grids if grids is not None else NAMED_GRIDS)]
    for g, _ in grid_list:
        if g not in GRIDS or g == "interpolated":
            raise TuneError(f"unknown grid {g!r}: expected one of "
                            f"{sorted(k for k in GRIDS if k != 'interpolated')}")
    _int_at_least("nfe", nfe, 1)
    if not (isinstance(tune_top, int) and tune_top >= 0):
        raise TuneError(f"tune_top={tune_top!r} is invalid: expected an integer >= 0")
    return names, grid_list


#: the arguments of :func:`tune` that :func:`search` sets itself (not in its ``tune_options``)
_SEARCH_SETS = frozenset({"sde", "model", "solver", "nfe", "solver_options", "calibration",
                          "heldout", "dtype", "reference", "out", "progress", "model_tag"})


def _check_tune_options(tune_options: Any) -> None:
    """Raise unless ``tune_options`` is None or a dict of :func:`tune`'s other options."""
    valid = sorted(set(inspect.signature(tune).parameters) - _SEARCH_SETS)
    if tune_options is not None and not isinstance(tune_options, Mapping):
        raise TuneError(f"tune_options={tune_options!r} is invalid: expected a dict of tune()'s "
                        f"options among {valid}")
    unknown = sorted(set(tune_options or {}) - set(valid))
    if unknown:
        raise TuneError(f"tune_options {unknown} are not options of tune() that search() passes "
                        f"on: expected some of {valid}")



def _search_rows(run: _Run, plan: list[tuple[str, dict[str, Any], str, dict[str, Any]]],
                 nfe: int, x_cal: Tensor, ref_cal: Tensor, x_ho: Tensor, ref_ho: Tensor
                 ) -> list[dict[str, Any]]:
    """One row per candidate of ``plan``: its calibration and held-out errors, or why not."""
    from tqdm.auto import tqdm
    rows = []
    for n, o, g, go in tqdm(plan, desc=f"search @ {nfe} NFE", disable=not run.progress,
                            leave=False, file=sys.stderr):
        slv = get_solver(n, **o)
        row: dict[str, Any] = {"solver": n, "options": o, "grid": g, "grid_options": go,
                               "tuned": False}
        try:
            steps = _steps_for(slv, nfe)
            times = make_grid(run.sde, g, steps, **go)
        except ValueError as e:
            rows.append({**row, "status": "skipped", "reason": str(e)})
            continue
        run.solver, run.options = n, o
        row.update(steps=steps, calibration_rms=run.error(x_cal, ref_cal, times))
        row["nfe"] = run.last_nfe
        row["heldout_rms"] = run.error(x_ho, ref_ho, times)
        row["status"] = "ok" if math.isfinite(row["calibration_rms"]) else "failed"
        rows.append(row)
    return rows


def _top_configs(ok: list[dict[str, Any]], k: int) -> list[tuple[str, dict[str, Any]]]:
    """The ``k`` best distinct (solver, options) of the ranked rows ``ok``: distinct in what
    they do, so a configuration whose calibration errors on every searched grid equal those of
    one already picked (e.g. an automatic ``lower_order_final`` that resolves to the explicit
    value everywhere) is the same sampler on these grids and is passed over."""
    def key(r: dict[str, Any]) -> tuple[str, str]:
        return r["solver"], json.dumps(r["options"], sort_keys=True, default=str)

    behaviour: dict[tuple[str, str], list[tuple[str, str, float]]] = {}
    for r in ok:
        behaviour.setdefault(key(r), []).append(
            (r["grid"], json.dumps(r["grid_options"], sort_keys=True, default=str),
             r["calibration_rms"]))
    picked: list[tuple[str, dict[str, Any]]] = []
    seen: list[list[tuple[str, str, float]]] = []
    for r in ok:
        b = sorted(behaviour[key(r)])
        if (r["solver"], r["options"]) not in picked and b not in seen:
            picked.append((r["solver"], r["options"]))
            seen.append(b)
        if len(picked) == k:
            break
    return picked


def _tuned_rows(run: _Run, picked: list[tuple[str, dict[str, Any]]], nfe: int,
                batches: tuple[Tensor, list[int] | None, Tensor, list[int] | None],
                cached: CachedReference, out_dir: str | os.PathLike | None,
                model_tag: str | None, tune_options: Mapping[str, Any] | None
                ) -> list[dict[str, Any]]:
    """The rows of the grids tuned for the ``picked`` solver configurations."""
    x_cal, cal_seeds, x_ho, ho_seeds = batches
    rows = []
    for n, o in picked:
        path = None if out_dir is None else Path(out_dir) / (
            f"{n}" + "".join(f"-{k}={v}" for k, v in sorted(o.items())) + f"-nfe{nfe}.json")
        tg = tune(run.sde, run.model, n, nfe, solver_options=o, calibration=x_cal, heldout=x_ho,
                  dtype=run.dtype, reference=cached, out=path, progress=run.progress,
                  model_tag=model_tag, **dict(tune_options or {}))
        tg.record["calibration"]["seeds"], tg.record["heldout"]["seeds"] = cal_seeds, ho_seeds
        if path is not None:
            tg.save(path)
        errs = tg.record["errors"]
        rows.append({"solver": n, "options": o, "grid": "tuned",
                     "grid_file": None if path is None else str(path),
                     "grid_options": {}, "tuned": True, "status": "ok",
                     "steps": tg.steps, "nfe": tg.record["measured_nfe"],
                     "calibration_rms": errs["calibration_rms"],
                     "heldout_rms": errs["heldout_rms"], "times": tg.times.tolist(),
                     "tuning_cost": tg.record["cost"]})
    return rows


def _winner_margin(run: _Run, ranked: list[dict[str, Any]], x_ho: Tensor, ref_ho: Tensor
                   ) -> dict[str, Any] | None:
    """The winner's held-out RMS over the runner-up's, with its paired-bootstrap 95% interval
    (:func:`ratio_interval`; two more held-out solves): whether the held-out batch tells the two
    apart. None with fewer than two ranked rows or where a solve fails."""
    if len(ranked) < 2:
        return None
    errs = []
    for r in ranked[:2]:
        run.solver, run.options = r["solver"], r["options"]
        times = torch.tensor(r["times"], dtype=torch.float64) if r["tuned"] else \
            make_grid(run.sde, r["grid"], r["steps"], **r["grid_options"])
        errs.append(run.state_errors(x_ho, ref_ho, times))
    paired = _paired_ratio(*errs)
    return None if paired is None else {"runner_up_rank": 2, "ratio": paired[0],
                                        "ci95": list(paired[1])}


def search(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor], nfe: int, *,
           solvers: Sequence[str] | None = None,
           grids: Sequence[tuple[str, Mapping[str, Any]]] | None = None, tune_top: int = 0,
           calibration: int | Tensor = 128, seeds: Sequence[int] | None = None, seed: int = 0,
           heldout: int | Tensor = 128, heldout_seeds: Sequence[int] | None = None,
           heldout_seed: int | None = None, shape: Sequence[int] | None = None,
           prediction: str = "eps", dtype: torch.dtype = torch.float32,
           reference: str | Callable[[Tensor], Tensor] = "dopri5",
           reference_tol: float | None = None, out_dir: str | os.PathLike | None = None,
           progress: bool = True, model_tag: str | None = None,
           tune_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Choose the solver, its options and the grid for ``model`` at ``nfe`` NFE.

    Every deterministic fixed-grid ODE solver of ``solvers`` (default: all in the registry) with
    every option set of :func:`solver_variants` runs on every named grid of ``grids`` (default
    :data:`NAMED_GRIDS`) on the calibration batch; candidates are ranked by their calibration
    RMS error against the converged reference, and each row also carries its held-out RMS (the
    number to report). With ``tune_top = k`` the grids of the k best distinct (solver, options)
    are tuned (:func:`tune`, ``tune_options``; the files go to ``out_dir``) and ranked with the
    rest as rows marked ``tuned``. Returns ``{"winner": row, "table": rows (ranked), ...}``."""
    t0 = time.perf_counter()
    dm = as_model(model, sde, prediction)
    names, grid_list = _search_space(solvers, grids, nfe, tune_top)
    _check_tune_options(tune_options)
    _check_reference(reference)
    check_flags(progress=progress)
    ident = model_identity(dm, model_tag)
    batches = _batches(sde, calibration, seeds, seed, heldout, heldout_seeds, heldout_seed,
                       shape, dtype)
    x_cal, cal_seeds, x_ho, ho_seeds = batches
    run = _Run(sde, dm, "", {}, 0, dtype, progress)
    ref_cal, rinfo = _reference(run, x_cal, reference, reference_tol)
    ref_ho, _ = _reference(run, x_ho, reference, reference_tol)
    plan = [(n, o, g, go) for n in names for o in solver_variants(n) for g, go in grid_list]
    rows = _search_rows(run, plan, nfe, x_cal, ref_cal, x_ho, ref_ho)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["calibration_rms"])
    tuned_rows: list[dict[str, Any]] = []
    if tune_top:
        cached = CachedReference({content_hash(x_cal): ref_cal, content_hash(x_ho): ref_ho},
                                 rinfo["method"])
        tuned_rows = _tuned_rows(run, _top_configs(ok, tune_top), nfe, batches, cached, out_dir,
                                 model_tag, tune_options)
    ranked = sorted(ok + tuned_rows, key=lambda r: r["calibration_rms"])
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    margin = _winner_margin(run, ranked, x_ho, ref_ho)
    return {"format": SEARCH_FORMAT, "nfe": nfe, "sde": sde_fingerprint(sde), "model": ident,
            "calibration": {"n": int(x_cal.shape[0]), "seeds": cal_seeds},
            "heldout": {"n": int(x_ho.shape[0]), "seeds": ho_seeds}, "reference": rinfo,
            "ranked_by": "calibration_rms", "winner": ranked[0] if ranked else None,
            "table": ranked, "not_ranked": [r for r in rows if r["status"] != "ok"],
            "winner_vs_runner_up": margin,
            "cost": {"wall_s": time.perf_counter() - t0, "nfe": run.nfe_spent
                     + sum(r["tuning_cost"]["nfe"] for r in tuned_rows), "candidates": len(plan)}}


def format_search(result: Mapping[str, Any], top: int = 15) -> str:
    """A markdown table of the ranked candidates (the winner first)."""
    lines = [(f"solver search at {result['nfe']} NFE: ranked by calibration RMS, held-out RMS "
              "reported"), "",
             "| rank | solver | options | grid | NFE | calibration RMS | held-out RMS |",
             "|---:|---|---|---|---:|---:|---:|"]
    for r in result["table"][:top]:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(r["options"].items())) or "-"
        grid = r["grid"] + ("(" + ",".join(f"{k}={v}" for k, v in r["grid_options"].items())
                            + ")" if r["grid_options"] else "") + (" (tuned)" if r["tuned"]
                                                                  and r["grid"] != "tuned" else "")
        lines.append(f"| {r['rank']} | {r['solver']} | {opts} | {grid} | {r['nfe']} | "
                     f"{r['calibration_rms']:.3e} | {r['heldout_rms']:.3e} |")
    m = result.get("winner_vs_runner_up")
    if m:
        lines += ["", f"held-out RMS of rank 1 / rank 2: {m['ratio']:.3g} (95% paired-bootstrap "
                  f"interval {m['ci95'][0]:.3g}-{m['ci95'][1]:.3g}"
                  + ("; the held-out batch cannot tell them apart)" if m["ci95"][0] < 1
                     < m["ci95"][1] else ")")]
    return "\n".join(lines)
