"""What limits the samplers on the flow-matching mixture of ``benchmarks/peers/run.py --sde flow``.

For each problem draw (seed 0 and 1) and the best configurations of that bench, three
measurements against the same converged reference (dopri5 at 1e-10):

* how the RMS error is made up: the endpoints more than 1 from their reference (the mixture's
  modes are 4-6 apart: such a state has been sent towards another mode) and the RMS without the
  worst 5 of the 512 states;
* the start: the same solve with the first step from t = 1 replaced by the exact map (the state
  carried to grid point 1 by the reference), i.e. what a perfect start would gain;
* where the error is made: the solve restarted from the exact state at a few grid points k,
  each restart's final RMS (steps whose restart leaves the error unchanged made none of it).

Writes benchmarks/results/flow_gmm_analysis.{json,md}. About 5 min on one thread:

    python benchmarks/flow_gmm_analysis.py
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sdekit import make_grid, sample  # noqa: E402

spec = importlib.util.spec_from_file_location("peers_run", HERE / "peers" / "run.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)
F = R.FLOW
CASES = [(10, "unipc_bh2", {"order": 3}, "uniform", {}),
         (10, "unipc_bh2", {"order": 3}, "logsnr", {}),
         (20, "unipc_bh2", {"order": 3}, "uniform", {}),
         (20, "unipc_bh2", {"order": 3}, "logsnr", {})]


def restarts(n: int) -> list[int]:
    """The grid points the solve is restarted from (a few, each costs a reference solve)."""
    return sorted({0, 1, n // 4, n // 2, (3 * n) // 4, n - 3, n - 2})


def stats(x: torch.Tensor, ref: torch.Tensor) -> dict:
    e2 = (x.double() - ref).pow(2).sum(1)
    srt = e2.sort(descending=True).values
    n, d = x.shape
    return {"rms": math.sqrt(float(e2.sum()) / (n * d)),
            "rms_without_worst5": math.sqrt(float(srt[5:].sum()) / ((n - 5) * d)),
            "off_by_1": int((e2 > 1).sum())}


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.time()
    out = {"command": "python benchmarks/flow_gmm_analysis.py", "cases": []}
    for seed in (0, 1):
        prob = R.FlowProblem("gmm", seed=seed)
        ref = prob.at(F.t_min)
        for n, solver, opts, grid, gopts in CASES:
            g = make_grid(F, grid, n, **gopts)

            def solve(x: torch.Tensor, k: int = 0) -> torch.Tensor:
                return sample(F, prob.model, x, solver=solver, grid=g[k:], **opts).x

            row = {"seed": seed, "nfe": n, "solver": R.label(solver, opts),
                   "grid": R.label(grid, gopts), **stats(solve(prob.x1), ref),
                   "exact_first_step": stats(solve(prob.at(float(g[1])).clone(), 1), ref),
                   "restart_rms": {k: stats(solve(prob.x1 if k == 0 else
                                                  prob.at(float(g[k])).clone(), k), ref)["rms"]
                                   for k in restarts(n)},
                   "times": [round(float(t), 5) for t in g]}
            out["cases"].append(row)
            print(row["seed"], row["nfe"], row["grid"], round(time.time() - t0), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    res = HERE / "results"
    (res / "flow_gmm_analysis.json").write_text(json.dumps(out, indent=1))
    lines = [f"Command: `{out['command']}` ({out['seconds']} s). The flow-matching mixture of "
             "`benchmarks/peers/run.py --sde flow` (seed 0 and a second draw, seed 1), 512 "
             "paired states from t = 1, reference dopri5 at 1e-10.", "",
             "| seed | NFE | solver | grid | RMS | off by > 1 | RMS without worst 5 | RMS with "
             "an exact first step | restart from grid point k (t_k): RMS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["cases"]:
        lines.append(f"| {r['seed']} | {r['nfe']} | `{r['solver']}` | `{r['grid']}` | "
                     f"{r['rms']:.3g} | {r['off_by_1']} | {r['rms_without_worst5']:.3g} | "
                     f"{r['exact_first_step']['rms']:.3g} | "
                     + ", ".join(f"k={k} ({r['times'][k]:.3g}): {v:.2g}"
                                 for k, v in r["restart_rms"].items()) + " |")
    (res / "flow_gmm_analysis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
