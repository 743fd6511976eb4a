"""``sdekit tune``: tune a solver's time grid at an NFE budget (or search solvers x grids)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._args import (
    RawHelpFormatter,
    UsageError,
    add_command,
    add_threads,
    apply_threads,
    float_in,
    int_at_least,
    positive_int,
    seed_int,
)
from .bench import _csv

if TYPE_CHECKING:
    from ..bench.problems import BenchProblem

DEFAULT_OUT = Path("runs") / "tune"
EPILOG = """\
Tuning uses the calibration seeds; every error it reports as the result is measured on the
held-out seeds (other initial states). The grid file records the solver, its options, the NFE,
the forward SDE and the model; `sdekit sample --grid FILE`, `sdekit bench --grids FILE` and
sdekit.sample(grid=FILE) refuse it for anything else. Interrupted runs resume from
<out>.state.pt (rerun the same command; --fresh starts over).

examples:
  sdekit tune --problem gaussian --solver dpmpp_2m --nfe 10
  sdekit tune --problem gmm --sde ddpm --solver unipc_bh2 --nfe 5 --out grids/gmm-unipc-5.json
  sdekit tune --problem checkpoint:runs/digits-vp/checkpoint.pt --solver dpmpp_2m --nfe 10
  sdekit tune --problem gaussian --nfe 10 --search --tune-top 2
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "tune", help="tune a solver's time grid for a model at an NFE",
                    description="Find the time grid that minimises a solver's end-point RMS "
                                "error at a fixed NFE against a converged reference (teacher "
                                "trajectory + dynamic programming + coordinate search), or with "
                                "--search rank solvers x options x grids.",
                    epilog=EPILOG, formatter_class=RawHelpFormatter)
    a = p.add_argument
    a("--problem", default="gaussian",
      help="gaussian, gmm (the built-in analytic problems of `sdekit bench`), checkpoint:PATH, a "
           ".pt file or module:factory (trusted code only: it is run)")
    a("--sde", default=None, help="forward SDE of a built-in problem (default: vp)")
    a("--dim", type=positive_int, default=None, help="dimension of a built-in problem "
                                                     "(default: 16)")
    a("--solver", default="dpmpp_2m", help="registry name of a deterministic fixed-grid solver")
    a("--nfe", type=int_at_least(1), required=True, help="NFE budget (required)")
    a("-O", "--solver-option", type=_option_kv, action="append", default=[],
      metavar="OPTION=VALUE", help="an option of --solver, e.g. lower_order_final=false "
                                   "(repeatable; default: none)")
    a("--n", type=int_at_least(2), default=128, help="calibration batch (prior draws)")
    a("--n-heldout", type=int_at_least(2), default=None, help="held-out batch (default: --n)")
    a("--seed", type=seed_int, default=0, help="seed of the calibration seeds")
    a("--heldout-seed", type=seed_int, default=None,
      help="seed of the held-out seeds (default: --seed + 1)")
    a("--float64", action="store_true",
      help="tune for float64 initial states and solves (default float32, as sdekit sample and "
           "sdekit bench run: a grid tuned in float64 can lean on steps whose rounding float32 "
           "amplifies)")
    a("--reference-tol", type=float_in(0.0, 1.0, lo_open=True), default=None,
      help="rtol = atol of the dopri5 reference (default: 1e-8 in float64, else 1e-6; the "
           "built-in gaussian problem uses its exact flow map)")
    a("--max-sweeps", type=int_at_least(0), default=40, help="coordinate-search sweeps at most")
    a("--polish", type=int_at_least(0), default=1000, metavar="SOLVES",
      help="solves of the multi-start simplex search after the coordinate search (0: none)")
    a("--model-tag", default=None,
      help="name of a model that cannot be hashed (default: the weights hash)")
    a("--search", action="store_true",
      help="rank solvers x options x named grids instead of tuning one solver")
    a("--solvers", type=_csv(str, "--solvers", refuse_empty=True), default=[],
      help="with --search: solvers to rank (default: every deterministic fixed-grid solver)")
    a("--tune-top", type=int_at_least(0), default=0,
      help="with --search: also tune the grids of the best K solver configurations")
    a("--out", type=Path, default=None,
      help=f"the grid file, .json (default: {DEFAULT_OUT}/<problem>-<solver>-nfe<N>.json; with "
           "--search the ranking, <problem>-search-nfe<N>.json)")
    a("--fresh", action="store_true", help="ignore a saved state and start over")
    a("--quiet", action="store_true", help="no progress output")
    add_threads(p)
    p.set_defaults(func=run)
    return p


def _option_kv(s: str) -> tuple[str, Any]:
    """``OPTION=VALUE`` with VALUE read as JSON where it parses (``false``, ``3``), else text."""
    key, eq, val = s.partition("=")
    if not key or not eq:
        raise argparse.ArgumentTypeError(f"--solver-option {s!r} is invalid: expected "
                                         "OPTION=VALUE, e.g. lower_order_final=false")
    try:
        return key, json.loads(val)
    except ValueError:
        return key, val


def _check_args(args: argparse.Namespace, builtin: bool, problems: Any) -> None:
    """Refuse the option combinations ``sdekit tune`` does not take (before any work)."""
    if not builtin and (args.sde is not None or args.dim is not None):
        raise UsageError(f"--sde/--dim configure the built-in problems {sorted(problems)} only, "
                         f"not --problem {args.problem!r}")
    if not args.search and (args.solvers or args.tune_top):
        raise UsageError("--solvers/--tune-top go with --search")
    if args.search and args.solver_option:
        raise UsageError("-O/--solver-option goes with one --solver, not --search (the search "
                         "varies the options itself)")
    if args.out is not None and args.out.suffix != ".json":
        raise UsageError(f"--out={str(args.out)!r} is invalid: expected a .json file name")
    if args.out is not None and args.out.is_dir():
        raise UsageError(f"--out={str(args.out)!r} is a directory: expected a .json file name")


def _run_search(args: argparse.Namespace, problem: BenchProblem, name: str,
                common: dict[str, Any]) -> int:
    """``sdekit tune --search``: rank the candidates, write the ranking, print the winner."""
    from ..tune import TuneError, format_search, search
    out = args.out or DEFAULT_OUT / f"{name}-search-nfe{args.nfe}.json"
    try:
        result = search(problem.sde, problem.model, args.nfe, solvers=args.solvers or None,
                        tune_top=args.tune_top, out_dir=out.parent,
                        tune_options={"max_sweeps": args.max_sweeps, "polish": args.polish},
                        **common)
    except TuneError as e:
        raise UsageError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..bench.runner import atomic_write_json
    atomic_write_json(out, result)
    print(format_search(result))
    w = result["winner"]
    where = (f"its tuned grid {w['grid_file']}" if w.get("grid_file") else
             f"the {w['grid']} grid" + (f" {w['grid_options']}" if w["grid_options"] else ""))
    print(f"\nwinner: {w['solver']} {w['options'] or ''} on {where}: held-out RMS "
          f"{w['heldout_rms']:.3e} at {w['nfe']} NFE ({result['cost']['nfe']} NFE spent, "
          f"{result['cost']['wall_s']:.1f} s) -> {out}")
    return 0


def _run_tune(args: argparse.Namespace, problem: BenchProblem, name: str, options: dict[str, Any],
              common: dict[str, Any]) -> int:
    """``sdekit tune``: tune one solver's grid, write the grid file, print its summary."""
    from ..tune import TuneError, tune
    out = args.out or DEFAULT_OUT / f"{name}-{args.solver}-nfe{args.nfe}.json"
    try:
        tg = tune(problem.sde, problem.model, args.solver, args.nfe, solver_options=options,
                  max_sweeps=args.max_sweeps, polish=args.polish, out=out, fresh=args.fresh,
                  **common)
    except TuneError as e:
        raise UsageError(str(e)) from None
    errs = tg.record["errors"]
    print(json.dumps({"grid": str(out), "solver": tg.solver, "nfe": tg.nfe,
                      "heldout_rms": errs["heldout_rms"],
                      "best_named_grid": errs["best_named_grid_heldout"],
                      "ratio": errs["ratio_heldout"],
                      "ratio_ci95": errs["ratio_heldout_ci95"],
                      "heldout_over_fit": errs["heldout_over_fit"], "cost": tg.record["cost"]},
                     indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.problems import PROBLEMS, resolve_problem
    from ..sde import get_sde

    builtin = args.problem in PROBLEMS
    apply_threads(args.threads, 1 if builtin else None)
    _check_args(args, builtin, PROBLEMS)
    options = dict(args.solver_option)
    try:
        sde = get_sde(args.sde) if args.sde is not None else None
    except ValueError as e:
        raise UsageError(f"--sde: {e}") from None
    problem = resolve_problem(args.problem, sde=sde, dim=args.dim, seed=0)
    shape = tuple(problem.sample_init(2, torch.Generator().manual_seed(0)).shape[1:])
    f64 = args.float64
    common: dict[str, Any] = {
        "calibration": args.n, "seed": args.seed, "heldout": args.n_heldout or args.n,
        "heldout_seed": args.heldout_seed, "shape": shape,
        "dtype": torch.float64 if f64 else torch.float32,
        "reference": problem.flow if problem.flow is not None else "dopri5",
        "reference_tol": args.reference_tol, "progress": not args.quiet,
        "model_tag": args.model_tag}
    name = problem.name + ("" if not builtin else f"-{args.sde or 'vp'}")
    if args.search:
        return _run_search(args, problem, name, common)
    return _run_tune(args, problem, name, options, common)
