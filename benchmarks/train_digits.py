"""Benchmark: the default digits recipe, trained from scratch on this CPU, scored by FD-digits.

Runs exactly ``sdekit train --data digits --sde vp --threads T --out OUT`` (in-process), times
it, then draws as many samples as the training half holds (901) with 20-NFE solvers from the EMA
weights and reports FD-digits against the held-out half beside the real-vs-real floor (training
half vs held-out half). Writes a JSON record, a Markdown snippet for docs/benchmarks.md and a PNG
grid.

    python benchmarks/train_digits.py --threads 1

Targets (issue 5): training <= 10 minutes on the 2-core CPU; FD-digits <= 3x the floor at 20 NFE.
The machine may be shared: the load average before and after and the CPU time are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from sdekit.cli.main import main as cli
from sdekit.training import generate, load_model
from sdekit.training.fd_digits import FDDigits
from sdekit.training.images import image_grid, save_png

SOLVERS = (("dpmpp_2m", 20), ("ddim", 20), ("unipc_bh2", 20))


def loadavg() -> list[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-digits"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/train_digits.json"))
    ap.add_argument("--png", type=Path, default=Path("docs/digits_samples.png"))
    ap.add_argument("--skip-train", action="store_true", help="score an existing --out run")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="extra `sdekit train` flags (recorded in the results)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the Markdown from --results")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(json.loads(args.results.read_text()), args)
        return

    cmd = ["train", "--data", "digits", "--sde", "vp", "--threads", str(args.threads),
           "--out", str(args.out), "--no-progress", *args.extra]
    rec: dict = {"command": "sdekit " + " ".join(cmd), "cpu_count": os.cpu_count(),
                 "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if not args.skip_train:
        if args.out.exists():
            shutil.rmtree(args.out)
        rec["loadavg_before"] = loadavg()
        w0, c0 = time.perf_counter(), time.process_time()
        rc = cli(cmd)
        rec["train_wall_s"] = round(time.perf_counter() - w0, 1)
        rec["train_cpu_s"] = round(time.process_time() - c0, 1)
        rec["loadavg_after"] = loadavg()
        if rc != 0:
            raise SystemExit(f"training failed with exit code {rc}")
    torch.set_num_threads(args.threads)
    net, sde, cfg = load_model(args.out / "checkpoint.pt")
    rec["config"] = cfg
    rec["parameters"] = sum(p.numel() for p in net.parameters())
    fd = FDDigits()
    floor = fd.reference(int(cfg["net"]["image_size"]))[1]   # 8x8 by default
    rec.update(fd_floor=round(floor, 4), classifier_test_accuracy=round(fd.accuracy, 4),
               n_samples=fd.n_train, n_heldout=fd.n_test)
    rec["fd"] = {}
    grid_x = None
    for solver, steps in SOLVERS:
        t0 = time.perf_counter()
        x, nfe = generate(net, sde, fd.n_train, solver=solver, steps=steps, seed=0)
        score = fd(x)
        rec["fd"][solver] = {"steps": steps, "nfe": nfe, "fd": round(score, 4),
                             "ratio_to_floor": round(score / floor, 3),
                             "sample_wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{solver:10s} NFE={nfe}: FD-digits {score:.3f} = {score / floor:.2f} x floor "
              f"({floor:.3f})")
        if grid_x is None:
            grid_x = x[:100]
    best = rec["fd"][SOLVERS[0][0]]
    rec["targets"] = {"train_wall_s_max": 600, "fd_ratio_max": 3.0,
                      "train_time_met": rec.get("train_wall_s", float("nan")) <= 600,
                      "fd_met": best["ratio_to_floor"] <= 3.0}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rec, indent=2) + "\n")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    save_png(args.png, image_grid(grid_x, nrow=10, scale=4))

    write_markdown(rec, args)


def write_markdown(rec: dict, args: argparse.Namespace) -> None:
    cfg = rec["config"]
    net = cfg["net"]
    md = [f"Default digits recipe, `{rec['command']}`: a {rec['parameters']:,}-parameter U-Net "
          f"(base {net['base_channels']} channels, mult {net['channel_mult']}, "
          f"{net['num_res_blocks']} residual block per level), EDM-preconditioned denoiser, "
          f"{cfg['loss']} loss on the {cfg['sde']} SDE, {cfg['steps']} steps of batch "
          f"{cfg['batch_size']}, EMA {cfg['ema_decay']}; {rec['cpu_count']}-core CPU shared with "
          f"other work, torch {rec['torch']}. FD-digits uses {rec['n_samples']} samples (the size "
          "of the training half) against the held-out half; "
          f"`python benchmarks/train_digits.py --threads {args.threads}`:", "",
          "| measure | value | target |", "| --- | --- | --- |"]
    if "train_wall_s" in rec:
        md.append(f"| training wall time | {rec['train_wall_s'] / 60:.1f} min (CPU time "
                  f"{rec['train_cpu_s'] / 60:.1f} min; load average {rec['loadavg_before'][0]:.1f}"
                  f" before, {rec['loadavg_after'][0]:.1f} after) | <= 10 min |")
    md.append(f"| FD-digits real-vs-real floor (training half vs held-out half) | "
              f"{rec['fd_floor']:.3f} | |")
    for solver, r in rec["fd"].items():
        md.append(f"| FD-digits, {solver}, {r['nfe']} NFE | {r['fd']:.3f}"
                  f" ({r['ratio_to_floor']:.2f} x floor) | <= 3 x floor |")
    md += ["", f"FD-digits classifier: held-out accuracy {rec['classifier_test_accuracy']:.1%}.",
           "", f"![digit samples]({args.png.as_posix()})", ""]
    args.results.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
