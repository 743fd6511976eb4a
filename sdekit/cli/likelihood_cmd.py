"""``sdekit likelihood``: bits/dim of a checkpoint on its data's held-out split, through the
probability-flow ODE (:func:`sdekit.likelihood`)."""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from ._args import (
    UsageError,
    add_command,
    add_threads,
    apply_threads,
    existing_file,
    positive_float,
    positive_int,
    seed_int,
    user_input,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "likelihood", help="bits/dim of a checkpoint on held-out data",
                    description="Probability-flow log-likelihood (Song et al. 2021) of the "
                                "held-out split of the checkpoint's data: bits/dim of the "
                                "discrete pixels with uniform dequantisation, the mean over "
                                "samples and its standard error.")
    a = p.add_argument
    a("--checkpoint", type=existing_file, required=True,
      help="a `sdekit train` checkpoint of an image dataset on a pixel lattice (digits 8x8)")
    a("--n", type=positive_int, default=None,
      help="held-out samples to evaluate (default: the whole held-out split)")
    a("--batch-size", type=positive_int, default=256, help="samples per ODE solve")
    a("--solver", default="dopri5",
      help="a torchdiffeq method: adaptive (dopri5, bosh3, ...) or fixed-grid (rk4, euler, ... "
           "with --steps)")
    a("--steps", type=positive_int, default=None,
      help="steps of a fixed-grid --solver (default: none, for an adaptive one)")
    a("--rtol", type=positive_float, default=1e-5, help="adaptive solver tolerance (rtol = atol)")
    a("--exact-trace", action="store_true",
      help="exact divergence (one VJP per dimension) instead of Hutchinson's estimator")
    a("--probes", type=positive_int, default=1, help="Hutchinson probes per solve")
    a("--probe", default="rademacher", choices=("rademacher", "gaussian"),
      help="Hutchinson probe distribution")
    a("--seed", type=seed_int, default=0, help="seed of the probes and dequantisation noise")
    a("--raw", action="store_true", help="use the raw weights instead of the EMA")
    a("--json", action="store_true", help="print the result as one JSON object")
    add_threads(p)
    p.set_defaults(func=run)
    return p


def _lattice(cfg: dict[str, Any]) -> tuple[int, tuple[float, float]]:
    """``(bins, data_range)`` in the network's space for a dataset of integer pixel values."""
    tr = cfg.get("transform") or {}
    if (tr.get("kind") != "affine" or not tr.get("data_range")
            or tr.get("image_size", tr.get("source_size")) != tr.get("source_size")):
        raise UsageError(f"the checkpoint's data {cfg.get('data')!r} (transform {tr}) is not on a "
                         "pixel lattice: bits/dim needs integer pixel values at their source "
                         "resolution (e.g. digits trained with --image-size 8)")
    lo, hi = tr["data_range"]
    return int(hi - lo) + 1, ((lo - tr["offset"]) / tr["scale"], (hi - tr["offset"]) / tr["scale"])


def run(args: argparse.Namespace) -> int:
    import torch

    from ..likelihood import _check, _check_lattice, likelihood
    from ..models import wrap
    from ..training.checkpoint import load_model
    from ..training.data import load_dataset

    if args.steps is not None and args.solver in ("dopri5", "dopri8", "bosh3", "adaptive_heun",
                                                  "fehlberg2"):
        raise UsageError(f"--steps is only used with a fixed-grid --solver, not {args.solver!r}")
    apply_threads(args.threads)
    net, sde, cfg = load_model(args.checkpoint, ema=not args.raw)
    bins, data_range = _lattice(cfg)
    with user_input("--checkpoint"):
        data = load_dataset(cfg["data"], image_size=cfg.get("image_size", 8))
    x = data.x_test if args.n is None else data.x_test[:args.n]
    model = wrap(net, sde)
    kw = {"solver": args.solver, "steps": args.steps, "exact_trace": args.exact_trace or None,
          "probes": args.probes, "probe": args.probe, "rtol": args.rtol, "atol": args.rtol,
          "bins": bins, "data_range": data_range}
    with user_input():      # sdekit.likelihood's own checks, before any work
        _check(x, args.solver, args.steps, kw["exact_trace"], args.probes, args.probe,
               args.seed, args.rtol, args.rtol, bins, data_range)
        _check_lattice(x, bins, *data_range)
    bpd: list[torch.Tensor] = []
    nfe, t0 = 0, time.perf_counter()
    for i, s in enumerate(range(0, x.shape[0], args.batch_size)):
        r = likelihood(sde, model, x[s:s + args.batch_size], seed=args.seed + i, **kw)
        assert r.bpd is not None  # bins are given
        bpd.append(r.bpd)
        nfe += r.nfe
    b = torch.cat(bpd)
    mean, se = b.mean().item(), (b.std().item() / math.sqrt(b.numel()) if b.numel() > 1
                                 else float("nan"))
    out = {"checkpoint": str(args.checkpoint), "n": b.numel(), "bpd": mean, "bpd_se": se,
           "nfe": nfe, "solver": args.solver, "steps": args.steps,
           "trace": "exact" if args.exact_trace else f"hutchinson-{args.probe}x{args.probes}",
           "seconds": round(time.perf_counter() - t0, 2)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{mean:.4f} +- {se:.4f} bits/dim on {b.numel()} held-out samples "
              f"({out['trace']}, {args.solver}, {nfe} NFE, {out['seconds']} s)")
    return 0
