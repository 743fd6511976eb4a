"""How far a distilled operator's error on its own training trajectories is from its error on
fresh ones (issue 18): per output slot, the MSE against the teacher on the first ``--n`` training
trajectories and on ``--n`` new ones drawn with the same teacher settings from another seed.

    python benchmarks/operator_generalisation.py --operator runs/operator/digits-long \\
        --checkpoint runs/bench-digits/checkpoint.pt --n 1024 --seed 777

A large gap says the operator memorises its pairs (more trajectories help); a small gap with a
large error says the network cannot fit the map (more data does not).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdekit.bench.problems import resolve_problem
from sdekit.distill import generate_trajectories, load_operator, load_trajectories


def slot_mse(op: torch.nn.Module, x_T: torch.Tensor, traj: torch.Tensor) -> list[float]:
    with torch.no_grad():
        pred = op(x_T)
    return [float((pred[:, k] - traj[:, k]).pow(2).mean()) for k in range(traj.shape[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--operator", type=Path, required=True,
                    help="a `sdekit distill --out` folder (operator.pt, trajectories/)")
    ap.add_argument("--checkpoint", required=True, help="the teacher checkpoint")
    ap.add_argument("--n", type=int, default=1024, help="trajectories in each set")
    ap.add_argument("--seed", type=int, default=777, help="seed of the fresh trajectories")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.n < 1:
        ap.error(f"--n {args.n} is invalid: expected at least 1")
    torch.set_num_threads(args.threads)
    meta = json.loads((args.operator / "trajectories" / "meta.json").read_text())
    if args.seed == meta["seed"]:
        ap.error(f"--seed {args.seed} is the training trajectories' seed: choose another")
    prob = resolve_problem(f"checkpoint:{args.checkpoint}")
    fresh = Path(f"{args.operator}/fresh_seed{args.seed}_n{args.n}")
    generate_trajectories(fresh, prob.sde, prob.model, tuple(meta["state_shape"]), args.n,
                          solver=meta["solver"], steps_per_segment=meta["steps_per_segment"],
                          slots=len(meta["times_out"]), spacing=meta["spacing"],
                          shard_size=args.n, seed=args.seed, teacher=meta["teacher"],
                          **meta["solver_options"])
    op, _ = load_operator(args.operator / "operator.pt")
    x_T, traj, _ = load_trajectories(args.operator / "trajectories")
    fx, ftraj, _ = load_trajectories(fresh)
    out = {"operator": str(args.operator), "n": args.n, "times_out": meta["times_out"],
           "training_trajectories": meta["n"],
           "train_mse": slot_mse(op, x_T[:args.n], traj[:args.n]),
           "fresh_mse": slot_mse(op, fx, ftraj)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
