"""How far is ``sdekit.tune``'s grid from the best grid there is? A brute-force check (issue 16).

For cells of benchmarks/tune_targets.py, a multi-start Nelder-Mead search over the grid's log
step lengths (in t, the ends fixed) from every named grid, random starts and (``--problem gmm``)
the grid ``sdekit.tune`` kept there, each start of up to a fixed number of solves. Gaussian
(exact flow map as reference): 8 random starts of up to 1500 solves, fitted on all 64
calibration states (seed 0), scored on the 512 held-out states (seed 1). Mixture (one dopri5
solve at rtol = atol = 1e-8 per batch as reference): 3 random starts of up to 600 solves, fitted
on the 4096 states ``sdekit.tune`` fits there (the first half of the 8192 calibration states),
scored on the 4096 held-out states. The best grid found is compared with the same solver's best
named grid on the held-out states, as tune_targets.py scores the tuned grid. Far more solves
than ``sdekit.tune`` spends: a bound on what any grid reaches there, not a tuner.

    OMP_NUM_THREADS=1 python benchmarks/tune_global_check.py   # results/tune_global_check.*
    OMP_NUM_THREADS=1 python benchmarks/tune_global_check.py --problem gmm   # ..._gmm.*
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tune_targets import DIM, DTYPE, N_CAL, N_HELDOUT, SDES, references  # noqa: E402

import sdekit  # noqa: E402
from sdekit._io import atomic_write_bytes, content_hash  # noqa: E402
from sdekit.bench.problems import gaussian_problem, gmm_problem, problem_from_checkpoint  # noqa: E402
from sdekit.tune import NAMED_GRIDS, CachedReference, prior_states, tune  # noqa: E402

#: per problem: the cells checked, random starts, solves per start, calibration states fitted
CELLS = {"gaussian": [("vp", "ddim", 5), ("vp", "ddim", 10), ("flow", "dpmpp_2m", 5),
                      ("flow", "unipc_bh2", 5), ("ddpm-cosine", "unipc_bh2", 5)] + [
                          (s, "ddim", n) for s in ("ddpm-linear", "ddpm-cosine", "ve", "flow")
                          for n in (5, 10)],
         "gmm": [("vp", "dpmpp_2m", 5), ("vp", "unipc_bh2", 5), ("vp", "ddim", 5),
                 ("vp", "dpmpp_2m", 10), ("flow", "dpmpp_2m", 10), ("flow", "unipc_bh2", 10),
                 ("vp", "ddim", 10), ("flow", "ddim", 5), ("flow", "ddim", 10)],
         "digits": [("checkpoint", "dpmpp_2m", 10)]}
RANDOM_STARTS = {"gaussian": 8, "gmm": 3, "digits": 0}
MAX_SOLVES = {"gaussian": 1500, "gmm": 600, "digits": 300}
N_FIT = {"gaussian": 64, "gmm": N_CAL["gmm"] // 2,   # tune fits the first half of the mixture's
         "digits": 64}
#: the digits model (``sdekit train --data digits --sde vp --threads 1 --out runs/digits``): 128
#: calibration states (``sdekit tune``'s default; it fits the first half), 128 held-out, a
#: float32 dopri5 reference at rtol = atol = 1e-6 (``sdekit tune``'s default for float32)
DIGITS = ROOT / "runs" / "digits" / "checkpoint.pt"
N_DIGITS, DIGITS_TOL = 128, 1e-6


def log_steps(times) -> np.ndarray:
    """A grid as the search's coordinates: its log step lengths."""
    return np.log(np.abs(np.diff(np.asarray(times, dtype=np.float64))))


def times_of(z: np.ndarray, t0: float, t1: float) -> torch.Tensor:
    """The grid from ``t0`` to ``t1`` whose step lengths are proportional to ``exp(z)``."""
    w = np.exp(z - z.max())
    t = torch.tensor(np.concatenate([[t0], t0 + (t1 - t0) * np.cumsum(w / w.sum())]))
    t[-1] = t1
    return t


def grid_search(err, t0: float, t1: float, starts: list[np.ndarray], max_solves: int
                ) -> tuple[float, torch.Tensor, int]:
    """Nelder-Mead over the log step lengths from each start (up to ``max_solves`` solves
    each), minimising ``err(times)``; returns (least error, its grid, solves)."""
    def f(z):
        e = err(times_of(z, t0, t1))
        return e if np.isfinite(e) else 1e300

    best, solves = (np.inf, None), 0
    for z0 in starts:
        res = minimize(f, z0, method="Nelder-Mead",
                       options={"maxfev": max_solves, "xatol": 1e-4, "fatol": 1e-9})
        solves += res.nfev
        if res.fun < best[0]:
            best = (float(res.fun), res.x)
    return best[0], times_of(best[1], t0, t1), solves


@functools.cache
def digits_batches() -> tuple:
    """:func:`batches` of the digits model, and ``sdekit.tune``'s grid and ratio there."""
    pb = problem_from_checkpoint(str(DIGITS))
    shape = tuple(pb.sample_init(1, torch.Generator().manual_seed(0)).shape[1:])
    x_cal = prior_states(pb.sde, N_DIGITS, shape, seed=0, dtype=DTYPE)
    x_ho = prior_states(pb.sde, N_DIGITS, shape, seed=1, dtype=DTYPE)
    refs = {content_hash(x): sdekit.sample(pb.sde, pb.model, x, solver="dopri5", rtol=DIGITS_TOL,
                                           atol=DIGITS_TOL).x.double() for x in (x_cal, x_ho)}
    ref = CachedReference(refs, f"dopri5 rtol=atol={DIGITS_TOL:g} (float32)")
    tg = tune(pb.sde, pb.model, "dpmpp_2m", 10, calibration=x_cal, heldout=x_ho, dtype=DTYPE,
              reference=ref, progress=False)
    return ((pb.sde, pb, x_cal[:N_FIT["digits"]], refs[content_hash(x_cal)][:N_FIT["digits"]],
             x_ho, refs[content_hash(x_ho)]),
            {"times": tg.times.tolist(), "ratio": tg.record["errors"]["ratio_heldout"],
             "wall_s": tg.record["cost"]["wall_s"]})


@functools.cache
def batches(kind: str, sde_name: str) -> tuple:
    """A problem's fitted states and held-out states with their references (one solve each)."""
    if kind == "digits":
        return digits_batches()[0]
    sde = SDES[sde_name]()
    pb = (gaussian_problem if kind == "gaussian" else gmm_problem)(sde=sde, dim=DIM)
    x_cal = prior_states(sde, N_CAL[kind], (DIM,), seed=0, dtype=DTYPE)
    x_ho = prior_states(sde, N_HELDOUT[kind], (DIM,), seed=1, dtype=DTYPE)
    ref = references(pb, x_cal, x_ho)[0].refs
    return (sde, pb, x_cal[:N_FIT[kind]], ref[content_hash(x_cal)][:N_FIT[kind]], x_ho,
            ref[content_hash(x_ho)])


def check(kind: str, sde_name: str, solver: str, steps: int, tuned: list | None) -> dict:
    sde, pb, x_cal, r_cal, x_ho, r_ho = batches(kind, sde_name)
    named = {}
    for g, o in NAMED_GRIDS:
        try:
            named[g + (f"({', '.join(f'{k}={v}' for k, v in o.items())})" if o else "")] = (
                sdekit.make_grid(sde, g, steps, **o).double())
        except ValueError:
            pass
    t0, t1 = (float(v) for v in next(iter(named.values()))[[0, -1]])

    def rms(times, x, r):   # per-coordinate RMS, as tune_targets.py reports it
        try:
            y = sdekit.sample(sde, pb.model, x, solver=solver, grid=times).x.double()
        except ValueError:
            return float("inf")
        return float((y - r).pow(2).mean().sqrt())

    starts = [log_steps(t) for t in named.values()]
    if tuned is not None:
        starts.append(log_steps(tuned))
    rng = np.random.default_rng(0)
    starts += [rng.normal(size=steps) for _ in range(RANDOM_STARTS[kind])]
    t_start = time.perf_counter()
    fit, best_t, solves = grid_search(lambda t: rms(t, x_cal, r_cal), t0, t1, starts,
                                      MAX_SOLVES[kind])
    named_ho = {k: rms(t, x_ho, r_ho) for k, t in named.items()}
    bn = min(named_ho, key=named_ho.get)
    ho = rms(best_t, x_ho, r_ho)
    return {"problem": kind, "sde": sde_name, "solver": solver, "nfe": steps,
            "best_found_heldout_rms": ho,
            "best_found_fit_rms": fit, "best_named_grid": bn,
            "best_named_heldout_rms": named_ho[bn], "ratio": ho / named_ho[bn],
            "starts": len(starts), "solves": int(solves),
            "wall_s": time.perf_counter() - t_start, "times": best_t.tolist()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", choices=sorted(CELLS), default="gaussian")
    ap.add_argument("--fresh", action="store_true",
                    help="search every cell again (default: keep the cells already in the "
                         "results file, so an interrupted or extended run resumes)")
    args = ap.parse_args(argv)
    kind = args.problem
    torch.set_num_threads(1)
    tt = json.loads((ROOT / "benchmarks" / "results" / "tune_targets.json").read_text())
    tuned = {(r["sde"], r["solver"], r["nfe"]): r for r in tt["rows"] if r["problem"] == kind}
    if kind == "digits" and not DIGITS.exists():
        ap.error(f"--problem digits needs {DIGITS} (sdekit train --data digits --sde vp "
                 "--threads 1 --out runs/digits)")
    out = ROOT / "benchmarks" / "results"
    command = "OMP_NUM_THREADS=1 python benchmarks/tune_global_check.py" + (
        f" --problem {kind}" if kind != "gaussian" else "")
    stem = "tune_global_check" + (f"_{kind}" if kind != "gaussian" else "")
    path = out / f"{stem}.json"
    done = {} if args.fresh or not path.exists() else {
        (r["sde"], r["solver"], r["nfe"]): r for r in json.loads(path.read_text())["rows"]}
    rows: list[dict] = []

    def save() -> None:   # after every cell: an interrupted run resumes from what is saved
        atomic_write_bytes(path, (json.dumps({"command": command, "tune_targets_command":
                                               tt["command"], "rows": rows}, indent=1)
                                   + "\n").encode())

    for cell in CELLS[kind]:
        tr = tuned.get(cell)
        if cell in done:   # kept; its tuner ratio read anew from the current tune_targets.json
            rows.append(dict(done[cell], **({"tune_ratio": tr["ratio"]} if tr else {})))
            continue
        if kind == "digits":   # tuned here, on the same states and reference
            tr = digits_batches()[1]
        # the tuned grid as one more start where its search was costly to repeat (the mixture)
        row = check(kind, *cell, tr["times"] if tr is not None and kind != "gaussian" else None)
        row["tune_ratio"] = tr["ratio"] if tr is not None else None
        if kind == "digits":
            row["tune_wall_s"] = tr["wall_s"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
        save()
    save()
    what = {"gaussian": "16-dim Gaussian", "gmm": "16-dim Gaussian mixture",
            "digits": "the digits model"}[kind]
    start = {"gmm": " and the grid sdekit.tune kept (tune_targets.json when the cell was "
                     "searched)",
             "digits": " and the grid sdekit.tune kept, tuned by this script on the same states "
                       f"and reference (dopri5 at {DIGITS_TOL:g}, float32)"}.get(kind, "")
    source = ("this script's own `sdekit.tune` run" if kind == "digits" else
              f"`{tt['command']}` (benchmarks/results/tune_targets.md)")
    lines = [f"# sdekit.tune against a brute-force grid search ({what})", "",
             f"`{command}`: multi-start Nelder-Mead ({RANDOM_STARTS[kind]} random starts, every "
             f"named grid{start}, up to {MAX_SOLVES[kind]} solves each) on the {N_FIT[kind]} "
             "calibration states sdekit.tune fits; held-out RMS "
             f"({({**N_HELDOUT, 'digits': N_DIGITS})[kind]} states) over the same solver's best "
             f"named grid. 'sdekit.tune' is the ratio of {source}.", "",
             "| SDE | solver | NFE | best grid found / best named | sdekit.tune / best named | "
             "best named grid | solves |", "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        tr = f"{r['tune_ratio']:.3f}" if r["tune_ratio"] is not None else "-"
        lines.append(f"| {r['sde']} | {r['solver']} | {r['nfe']} | {r['ratio']:.3f} | {tr} | "
                     f"{r['best_named_grid']} | {r['solves']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
