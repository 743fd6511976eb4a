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

from default_rule import DIM, KINDS, NFES, SDES, rms

import sdekit
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
                glabel = g + ("(" + ",".join(f"{k}={v}" for k, v in go.items()) + ")" if go else "")
                try:
                    times = make_grid(sde, g, steps, **go)
                except ValueError as e:
                    rows.append({"solver": name, "grid": glabel, "nfe": nfe, "error": str(e)})
                    continue
                row: dict[str, Any] = {"problem": kind, "sde": sde_name, "solver": name,
                                       "grid": glabel, "grid_name": g, "grid_options": go,
                                       "nfe": nfe, "steps": steps}
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


def refresh_auto(rows: list[dict[str, Any]]) -> None:
    """Re-apply this sdekit's automatic lower-order final rule to the stored on/off RMS (the
    rule picks one of the two: no solve needed)."""
    for r in rows:
        if "rms_lof_True" in r:
            sde = SDES[r["sde"]]()
            times = make_grid(sde, r.get("grid_name", r["grid"]), r["steps"],
                              **r.get("grid_options", {}))
            r["auto_lof"] = bool(get_solver(r["solver"]).lof(Problem(sde, None, times, None)))
            r["rms"] = r[f"rms_lof_{r['auto_lof']}"]


def _data_prediction(name: str) -> bool:
    return getattr(get_solver(name), "prediction", "x0") == "x0"


#: candidate automatic lower-order final rules, scored on the stored on/off RMS
LOF_RULES: dict[str, Any] = {
    "this sdekit (ExpIntegrator.lof)": lambda r: r["auto_lof"],
    "ratio > 2 or step > 1.4, every solver (the rule before)":
        lambda r: r["last_ratio"] > 2 or r["last_step"] > 1.4,
    "ratio > 2 only": lambda r: r["last_ratio"] > 2,
    "ratio > 2 or step > 1.4, data prediction; never for noise prediction":
        lambda r: (r["last_ratio"] > 2 or r["last_step"] > 1.4) if _data_prediction(r["solver"])
        else False,
    "below 10 steps (the rule of the first version)": lambda r: r["steps"] < 10,
    "never": lambda r: False,
    "always": lambda r: True,
}


def lof_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per rule and problem (all, gaussian, gmm): RMS of its choice over the better of on/off
    (geo mean, max, cells > 2x)."""
    sel = [r for r in rows if "rms_lof_True" in r and math.isfinite(r["rms_lof_True"])
           and math.isfinite(r["rms_lof_False"]) and min(r["rms_lof_True"], r["rms_lof_False"]) > 0]
    out: dict[str, dict[str, Any]] = {}
    for name, rule in LOF_RULES.items():
        for prob in ("all", "gaussian", "gmm"):
            q = [(r["rms_lof_True"] if rule(r) else r["rms_lof_False"])
                 / min(r["rms_lof_True"], r["rms_lof_False"]) for r in sel
                 if prob in ("all", r["problem"])]
            out.setdefault(name, {})[prob] = {
                "cells": len(q), "geo_mean": math.exp(sum(map(math.log, q)) / len(q)),
                "max": max(q), "over_2x": sum(x > 2 for x in q)}
    return out


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


#: solver families for the reasons of far cells (sdekit.solvers' families)
EXPLICIT_T = ("euler", "heun", "rk4", "edm_euler", "edm_heun")
STAGES = ("dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "deis_rhork")


def reason(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The documented reason of a far cell. ``grid`` is measured: the best solver on this grid
    is itself more than FAR x the best solver on the best grid (the grid, not the solver,
    fails). The others name the solver family whose step cannot take that grid's long steps."""
    same = [x for x in rows if x.get("problem") == r["problem"] and x.get("sde") == r["sde"]
            and x.get("nfe") == r["nfe"] and not refused(x)]
    on_grid = min(auto_rms(x) for x in same if x["grid"] == r["grid"])
    if on_grid > FAR * min(auto_rms(x) for x in same):
        return "grid: every solver fails on it"
    if r["solver"] in EXPLICIT_T:
        return "explicit Runge-Kutta in t: unstable on the grid's long steps"
    if r["solver"] in STAGES:
        return "intermediate stages at the lambda midpoints of long steps"
    return "multistep extrapolation from the previous nodes over a longer step"


def markdown(res: dict[str, Any]) -> str:
    v = violations(res["rows"])
    for r in v:
        r["reason"] = reason(r, res["rows"])
    lines = ["# Solver x named grid x forward process: cells far from the solver's best grid", "",
             f"`{res['command']}` ({res['total_wall_s']:.0f} s). {len(res['rows'])} cells; "
             f"{N_STATES} prior states, exact models; RMS against the exact flow map (Gaussian) "
             "or dopri5 at rtol = atol = 1e-8 (mixture). A cell is listed where its RMS (with the "
             f"automatic lower-order final step) is more than {FAR:g}x the same solver's RMS on "
             "its best named grid (same problem, process and NFE).", "",
             *([res["note"], ""] if res.get("note") else []),
             f"{len(v)} cells listed (refused cells, e.g. solvers that cannot start at alpha = 0 "
             "on flow matching, are not: they raise a clear error).", "",
             "Reasons: `grid` is measured (the best solver on that grid is itself more than "
             f"{FAR:g}x the best solver on the best grid); the others name the solver family "
             "whose step fails on that grid's long steps.", "",
             "| reason | cells | by process: grid (cells) |", "|---|---:|---|"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in v:
        by.setdefault(r["reason"], []).append(r)
    for k, rs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        cnt: dict[str, int] = {}
        for r in rs:
            cnt[f"{r['sde']}: {r['grid']}"] = cnt.get(f"{r['sde']}: {r['grid']}", 0) + 1
        lines.append(f"| {k} | {len(rs)} | " + ", ".join(f"{a} ({b})" for a, b in sorted(
            cnt.items())) + " |")
    lines += ["",
              "| problem | SDE | solver | NFE | grid | RMS | best grid's RMS | ratio | reason |",
              "|---|---|---|---:|---|---:|---:|---:|---|"]
    for r in sorted(v, key=lambda r: (r["solver"], r["sde"], r["problem"], r["nfe"])):
        lines.append(f"| {r['problem']} | {r['sde']} | {r['solver']} | {r['nfe']} | {r['grid']} "
                     f"| {r['rms']:.3g} | {r['best_rms']:.3g} | {r['ratio']:.1f} | "
                     f"{r['reason']} |")
    lines += ["", "## The automatic lower-order final step", "",
              "Every solver that takes `lower_order_final` ran with it on and off in every cell; "
              "a rule picks one. Its RMS over the better of the two:", "",
              "| rule | all: cells, geo mean, max, cells > 2x | Gaussian | mixture |",
              "|---|---|---|---|"]
    for k, x in res["lof_summary"].items():
        lines.append(f"| {k} | " + " | ".join(
            f"{y['cells']}, {y['geo_mean']:.3f}, {y['max']:.2f}, {y['over_2x']}"
            for y in x.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="rebuild the Markdown from the JSON")
    ap.add_argument("--sdes", nargs="*", default=list(SDES))
    ap.add_argument("--out", type=Path, default=OUT / "grid_cells.json")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="shard JSONs (from --sdes runs) to combine into --out")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        res = {**parts[0], "rows": [r for p in parts for r in p["rows"]],
               "total_wall_s": sum(p["total_wall_s"] for p in parts),
               "command": "OMP_NUM_THREADS=1 python benchmarks/grid_cells.py",
               "shards": [p["command"] for p in parts]}
    elif args.report:
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
    refresh_auto(res["rows"])
    res["lof_summary"] = lof_summary(res["rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, separators=(",", ":")) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(f"{len(violations(res['rows']))} cells more than {FAR:g}x the solver's best grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
