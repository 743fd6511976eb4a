"""How far is ``sdekit.tune``'s grid from the best grid there is? A brute-force check (issue 16).

For cells of benchmarks/tune_targets.py (16-dim Gaussian, exact flow map as reference), a
multi-start Nelder-Mead search over the grid's log step lengths (in t, the ends fixed) from every
named grid and 8 random starts, each of up to 1500 solves, fitted on all 64 calibration states
(seed 0); the best grid found is scored on the 512 held-out states (seed 1) against the same
solver's best named grid, as tune_targets.py scores the tuned grid. Far more solves than
``sdekit.tune`` spends: a bound on what any grid reaches there, not a tuner.

    OMP_NUM_THREADS=1 python benchmarks/tune_global_check.py   # results/tune_global_check.*
"""
from __future__ import annotations

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

from tune_targets import DIM, DTYPE, N_HELDOUT, SDES  # noqa: E402

import sdekit  # noqa: E402
from sdekit.bench.problems import gaussian_problem  # noqa: E402
from sdekit.tune import NAMED_GRIDS, prior_states  # noqa: E402

CELLS = [("vp", "ddim", 5), ("vp", "ddim", 10), ("flow", "dpmpp_2m", 5),
         ("flow", "unipc_bh2", 5), ("ddpm-cosine", "unipc_bh2", 5)]
RANDOM_STARTS, MAX_SOLVES = 8, 1500


def check(sde_name: str, solver: str, steps: int) -> dict:
    sde = SDES[sde_name]()
    pb = gaussian_problem(sde=sde, dim=DIM)
    x_cal = prior_states(sde, 64, (DIM,), seed=0, dtype=DTYPE)
    x_ho = prior_states(sde, N_HELDOUT["gaussian"], (DIM,), seed=1, dtype=DTYPE)
    r_cal, r_ho = pb.flow(x_cal.double()), pb.flow(x_ho.double())
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

    def times_of(z):
        w = np.exp(z - z.max())
        t = torch.tensor(np.concatenate([[t0], t0 + (t1 - t0) * np.cumsum(w / w.sum())]))
        t[-1] = t1
        return t

    def f(z):
        e = rms(times_of(z), x_cal, r_cal)
        return e if np.isfinite(e) else 1e300

    starts = [np.log(np.abs(np.diff(t.numpy()))) for t in named.values()]
    rng = np.random.default_rng(0)
    starts += [rng.normal(size=steps) for _ in range(RANDOM_STARTS)]
    best, solves, t_start = (np.inf, None), 0, time.perf_counter()
    for z0 in starts:
        res = minimize(f, z0, method="Nelder-Mead",
                       options={"maxfev": MAX_SOLVES, "xatol": 1e-4, "fatol": 1e-9})
        solves += res.nfev
        if res.fun < best[0]:
            best = (float(res.fun), res.x)
    named_ho = {k: rms(t, x_ho, r_ho) for k, t in named.items()}
    bn = min(named_ho, key=named_ho.get)
    ho = rms(times_of(best[1]), x_ho, r_ho)
    return {"sde": sde_name, "solver": solver, "nfe": steps, "best_found_heldout_rms": ho,
            "best_found_fit_rms": best[0], "best_named_grid": bn,
            "best_named_heldout_rms": named_ho[bn], "ratio": ho / named_ho[bn],
            "starts": len(starts), "solves": int(solves),
            "wall_s": time.perf_counter() - t_start, "times": times_of(best[1]).tolist()}


def main() -> int:
    torch.set_num_threads(1)
    tt = json.loads((ROOT / "benchmarks" / "results" / "tune_targets.json").read_text())
    tuned = {(r["sde"], r["solver"], r["nfe"]): r["ratio"] for r in tt["rows"]
             if r["problem"] == "gaussian"}
    rows = []
    for cell in CELLS:
        row = check(*cell)
        row["tune_ratio"] = tuned.get(cell)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
    out = ROOT / "benchmarks" / "results"
    (out / "tune_global_check.json").write_text(json.dumps(
        {"command": "OMP_NUM_THREADS=1 python benchmarks/tune_global_check.py",
         "tune_targets_command": tt["command"], "rows": rows}, indent=1) + "\n")
    lines = ["# sdekit.tune against a brute-force grid search (16-dim Gaussian)", "",
             "`OMP_NUM_THREADS=1 python benchmarks/tune_global_check.py`: multi-start "
             f"Nelder-Mead ({RANDOM_STARTS} random starts and every named grid, up to "
             f"{MAX_SOLVES} solves each) on the 64 calibration states; held-out RMS over the "
             "same solver's best named grid. 'sdekit.tune' is the ratio of "
             f"`{tt['command']}` (benchmarks/results/tune_targets.md).", "",
             "| SDE | solver | NFE | best grid found / best named | sdekit.tune / best named | "
             "best named grid | solves |", "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        tr = f"{r['tune_ratio']:.3f}" if r["tune_ratio"] is not None else "-"
        lines.append(f"| {r['sde']} | {r['solver']} | {r['nfe']} | {r['ratio']:.3f} | {tr} | "
                     f"{r['best_named_grid']} | {r['solves']} |")
    (out / "tune_global_check.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
