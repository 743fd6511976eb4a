"""``sdekit distill``: teacher trajectories from a checkpoint, then a one-pass operator."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ._args import (
    UsageError,
    add_command,
    add_threads,
    alias,
    apply_threads,
    existing_file,
    nonneg_float,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
    seed_int,
)


# over 60 lines: argparse declarations only (one option after another), nothing to split out
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "distill",
        help="distil a checkpoint into a one-pass operator sampler (solver 'fno')",
        description="Solve the probability-flow ODE of a trained checkpoint from prior draws "
                    "(resumable, on disk), then train a temporal Fourier neural operator that "
                    "maps x_T to the trajectory in one pass (Zheng et al. 2023). Sample with "
                    "`sdekit sample --checkpoint TEACHER --solver fno --operator OUT/operator.pt`.")
    a = p.add_argument
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=existing_file,
                     help="the teacher: a `sdekit train` checkpoint (this or --problem is "
                          "required)")
    src.add_argument("--problem", help="the teacher as a `sdekit bench` problem: gaussian, gmm "
                                       "(exact scores), checkpoint:PATH or module:factory (this "
                                       "or --checkpoint is required)")
    a("--sde", default=None, help="forward SDE of a built-in problem (default vp)")
    a("--dim", type=positive_int, default=None,
      help="dimension of a built-in problem (default: the problem's own)")
    a("--problem-seed", type=seed_int, default=0,
      help="seed of a built-in problem (as `sdekit bench --seed`)")
    a("--out", type=out_dir, required=True,
      help="directory for trajectories and operator.pt (required)")
    a("--n", type=positive_int, default=8192, help="number of teacher trajectories")
    a("--solver", default=None,
      help="teacher solver (any registered fixed-grid solver; default heun, or unipc_bh2 of "
           "order 3 where the process starts at alpha = 0, flow matching at t = 1, where Heun "
           "cannot start)")
    a("--steps-per-segment", type=positive_int, default=8,
      help="teacher steps between consecutive output times")
    a("--shard-size", type=positive_int, default=1024,
      help="trajectories per file (and per solve)")
    a("--slots", type=positive_int, default=4,
      help="output times of the operator (the last is t_min)")
    a("--spacing", default="quadratic", help="spacing of the output times")
    a("--train-steps", type=nonneg_int, default=4000, help="optimiser steps")
    a("--batch-size", type=positive_int, default=256, help="trajectories per step")
    alias(p, "--batch", "batch_size", type=positive_int)
    a("--lr", type=positive_float, default=2e-3,
      help="peak learning rate (default 2e-3; 100 warm-up steps, cosine decay to 0)")
    a("--width", type=positive_int, default=64, help="channels of the temporal Fourier layers")
    a("--layers", type=positive_int, default=2, help="temporal Fourier layers")
    a("--modes", type=positive_int, default=2, help="Fourier modes kept along the trajectory axis")
    a("--experts", type=positive_int, default=1,
      help="gated affine maps in the operator's linear path (vectors; e.g. the number of "
           "modes of the data)")
    a("--backbone-at", choices=("auto", "slots", "start"), default="auto",
      help="slots: one backbone pass per output time beside a fitted linear path; start: one "
           "pass at x_T's own noise level, every slot starting from its one-step DDIM estimate "
           "(with --init-from-teacher the operator starts as the teacher's 1-NFE DDIM; not on "
           "a process that starts at alpha = 0, flow matching); auto (default): start with "
           "--init-from-teacher where the process allows it, slots otherwise")
    a("--fold-time", action="store_true",
      help="with --backbone-at start: fold the backbone's noise-level input (constant at the "
           "start time) into one learned vector per block: fewer parameters and "
           "multiply-accumulates than the teacher's network, the same function at the start")
    a("--feature-loss", type=nonneg_float, default=0.0, metavar="WEIGHT",
      help="add WEIGHT times a feature-space loss on the last slot (digits only; a feature "
           "network of its own, not the FD-digits evaluation network; default 0: L2 only)")
    for flag, stage, weight_help, steps, lr in (
        ("adversarial", "adversarial",
         "a GAN loss on fresh prior draws, the teacher's endpoints as the real samples",
         2500, "2e-4; the discriminator's: 1e-3"),
        ("dmd", "distribution-matching",
         "the distribution-matching (DMD) loss on fresh prior draws: the teacher's score "
         "against a fake score, a copy of the teacher's network trained on the operator's "
         "samples (a checkpoint teacher only; not with --adversarial; the digits recipe: 30)",
         1500, "5e-5; the fake score's: 2e-4"),
    ):
        a(f"--{flag}", type=nonneg_float, default=0.0, metavar="WEIGHT",
          help=f"after the L2 training (kept as OUT/operator_l2.pt), train --{flag}-steps "
               f"more with WEIGHT times {weight_help}, into OUT/operator.pt (default 0: L2 "
               "only)")
        a(f"--{flag}-steps", type=positive_int, default=None,
          help=f"steps of the {stage} stage (with --{flag}; default {steps})")
        a(f"--{flag}-lr", type=positive_float, default=None,
          help=f"constant learning rate of the {stage} stage (with --{flag}; default {lr})")
    a("--init-from-teacher", action="store_true",
      help="use the teacher checkpoint's network (architecture and weights) as the backbone")
    a("--seed", type=seed_int, default=0, help="seed of the teacher's draws and of training")
    add_threads(p)
    a("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _teacher(args: argparse.Namespace) -> tuple[Any, Any, tuple[int, ...], str]:
    """``(sde, model, state_shape, description)`` of the teacher named on the command line."""
    import torch

    from ..bench.problems import PROBLEMS, BenchError, resolve_problem
    from ..sde import get_sde

    spec = f"checkpoint:{args.checkpoint}" if args.checkpoint else args.problem
    if spec not in PROBLEMS and (args.sde is not None or args.dim is not None):
        raise BenchError(f"--sde/--dim configure the built-in problems {sorted(PROBLEMS)} only, "
                         f"not {spec!r}")
    sde = get_sde(args.sde) if args.sde is not None else None
    problem = resolve_problem(spec, sde=sde, dim=args.dim, seed=args.problem_seed)
    shape = tuple(problem.sample_init(1, torch.Generator().manual_seed(0)).shape[1:])
    return problem.sde, problem.model, shape, problem.description or spec


def _teacher_checkpoint(args: argparse.Namespace, flag: str) -> Path:
    """The teacher's checkpoint path, which ``flag`` (--dmd, --init-from-teacher) needs;
    refused for a built-in problem."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.problem.startswith("checkpoint:"):
        return Path(args.problem.split(":", 1)[1])
    raise UsageError(f"{flag} needs a checkpoint teacher (--checkpoint PATH or --problem "
                     f"checkpoint:PATH), not --problem {args.problem!r}")


def _teacher_network(args: argparse.Namespace, model: Any) -> tuple[dict, dict]:
    """The teacher checkpoint's network config and (EMA) weights, for --init-from-teacher,
    taken from the already loaded teacher ``model``."""
    from ..models import ScoreNet
    from ..training.checkpoint import CheckpointError
    _teacher_checkpoint(args, "--init-from-teacher")
    fn = model.net.fn  # the counted callable: the ScoreNet, or a ConditionedNet around it
    net = getattr(fn, "net", fn)
    if not isinstance(net, ScoreNet):
        raise CheckpointError(f"--init-from-teacher: the teacher's network is a "
                              f"{type(net).__name__}, not an sdekit ScoreNet")
    return dict(net.config), net.state_dict()


def _second_stage(args: argparse.Namespace, settings: dict[str, Any]) -> Any:
    """The second stage's settings from the command line: ``settings`` maps each stage's flag
    (``adversarial``, ``dmd``) to its settings class; None without either flag. A stage's other
    flags without its weight, and both stages at once, are refused rather than ignored."""
    chosen = None
    for flag, cls in settings.items():
        given = {k: v for k in ("steps", "lr")
                 if (v := getattr(args, f"{flag}_{k}")) is not None}
        if not getattr(args, flag):
            if given:
                flags = " and ".join(f"--{flag}-{k}" for k in given)
                raise UsageError(f"{flags} {'set' if len(given) > 1 else 'sets'} the --{flag} "
                                 f"stage, which runs only with --{flag} WEIGHT > 0: give the "
                                 "weight too, or leave it out")
            continue
        if chosen is not None:
            raise UsageError("--adversarial and --dmd are two kinds of second stage: give one")
        chosen = cls(getattr(args, flag), **given)
    return chosen


def run(args: argparse.Namespace) -> int:
    from .._io import atomic_write_bytes
    from ..distill import (
        AdversarialSettings,
        DistributionMatchingSettings,
        check_backbone_at,
        check_feature_loss,
        check_fold_time,
        generate_trajectories,
        train_operator,
    )

    apply_threads(args.threads)
    t0 = time.perf_counter()
    try:
        sde, model, shape, teacher = _teacher(args)
        check_feature_loss(args.feature_loss, shape)   # before the trajectories
        backbone = init = None
        backbone_at = args.backbone_at
        if backbone_at == "auto":   # start has no noise level to run at where alpha(T) = 0
            backbone_at = ("start" if args.init_from_teacher and not sde.alpha_zero_at_T
                           else "slots")
        check_backbone_at(sde, backbone_at)   # before the trajectories
        adversarial = _second_stage(args, {"adversarial": AdversarialSettings,
                                           "dmd": DistributionMatchingSettings})
        matching = _teacher_checkpoint(args, "--dmd") if args.dmd else None
        if args.init_from_teacher:
            backbone, init = _teacher_network(args, model)
        check_fold_time(args.fold_time, backbone_at, backbone)   # before the trajectories
        data = generate_trajectories(args.out / "trajectories", sde, model, shape, args.n,
                                     solver=args.solver, steps_per_segment=args.steps_per_segment,
                                     slots=args.slots, spacing=args.spacing,
                                     shard_size=args.shard_size, seed=args.seed,
                                     teacher=teacher, progress=not args.quiet)
        t1 = time.perf_counter()
        train_operator(data, args.out / "operator.pt", sde, backbone=backbone,
                       init_backbone=init, width=args.width, layers=args.layers,
                       modes=args.modes, experts=args.experts, backbone_at=backbone_at,
                       fold_time=args.fold_time, steps=args.train_steps,
                       batch=args.batch_size, lr=args.lr, seed=args.seed,
                       feature_loss=args.feature_loss, adversarial=adversarial,
                       teacher=matching, progress=not args.quiet)
    except ValueError as e:  # BenchError and CheckpointError included; reported by main
        raise UsageError(str(e)) from e
    t2 = time.perf_counter()
    report = {"teacher": teacher, "trajectories_s": round(t1 - t0, 1),
              "training_s": round(t2 - t1, 1), "operator": str(args.out / "operator.pt")}
    atomic_write_bytes(args.out / "distill.json", json.dumps(report, indent=1).encode())
    print(json.dumps(report))
    return 0
