"""``sdekit sample``: draw samples from a checkpoint; writes a PNG grid and an .npz."""
from __future__ import annotations

import argparse
import inspect
import json
import math
from typing import Any

from ._args import (
    UsageError,
    add_command,
    add_threads,
    apply_threads,
    existing_file,
    float_in,
    nonneg_int,
    out_prefix,
    positive_int,
    seed_int,
    user_input,
)


def default_solver() -> str | None:
    """The default solver of :func:`sdekit.sample` (its signature is the one place it is set):
    None, the option-free rule (:func:`sdekit.solvers.default_config`)."""
    from ..integrate import sample
    return inspect.signature(sample).parameters["solver"].default


class _Given(argparse.Action):
    """Store the value and note in ``namespace.given`` that the option was given."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def solver_label(name: str, options: dict[str, Any]) -> str:
    """``name(k=v, ...)``: a solver with options, as the tables write it."""
    return name + ("(" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
                   if options else "")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "sample", help="sample a trained checkpoint",
                    description="Draw samples from a checkpoint (EMA weights) with any "
                                "registered solver; writes <out>.png and <out>.npz.")
    a = p.add_argument
    a("--checkpoint", type=existing_file, required=True,
      help="a `sdekit train` checkpoint (required)")
    a("--solver", default=default_solver(), action=_Given,
      help="registered solver name (see `sdekit solvers`), as in sdekit.sample(); with a "
           "--grid FILE unless given: the solver it was tuned for (default: sdekit.sample's "
           "option-free rule, sdekit.solvers.default_config, which also picks the grid and "
           "the solver's options from the forward SDE and --steps: unipc_bh2 on the logsnr "
           "grid with a floor, of order 3 where its lambda steps are at most 1.2 (order 2 "
           "where longer), on the Karras grid for flow matching at <= 5 steps; docs/defaults.md; "
           "with --grid NAME: unipc_bh2)")
    a("--steps", type=positive_int, default=20, action=_Given,
      help="solver steps; with a --grid FILE unless given: its steps")
    a("--grid", default=None,
      help="time grid: a name, with options as the tables print them (e.g. "
           "'logsnr(lambda_floor=-2.5)', 'uniform(shift=3)'), or a tuned grid file (.json "
           "from `sdekit tune`, refused unless tuned for this checkpoint, solver and steps; "
           "its solver options are used) (default: the solver's own)")
    a("--n", type=positive_int, default=64, help="number of samples")
    a("--seed", type=seed_int, default=0, help="seed of the per-sample seeds")
    a("--batch-size", type=positive_int, default=1000, help="samples per solver call")
    a("--label", type=nonneg_int, default=None,
      help="class label for a class-conditional model (default: labels cycle 0..K-1)")
    a("--guidance", type=float_in(-math.inf), default=0.0,
      help="classifier-free guidance weight w: (1 + w) conditional - w unconditional, one "
           "batched call of 2 network passes (2 NFE) per model call")
    a("--cfg-rescale", type=float_in(0.0, 1.0, hi_open=False), default=0.0, metavar="PHI",
      help="CFG rescale (Lin et al. 2024) of the guided output, in [0, 1]")
    a("--classifier", type=existing_file, default=None,
      help="a noise-conditional classifier checkpoint (`sdekit train --objective classifier`, "
           "on the same SDE) for classifier guidance towards --label or the cycling labels "
           "(default: none)")
    a("--classifier-scale", type=float_in(-math.inf), default=None, metavar="S",
      help="classifier guidance scale s: eps - s sigma grad log p(y | x_t), with --classifier "
           "(default: 1)")
    a("--sde", default=None,
      help="forward SDE to sample (default: the one the checkpoint records, the only valid one)")
    a("--prediction", default=None,
      help="the network's output kind (default: the one the checkpoint records, the only valid "
           "one)")
    a("--raw", action="store_true", help="use the raw weights instead of the EMA")
    a("--operator", type=existing_file, default=None,
      help="operator checkpoint for --solver fno (made by `sdekit distill`; default: none)")
    a("--out", type=out_prefix, default=None,
      help="output prefix (default: <checkpoint dir>/samples)")
    add_threads(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..solvers.registry import DEFAULT_SOLVER, get_solver
    from ..training.checkpoint import load_model
    from ..training.sampling import generate

    tuned = _tuned_grid(args)
    with user_input("--solver"):
        slv = get_solver(args.solver or DEFAULT_SOLVER)
    own = ("an adaptive solver picks its own steps" if slv.adaptive else
           "the operator runs at its own output times" if slv.grid_free else None)
    if own and "steps" in getattr(args, "given", set()):
        raise UsageError(f"--steps={args.steps} does not apply to --solver {slv.name}: {own}; "
                         "leave --steps out")
    if args.steps < slv.min_steps:
        raise UsageError(f"--steps={args.steps} is too few for --solver {args.solver}: expected "
                         f"at least {slv.min_steps}")
    apply_threads(args.threads)
    net, sde, cfg = load_model(args.checkpoint, ema=not args.raw)  # CheckpointError: main
    for flag, value, recorded in (("--sde", args.sde, cfg.get("sde")),
                                  ("--prediction", args.prediction, net.prediction)):
        if value is not None and value != recorded:
            what = "trained on the SDE" if flag == "--sde" else "trained to predict"
            raise UsageError(f"{flag}={value!r} is invalid for checkpoint "
                             f"{str(args.checkpoint)!r}: its network was {what} {recorded!r} "
                             f"(loss {cfg.get('loss')!r}): expected {recorded!r}, or omit {flag}")
    clf = _classifier(args, cfg)
    if args.classifier_scale is None:
        args.classifier_scale = 1.0
    elif clf is None:
        raise UsageError("--classifier-scale is only used with --classifier")
    y = _labels(args, net, clf)
    kw = {"grid": args.grid} if args.grid else {}
    if tuned is not None and args.solver == tuned.solver:
        kw.update(tuned.solver_options)   # the options it was tuned with
    if args.operator is not None:
        if args.solver != "fno":
            raise UsageError("--operator is only used with --solver fno")
        kw["operator"] = args.operator
    try:
        x, nfe = generate(net, sde, args.n, solver=args.solver, steps=args.steps, seed=args.seed,
                          y=y, guidance=args.guidance, batch_size=args.batch_size,
                          rescale=args.cfg_rescale, classifier=clf,
                          classifier_scale=args.classifier_scale, **kw)
    except (ValueError, KeyError) as e:   # a library input error, after the checks above
        raise UsageError(str(e.args[0] if e.args else e)) from e
    png, npz, solver = _save(args, x, y, nfe, net, sde, cfg, clf)
    steps = "its own steps" if own else f"{args.steps} steps"
    print(f"{args.n} samples, {nfe} NFE ({solver}, {steps}) -> {png}, {npz}")
    return 0


def _tuned_grid(args: argparse.Namespace) -> Any:
    """The tuned grid file ``--grid`` names (None for a named grid); its solver and step count
    fill ``--solver``/``--steps`` where they were not given."""
    from ..grids import GRIDS, is_grid_spec, parse_grid
    from ..tune import TuneError, is_grid_file, load_tuned_grid

    if args.grid is None or is_grid_spec(args.grid):
        return None
    if not is_grid_file(args.grid):
        if "(" in args.grid:   # a named grid with options: say what is wrong with them
            try:
                parse_grid(args.grid)
            except ValueError as e:
                raise UsageError(f"--grid: {e}") from None
        raise UsageError(f"--grid={args.grid!r} is invalid: expected one of {sorted(GRIDS)} "
                         "(options as name(key=value, ...)) or a tuned grid file (.json, made "
                         "by sdekit tune)")
    try:
        tuned = load_tuned_grid(args.grid)
    except TuneError as e:
        raise UsageError(f"--grid: {e}") from None
    given: set[str] = getattr(args, "given", set())
    args.solver = args.solver if "solver" in given else tuned.solver
    args.steps = args.steps if "steps" in given else tuned.steps
    return tuned


def _classifier(args: argparse.Namespace, cfg: dict[str, Any]) -> Any:
    """The ``--classifier`` network (None without it), checked against the model's SDE."""
    from ..training.checkpoint import CheckpointError, load_model

    if args.classifier is None:
        return None
    try:
        clf, _, ccfg = load_model(args.classifier)
    except CheckpointError as e:
        raise UsageError(f"--classifier: {e}") from e
    if ccfg.get("loss") != "classifier" or ccfg.get("sde") != cfg.get("sde") or \
            ccfg.get("sde_kwargs", {}) != cfg.get("sde_kwargs", {}):
        what = ("is not a classifier checkpoint (made by `sdekit train --objective "
                "classifier`)" if ccfg.get("loss") != "classifier" else
                f"was trained on the SDE {ccfg.get('sde')!r} {ccfg.get('sde_kwargs', {})}, "
                f"the model on {cfg.get('sde')!r} {cfg.get('sde_kwargs', {})}")
        raise UsageError(f"--classifier {str(args.classifier)!r} {what}")
    return clf


def _labels(args: argparse.Namespace, net: Any, clf: Any) -> Any:
    """The class labels of the samples (``--label``, else 0, 1, ... cycling; None for an
    unconditional model without a classifier)."""
    import torch

    classes = net.num_classes or (clf.num_classes if clf is not None else None)
    y = None
    if classes:
        y = (torch.full((args.n,), args.label) if args.label is not None
             else torch.arange(args.n) % classes)
        if args.label is not None and not 0 <= args.label < classes:
            raise UsageError(f"--label={args.label} is invalid: expected 0..{classes - 1}")
    if not net.num_classes and (args.guidance or args.cfg_rescale or
                                (args.label is not None and clf is None)):
        raise UsageError("--label/--guidance/--cfg-rescale need a class-conditional checkpoint "
                         "(trained with --class-cond), or --classifier for --label")
    return y


def _save(args: argparse.Namespace, x: Any, y: Any, nfe: int, net: Any, sde: Any,
          cfg: dict[str, Any], clf: Any) -> tuple[Any, Any, str]:
    """Write the sample grid (.png) and the samples with their metadata (.npz); returns their
    paths and the solver as recorded (the option-free rule's where none was given)."""
    import numpy as np

    from ..solvers.registry import DEFAULT_SOLVER, default_config
    from ..training.data import to_data_space
    from ..training.images import save_samples_png

    out = args.out or args.checkpoint.parent / "samples"
    out.parent.mkdir(parents=True, exist_ok=True)
    png, npz = out.with_name(out.name + ".png"), out.with_name(out.name + ".npz")
    save_samples_png(png, x, nrow=10 if net.num_classes == 10 else None)
    transform = cfg.get("transform") or {}
    solver, grid, grid_options = args.solver, args.grid, {}
    if solver is None:   # record what the option-free rule picked
        rule = default_config(sde, args.steps)
        solver = DEFAULT_SOLVER if grid else solver_label(rule["solver"], rule["options"])
        if not grid:
            grid, grid_options = rule["grid"], rule["grid_options"]
    meta = {"checkpoint": str(args.checkpoint), "solver": solver, "steps": args.steps,
            "grid": grid, "grid_options": grid_options,
            "nfe": nfe, "seed": args.seed, "guidance": args.guidance, "ema": not args.raw,
            "cfg_rescale": args.cfg_rescale,
            "classifier": str(args.classifier) if clf is not None else None,
            "classifier_scale": args.classifier_scale if clf is not None else None}
    arrays: dict[str, Any] = {"x": x.numpy(), "meta": np.array(json.dumps(meta))}
    if transform:
        xd = to_data_space(x, transform)
        if transform.get("data_range"):          # pixel values: clip to the valid range
            xd = xd.clamp(*transform["data_range"])
        arrays["x_data"] = xd.numpy()
    if y is not None:
        arrays["y"] = y.numpy()
    np.savez(npz, **arrays)
    return png, npz, solver
