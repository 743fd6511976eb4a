"""``sdekit train``: train a score network on a bundled dataset (also under ``torchrun``)."""
from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

from ._args import (
    THREADS_HELP,
    UsageError,
    add_command,
    add_threads,
    alias,
    apply_threads,
    default_out_dir,
    float_in,
    fraction,
    nonneg_float,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
    seed_int,
    user_input,
)


def _ints(s: str) -> list[int]:
    try:
        v = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        v = None
    if v is None or any(i < 1 for i in v):
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a comma-separated list of integers >= 1")
    return v


def _json(s: str) -> dict[str, Any]:
    try:
        d = json.loads(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{s!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"{s!r} is not a JSON object")
    return d


# flag dest -> network config key
NET_FLAGS = {"net": "name", "prediction": "prediction", "channels": "base_channels",
             "channel_mult": "channel_mult", "num_res_blocks": "num_res_blocks",
             "attn_resolutions": "attn_resolutions", "width": "width", "depth": "depth",
             "embedding": "embedding", "dropout": "dropout", "sigma_data": "sigma_data"}
# flag dests that override a TrainConfig entry of the same name
CONFIG_FLAGS = ("loss", "steps", "batch_size", "lr", "lr_decay", "warmup", "weight_decay",
                "grad_clip", "ema_decay", "seed", "ckpt_every", "log_every", "sample_solver",
                "sample_steps", "sample_n", "device", "label_dropout", "image_size",
                "t_sampling", "logit_mean", "logit_std")
# flags of the flow-matching loss's t sampling: (dest, flag)
T_FLAGS = (("t_sampling", "--t-sampling"), ("logit_mean", "--logit-mean"),
           ("logit_std", "--logit-std"))


def _recipe_default(key: str, net: bool = False, flow: bool = False) -> str:
    """``default: ...`` text for a flag: the recipes' value (digits vs the 2-D toys; the
    flow-matching recipes with ``flow``)."""
    from ..training.trainer import FLOW_RECIPES, RECIPES, TrainConfig

    def show(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    vals = {}
    for r, label in (("digits", "digits"), ("toy", "toys")):
        if flow:
            v = FLOW_RECIPES[r].get(key, TrainConfig.__dataclass_fields__[key].default)
        elif net:
            v = RECIPES[r]["net"].get(key)
        else:
            v = RECIPES[r].get(key, TrainConfig.__dataclass_fields__[key].default)
        if v is not None:
            vals[label] = show(v)
    if not vals:
        return "default: the network's own"
    if len(set(vals.values())) == 1 and len(vals) == 2:
        return f"default: {next(iter(vals.values()))}"
    return "default: " + ", ".join(f"{k} {v}" for k, v in vals.items())


# over 60 lines: argparse declarations only (one option after another), nothing to split out
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ..models import EMBEDDINGS, NET_PREDICTIONS, NETWORKS
    from ..sde import SDES
    from ..training.data import DATASETS
    from ..training.losses import LOSSES, T_SAMPLINGS

    R = _recipe_default
    p = add_command(
        subparsers, "train", help="train a score network on a bundled dataset",
        description="Train a score network. Defaults come from the dataset's recipe (digits: a "
                    "small U-Net; the 2-D toys: a residual MLP); every flag overrides one entry. "
                    "`--print-config` shows the resolved config. Run data-parallel with "
                    "`torchrun --nproc-per-node N -m sdekit.cli.main train ...`.")
    a = p.add_argument
    a("--data", required=True, choices=list(DATASETS), help="bundled dataset (required)")
    a("--sde", default=None, choices=sorted(SDES),
      help="forward SDE (default: vp; flow with --objective flow)")
    a("--sde-kwargs", type=_json, default=None, metavar="JSON",
      help='SDE keyword arguments, e.g. \'{"beta_max": 20}\' (default: the SDE\'s own)')
    a("--out", type=out_dir, default=None,
      help="output directory (default: runs/<data>-<sde>, runs/<data>-<sde>-classifier with "
           "--objective classifier)")
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--print-config", action="store_true",
      help="print the resolved training config as JSON and exit without training")
    g = p.add_argument_group("network")
    g.add_argument("--net", choices=sorted(NETWORKS), default=None,
                   help="network architecture (" + R("name", net=True) + ")")
    g.add_argument("--prediction", choices=NET_PREDICTIONS, default=None,
                   help="network output (denoiser = EDM preconditioning; choosing one without "
                        "--loss picks eps loss, or edm for denoiser; "
                        + R("prediction", net=True) + ")")
    g.add_argument("--channels", type=positive_int, default=None,
                   help="U-Net base channels (" + R("base_channels", net=True) + ")")
    g.add_argument("--channel-mult", type=_ints, default=None, metavar="1,2",
                   help="U-Net channel multipliers per level (" + R("channel_mult", net=True)
                   + ")")
    g.add_argument("--num-res-blocks", type=positive_int, default=None,
                   help="U-Net residual blocks per level (" + R("num_res_blocks", net=True) + ")")
    g.add_argument("--attn-resolutions", type=_ints, default=None, metavar="4",
                   help="U-Net resolutions with self-attention (default: none)")
    g.add_argument("--width", type=positive_int, default=None,
                   help="MLP width (" + R("width", net=True) + ")")
    g.add_argument("--depth", type=positive_int, default=None,
                   help="MLP residual blocks (" + R("depth", net=True) + ")")
    g.add_argument("--embedding", choices=EMBEDDINGS, default=None,
                   help="time embedding (" + R("embedding", net=True) + ")")
    g.add_argument("--dropout", type=fraction, default=None,
                   help="dropout probability (" + R("dropout", net=True) + ")")
    g.add_argument("--sigma-data", type=positive_float, default=None,
                   help="data scale of the EDM preconditioning ("
                   + R("sigma_data", net=True) + ")")
    g.add_argument("--class-cond", action="store_true",
                   help="condition on labels (with a null class for classifier-free guidance)")
    g.add_argument("--label-dropout", type=fraction, default=None,
                   help="probability of the null class in training (" + R("label_dropout") + ")")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="upsample digits to this size (" + R("image_size") + ")")
    o = p.add_argument_group("optimisation")
    o.add_argument("--loss", choices=LOSSES, default=None,
                   help="training loss (" + R("loss") + ")")
    o.add_argument("--objective", choices=("flow", "classifier"), default=None,
                   help="flow: flow matching (--sde flow, --prediction flow, --loss flow and "
                        "the flow recipe's --t-sampling, each unless given); classifier: a "
                        "noise-conditional classifier p(y | x_t, t) for classifier guidance "
                        "(the U-Net's encoder half, cross-entropy on x_t; digits only; default: "
                        "none, denoising score matching)")
    alias(o, "--classifier", "objective", action="store_const", const="classifier")
    o.add_argument("--t-sampling", choices=T_SAMPLINGS, default=None,
                   help="training times of the flow loss: logit_normal, t = sigmoid(m + s z) "
                        "(SD3), or uniform (" + R("t_sampling", flow=True) + ")")
    o.add_argument("--logit-mean", type=float_in(-math.inf), default=None, metavar="M",
                   help="m of --t-sampling logit_normal (" + R("logit_mean", flow=True) + ")")
    o.add_argument("--logit-std", type=positive_float, default=None, metavar="S",
                   help="s of --t-sampling logit_normal (" + R("logit_std", flow=True) + ")")
    o.add_argument("--steps", type=positive_int, default=None, help="optimiser steps ("
                   + R("steps") + ")")
    o.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch size (" + R("batch_size") + ")")
    o.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (" + R("lr") + ")")
    o.add_argument("--lr-decay", choices=("cosine", "constant"), default=None,
                   help="learning-rate schedule after the warm-up (" + R("lr_decay") + ")")
    o.add_argument("--warmup", type=nonneg_int, default=None,
                   help="linear warm-up steps (" + R("warmup") + ")")
    o.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="AdamW weight decay (" + R("weight_decay") + ")")
    o.add_argument("--grad-clip", type=positive_float, default=None,
                   help="gradient-norm clip (" + R("grad_clip") + ")")
    o.add_argument("--ema-decay", type=fraction, default=None,
                   help="EMA decay of the sampled weights (" + R("ema_decay") + ")")
    o.add_argument("--seed", type=seed_int, default=None,
                   help="seed of the weights and batches (" + R("seed") + ")")
    r = p.add_argument_group("output")
    r.add_argument("--ckpt-every", type=positive_int, default=None,
                   help="steps between checkpoints (" + R("ckpt_every") + ")")
    r.add_argument("--log-every", type=positive_int, default=None,
                   help="steps between log rows (" + R("log_every") + ")")
    r.add_argument("--sample-solver", default=None,
                   help="solver of the sample grid at each checkpoint (default: sdekit.sample's "
                   "option-free rule, which also picks the grid; see `sdekit solvers`)")
    r.add_argument("--sample-steps", type=positive_int, default=None,
                   help="its steps (" + R("sample_steps") + ")")
    r.add_argument("--sample-n", type=positive_int, default=None,
                   help="samples in the grid (" + R("sample_n") + ")")
    r.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available (default: auto)")
    add_threads(r, "1 for the 2-D toys' MLP; otherwise " + THREADS_HELP)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    alias(r, "--no-progress", "quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def _default_sde(args: argparse.Namespace) -> str:
    return "flow" if args.objective == "flow" else "vp"


# flags of a score network or its loss, meaningless for --objective classifier
SCORE_ONLY = (("prediction", "--prediction"), ("sigma_data", "--sigma-data"),
              ("loss", "--loss"), ("label_dropout", "--label-dropout"), ("width", "--width"),
              ("depth", "--depth"), ("net", "--net"), ("class_cond", "--class-cond"))


def build_config(args: argparse.Namespace):
    from ..training.trainer import recipe

    if args.objective == "classifier":
        given = [flag for dest, flag in SCORE_ONLY + T_FLAGS if getattr(args, dest)]
        if given:
            raise ValueError(f"{given[0]} sets up a score network or its loss, but "
                             "--objective classifier trains a classifier (no prediction, no "
                             f"null class, cross-entropy loss): drop {given[0]}")

    net = {key: getattr(args, flag) for flag, key in NET_FLAGS.items()
           if getattr(args, flag) is not None}
    args.sde = args.sde or _default_sde(args)
    over: dict[str, Any] = {"sde": args.sde, "net": net, "class_cond": bool(args.class_cond)}
    if args.sde_kwargs:
        over["sde_kwargs"] = args.sde_kwargs
    over.update({k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None})
    if (args.objective != "flow" and args.prediction is not None
            and args.loss is None):   # the natural loss for the output
        over["loss"] = {"denoiser": "edm", "flow": "flow"}.get(args.prediction, "eps")
    # flow matching: the recipe's rectified-flow process, velocity network and CFM loss
    cfg = recipe(args.data, objective=args.objective or "dsm", **over)
    given = [flag for dest, flag in T_FLAGS if getattr(args, dest) is not None]
    if given and cfg.loss != "flow":
        raise ValueError(f"{given[0]} sets the training times of the flow loss, but the loss is "
                         f"{cfg.loss!r}: expected --loss flow or --objective flow with it")
    mn = [flag for dest, flag in T_FLAGS[1:] if getattr(args, dest) is not None]
    if mn and cfg.t_sampling != "logit_normal":
        raise ValueError(f"{mn[0]} is a parameter of --t-sampling logit_normal, but "
                         f"--t-sampling is {cfg.t_sampling!r}: drop {mn[0]} or use "
                         "--t-sampling logit_normal")
    if cfg.net.get("name") == "mlp":   # drop U-Net-only keys from an MLP recipe and vice versa
        for k in ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions"):
            cfg.net.pop(k, None)
    elif cfg.net.get("name") == "unet":
        for k in ("width", "depth", "emb_dim"):
            cfg.net.pop(k, None)
    return cfg


def check_config(cfg: Any) -> None:
    """Reject what would only fail later (the SDE's keyword arguments, the checkpoint sampler)
    with a :class:`UsageError` naming the flag."""
    from ..sde import SDES, get_sde
    from ..solvers.registry import DEFAULT_SOLVER, get_solver

    params = inspect.signature(SDES[cfg.sde].__init__).parameters
    if not any(v.kind is v.VAR_KEYWORD for v in params.values()):
        valid = [k for k in params if k != "self"]
        bad = sorted(set(cfg.sde_kwargs) - set(valid))
        if bad:
            raise UsageError(f"--sde-kwargs: unknown keyword(s) {bad} for --sde {cfg.sde} "
                             f"({SDES[cfg.sde].__name__}): expected some of {valid}")
    with user_input("--sde-kwargs"):
        get_sde(cfg.sde, **cfg.sde_kwargs)
    net = cfg.net
    if net.get("name") == "unet" and isinstance(cfg.image_size, int) and net.get(
            "attn_resolutions"):
        levels = [cfg.image_size // 2 ** i for i in range(len(net.get("channel_mult") or [1]))]
        bad = [r for r in net["attn_resolutions"] if r not in levels]
        if bad:   # an attention layer at no level of the U-Net would silently be left out
            raise UsageError(f"--attn-resolutions {bad} are not resolutions of the U-Net: "
                             f"expected some of {levels} (--image-size {cfg.image_size} halved "
                             "at each --channel-mult level)")
    with user_input("--sample-solver"):
        slv = get_solver(cfg.sample_solver or DEFAULT_SOLVER)
    if cfg.sample_steps < slv.min_steps:
        raise UsageError(f"--sample-steps={cfg.sample_steps} is too few for --sample-solver "
                         f"{cfg.sample_solver}: expected at least {slv.min_steps}")


def _t_sampling(cfg: Any) -> str:
    if cfg.loss != "flow":
        return ""
    if cfg.t_sampling == "uniform":
        return " (t uniform)"
    return f" (t logit-normal, mean {cfg.logit_mean:g}, std {cfg.logit_std:g})"


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import CHECKPOINT_NAME, Trainer

    sde_name = args.sde or _default_sde(args)
    suffix = "-classifier" if args.objective == "classifier" else ""
    out = args.out or default_out_dir(Path("runs") / f"{args.data}-{sde_name}{suffix}")
    with user_input():
        cfg = build_config(args)
    check_config(cfg)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return 0
    if (out / CHECKPOINT_NAME).exists() and not args.resume:
        raise UsageError(f"{out / CHECKPOINT_NAME} already exists: pass --resume to continue "
                         "that run, or choose another --out")
    toy_mlp = args.data != "digits" and cfg.net.get("name") == "mlp"
    apply_threads(args.threads, 1 if toy_mlp else None)   # tiny MLP matmuls: 1 thread is fastest
    with user_input():   # bad settings and checkpoints (CheckpointError is a ValueError)
        trainer = Trainer(cfg, out, resume=args.resume, progress=not args.quiet)
    try:
        if trainer.step >= cfg.steps:   # a finished run resumed with the same --steps
            if trainer.rank == 0:
                print(f"nothing to do: {trainer.checkpoint_path} is already at step "
                      f"{trainer.step} = --steps; pass a larger --steps to train further")
            return 0
        if trainer.rank == 0:
            start = (f" (resumed at step {trainer.step})" if trainer.step else
                     f" (--resume: no checkpoint in {out}, so from step 0)" if args.resume
                     else "")
            n = sum(p.numel() for p in trainer.net.parameters())
            what = ("classes" if trainer.is_classifier
                    else f"prediction {trainer.net.prediction}")
            print(f"training {cfg.net['name']} ({n:,} parameters, {what}) on {cfg.data} with "
                  f"{cfg.sde}/{cfg.loss} loss"
                  f"{_t_sampling(cfg)} for "
                  f"{cfg.steps} steps{start}; world size {trainer.world_size}; output {out}")
        res = trainer.train()
        if trainer.rank == 0:
            print(f"done: step {res.step}, loss {res.loss:.4f}, {res.elapsed_s:.1f} s; "
                  f"checkpoint {res.checkpoint}")
        return 0
    finally:
        trainer.close()
