"""Every deterministic fixed-grid solver x named grid x forward process, and the cells that are
far worse than the same solver on its best grid (issue 16's third target), plus the measurement
behind the automatic lower-order final step (:meth:`ExpIntegrator.lof`).

On sdekit bench's analytic problems (16-dim Gaussian and 8-mode Gaussian mixture with exact
models, data seed 0) under VP, DDPM (linear), the DDPM squared-cosine table, VE, EDM and flow
matching, at NFE 5, 10 and 20: the RMS of every registered deterministic ODE solver with a fixed
grid (not adaptive, not learned, not stochastic: an SDE solver's RMS against the PF-ODE reference
measures its noise, not its grid) on every named grid of :data:`sdekit.tune.NAMED_GRIDS`, on
256 prior states (seed 1). Solvers that take ``lower_order_final`` run with it on and off (the
automatic rule picks one of the two, so every candidate rule is scored from these two numbers);
each such row records the features the rule may read: the grid's last lambda step, its ratio to
the step before, the step count and the solver's order.

A cell *violates* where its RMS is more than 10x the same solver's RMS on its best grid (same
problem, process and NFE) at the automatic lower-order final step; ``--report`` lists them.

    OMP_NUM_THREADS=1 python benchmarks/grid_cells.py            # results/grid_cells.json + .md
    OMP_NUM_THREADS=1 python benchmarks/grid_cells.py --report   # rebuild the .md from the json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sdekit
from default_rule import DIM, KINDS, NFES, SDES, rms
from sdekit.bench.problems import gaussian_problem, gmm_problem
from sdekit.bench.runner import steps_for_budget
from sdekit.grids import make_grid
from sdekit.solvers import get_solver, list_solvers
from sdekit.solvers.base import Problem
from sdekit.solvers.exp_integrator import ExpIntegrator, last_lambda_step_ratio
from sdekit.tune import NAMED_GRIDS, prior_states

N_STATES = 256
FAR = 10.0
OUT = ROOT / "benchmarks" / "results"


def sweep_solvers() -> list[str]:
    """Deterministic solvers on a fixed grid."""
    return [d["name"] for d in list_solvers()
            if d["kind"] == "ODE" and not d["adaptive"] and not d["grid_free"]]


def takes_lof(name: str) -> bool:
    try:
        return isinstance(get_solver(name, lower_order_final=None), ExpIntegrator)
    except TypeError:
        return False


def solver_order(name: str) -> int:
    """The multistep order the lower-order final step lowers (DEIS: its AB order + 1)."""
    s = get_solver(name)
    ab = getattr(s, "ab_order", None)
    return int(ab + 1 if ab is not None else getattr(s, "max_order", None) or s.order)


def run_cells(sde_name: str, kind: str) -> list[dict[str, Any]]:
    sde = SDES[sde_name]()
    prob = (gaussian_problem if kind == "gaussian" else gmm_problem)(sde=sde, dim=DIM, seed=0)
    x = prior_states(sde, N_STATES, (DIM,), seed=1)
    ref = (prob.flow(x.double()) if prob.flow is not None else
           sdekit.sample(sde, prob.model, x.double(), solver="dopri5", rtol=1e-8, atol=1e-8,
                         float64=True).x).double()
    rows = []
    for name in sweep_solvers():
        lof_variants: tuple[bool | None, ...] = (True, False) if takes_lof(name) else (None,)
        for nfe in NFES:
            steps, _, _ = steps_for_budget(get_solver(name), nfe)
            if steps is None:
                continue
            for g, go in NAMED_GRIDS:
                try:
                    times = make_grid(sde, g, steps, **go)
                except ValueError as e:
                    rows.append({"solver": name, "grid": g, "nfe": nfe, "error": str(e)})
                    continue
                row: dict[str, Any] = {"problem": kind, "sde": sde_name, "solver": name,
                                       "grid": g, "nfe": nfe, "steps": steps}
                lam = sde.lambda_(times).double()
                d = lam[torch.isfinite(lam)].diff()
                row["last_step"] = float(d[-1]) if d.numel() else None
                row["last_ratio"] = last_lambda_step_ratio(lam)
                for lof in lof_variants:
                    opts = {} if lof is None else {"lower_order_final": lof}
                    key = "rms" if lof is None else f"rms_lof_{lof}"
                    try:
                        out = sdekit.sample(sde, prob.model, x, solver=name, grid=times, **opts).x
                        row[key] = rms(out, ref)
                    except ValueError as e:
                        row[key], row["error"] = math.inf, str(e)
                if lof_variants != (None,):
                    slv = get_solver(name)
                    row["order"] = solver_order(name)
                    row["auto_lof"] = bool(slv.lof(Problem(sde, prob.model, times, None)))
                    row["rms"] = row[f"rms_lof_{row['auto_lof']}"]
                rows.append(row)
    return rows


def auto_rms(row: dict[str, Any]) -> float:
    return row.get("rms", math.inf)


def refused(row: dict[str, Any]) -> bool:
    """The solver refused the cell with a clear error (e.g. a start at alpha = 0)."""
    return "error" in row and not math.isfinite(auto_rms(row))


def violations(rows: list[dict[str, Any]], far: float = FAR) -> list[dict[str, Any]]:
    """Cells (not refused) more than ``far`` times the same solver's best grid (problem, SDE,
    NFE); a non-finite RMS without an error counts as infinitely worse."""
    best: dict[tuple[str, str, str, int], float] = {}
    for r in rows:
        if "problem" in r and not refused(r):
            k = (r["problem"], r["sde"], r["solver"], r["nfe"])
            best[k] = min(best.get(k, math.inf), auto_rms(r))
    out = []
    for r in rows:
        if "problem" not in r or refused(r):
            continue
        b = best[(r["problem"], r["sde"], r["solver"], r["nfe"])]
        ratio = auto_rms(r) / b if b > 0 else math.inf
        if r["nfe"] >= 5 and not ratio <= far:
            out.append({**r, "best_rms": b, "ratio": ratio})
    return out


def markdown(res: dict[str, Any]) -> str:
    v = violations(res["rows"])
    lines = ["# Solver x named grid x forward process: cells far from the solver's best grid", "",
             f"`{res['command']}` ({res['total_wall_s']:.0f} s). {len(res['rows'])} cells; "
             f"{N_STATES} prior states, exact models; RMS against the exact flow map (Gaussian) "
             "or dopri5 at rtol = atol = 1e-8 (mixture). A cell is listed where its RMS (with the "
             f"automatic lower-order final step) is more than {FAR:g}x the same solver's RMS on "
             "its best named grid (same problem, process and NFE).", "",
             f"{len(v)} cells listed.", "",
             "| problem | SDE | solver | NFE | grid | RMS | best grid's RMS | ratio |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for r in sorted(v, key=lambda r: -r["ratio"]):
        lines.append(f"| {r['problem']} | {r['sde']} | {r['solver']} | {r['nfe']} | {r['grid']} "
                     f"| {r['rms']:.3g} | {r['best_rms']:.3g} | {r['ratio']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="rebuild the Markdown from the JSON")
    ap.add_argument("--sdes", nargs="*", default=list(SDES))
    ap.add_argument("--out", type=Path, default=OUT / "grid_cells.json")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads(args.out.read_text())
    else:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        for s in args.sdes:
            for kind in KINDS:
                t1 = time.perf_counter()
                rows += run_cells(s, kind)
                print(f"{s} {kind}: {time.perf_counter() - t1:.0f} s", flush=True)
        res = {"description": __doc__.splitlines()[0],
               "command": "OMP_NUM_THREADS=1 python benchmarks/grid_cells.py"
                          + ("" if args.sdes == list(SDES) else " --sdes " + " ".join(args.sdes)),
               "n_states": N_STATES, "dim": DIM, "grids": [g for g, _ in NAMED_GRIDS],
               "rows": rows, "total_wall_s": time.perf_counter() - t0,
               "environment": {"sdekit": sdekit.__version__, "torch": torch.__version__,
                               "python": platform.python_version(), "threads": 1}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, separators=(",", ":")) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(f"{len(violations(res['rows']))} cells more than {FAR:g}x the solver's best grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
