"""``sdekit train``: train a score network on a bundled dataset (also under ``torchrun``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a comma-separated list of integers") from None


def _json(s: str) -> dict[str, Any]:
    try:
        d = json.loads(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{s!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"{s!r} is not a JSON object")
    return d


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ..models import EMBEDDINGS, NET_PREDICTIONS, NETWORKS
    from ..sde import SDES
    from ..training.data import DATASETS
    from ..training.losses import LOSSES

    p = subparsers.add_parser(
        "train", help="train a score network on a bundled dataset",
        description="Train a score network. Defaults come from the dataset's recipe; every flag "
                    "overrides one entry. Run data-parallel with `torchrun --nproc_per_node N -m "
                    "sdekit.cli.main train ...`.")
    a = p.add_argument
    a("--data", required=True, choices=list(DATASETS), help="bundled dataset")
    a("--sde", default=None, choices=sorted(SDES),
      help="forward SDE (default vp; flow with --objective flow)")
    a("--sde-kwargs", type=_json, default=None, metavar="JSON",
      help='SDE keyword arguments, e.g. \'{"beta_max": 20}\'')
    a("--out", type=Path, default=None, help="output directory (default runs/<data>-<sde>)")
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g = p.add_argument_group("network")
    g.add_argument("--net", choices=sorted(NETWORKS), default=None)
    g.add_argument("--prediction", choices=NET_PREDICTIONS, default=None,
                   help="network output (recipes: denoiser = EDM preconditioning; "
                        "choosing one without --loss picks eps loss, or edm for denoiser)")
    g.add_argument("--channels", type=int, default=None, help="U-Net base channels")
    g.add_argument("--channel-mult", type=_ints, default=None, metavar="1,2")
    g.add_argument("--num-res-blocks", type=int, default=None)
    g.add_argument("--attn-resolutions", type=_ints, default=None, metavar="4")
    g.add_argument("--width", type=int, default=None, help="MLP width")
    g.add_argument("--depth", type=int, default=None, help="MLP residual blocks")
    g.add_argument("--embedding", choices=EMBEDDINGS, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--sigma-data", type=float, default=None)
    g.add_argument("--class-cond", action="store_true",
                   help="condition on labels (with a null class for classifier-free guidance)")
    g.add_argument("--label-dropout", type=float, default=None)
    g.add_argument("--image-size", type=int, default=None, help="upsample digits to this size")
    o = p.add_argument_group("optimisation")
    o.add_argument("--loss", choices=LOSSES, default=None)
    o.add_argument("--objective", choices=("flow",), default=None,
                   help="flow: flow matching (--sde flow, --prediction flow, --loss flow, "
                        "each unless given)")
    o.add_argument("--steps", type=int, default=None)
    o.add_argument("--batch-size", type=int, default=None)
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--lr-decay", choices=("cosine", "constant"), default=None)
    o.add_argument("--warmup", type=int, default=None)
    o.add_argument("--weight-decay", type=float, default=None)
    o.add_argument("--grad-clip", type=float, default=None)
    o.add_argument("--ema-decay", type=float, default=None)
    o.add_argument("--seed", type=int, default=None)
    r = p.add_argument_group("output")
    r.add_argument("--ckpt-every", type=int, default=None)
    r.add_argument("--log-every", type=int, default=None)
    r.add_argument("--sample-solver", default=None, help="solver for checkpoint sample grids")
    r.add_argument("--sample-steps", type=int, default=None)
    r.add_argument("--sample-n", type=int, default=None)
    r.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the 2-D toys, torch's default "
                        "otherwise; 1 is fastest on a busy machine)")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _default_sde(args: argparse.Namespace) -> str:
    return "flow" if args.objective == "flow" else "vp"


def build_config(args: argparse.Namespace):
    from ..training.trainer import recipe

    net: dict[str, Any] = {}
    for flag, key in (("net", "name"), ("prediction", "prediction"), ("channels", "base_channels"),
                      ("channel_mult", "channel_mult"), ("num_res_blocks", "num_res_blocks"),
                      ("attn_resolutions", "attn_resolutions"), ("width", "width"),
                      ("depth", "depth"), ("embedding", "embedding"), ("dropout", "dropout"),
                      ("sigma_data", "sigma_data")):
        v = getattr(args, flag)
        if v is not None:
            net[key] = v
    if args.objective == "flow":   # flow matching: the rectified-flow process, velocity, CFM
        net.setdefault("prediction", "flow")
        args.loss = args.loss or "flow"
    args.sde = args.sde or _default_sde(args)
    over: dict[str, Any] = {"sde": args.sde, "net": net, "class_cond": bool(args.class_cond)}
    if args.sde_kwargs:
        over["sde_kwargs"] = args.sde_kwargs
    for key in ("loss", "steps", "batch_size", "lr", "lr_decay", "warmup", "weight_decay",
                "grad_clip", "ema_decay", "seed", "ckpt_every", "log_every", "sample_solver",
                "sample_steps", "sample_n", "device", "label_dropout", "image_size"):
        v = getattr(args, key)
        if v is not None:
            over[key] = v
    if args.prediction is not None and args.loss is None:   # the natural loss for the output
        over["loss"] = {"denoiser": "edm", "flow": "flow"}.get(args.prediction, "eps")
    cfg = recipe(args.data, **over)
    if cfg.net.get("name") == "mlp":   # drop U-Net-only keys from an MLP recipe and vice versa
        for k in ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions"):
            cfg.net.pop(k, None)
    elif cfg.net.get("name") == "unet":
        for k in ("width", "depth", "emb_dim"):
            cfg.net.pop(k, None)
    return cfg


def run(args: argparse.Namespace) -> int:
    import torch

    from ..training.checkpoint import CheckpointError
    from ..training.trainer import CHECKPOINT_NAME, Trainer, TrainingDiverged

    if args.threads is not None:
        if args.threads < 1:
            print(f"sdekit train: error: --threads={args.threads} is invalid: expected >= 1",
                  file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    elif args.data != "digits" and args.net in (None, "mlp"):
        torch.set_num_threads(1)   # tiny MLP matmuls: extra threads only add contention
    out = args.out or Path("runs") / f"{args.data}-{args.sde or _default_sde(args)}"
    if (out / CHECKPOINT_NAME).exists() and not args.resume:
        print(f"sdekit train: error: {out / CHECKPOINT_NAME} already exists: pass --resume to "
              "continue that run, or choose another --out", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args)
        trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress)
    except (ValueError, CheckpointError) as e:
        print(f"sdekit train: error: {e}", file=sys.stderr)
        return 2
    try:
        if trainer.rank == 0:
            start = f" (resumed at step {trainer.step})" if trainer.step else ""
            n = sum(p.numel() for p in trainer.net.parameters())
            print(f"training {cfg.net['name']} ({n:,} parameters, prediction "
                  f"{trainer.net.prediction}) on {cfg.data} with {cfg.sde}/{cfg.loss} loss for "
                  f"{cfg.steps} steps{start}; world size {trainer.world_size}; output {out}")
        res = trainer.train()
        if trainer.rank == 0:
            print(f"done: step {res.step}, loss {res.loss:.4f}, {res.elapsed_s:.1f} s; "
                  f"checkpoint {res.checkpoint}")
        return 0
    except TrainingDiverged as e:
        print(f"sdekit train: error: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
