"""DPM-Solver-v3 with estimated EMS against DPM-Solver++(2M/3M) and UniPC-bh2 (issue 16, item 5).

The problems of benchmarks/default_rule.py under VP: the 16-dim Gaussian (exact PF-ODE flow map as
reference) and the 8-mode Gaussian mixture (dopri5, rtol = atol = 1e-8, float64), exact models.
The EMS are estimated from 256 calibration states drawn from the prior (seed 0) carried along the
EMS grid by a teacher solve (``estimate_ems(..., source="prior")``: no data used); every RMS is
on 512 held-out prior states (seed 1), float32 states, at NFE 5 and 10, on two grids: ``logsnr``
(every solver's default) and ``logsnr`` with ``lambda_floor=-2.5`` (the option-free default's).

    OMP_NUM_THREADS=1 python benchmarks/dpm_solver_v3.py     # writes results/dpm_solver_v3.md
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdekit
from sdekit.bench.problems import gaussian_problem, gmm_problem
from sdekit.grids import make_grid
from sdekit.solvers.dpm_solver_v3 import estimate_ems
from sdekit.tune import prior_states

DIM, N_CAL, N_HELDOUT, NFES = 16, 256, 512, (5, 10)
GRIDS = (("logsnr", {}), ("logsnr(floor -2.5)", {"lambda_floor": -2.5}))
SOLVERS = (("dpm_solver_v3 (EMS, order 3)", "dpm_solver_v3", {"order": 3, "corrector": False}),
           ("dpm_solver_v3 (EMS, order 2 + corrector: the default)", "dpm_solver_v3",
            {"order": 2, "corrector": True}),
           ("dpm_solver_v3 (EMS, order 3 + corrector)", "dpm_solver_v3",
            {"order": 3, "corrector": True}),
           ("dpm_solver_v3 (EMS, order 3, pseudo-order)", "dpm_solver_v3",
            {"order": 3, "corrector": False, "pseudo_order": True}),
           ("dpm_solver_v3 (no EMS: data_prediction, order 2 + corrector)", "dpm_solver_v3",
            {"ems": "data_prediction"}),
           ("dpmpp_2m", "dpmpp_2m", {}), ("dpmpp_3m", "dpmpp_3m", {}),
           ("unipc_bh2", "unipc_bh2", {}), ("unipc_bh2 (order 3)", "unipc_bh2", {"order": 3}))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    e = float((a.double() - b.double()).pow(2).mean().sqrt())
    return e if math.isfinite(e) else math.inf


def run(kind: str) -> tuple[list[str], dict[str, float]]:
    sde = sdekit.VPSDE()
    problem = (gaussian_problem if kind == "gaussian" else gmm_problem)(sde=sde, dim=DIM, seed=0)
    model = problem.model
    x_cal = prior_states(sde, N_CAL, (DIM,), seed=0, dtype=torch.float64)
    x_ho = prior_states(sde, N_HELDOUT, (DIM,), seed=1, dtype=torch.float32)
    t0 = time.perf_counter()
    ref = (problem.flow(x_ho.double()) if problem.flow is not None else
           sdekit.sample(sde, model, x_ho.double(), solver="dopri5", rtol=1e-8, atol=1e-8,
                         float64=True).x).double()
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ems = estimate_ems(sde, model, x_cal, n=200, source="prior")
    cost = {"ems_wall_s": time.perf_counter() - t0, "ems_nfe": ems.nfe, "ref_wall_s": ref_s}
    rows = []
    for label, name, opts in SOLVERS:
        o = {"ems": ems, **opts} if name == "dpm_solver_v3" else opts
        cells = []
        for _, go in GRIDS:
            for nfe in NFES:
                grid = make_grid(sde, "logsnr", nfe, **go)
                sol = sdekit.sample(sde, model, x_ho, solver=name, grid=grid, **o)
                assert sol.nfe == nfe, (label, sol.nfe)
                cells.append(rms(sol.x, ref))
        rows.append((label, cells))
    default = [rms(sdekit.sample(sde, model, x_ho, steps=n).x, ref) for n in NFES]
    lines = [f"### {problem.description}", "",
             f"EMS: {cost['ems_nfe']} model calls on the {N_CAL} calibration states "
             f"({cost['ems_wall_s']:.1f} s); reference: "
             f"{'exact flow map' if problem.flow is not None else 'dopri5 1e-8'} "
             f"({cost['ref_wall_s']:.1f} s). Held-out RMS ({N_HELDOUT} states); in brackets: "
             "ratio to the best of dpmpp_2m / dpmpp_3m / unipc_bh2 (both orders) in that column.",
             "", "| solver | " + " | ".join(f"{g} NFE {n}" for g, _ in GRIDS for n in NFES) + " |",
             "|---|" + "---|" * (len(GRIDS) * len(NFES))]
    base = [min(c[k] for lab, c in rows if not lab.startswith("dpm_solver_v3"))
            for k in range(len(GRIDS) * len(NFES))]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(f"{v:.3g} ({v / b:.2f}x)" for v, b in
                                                  zip(cells, base)) + " |")
    lines.append("| option-free default (`sample(steps=N)`: unipc_bh2, its rule) | | | " +
                 " | ".join(f"{v:.3g}" for v in default) + " |")
    return lines, cost


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = ["# DPM-Solver-v3 with estimated EMS (benchmarks/dpm_solver_v3.py)", "",
           "    OMP_NUM_THREADS=1 python benchmarks/dpm_solver_v3.py", "",
           __doc__.split("\n\n")[1].replace("\n", " "), ""]
    for kind in ("gaussian", "gmm"):
        lines, _ = run(kind)
        out += lines + [""]
        print("\n".join(lines), flush=True)
    out.append(f"Total wall time {time.perf_counter() - t0:.0f} s (torch {torch.__version__}, "
               "1 thread).")
    path = ROOT / "benchmarks" / "results" / "dpm_solver_v3.md"
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
