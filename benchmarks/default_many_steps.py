"""The option-free default at many steps: the floored logsnr grid's first step against N.

``unipc_bh2`` of order 3 (the default's solver at N >= 10) at N = 20, 40, 80, 160 on the
16-dim Gaussian (exact flow map) and 8-mode mixture (dopri5 at rtol = atol = 1e-10) of sdekit
bench, 128 held-out prior states (seed 1), float64, under VP, flow matching, the squared-cosine
DDPM table and EDM, on three grids: the floor fixed at -2.5, the default's falling floor
(``sdekit.solvers.registry.default_lambda_floor``) and the plain logsnr grid.

    # writes results/default_many_steps.md
    OMP_NUM_THREADS=1 python benchmarks/default_many_steps.py
"""
from __future__ import annotations

import sys
import time
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdekit
from sdekit.bench.problems import gaussian_problem, gmm_problem
from sdekit.solvers.registry import DEFAULT_LAMBDA_FLOOR, default_lambda_floor

prior_states = import_module("sdekit.tune").prior_states
SDES = {"VP": sdekit.VPSDE, "flow": sdekit.FlowSDE, "cosine DDPM": sdekit.DiscreteDDPM.squaredcos,
        "EDM": sdekit.EDMSDE}
STEPS = (20, 40, 80, 160)
FLOOR_SCAN = (-2.5, -3.0, -3.5, -4.0)
GRIDS = {"floor fixed at -2.5": lambda n: {"lambda_floor": DEFAULT_LAMBDA_FLOOR},
         "falling floor (the rule)": lambda n: {"lambda_floor": default_lambda_floor(n)},
         "plain logsnr": lambda n: {}}


def rms(p, x: torch.Tensor, ref: torch.Tensor, n: int, grid_options: dict) -> float:
    """RMS error of unipc_bh2 order 3 on the logsnr grid with ``grid_options`` at ``n`` steps."""
    out = sdekit.sample(p.sde, p.model, x, steps=n, grid="logsnr", grid_options=grid_options,
                        solver=sdekit.get_solver("unipc_bh2", order=3)).x
    return float((out - ref).pow(2).mean().sqrt())


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lines = ["# The option-free default at many steps", "",
             "`OMP_NUM_THREADS=1 python benchmarks/default_many_steps.py`. " + " ".join(
                 __doc__.split("\n\n")[1].split()), "",
             "RMS at N = " + " / ".join(map(str, STEPS)) + ":", "",
             "| problem | " + " | ".join(GRIDS) + " |", "|---|" + "---|" * len(GRIDS)]
    for kind, make in (("Gaussian", gaussian_problem), ("mixture", gmm_problem)):
        for name, sde_cls in SDES.items():
            sde = sde_cls()
            p = make(sde=sde, dim=16)
            x = prior_states(sde, 128, (16,), seed=1, dtype=torch.float64)
            ref = (p.flow(x) if kind == "Gaussian" else
                   sdekit.sample(sde, p.model, x, solver="dopri5", rtol=1e-10, atol=1e-10,
                                 float64=True).x)
            cells = []
            for grid_options in GRIDS.values():
                cells.append(" / ".join(f"{rms(p, x, ref, n, grid_options(n)):.2e}"
                                        for n in STEPS))
            lines.append(f"| {kind}, {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", "The first step's error against the floor: the same solver on the Gaussians at "
              "N = 160 / 320 with a fixed floor (once the other steps' error is below it, the "
              "RMS stops falling with N):", "", "| floor | Gaussian, VP | Gaussian, flow |",
              "|---:|---|---|"]
    for floor in FLOOR_SCAN:
        cells = []
        for sde in (sdekit.VPSDE(), sdekit.FlowSDE()):
            p = gaussian_problem(sde=sde, dim=16)
            x = prior_states(sde, 128, (16,), seed=1, dtype=torch.float64)
            ref = p.flow(x)
            cells.append(" / ".join(f"{rms(p, x, ref, n, {'lambda_floor': floor}):.2e}"
                                    for n in (160, 320)))
        lines.append(f"| {floor} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"{time.perf_counter() - t0:.0f} s on one thread."]
    out = ROOT / "benchmarks" / "results" / "default_many_steps.md"
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
