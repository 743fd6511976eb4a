"""``sdekit bench``: sweep solvers x grids x NFE budgets on a problem, report quality vs NFE."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._args import (
    THREADS_HELP,
    RawHelpFormatter,
    UsageError,
    add_command,
    add_threads,
    apply_threads,
    default_out_dir,
    float_in,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
    seed_int,
)

if TYPE_CHECKING:
    from ..bench.runner import SweepConfig

DEFAULT_OUT = Path("runs") / "bench"
EPILOG = """\
problems:
  gaussian            16-dim Gaussian under VP, exact score and exact references (default)
  gmm                 16-dim 8-component Gaussian mixture, exact score
  checkpoint:PATH     a trained sdekit checkpoint (needs sdekit.training)
  module:factory      your model: factory() -> {'sde', 'model', 'sample_init'[, 'reference']};
                      TRUSTED CODE ONLY: the module is imported and run. It is found on
                      sys.path (the current directory is not added: set PYTHONPATH)

examples:
  sdekit bench                                   # every solver x grid at NFE 5,10,20,50
  sdekit bench --solvers ddim,heun --grids logsnr --nfe 10,20
  sdekit bench --problem gmm --out results/gmm
  torchrun --nproc-per-node 2 -m sdekit.cli.main bench --problem gmm   # sharded sweep

Progress (the reference solve, then each cell) goes to stderr; --quiet turns it off.
"""


def _csv(kind: type, name: str, refuse_empty: bool = False, nested: bool = False):
    """A comma-separated list of ``kind`` values ('all': the empty list, the flag's default);
    with ``refuse_empty`` an empty value is refused, not read as 'all' (an unset shell
    variable must not start the whole sweep); with ``nested`` commas inside parentheses stay
    (a grid's options: ``logsnr,uniform(shift=3, shift_type=linear)``)."""
    def parse(s: str) -> list[Any]:
        if s.strip().lower() == "all":
            return []
        try:
            values = [kind(v.strip()) for v in (_split_outside_parens(s) if nested
                                                else s.split(",")) if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}={s!r} is invalid: expected comma-separated {kind.__name__} values")
        if refuse_empty and not values:
            raise argparse.ArgumentTypeError(
                f"{name}={s!r} is invalid: expected comma-separated names (or 'all')")
        return values
    return parse


def _split_outside_parens(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _option(s: str) -> tuple[str, str, Any]:
    name, _, rest = s.partition(".")
    key, eq, val = rest.partition("=")
    if not name or not key or not eq:
        raise argparse.ArgumentTypeError(
            f"--solver-option {s!r} is invalid: expected SOLVER.OPTION=VALUE, e.g. pc.snr=0.1")
    try:
        v: Any = json.loads(val)
    except ValueError:
        v = val
    return name, key, v


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "bench", help="NFE-versus-quality benchmark of the registered solvers",
        description="Sweep solvers x time grids x NFE budgets on a problem and report quality "
                    "(RMS vs the reference PF-ODE solution, Frechet distance, KL, sliced "
                    "Wasserstein, MMD) against measured NFE and wall time. Finished cells are "
                    "cached: rerun the same command to resume an interrupted sweep.",
        epilog=EPILOG, formatter_class=RawHelpFormatter)
    a = p.add_argument
    a("--problem", default="gaussian", help="gaussian, gmm, checkpoint:PATH or "
                                            "module:factory (trusted code only: it is run)")
    a("--sde", default=None, help="forward SDE of a built-in problem (default: vp); see "
                                  "`sdekit sdes`")
    a("--dim", type=positive_int, default=None,
      help="dimension of a built-in problem (default: gaussian 16, gmm 16)")
    a("--solvers", type=_csv(str, "--solvers", refuse_empty=True), default=[],
      help="comma-separated registry names, 'default': the option-free call (default: all)")
    a("--exclude", type=_csv(str, "--exclude"), default=[],
      help="solvers to leave out (default: none)")
    a("--grids", type=_csv(str, "--grids", refuse_empty=True, nested=True), default=[],
      help="comma-separated time grids (default: all: uniform, quadratic, logsnr, karras), "
           "with options as the tables print them, e.g. 'logsnr(lambda_floor=-2.5)' or "
           "'uniform(shift=3)' (quote them for the shell); a tuned grid file (.json from "
           "`sdekit tune`) adds its own row, '<solver> [tuned]', at its NFE")
    a("--nfe", type=_csv(int, "--nfe"), default=[5, 10, 20, 50], help="NFE budgets "
                                                                      "(default: 5,10,20,50)")
    a("--tols", type=_csv(float, "--tols"), default=[1e-2, 1e-3, 1e-4],
      help="tolerances for adaptive solvers (default: 1e-2,1e-3,1e-4)")
    a("-n", "--n", type=positive_int, default=500, help="samples per cell, one batch")
    a("--n-ref", type=positive_int, default=None, help="held-out samples (default: --n)")
    a("--seed", type=seed_int, default=0, help="seed of the initial states and the noise")
    a("-O", "--solver-option", type=_option, action="append", default=[],
      metavar="SOLVER.OPTION=VALUE",
      help="an option for one solver of --solvers, e.g. pc.snr=0.1 (repeatable; default: none)")
    a("--float64", action="store_true", help="keep solver states in float64")
    a("--reference-tol", type=float_in(0.0, 1.0, lo_open=True), default=None,
      help="rtol = atol of the reference solve where no exact flow map exists (default: 1e-8 "
           "for analytic models, 1e-6 for networks)")
    a("--out", type=out_dir, default=None,
      help=f"output folder (default: {DEFAULT_OUT}/<problem>)")
    a("--cache-dir", type=out_dir, default=None,
      help="cell cache (default: <out>/cache); must be shared by all ranks of a sharded run")
    a("--fresh", action="store_true", help="recompute every cell instead of resuming")
    a("--formats", type=_csv(str, "--formats"), default=["json", "csv", "md", "png"],
      help="outputs to write (default json,csv,md,png)")
    a("--plot", choices=("best", "all"), default="best",
      help="plot each solver on its best grid (default) or every solver x grid")
    a("--metrics", type=_csv(str, "--metrics"), default=["rms", "fd"],
      help="metrics of the terminal tables (default rms,fd; any of rms,fd,kl,sw,mmd,"
           "ms_per_sample,passes,ms_median)")
    a("--timing-repeats", type=nonneg_int, default=3,
      help="rounds of side-by-side timing: every ok cell solved again per round, interleaved, "
           "for the ms_min/ms_median columns (default 3; 0: no timing rounds)")
    add_threads(p, "1 for the built-in analytic problems, whose tiny operations only lose from "
                   "threading; otherwise " + THREADS_HELP)
    a("--quiet", action="store_true", help="no progress output (reference solve, cells)")
    a("--shard-timeout", type=positive_float, default=3600.0,
      help="seconds rank 0 waits for the other ranks' cells")
    p.set_defaults(func=run)
    return p


#: the flag of each library setting named by a :class:`sdekit.bench.runner.ConfigError`
FLAGS = {"solvers": "--solvers", "exclude": "--exclude", "solver_options": "--solver-option",
         "grids": "--grids", "nfe": "--nfe", "tols": "--tols", "n": "--n", "n_ref": "--n-ref",
         "reference_tol": "--reference-tol", "timing_repeats": "--timing-repeats",
         "metrics": "--metrics", "formats": "--formats"}


def _config(args: argparse.Namespace) -> SweepConfig:
    """The :class:`~sdekit.bench.runner.SweepConfig` of the flags (checked when made)."""
    from ..bench.runner import DEFAULT_ROW, SweepConfig, check_solver_names
    from ..solvers.registry import solver_names

    check_solver_names(args.exclude, "exclude", default_row=True)  # (--solvers: SweepConfig's)
    every = [DEFAULT_ROW, *solver_names()]     # no --solvers: the option-free row and all
    solvers = [s for s in (args.solvers or every) if s not in set(args.exclude)]
    if not solvers:
        raise UsageError("--solvers/--exclude leave no solver to run")
    options: dict[str, dict[str, Any]] = {}
    for name, key, val in args.solver_option:
        if name in solver_names() and name not in solvers:
            raise UsageError(f"-O/--solver-option {name}.{key}=...: solver {name!r} is not "
                             f"swept (--solvers/--exclude leave {solvers}): add it to "
                             "--solvers or drop the option")
        options.setdefault(name, {})[key] = val
    return SweepConfig(solvers=solvers, grids=args.grids or None, nfe=args.nfe, tols=args.tols,
                       n=args.n, n_ref=args.n_ref, seed=args.seed, solver_options=options,
                       float64=args.float64, reference_tol=args.reference_tol,
                       timing_repeats=args.timing_repeats)


def run(args: argparse.Namespace) -> int:
    from ..bench import report
    from ..bench.problems import PROBLEMS, BenchError, resolve_problem
    from ..bench.runner import CacheBusyError, ConfigError, run_sweep
    from ..sde import get_sde

    try:
        builtin = args.problem in PROBLEMS
        apply_threads(args.threads, 1 if builtin else None)
        if not builtin and (args.sde is not None or args.dim is not None):
            raise UsageError(f"--sde/--dim configure the built-in problems {sorted(PROBLEMS)} "
                             f"only, not --problem {args.problem!r}")
        report.check_metrics(args.metrics)
        report.check_formats(args.formats)
        config = _config(args)  # fails on names before building the problem
        sde = get_sde(args.sde) if args.sde is not None else None
        problem = resolve_problem(args.problem, sde=sde, dim=args.dim, seed=args.seed)
        out = args.out or default_out_dir(DEFAULT_OUT / problem.name)
        cache = args.cache_dir or out / "cache"
        results = run_sweep(problem, config, cache, resume=not args.fresh,
                            progress=not args.quiet, timeout=args.shard_timeout)
    except ConfigError as e:   # the library names its settings; here they are flags
        raise UsageError(FLAGS.get(e.field, e.field) + e.detail) from e
    except CacheBusyError as e:
        raise UsageError(f"{e} (--out or --cache-dir)") from e
    except (BenchError, ValueError, TypeError) as e:   # reported once, by main
        raise UsageError(str(e)) from e
    except KeyboardInterrupt:
        print("\nsdekit bench: interrupted; finished cells are cached, rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    if results is None:  # a non-zero rank of a sharded run: rank 0 reports
        return 0
    results["command"] = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) \
        if sys.argv else None  # what this process was started with
    written = report.write_reports(results, out, args.formats, args.plot)
    print(report.terminal_report(results, args.metrics))
    print("\nwrote " + ", ".join(written))
    return 0
