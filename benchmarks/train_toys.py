"""Benchmark: the 2-D toy recipes, each trained from scratch and checked for mode coverage.

For each toy runs ``sdekit train --data NAME --sde vp --threads T --out OUT`` (in-process), times
it, draws 4,000 samples with 20-NFE solvers from the EMA weights and applies
:func:`sdekit.training.mode_coverage` (every mode gets at least a quarter of its expected share,
and at least 90% of the samples lie within the radius that 99% of real points reach).

    python benchmarks/train_toys.py --threads 1

Target (issue 5): each toy trains in <= 1 minute and covers every mode.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sdekit.cli.main import main as cli
from sdekit.training import TOYS, generate, load_model, mode_coverage
from sdekit.training.images import save_png, scatter_image

SOLVERS = (("dpmpp_2m", 20), ("ddim", 20))


def loadavg() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-toys"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/train_toys.json"))
    ap.add_argument("--png", type=Path, default=Path("docs/toy_samples.png"))
    ap.add_argument("--toys", nargs="*", default=list(TOYS))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the Markdown from --results")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(json.loads(args.results.read_text()), args)
        return
    rec: dict = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "toys": {}}
    panels = []
    for name in args.toys:
        out = args.out / name
        if out.exists():
            shutil.rmtree(out)
        cmd = ["train", "--data", name, "--sde", "vp", "--threads", str(args.threads),
               "--out", str(out), "--no-progress"]
        lb = loadavg()
        w0, c0 = time.perf_counter(), time.process_time()
        if cli(cmd) != 0:
            raise SystemExit(f"training {name} failed")
        r = {"command": "sdekit " + " ".join(cmd),
             "train_wall_s": round(time.perf_counter() - w0, 1),
             "train_cpu_s": round(time.process_time() - c0, 1),
             "loadavg_before": lb, "loadavg_after": loadavg(), "coverage": {}}
        torch.set_num_threads(args.threads)
        net, sde, cfg = load_model(out / "checkpoint.pt")
        r["steps"], r["batch_size"] = cfg["steps"], cfg["batch_size"]
        for solver, steps in SOLVERS:
            x, nfe = generate(net, sde, 4000, solver=solver, steps=steps, seed=0)
            cov = mode_coverage(name, x)
            r["coverage"][solver] = {"nfe": nfe, **{k: cov[k] for k in (
                "passed", "modes_covered", "n_modes", "on_support", "mode_share_ratio")},
                "real_on_support": cov["real"]["on_support"]}
            if solver == SOLVERS[0][0]:
                panels.append(scatter_image(x, size=200))
            print(f"{name:16s} {solver:9s} NFE={nfe}: {cov['modes_covered']}/{cov['n_modes']} "
                  f"modes, on support {cov['on_support']:.3f} -> {cov['passed']}")
        r["met"] = r["train_wall_s"] <= 60 and all(c["passed"] for c in r["coverage"].values())
        rec["toys"][name] = r
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rec, indent=2) + "\n")
    if panels:
        sep = np.full((panels[0].shape[0], 4), 128, np.uint8)
        row = np.concatenate(sum(([p, sep] for p in panels), [])[:-1], axis=1)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        save_png(args.png, row)
    write_markdown(rec, args)


def write_markdown(rec: dict, args: argparse.Namespace) -> None:
    md = [f"2-D toy recipes (`sdekit train --data NAME --sde vp --threads {args.threads}`: "
          "residual MLP, EDM-preconditioned denoiser, EDM loss, 2,000 steps of batch 256; "
          f"{rec['cpu_count']}-core CPU shared with other work, "
          f"`python benchmarks/train_toys.py --threads {args.threads}`). Samples: 4,000 per toy, "
          "20 NFE; a sample is on support within 3 noise std of the noise-free generating set; "
          "a mode is covered with >= 1/4 of its expected share:", "",
          "| toy | train wall time (CPU time, load avg) | modes covered dpmpp_2m / ddim | "
          "on support dpmpp_2m (real data) | target |", "| --- | --- | --- | --- | --- |"]
    for name, r in rec["toys"].items():
        c = r["coverage"]
        a, b = c["dpmpp_2m"], c["ddim"]
        md.append(f"| {name} | {r['train_wall_s']:.0f} s ({r['train_cpu_s']:.0f} s, "
                  f"{r['loadavg_before']:.1f}) | {a['modes_covered']}/{a['n_modes']} / "
                  f"{b['modes_covered']}/{b['n_modes']} | {a['on_support']:.1%} "
                  f"({a['real_on_support']:.1%}) | <= 60 s, all modes |")
    md += ["", f"![toy samples]({args.png.as_posix()})", ""]
    args.results.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
