"""One-pass operator (solver 'fno') against the fast samplers at a few NFE, on a trained model.

Error metric: RMS distance to the teacher's endpoint from the same x_T (the teacher is the
operator's own teacher solve, re-run on held-out prior draws). Every registered deterministic
fixed-grid solver is tried on every grid at the given NFE; the best configuration is reported
beside the operator.

    sdekit train --data eight_gaussians --sde vp --out runs/eg
    sdekit distill --checkpoint runs/eg/checkpoint.pt --out runs/eg-op
    python benchmarks/operator_vs_fast.py --checkpoint runs/eg/checkpoint.pt \
        --operator runs/eg-op/operator.pt --out benchmarks/results/operator_eight_gaussians.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import sdekit
from sdekit.distill import load_operator
from sdekit.grids import GRIDS
from sdekit.models import wrap
from sdekit.training.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--operator", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--nfe", type=int, nargs="+", default=[4])
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, sde, cfg = load_model(args.checkpoint)
    op, ocfg = load_operator(args.operator)
    meta = json.load(open(f"{ocfg['train']['data']}/meta.json"))
    shape = (args.n,) + tuple(net.data_shape)
    model = wrap(net, sde)
    from sdekit.distill import teacher_grid
    grid = teacher_grid(sde, torch.tensor(meta["times_out"], dtype=torch.float64),
                        meta["steps_per_segment"])
    with torch.no_grad():
        ref = sdekit.sample(sde, model, shape=shape, solver=meta["solver"], grid=grid,
                            seed=args.seed)
        t0 = time.perf_counter()
        fno = sdekit.sample(sde, model, shape=shape, solver="fno", operator=(op, ocfg),
                            steps=1, seed=args.seed)
        fno_s = time.perf_counter() - t0
    rms = lambda a: float((a - ref.x).pow(2).mean().sqrt())  # noqa: E731
    rows = [{"config": "fno (one pass)", "nfe": fno.nfe, "rms_vs_teacher": rms(fno.x),
             "seconds": fno_s}]
    print(rows[0])
    for nfe in args.nfe:
        best = None
        for name in sdekit.solver_names():
            s = sdekit.get_solver(name)
            if s.stochastic or s.adaptive or s.external_loop:
                continue
            steps = next((k for k in range(1, nfe + 1) if s.expected_nfe(k) == nfe), None)
            if steps is None or steps < s.min_steps:
                continue
            for g in GRIDS:
                try:
                    with torch.no_grad():
                        sol = sdekit.sample(sde, model, shape=shape, solver=name, steps=steps,
                                            grid=g, seed=args.seed)
                except ValueError:
                    continue
                row = {"config": f"{name} / {g}", "nfe": sol.nfe, "rms_vs_teacher": rms(sol.x)}
                if best is None or row["rms_vs_teacher"] < best["rms_vs_teacher"]:
                    best = row
        print(best)
        rows.append(best)
    if args.out:
        json.dump({"checkpoint": args.checkpoint, "operator": args.operator,
                   "teacher": {k: meta[k] for k in ("solver", "steps_per_segment", "teacher_nfe")},
                   "n": args.n, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
