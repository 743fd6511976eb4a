"""``sdekit sample``: draw samples from a checkpoint; writes a PNG grid and an .npz."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="sample a trained checkpoint",
                              description="Draw samples from a checkpoint (EMA weights) with any "
                                          "registered solver; writes <out>.png and <out>.npz.")
    a = p.add_argument
    a("--checkpoint", type=Path, required=True)
    a("--solver", default="ddim", help="registered solver name (see `sdekit solvers`)")
    a("--steps", type=int, default=20)
    a("--grid", default=None, help="time grid (default: the solver's own)")
    a("--n", type=int, default=64, help="number of samples")
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, default=1000)
    a("--label", type=int, default=None,
      help="class label for a class-conditional model (default: labels cycle 0..K-1)")
    a("--guidance", type=float, default=0.0, help="classifier-free guidance weight w")
    a("--raw", action="store_true", help="use the raw weights instead of the EMA")
    a("--operator", type=Path, default=None,
      help="operator checkpoint for --solver fno (made by `sdekit distill`)")
    a("--out", type=Path, default=None, help="output prefix (default: <checkpoint dir>/samples)")
    a("--threads", type=int, default=None)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..training.checkpoint import CheckpointError, load_model
    from ..training.data import to_data_space
    from ..training.images import save_samples_png
    from ..training.sampling import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("n", "steps", "batch_size"):
        v = getattr(args, name)
        if v < 1:
            print(f"sdekit sample: error: --{name.replace('_', '-')}={v} is invalid: expected an "
                  "integer >= 1", file=sys.stderr)
            return 2
    try:
        net, sde, cfg = load_model(args.checkpoint, ema=not args.raw)
    except CheckpointError as e:
        print(f"sdekit sample: error: {e}", file=sys.stderr)
        return 2
    y = None
    if net.num_classes:
        y = (torch.full((args.n,), args.label) if args.label is not None
             else torch.arange(args.n) % net.num_classes)
        if args.label is not None and not 0 <= args.label < net.num_classes:
            print(f"sdekit sample: error: --label={args.label} is invalid: expected 0.."
                  f"{net.num_classes - 1}", file=sys.stderr)
            return 2
    elif args.label is not None or args.guidance:
        print("sdekit sample: error: --label/--guidance need a class-conditional checkpoint "
              "(trained with --class-cond)", file=sys.stderr)
        return 2
    kw = {"grid": args.grid} if args.grid else {}
    if args.operator is not None:
        if args.solver != "fno":
            print("sdekit sample: error: --operator is only used with --solver fno",
                  file=sys.stderr)
            return 2
        kw["operator"] = args.operator
    try:
        x, nfe = generate(net, sde, args.n, solver=args.solver, steps=args.steps, seed=args.seed,
                          y=y, guidance=args.guidance, batch_size=args.batch_size, **kw)
    except (ValueError, KeyError) as e:
        msg = e.args[0] if e.args else e
        print(f"sdekit sample: error: {msg}", file=sys.stderr)
        return 2
    out = args.out or args.checkpoint.parent / "samples"
    out.parent.mkdir(parents=True, exist_ok=True)
    png, npz = out.with_name(out.name + ".png"), out.with_name(out.name + ".npz")
    nrow = 10 if net.num_classes == 10 else None
    save_samples_png(png, x, nrow=nrow)
    transform = cfg.get("transform") or {}
    meta = {"checkpoint": str(args.checkpoint), "solver": args.solver, "steps": args.steps,
            "nfe": nfe, "seed": args.seed, "guidance": args.guidance, "ema": not args.raw}
    arrays = {"x": x.numpy(), "meta": np.array(json.dumps(meta))}
    if transform:
        xd = to_data_space(x, transform)
        if transform.get("data_range"):          # pixel values: clip to the valid range
            xd = xd.clamp(*transform["data_range"])
        arrays["x_data"] = xd.numpy()
    if y is not None:
        arrays["y"] = y.numpy()
    np.savez(npz, **arrays)
    print(f"{args.n} samples, {nfe} NFE ({args.solver}, {args.steps} steps) -> {png}, {npz}")
    return 0
