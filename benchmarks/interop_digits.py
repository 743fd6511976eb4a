"""A digits checkpoint trained by ``sdekit train``, sampled two ways with the same solver, grid and
per-sample seeds: inside diffusers' unchanged ``DDPMPipeline`` loop (``to_diffusers``: the
checkpoint's U-Net as the pipeline's ``unet``, ``SdekitScheduler`` as its scheduler) and through
``sdekit.sample``. Both results go through the pipeline's own post-processing
``(x / 2 + 0.5).clamp(0, 1)`` (the pipeline applies it itself; the sdekit result gets the same
map), so equal solves give equal images bit for bit. Reported per solver: FD-digits of both sets
(of ``2 image - 1``, the data's [-1, 1] space), the largest absolute pixel difference of the
images (in [0, 1]) and how many samples are bit-identical, the NFE of each, and the wall time of
each (timed interleaved pipeline, sdekit, pipeline, ...; min and median over ``--rounds``).

The pipeline gets one ``torch.Generator`` per sample seeded with sdekit's per-sample seed, so its
initial noise is sdekit's (both draw the sample's first normals from a generator of that seed).
``num_inference_steps = NFE`` gives NFE - 1 solver steps and the final x0 prediction, which is
``sdekit.sample(steps=NFE - 1, denoise=True)``. One CPU thread. Train the checkpoint with

    sdekit train --data digits --sde vp --threads 1 --out /tmp/iod-digits

and run

    python benchmarks/interop_digits.py --checkpoint /tmp/iod-digits/checkpoint.pt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import diffusers
import torch

import sdekit
from sdekit.interop import to_diffusers
from sdekit.models import wrap
from sdekit.noise import sample_seeds
from sdekit.training import load_model
from sdekit.training.checkpoint import load_checkpoint
from sdekit.training.fd_digits import FDDigits

RESULTS = Path(__file__).resolve().parent / "results"


def pipeline_run(checkpoint: str, solver: str, seeds: list[int], nfe: int) -> tuple:
    unet, scheduler = to_diffusers(checkpoint, solver=solver)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        img = pipe(batch_size=len(seeds), generator=[torch.Generator().manual_seed(s)
                                                     for s in seeds],
                   num_inference_steps=nfe, output_type="pt").images
    wall = time.perf_counter() - t0
    return img, wall, len(scheduler.timesteps)


def sdekit_run(net, sde, solver: str, seeds: list[int], nfe: int) -> tuple:
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = sdekit.sample(sde, wrap(net, sde), shape=(len(seeds), *net.data_shape),
                            solver=solver, steps=nfe - 1, denoise=True, seeds=seeds)
    wall = time.perf_counter() - t0
    return (sol.x / 2 + 0.5).clamp(0, 1), wall, int(sol.nfe)   # DDPMPipeline's own map


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="/tmp/iod-digits/checkpoint.pt")
    ap.add_argument("--solvers", default="dpmpp_2m,unipc_bh2")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--n", type=int, default=900, help="samples (default 900)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "interop_digits"),
                    help="output path without suffix (.json and .md are written)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ck = load_checkpoint(args.checkpoint)
    net, sde, cfg = load_model(args.checkpoint)
    fd = FDDigits()
    load = os.getloadavg()[0]
    seeds = sample_seeds(args.seed, args.n)
    rows = []
    for solver in args.solvers.split(","):
        walls: dict[str, list[float]] = {"pipeline": [], "sdekit": []}
        for _ in range(args.rounds):            # interleaved: pipeline, sdekit, pipeline, ...
            x_pipe, w, nfe_pipe = pipeline_run(args.checkpoint, solver, seeds, args.nfe)
            walls["pipeline"].append(w)
            x_sdk, w, nfe_sdk = sdekit_run(net, sde, solver, seeds, args.nfe)
            walls["sdekit"].append(w)
        diff = (x_pipe - x_sdk).abs()
        row = {"solver": solver, "nfe_pipeline": nfe_pipe, "nfe_sdekit": nfe_sdk,
               "fd_pipeline": fd(x_pipe * 2 - 1), "fd_sdekit": fd(x_sdk * 2 - 1),
               "max_abs_diff": float(diff.max()),
               "identical_samples": int((diff.flatten(1).amax(1) == 0).sum()),
               **{f"wall_{k}_{s}": round(f(v), 4) for k, v in walls.items()
                  for s, f in (("min", min), ("median", statistics.median))}}
        rows.append(row)
        print(json.dumps(row))
    result = {"checkpoint": str(args.checkpoint), "step": int(ck["step"]),
              "weights_sha256": ck["weights_sha256"], "sde": cfg["sde"],
              "prediction": net.prediction, "n": args.n, "seed": args.seed, "nfe": args.nfe,
              "rounds": args.rounds, "fd_floor": fd.floor, "threads": 1,
              "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": platform.python_version(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [
        "# A trained digits U-Net: diffusers pipeline vs sdekit.sample",
        "",
        (f"`python benchmarks/interop_digits.py` on a "
        f"`sdekit train --data digits --sde {r['sde']}` "
        f"checkpoint (step {r['step']}, {r['prediction']} network, weights "
        f"`{r['weights_sha256'][:12]}`): {r['n']} samples, seed {r['seed']}, {r['nfe']} NFE "
        f"({r['nfe'] - 1} steps and the final x0), one CPU thread, torch {r['torch']}, "
        f"diffusers {r['diffusers']}. *pipeline*: `DDPMPipeline(*to_diffusers(checkpoint, "
        "solver=...))` with one generator per sample seeded with sdekit's per-sample seed; "
        "*sdekit*: `sdekit.sample(..., steps=NFE-1, denoise=True, seeds=...)`, its result mapped "
        "as the pipeline maps its own, `(x / 2 + 0.5).clamp(0, 1)`. Max abs diff is over all "
        "pixels in [0, 1]; FD-digits is of `2 image - 1`; wall times are min / median of "
        f"{r['rounds']} interleaved rounds (1-minute load average of the shared machine at the "
        f"start and the end: {r['loadavg_1min'][0]} and {r['loadavg_1min'][1]}). FD-digits "
        f"floor (real vs real): {r['fd_floor']:.3f}."),
        "",
        ("| solver | NFE pipeline / sdekit | FD-digits pipeline | FD-digits sdekit | max abs diff "
        "| identical samples | wall pipeline min / median (s) | wall sdekit min / median (s) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in r["rows"]:
        lines.append(
            f"| {w['solver']} | {w['nfe_pipeline']} / {w['nfe_sdekit']} | {w['fd_pipeline']:.4f} "
            f"| {w['fd_sdekit']:.4f} | {w['max_abs_diff']:.3g} | {w['identical_samples']} / "
            f"{r['n']} | {w['wall_pipeline_min']:.3f} / {w['wall_pipeline_median']:.3f} | "
            f"{w['wall_sdekit_min']:.3f} / {w['wall_sdekit_median']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
