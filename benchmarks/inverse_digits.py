"""Benchmark: inverse problems on held-out digits with a trained digits model (sdekit.inverse).

Tasks on the first ``--n`` images of the held-out split (digits in [-1, 1], 8x8):

* ``inpaint``: the right half of each image masked (left 4 columns known), noise-free;
* ``sr4``: 4x super-resolution, ``y`` = the 2x2 means of 4x4 blocks, noise-free;
* ``denoise``: ``y = x + 0.2 z`` (DPS and DDRM only: replacement needs a noise-free measurement).

Methods side by side at each NFE budget (20 and 100): replacement (``inpaint`` / ``replacement``
with the ancestral sampler, ``steps = NFE``), RePaint (ancestral, ``resample = r`` passes of
blocks of ``jump`` steps, ``steps = NFE / r``), DPS (ancestral, ``steps = NFE``, zeta chosen
per task and NFE on 48 images of the *training* split) and DDRM (eta 0.85, eta_b 1, ``steps =
NFE``). Scores: PSNR (peak-to-peak 2, mean and standard error over images) and FD-digits of the
restorations against the held-out split; rows for the ground truth itself (the FD floor at this
n) and for the measurement's least-squares preimage ``H^+ y``.

    python benchmarks/inverse_digits.py --checkpoint /tmp/inv-digits/checkpoint.pt --n 256

The checkpoint comes from ``sdekit train --data digits --sde vp --threads 1 --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from sdekit.inverse import (
    Denoising,
    Inpainting,
    SuperResolution,
    ddrm,
    dps,
    inpaint,
    replacement,
)
from sdekit.models import wrap
from sdekit.training.checkpoint import load_model
from sdekit.training.data import load_dataset
from sdekit.training.fd_digits import FDDigits

NFES = (20, 100)
REPAINT = {20: (2, 2), 100: (4, 5)}      # NFE -> (resample r, jump j); steps = NFE / r
ZETAS = (0.1, 0.3, 1.0, 3.0)
DENOISE_SIGMA = 0.2


def psnr(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    mse = (x.clamp(-1, 1) - ref).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    p = 10 * torch.log10(4.0 / mse)
    return float(p.mean()), float(p.std() / math.sqrt(p.numel()))


def task(name: str, x: torch.Tensor, seed: int):
    """``(operator, measurement y, mask or None, sigma_y)`` of a task for images ``x``."""
    if name == "inpaint":
        mask = torch.zeros(1, 8, 8, dtype=torch.bool)
        mask[..., :4] = True
        op = Inpainting(mask)
        return op, op(x), mask, 0.0
    if name == "sr4":
        op = SuperResolution((1, 8, 8), 4)
        return op, op(x), None, 0.0
    op = Denoising((1, 8, 8))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return op, x + DENOISE_SIGMA * z, None, DENOISE_SIGMA


def run_method(method: str, sde, model, x, op, y, mask, sigma_y, nfe, zeta=None, seed=0):
    if method == "replacement":
        if mask is not None:
            return inpaint(sde, model, x, mask, solver="ancestral", steps=nfe, seed=seed)
        return replacement(sde, model, y, op, solver="ancestral", steps=nfe, seed=seed)
    if method == "repaint":
        r, j = REPAINT[nfe]
        if mask is not None:
            return inpaint(sde, model, x, mask, solver="ancestral", steps=nfe // r,
                           resample=r, jump=j, seed=seed)
        return replacement(sde, model, y, op, solver="ancestral", steps=nfe // r, resample=r,
                           jump=j, seed=seed)
    if method == "dps":
        return dps(sde, model, y, op, zeta=zeta, solver="ancestral", steps=nfe, seed=seed)
    return ddrm(sde, model, y, op, sigma_y=sigma_y, steps=nfe, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--n", type=int, default=256, help="held-out images restored per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", default="inpaint,sr4,denoise")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/inverse_digits.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown only")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(json.loads(args.results.read_text()), args.results.with_suffix(".md"))
        return
    torch.set_num_threads(args.threads)
    net, sde, cfg = load_model(args.checkpoint)
    model = wrap(net, sde)
    ds = load_dataset("digits")
    x, tune_x = ds.x_test[:args.n], ds.x[:48]
    fd = FDDigits()
    rec = {"command": f"python benchmarks/inverse_digits.py --checkpoint {args.checkpoint} "
                      f"--n {args.n} --threads {args.threads} --tasks {args.tasks}",
           "checkpoint_config": {k: cfg.get(k) for k in ("data", "sde", "steps")},
           "n": args.n, "tune_n": tune_x.shape[0], "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "fd_floor_full": fd.floor,
           "repaint": {str(k): v for k, v in REPAINT.items()}, "zetas": list(ZETAS),
           "denoise_sigma": DENOISE_SIGMA, "rows": []}
    t_all = time.perf_counter()
    for name in args.tasks.split(","):
        op, y, mask, sy = task(name, x, seed=1)
        top, ty, tmask, _ = task(name, tune_x, seed=2)
        rows = [("ground truth", x, None, None, None), ("H^+ y", op.pinv(y), None, None, None)]
        for label, xr, *_ in rows:
            p, se = psnr(xr, x) if label != "ground truth" else (None, None)
            rec["rows"].append({"task": name, "method": label, "nfe": 0, "psnr": p, "psnr_se": se,
                                "fd": fd(xr.clamp(-1, 1)), "seconds": 0.0})
        methods = ["dps", "ddrm"] if sy > 0 else ["replacement", "repaint", "dps", "ddrm"]
        for nfe in NFES:
            zeta = None
            if "dps" in methods:      # zeta chosen on training-split images
                scores = {z: psnr(run_method("dps", sde, model, tune_x, top, ty, tmask, sy, nfe,
                                             zeta=z, seed=7).x, tune_x)[0] for z in ZETAS}
                zeta = max(scores, key=scores.get)
                print(f"{name} nfe {nfe}: dps zeta scores {scores} -> {zeta}", flush=True)
            for m in methods:
                t0 = time.perf_counter()
                sol = run_method(m, sde, model, x, op, y, mask, sy, nfe, zeta=zeta)
                sec = time.perf_counter() - t0
                p, se = psnr(sol.x, x)
                row = {"task": name, "method": m, "nfe": sol.nfe, "psnr": p, "psnr_se": se,
                       "fd": fd(sol.x.clamp(-1, 1)), "seconds": round(sec, 1),
                       "consistency_rms": float((op(sol.x) - y).pow(2).mean().sqrt())}
                if m == "dps":
                    row["zeta"] = zeta
                rec["rows"].append(row)
                print(json.dumps(row), flush=True)
    rec["seconds"] = round(time.perf_counter() - t_all, 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rec, indent=1) + "\n")
    write_markdown(rec, args.results.with_suffix(".md"))


def write_markdown(rec: dict, path: Path) -> None:
    lines = [(f"Inverse problems on the first {rec['n']} held-out digits (`{rec['command']}`; "
             f"{rec['seconds']} s on a shared CPU). PSNR in dB (peak-to-peak 2, mean +- standard "
             f"error over images), FD-digits against the held-out split (floor with all "
             f"901 training digits: {rec['fd_floor_full']:.3f}; the 'ground truth' row is the "
             f"floor at n = {rec['n']}). Ancestral sampler for replacement, RePaint and DPS; "
             f"RePaint (r, jump) per NFE: {rec['repaint']}; DPS zeta picked from "
             f"{rec['zetas']} on {rec['tune_n']} training digits; DDRM eta 0.85, eta_b 1. "
             "Inpainting: the right half masked; sr4: 2x2 block means of 4x4 blocks; denoise: "
             f"sigma_y = {rec['denoise_sigma']}."), "",
             "| task | method | NFE | PSNR (dB) | FD-digits | H x - y (rms) | s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rec["rows"]:
        m = r["method"] + (f" (zeta {r['zeta']})" if "zeta" in r else "")
        c = f"{r['consistency_rms']:.3f}" if "consistency_rms" in r else ""
        p = "" if r["psnr"] is None else f"{r['psnr']:.2f} +- {r['psnr_se']:.2f}"
        lines.append(f"| {r['task']} | {m} | {r['nfe'] or ''} | {p} | {r['fd']:.2f} | {c} | "
                     f"{r['seconds'] or ''} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
