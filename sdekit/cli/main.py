"""The ``sdekit`` command line. Only this package and the registry turn strings into objects."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..sde import SDES


def _cmd_sdes(args: argparse.Namespace) -> int:
    for name, cls in SDES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:8s} {cls.__name__:14s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdekit", description="Diffusion sampling as ODE/SDE solving.")
    p.add_argument("--version", action="version", version=f"sdekit {__version__}")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("sdes", help="list the forward SDEs")
    s.set_defaults(func=_cmd_sdes)
    from .bench import add_parser as add_bench; add_bench(sub)  # noqa: E702
    from .solvers_cmd import add_parser as add_solvers; add_solvers(sub)  # noqa: E702
    from .train import add_parser as add_train; add_train(sub)  # noqa: E702
    from .sample_cmd import add_parser as add_sample; add_sample(sub)  # noqa: E702
    from .distill_cmd import add_parser as add_distill; add_distill(sub)  # noqa: E702
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
