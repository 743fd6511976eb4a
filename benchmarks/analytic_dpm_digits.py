"""Analytic-DPM on the digits model (issue 17, section 4): FD-digits of ancestral sampling with
the beta-tilde, beta and analytic reverse variances (Bao et al. 2022) at 10, 20 and 50 steps.

The analytic variance uses Gamma_t = E |eps_hat(x_t, t)|^2 / d estimated on the training half of
the digits (901 images, one fresh noise draw per image and time) at the sampling grid's times,
clipped to the bounds of Bao et al.'s Thm. 2 with the data range [-1, 1]; "analytic (diagonal)"
is the per-pixel form. Every variant samples from the same initial states and noise seeds; FD-digits
is against the held-out half (`sdekit.training.fd_digits`), with the real-vs-real floor. Two
protocols: the sampler as registered (noise added at every step, the last one to t_min too), and
with the last state replaced by the model's x0 prediction (`denoise=True`, one more NFE), as
DDPM-style samplers usually finish (the analytic variance of the last step is the posterior
variance of x0, which is added as noise otherwise).

    python benchmarks/analytic_dpm_digits.py --checkpoint runs/digits/checkpoint.pt

Writes benchmarks/results/analytic_dpm_digits.{json,md} (after every cell, so a partial run
keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sdekit
from sdekit.bench.problems import problem_from_checkpoint
from sdekit.solvers import get_solver
from sdekit.solvers.analytic_dpm import MomentTable, estimate_moments
from sdekit.training.data import load_dataset
from sdekit.training.fd_digits import FDDigits

VARIANTS = {"beta_tilde": {}, "beta": {"variance": "beta"},
            "analytic": {"variance": "analytic"}, "analytic (diagonal)": {"variance": "analytic"}}
PROTOCOLS = {"noise (as registered)": False, "x0 prediction (+1 NFE)": True}


def write(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    steps = sorted({c["steps"] for c in out["cells"]})
    protocols = {c["protocol"]: None for c in out["cells"]}
    lines = [(f"Ancestral sampling of the digits model `{out['checkpoint']}` ({out['n']} "
              f"samples per cell, grid `{out['grid']}`, seed {out['seed']}); FD-digits against "
              f"the held-out half (real-vs-real floor {out['fd_floor']:.3f}). Analytic variance: "
              f"Gamma from {out['gamma_n']} training images noised to each grid time "
              f"({out['gamma_s']:.0f} s for all grids), clipped to Bao et al.'s bounds with the "
              f"data range [-1, 1]. `{out['command']}`:"), "",
             "| variance | last step | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|---|" + "---:|" * len(steps)]
    for pr in protocols:
        for v in VARIANTS:
            row = {c["steps"]: c["fd"] for c in out["cells"]
                   if c["variance"] == v and c["protocol"] == pr}
            if row:
                lines.append(f"| {v} | {pr} | " + " | ".join(f"{row[s]:.2f}" if s in row else ""
                                                              for s in steps) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/digits/checkpoint.pt")
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("-n", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/analytic_dpm_digits")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problem = problem_from_checkpoint(args.checkpoint)
    sde, model = problem.sde, problem.model
    train = load_dataset("digits").x.float()
    fd = FDDigits()
    grid_name = get_solver("ancestral").grid_for(sde)
    steps_list = [int(s) for s in args.steps.split(",")]
    x_T = problem.sample_init(args.n, torch.Generator().manual_seed(args.seed))
    out = {"checkpoint": args.checkpoint, "checkpoint_sha256": problem.fingerprint["sha256"],
           "n": args.n, "seed": args.seed, "grid": grid_name,
           "fd_floor": fd.floor, "gamma_n": train.shape[0], "threads": args.threads,
           "command": "python benchmarks/analytic_dpm_digits.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in (("checkpoint", args.checkpoint),
                                                           ("steps", args.steps))),
           "gamma": {}, "cells": []}
    t0 = time.perf_counter()
    tables = {}
    for steps in steps_list:
        grid = sdekit.make_grid(sde, grid_name, steps)
        diag = estimate_moments(sde, model, train, grid, diagonal=True, seed=args.seed)
        flat = diag.gamma.flatten(1).mean(1)
        tables[steps] = (MomentTable(diag.times, flat, diag.n), diag)
        out["gamma"][str(steps)] = {"times": grid.tolist(), "gamma": flat.tolist()}
    out["gamma_s"] = time.perf_counter() - t0
    path = Path(args.out)
    for steps in steps_list:
        grid = sdekit.make_grid(sde, grid_name, steps)
        scalar, diag = tables[steps]
        for protocol, denoise in PROTOCOLS.items():
            for v, kw in VARIANTS.items():
                opts = dict(kw)
                if v.startswith("analytic"):
                    opts.update(moments=diag if "diagonal" in v else scalar,
                                data_range=(-1.0, 1.0))
                t1 = time.perf_counter()
                sol = sdekit.sample(sde, model, x_T, solver="ancestral", grid=grid,
                                    seed=args.seed, denoise=denoise, **opts)
                wall = time.perf_counter() - t1
                score = float(fd(sol.x))
                out["cells"].append({"variance": v, "protocol": protocol, "steps": steps,
                                     "nfe": sol.nfe, "fd": score, "wall_s": round(wall, 2)})
                print(f"{v:22s} {protocol:30s} {steps:3d} steps: FD-digits {score:.3f} "
                      f"({wall:.0f} s)", flush=True)
                write(out, path)


if __name__ == "__main__":
    main()
