"""Shared argument handling of the ``sdekit`` subcommands: validating argument types, the help
formatter that shows every default, the thread setting, and :class:`UsageError`.

Every check here runs while the command line is parsed or before a command starts its work, so
a mistake ends in one line ``sdekit <command>: error: ...`` and exit status 2, with nothing
written.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SEED_LIMIT = 2 ** 63   # seeds are 63-bit (torch.Generator.manual_seed and sdekit.noise)
THREADS_HELP = "1 on a machine with 1 or 2 cores, torch's own default on larger ones"


class UsageError(Exception):
    """A mistake on the command line, found after parsing (it needs the registry, a checkpoint
    or another argument). :func:`sdekit.cli.main.main` prints it as one line and returns 2.

    Deliberately not a ``ValueError``: the CLI's top-level handler catches this type (and
    sdekit's own input-error types), never a bare ``ValueError``/``TypeError`` from the middle
    of a run, which is a bug and keeps its traceback."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``<prog>: error: <message>`` (exit 2)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option's help unless the help already states its
    default (options whose default is None say what None means in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if ("default" in h or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return h
        return h + " (default: %(default)s)"


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` keeping the description's and epilog's line breaks."""


def add_command(subparsers: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand parser (with :class:`HelpFormatter` unless ``formatter_class`` is given)."""
    kw.setdefault("formatter_class", HelpFormatter)
    return subparsers.add_parser(name, **kw)


def alias(parser: argparse.ArgumentParser | Any, old: str, dest: str, **kw: Any) -> None:
    """A hidden old spelling ``old`` of an option stored in ``dest`` (old commands still work;
    ``--help`` shows only the new spelling)."""
    parser.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


# ------------------------------------------------------------------ argument types
def _integer(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is invalid: expected an integer") from None


def _number(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is invalid: expected a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is invalid: expected a finite number")
    return v


def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer ``lo <= v`` (``< hi`` when given)."""
    def parse(s: str) -> int:
        v = _integer(s)
        if v < lo or (hi is not None and v >= hi):
            want = f">= {lo}" if hi is None else f"in {lo}..{hi - 1}"
            raise argparse.ArgumentTypeError(f"{v} is invalid: expected an integer {want}")
        return v
    parse.__name__ = f"int>={lo}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
seed_int = int_at_least(0, SEED_LIMIT)


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False,
             hi_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from ``lo`` to ``hi``."""
    def parse(s: str) -> float:
        v = _number(s)
        if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            if hi == math.inf:
                want = f"> {lo:g}" if lo_open else f">= {lo:g}"
            else:
                want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{v:g} is invalid: expected a number {want}")
        return v
    parse.__name__ = "number"
    return parse


positive_float = float_in(0.0, lo_open=True)
nonneg_float = float_in(0.0)
fraction = float_in(0.0, 1.0)                     # [0, 1)


def existing_file(s: str) -> Path:
    """An argparse type: a path to an existing regular file."""
    p = Path(s)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{s!r} does not exist")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{s!r} is not a file")
    return p


def check_out_dir(p: Path) -> Path:
    """``p`` can be (or already is) a directory: neither it nor a parent is an existing
    non-directory. Raises ``argparse.ArgumentTypeError``."""
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "is" if q == p else f"is inside {str(q)!r}, which is"
                raise argparse.ArgumentTypeError(
                    f"{str(p)!r} {what} an existing file: expected a directory (new or "
                    "existing)")
            break
    return p


def out_dir(s: str) -> Path:
    """An argparse type: an output directory (new or existing, not a file)."""
    return check_out_dir(Path(s))


def default_out_dir(default: Path, flag: str = "--out") -> Path:
    """The default output directory ``default`` of an unset ``flag``, checked as :func:`out_dir`
    checks a given one (a :class:`UsageError` if it is a file)."""
    try:
        return check_out_dir(default)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"the default {flag} {e}; pass another {flag}") from None


def out_prefix(s: str) -> Path:
    """An argparse type: an output prefix ``DIR/NAME`` (files ``DIR/NAME.<ext>``): ``DIR`` must
    be a directory (new or existing) and the prefix itself not an existing directory."""
    p = Path(s)
    if p.is_dir():
        raise argparse.ArgumentTypeError(
            f"{s!r} is an existing directory: expected a file prefix, e.g. {str(p / 'samples')!r}")
    check_out_dir(p.parent)
    return p


# ------------------------------------------------------------------ after parsing
@contextlib.contextmanager
def user_input(flag: str = "") -> Iterator[None]:
    """Within the block, a ``ValueError``/``TypeError`` is sdekit rejecting the user's input (the
    block only builds objects from arguments, before any work): re-raise it as a
    :class:`UsageError`, prefixed with ``flag`` when given."""
    try:
        yield
    except (ValueError, TypeError) as e:
        msg = e.args[0] if len(e.args) == 1 else str(e)
        raise UsageError(f"{flag}: {msg}" if flag else str(msg)) from None


def add_threads(parser: Any, default_help: str = THREADS_HELP) -> None:
    parser.add_argument("--threads", type=positive_int, default=None,
                        help=f"torch CPU threads (default: {default_help})")


def default_threads() -> int | None:
    """The default torch CPU thread count of the sdekit commands: 1 on a machine with at most
    2 cores, where a second thread made training 2-4x slower for digits and 20-65x for a 2-D
    toy in a measurement on a shared, loaded 2-core machine (150 digits steps: 19-21 s with 1
    thread, 42-94 s with 2; 300 two_moons steps: 4 s against 86-285 s); None (torch's own
    default) on larger machines, where nothing was measured."""
    return 1 if (os.cpu_count() or 1) <= 2 else None


def apply_threads(threads: int | None, default: int | None = None) -> None:
    """Set torch's CPU threads to ``threads``, else ``default``, else :func:`default_threads`
    (when that is None, torch's setting is left alone)."""
    n = threads or default or default_threads()
    if n is not None:
        import torch
        torch.set_num_threads(n)
