"""The ``sdekit`` command line. Only this package and the registry turn strings into objects.

Errors: a mistake on the command line ends in one line ``sdekit <command>: error: ...`` and exit
status 2 before any work starts. Parse errors come from argparse (:class:`._args.Parser`); later
checks raise :class:`._args.UsageError`. :func:`main` also reports sdekit's own input-error types
(a bad checkpoint, a bad bench problem) as one line, and a model that returned NaN/Inf
(:class:`~sdekit.solvers.base.ModelOutputError`) as one line with status 1. Any other exception
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ._args import Parser, UsageError, add_command


def _cmd_sdes(args: argparse.Namespace) -> int:
    from ..sde import SDES

    for name, cls in SDES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:8s} {cls.__name__:14s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sdekit", description="Diffusion sampling as ODE/SDE solving.")
    p.add_argument("--version", action="version", version=f"sdekit {__version__}")
    sub = p.add_subparsers(dest="command")
    s = add_command(sub, "sdes", help="list the forward SDEs")
    s.set_defaults(func=_cmd_sdes)
    from . import (
        bench,
        distill_cmd,
        likelihood_cmd,
        sample_cmd,
        solvers_cmd,
        train,
        tune_cmd,
    )
    for command in (bench, solvers_cmd, train, sample_cmd, distill_cmd, likelihood_cmd,
                    tune_cmd):
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ..bench.problems import BenchError
    from ..solvers.base import ModelOutputError
    from ..training.checkpoint import CheckpointError
    from ..training.trainer import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = f"sdekit {args.command}"
    try:
        return int(args.func(args) or 0)
    except (UsageError, CheckpointError, BenchError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (ModelOutputError, TrainingDiverged) as e:   # the run failed, not the input
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # the reader went away (`sdekit solvers | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no error at exit
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
