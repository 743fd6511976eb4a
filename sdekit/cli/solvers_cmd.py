"""``sdekit solvers``: list the solver registry."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ._args import add_command


def _order(d: dict[str, Any]) -> str:
    o = "-" if d.get("order") is None else str(d["order"])
    if d.get("strong_order") is not None:
        o += f" (strong {d['strong_order']:g})"
    return o


def batch_invariance(d: dict[str, Any]) -> str:
    """The registry's ``batch_invariant`` in words: does a sample depend on its batch?"""
    labels: dict[Any, str] = {True: "yes", "tolerance": "to tol.", False: "no"}
    return labels.get(d.get("batch_invariant"), "?")


def starts_at_t1(d: dict[str, Any]) -> str:
    """The registry's ``starts_at_alpha_zero`` in words: can it start where alpha = 0 (t = 1 of
    flow matching)?"""
    labels: dict[Any, str] = {True: "yes", False: "no"}
    return labels.get(d.get("starts_at_alpha_zero"), "?")


def solver_rows() -> list[list[str]]:
    from ..solvers.registry import list_solvers

    rows = []
    for d in list_solvers():
        nfe = "adaptive" if d.get("adaptive") else str(d.get("nfe_per_step", "?"))
        rows.append([d["name"], str(d.get("family", "?")), _order(d), nfe,
                     str(d.get("kind", "?")), str(d.get("grid_rule", d.get("default_grid", "?"))),
                     batch_invariance(d), starts_at_t1(d), str(d.get("paper", ""))])
    return rows


HEADER = ["name", "family", "order", "NFE/step", "ODE/SDE", "grid", "batch inv.", "alpha=0",
          "paper"]


def run(args: argparse.Namespace) -> int:
    from ..solvers.registry import list_solvers

    if args.json:
        print(json.dumps(list_solvers(), indent=1))
        return 0
    rows = solver_rows()
    if args.markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for r in rows:
            print("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
        return 0
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER[:-1])]
    for r in [HEADER] + rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r[:-1])) + "  " + r[-1])
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "solvers", help="list the registered solvers",
                    description="List the solver registry: name, family, order (strong "
                                "order for SDE solvers), NFE per step, ODE or SDE, the "
                                "default time grid (its rule per forward SDE), batch "
                                "invariance (yes: a sample never "
                                "depends on its batch; to tol.: only to within the solver's "
                                "tolerance), whether it starts where alpha = 0 (alpha=0: t = 1 "
                                "of flow matching, an exact prior) and the paper.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="the registry metadata as JSON")
    g.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.set_defaults(func=run)
    return p
