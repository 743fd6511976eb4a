"""``sdekit distill``: teacher trajectories from a checkpoint, then a one-pass operator."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill", help="distil a checkpoint into a one-pass operator sampler (solver 'fno')",
        description="Solve the probability-flow ODE of a trained checkpoint from prior draws "
                    "(resumable, on disk), then train a temporal Fourier neural operator that "
                    "maps x_T to the trajectory in one pass (Zheng et al. 2023). Sample with "
                    "`sdekit sample --checkpoint TEACHER --solver fno --operator OUT/operator.pt`.")
    a = p.add_argument
    a("--checkpoint", type=Path, required=True, help="the teacher (a `sdekit train` checkpoint)")
    a("--out", type=Path, required=True, help="directory for trajectories and operator.pt")
    a("--n", type=int, default=4096, help="number of teacher trajectories")
    a("--solver", default="heun", help="teacher solver (any registered fixed-grid solver)")
    a("--steps-per-segment", type=int, default=8,
      help="teacher steps between consecutive output times")
    a("--slots", type=int, default=4, help="output times of the operator (the last is t_min)")
    a("--spacing", default="quadratic", help="spacing of the output times")
    a("--train-steps", type=int, default=3000)
    a("--batch", type=int, default=128)
    a("--lr", type=float, default=2e-4)
    a("--width", type=int, default=64)
    a("--layers", type=int, default=2)
    a("--modes", type=int, default=2)
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=None)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distill import generate_trajectories, train_operator
    from ..models import wrap
    from ..training.checkpoint import CheckpointError, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("n", "steps_per_segment", "slots", "batch"):
        if getattr(args, name) < 1:
            print(f"sdekit distill: error: --{name.replace('_', '-')}={getattr(args, name)} is "
                  "invalid: expected an integer >= 1", file=sys.stderr)
            return 2
    try:
        net, sde, cfg = load_model(args.checkpoint)
    except CheckpointError as e:
        print(f"sdekit distill: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        data = generate_trajectories(args.out / "trajectories", sde, wrap(net, sde),
                                     net.data_shape, args.n, solver=args.solver,
                                     steps_per_segment=args.steps_per_segment, slots=args.slots,
                                     spacing=args.spacing, seed=args.seed, progress=True)
        t1 = time.perf_counter()
        train_operator(data, args.out / "operator.pt", sde, sde_name=cfg["sde"],
                       sde_kwargs=cfg.get("sde_kwargs", {}), width=args.width,
                       layers=args.layers, modes=args.modes, steps=args.train_steps,
                       batch=args.batch, lr=args.lr, seed=args.seed, progress=True)
    except ValueError as e:
        print(f"sdekit distill: error: {e}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    report = {"teacher": str(args.checkpoint), "trajectories_s": round(t1 - t0, 1),
              "training_s": round(t2 - t1, 1), "operator": str(args.out / "operator.pt")}
    (args.out / "distill.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0
