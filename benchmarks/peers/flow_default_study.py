#!/usr/bin/env python
"""Which grid should the option-free call use on a flow-matching process? A check beyond the two
problems of ``run.py --sde flow``: four Gaussians (dimensions 8-64, eigenvalue ranges 1e-4..4,
zero and nonzero means) and three Gaussian mixtures (dimensions 8-32, 4-8 modes, spreads 0.5-2),
each with an exact flow model under ``FlowSDE()``, 256 starting states at t = 1.

For every problem and NFE (5, 10, 20) the best RMS over a set of solver x grid configurations
(the solvers that start at t = 1, orders 1-3, on every named grid and uniform with shift 3) is
the yardstick; the table gives, for the default solver on each grid (and, for comparison, with
``order=3``), the geometric mean and the largest of its ratio to that best over the problems,
and on how many problems it is within 1.25x. References: exact (Gaussians) or dopri5 at rtol =
atol = 1e-10 (mixtures). Writes flow_default_study.md next to this script.

    python benchmarks/peers/flow_default_study.py     # about 4 min on 1 CPU thread
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

import sdekit
from sdekit import FlowSDE, GaussianData, sample
from sdekit.bench.problems import gmm_problem

HERE = Path(__file__).resolve().parent
F64 = torch.float64
FLOW = FlowSDE()
N_STATES = 256
BUDGETS = (5, 10, 20)


def gaussian(dim, eig_max, eig_min, seed, mean_scale=0.0):
    d = GaussianData.random(FLOW, dim=dim, eig_max=eig_max, eig_min=eig_min, seed=seed,
                            mean_scale=mean_scale)
    x1 = torch.randn(N_STATES, dim, generator=torch.Generator().manual_seed(seed + 7), dtype=F64)
    c = (1 - FLOW.t_min) ** 2 * d.eigvals + FLOW.t_min ** 2   # exact map from t = 1 to t_min
    ref = ((x1 @ d.eigvecs) * c.sqrt()) @ d.eigvecs.T + (1 - FLOW.t_min) * d.mean
    return (f"Gaussian dim {dim}, eigenvalues {eig_max:g}..{eig_min:g}, mean scale "
            f"{mean_scale:g}, seed {seed}"), d.model("flow"), x1, ref


def mixture(dim, seed, spread=1.0, eig_max=0.1, eig_min=1e-3, components=8):
    model = gmm_problem(FLOW, dim=dim, seed=seed, spread=spread, eig_max=eig_max,
                        eig_min=eig_min, components=components).model
    x1 = torch.randn(N_STATES, dim, generator=torch.Generator().manual_seed(seed + 7), dtype=F64)
    ref = sample(FLOW, model, x1, solver="dopri5", rtol=1e-10, atol=1e-10).x
    return (f"mixture dim {dim}, {components} modes, spread {spread:g}, eigenvalues "
            f"{eig_max:g}..{eig_min:g}, seed {seed}"), model, x1, ref


PROBLEMS = [lambda: gaussian(64, 1, 1e-4, 0), lambda: gaussian(16, 1, 1e-3, 1),
            lambda: gaussian(32, 4, 1e-2, 2, 1.0), lambda: gaussian(8, 0.5, 0.05, 3, 2.0),
            lambda: mixture(16, 0), lambda: mixture(8, 1, 2.0),
            lambda: mixture(32, 2, 0.5, 0.3, 1e-2, 4)]
SOLVERS = [("unipc_bh2", {}), ("unipc_bh2", {"order": 3}), ("unipc_bh1", {}),
           ("unipc_bh1", {"order": 3}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_2s", {}),
           ("unic_dpmpp_2m", {}), ("ddim", {})]
GRIDS = [("logsnr", {}), ("karras", {}), ("karras", {"rho": 5.0}), ("karras", {"rho": 3.0}),
         ("uniform", {}), ("uniform", {"shift": 3.0}), ("quadratic", {})]


def label(name, opts):
    return name + ("" if not opts else "(" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")")


def main() -> None:
    torch.set_num_threads(1)
    default = sdekit.solvers.DEFAULT_SOLVER   # the previous option-free default studied here
    ratios: dict[tuple[str, str, int], list[float]] = {}
    names = []
    for make in PROBLEMS:
        name, model, x1, ref = make()
        names.append(name)
        err = {}
        for (s, o), (g, go), n in itertools.product(SOLVERS, GRIDS, BUDGETS):
            x = sample(FLOW, model, x1, solver=s, steps=n, grid=g, grid_options=go or None, **o).x
            err[(label(s, o), label(g, go), n)] = float((x - ref).pow(2).mean().sqrt())
        for n in BUDGETS:
            best = min(v for k, v in err.items() if k[2] == n)
            for (s, g, m), v in err.items():
                if m == n and s in (default, f"{default}(order=3)"):
                    ratios.setdefault((s, g, n), []).append(v / best)
        print(name, "done", flush=True)
    lines = [__doc__.split("\n\n")[0], "", "Problems: " + "; ".join(names) + ".", "",
             "| solver | grid | " + " | ".join(f"NFE {n}: geo-mean / max / within 1.25x"
                                             for n in BUDGETS) + " |",
             "|---|---|" + "---|" * len(BUDGETS)]
    for s in (default, f"{default}(order=3)"):
        for g in dict.fromkeys(k[1] for k in ratios):
            cells = []
            for n in BUDGETS:
                r = ratios[(s, g, n)]
                gm = math.exp(sum(map(math.log, r)) / len(r))
                cells.append(f"{gm:.2f} / {max(r):.1f} / {sum(v <= 1.25 for v in r)} of {len(r)}")
            lines.append(f"| `{s}` | `{g}` | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nCommand: `python benchmarks/peers/flow_default_study.py`\n"
    (HERE / "flow_default_study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
