"""Digits operator: the feature-space loss against plain L2, at a small, timed scale.

Teacher trajectories of the bundled digits U-Net (runs/bench-digits/checkpoint.pt, from
`python benchmarks/train_digits.py`) are generated (or reused) in --work, then one operator per
--feature-loss weight is trained from the teacher's weights (backbone at x_T's own noise level:
one teacher-sized pass per sample), and scored by FD-digits of its last slot on the 900 initial
states `sdekit bench -n 900 --seed 0` uses (so the numbers compare with the fast samplers of
benchmarks/results/operator/digits/bench.md), against the held-out half. The feature loss uses
sdekit.training.feature_loss (a classifier of its own, not the FD-digits network).

CPU time (process time, all threads) is recorded beside wall time for every phase: the machine
is shared, so wall time says little about the work.

    python benchmarks/operator_feature_loss.py --n 4096 --steps 400 --feature-loss 0,1

Results: benchmarks/results/operator/digits/feature_loss.{json,md} (one row per run, appended;
a run with the same settings replaces its row). The trajectories' cost is that of their
generation (kept in <data>/cost.json; unknown where the directory was made otherwise) and is
shared by every row made from them: distillation cost = trajectories + training.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sdekit.bench.problems import resolve_problem
from sdekit.distill import generate_trajectories, load_operator, train_operator
from sdekit.training.fd_digits import FDDigits

TEACHER = "runs/bench-digits/checkpoint.pt"


def timed(fn, *a, **kw):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*a, **kw)
    return out, round(time.process_time() - c0, 1), round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="teacher trajectories")
    ap.add_argument("--solver", default="unipc_bh2")
    ap.add_argument("--steps-per-segment", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--feature-loss", default="0,1", help="comma-separated weights")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/operator/feature_loss")
    ap.add_argument("--out", default="benchmarks/results/operator/digits")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild feature_loss.md from feature_loss.json")
    args = ap.parse_args()
    if args.report_only:
        return write_report(Path(args.out) / "feature_loss.json")
    torch.set_num_threads(args.threads)
    if not Path(TEACHER).exists():
        raise SystemExit(f"{TEACHER} is missing: run python benchmarks/train_digits.py first")
    p = resolve_problem(f"checkpoint:{TEACHER}")
    net = p.model.net.fn
    net = getattr(net, "net", net)
    work = Path(args.work)
    data = work / f"traj-{args.solver}-{args.steps_per_segment}-{args.n}"
    fresh = not data.exists()
    _, traj_cpu, traj_wall = timed(generate_trajectories, data, p.sde, p.model, (1, 8, 8),
                                   args.n, solver=args.solver,
                                   steps_per_segment=args.steps_per_segment, slots=4,
                                   shard_size=1024, teacher=p.description)
    cost = data / "cost.json"   # the generation's cost, kept for reruns that reuse the data
    if fresh:
        cost.write_text(json.dumps({"cpu_s": traj_cpu, "wall_s": traj_wall,
                                    "threads": args.threads}))
    saved = json.loads(cost.read_text()) if cost.exists() else {}
    traj_cpu, traj_wall = saved.get("cpu_s"), saved.get("wall_s")   # None: made elsewhere
    x = p.sample_init(900, torch.Generator().manual_seed(0))   # sdekit bench's x_init
    fd = FDDigits()
    res_file = Path(args.out) / "feature_loss.json"
    rows = json.loads(res_file.read_text()) if res_file.exists() else []
    for c in [float(v) for v in args.feature_loss.split(",")]:
        out = work / f"op-{args.n}-{args.steps}-{args.batch}-{args.lr:g}-fl{c:g}.pt"
        _, cpu, wall = timed(train_operator, data, out, p.sde, backbone=dict(net.config),
                             init_backbone=net.state_dict(), backbone_at="start",
                             steps=args.steps, batch=args.batch, lr=args.lr, feature_loss=c,
                             checkpoint_every=max(args.steps, 1))
        op, _ = load_operator(out)
        with torch.no_grad():
            y = torch.cat([op(x[i:i + 300])[:, -1] for i in range(0, 900, 300)])
        row = {"n": args.n, "solver": args.solver, "steps_per_segment": args.steps_per_segment,
               "steps": args.steps, "batch": args.batch, "lr": args.lr, "feature_loss": c,
               "threads": args.threads, "fd": round(fd(y), 3),
               "trajectories_cpu_s": traj_cpu, "trajectories_wall_s": traj_wall,
               "training_cpu_s": cpu, "training_wall_s": wall}
        key = {k: row[k] for k in ("n", "solver", "steps_per_segment", "steps", "batch", "lr",
                                   "feature_loss")}
        rows = [r for r in rows if {k: r.get(k) for k in key} != key] + [row]
        print(json.dumps(row))
        res_file.parent.mkdir(parents=True, exist_ok=True)
        res_file.write_text(json.dumps(rows, indent=1))
        write_report(res_file)


def command(r: dict) -> str:
    """The command line that makes row ``r``."""
    return (f"python benchmarks/operator_feature_loss.py --n {r['n']} --solver {r['solver']} "
            f"--steps-per-segment {r['steps_per_segment']} --steps {r['steps']} --batch "
            f"{r['batch']} --lr {r['lr']:g} --feature-loss {r['feature_loss']:g} --threads "
            f"{r['threads']}")


def write_report(res_file: Path) -> None:
    """``feature_loss.md`` from ``feature_loss.json``."""
    rows = json.loads(res_file.read_text())
    lines = [HEADER, "", "| trajectories | steps x batch | lr | feature loss | FD-digits "
             "(1 pass) | trajectories CPU s | training CPU s (wall s) | command |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['n']} ({r['solver']}, {r['steps_per_segment']}/segment) | "
              f"{r['steps']} x {r['batch']} | {r['lr']:g} | {r['feature_loss']:g} | "
              f"{r['fd']:.2f} | {r['trajectories_cpu_s'] or NOTE} | "
              f"{r['training_cpu_s']} ({r['training_wall_s']}) | `{command(r)}` |"
              for r in sorted(rows, key=lambda r: (r["n"], r["steps"], r["lr"],
                                                   r["feature_loss"]))]
    res_file.with_suffix(".md").write_text("\n".join(lines) + "\n")


NOTE = "made outside this script"   # trajectories reused, their cost not recorded here

HEADER = """## Digits operator: feature-space loss vs L2 (`benchmarks/operator_feature_loss.py`)

One operator pass (the teacher's U-Net, 704,705 parameters, initialised from the teacher and run
once at x_T's noise level, plus the temporal head) scored by FD-digits of its last slot on the 900
initial states of `sdekit bench -n 900 --seed 0`, against the held-out half (the same x_T and
FD-digits as bench.md: there unipc_bh1 / quadratic scores 3.42 at 5 NFE, and the recorded
`operator_targets.py` recipe, 16384 trajectories x 4000 steps of batch 64, scores 5.99). The
feature loss is `sdekit.training.feature_loss` (a classifier of another architecture and seed,
trained on the training half only; not the FD-digits network). CPU time is process time (all
threads); wall time is on a 2-core machine shared with other work."""


if __name__ == "__main__":
    main()
