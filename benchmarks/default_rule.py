"""The option-free default against the best fixed configuration (issue 16, section 4).

On sdekit bench's analytic problems (16-dim Gaussian and 8-mode Gaussian mixture with exact
models) under VP, DDPM-discrete (linear), the DDPM squared-cosine table, VE, EDM and flow matching,
at NFE 5, 10 and 20:

- **best fixed**: :func:`sdekit.tune.search` over a few fast ODE solvers (with their option sets)
  on every named grid, plus UniPC-bh2 of order 3 on every named grid, chosen on 256 calibration
  states (seed 0); its RMS on 512 held-out states (seed 1) is the number reported;
- **current**: the option-free call ``sdekit.sample(sde, model, x, steps=N)``, held-out RMS;
- **rules**: candidate default rules, each a small pure function of ``(sde, N)`` (only the
  process's properties: whether alpha reaches 0, its lambda range), held-out RMS.

Ratios are rule / best fixed (held-out). A rule is chosen here on these problems (in-sample), so
the script also re-measures current and rules on a second draw of every problem (data seed 1,
calibration/held-out seeds 2/3): the out-of-sample check.

    OMP_NUM_THREADS=1 python benchmarks/default_rule.py          # writes results/default_rule.*
    OMP_NUM_THREADS=1 python benchmarks/default_rule.py --quick  # two problems, a smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdekit
from sdekit._io import content_hash
from sdekit.bench.problems import gaussian_problem, gmm_problem
from sdekit.grids import make_grid
from sdekit.tune import NAMED_GRIDS, CachedReference, prior_states, search

SDES: dict[str, Callable[[], Any]] = {
    "vp": lambda: sdekit.VPSDE(), "ddpm": lambda: sdekit.DiscreteDDPM(),
    "cosine": lambda: sdekit.DiscreteDDPM.squaredcos(), "ve": lambda: sdekit.VESDE(),
    "edm": lambda: sdekit.EDMSDE(), "flow": lambda: sdekit.FlowSDE()}
KINDS = ("gaussian", "gmm")
NFES = (5, 10, 20)
DIM = 16
N_CAL, N_HELDOUT = 256, 512
SEARCH_SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc_bh2")
EXTRA = [("unipc_bh2", {"order": 3}), ("unipc_bh2", {}),   # searched too, on every named grid
         ("unipc_bh2", {"order": 3, "lower_order_final": False}),
         ("unipc_bh2", {"order": 3, "lower_order_final": True})]
DTYPE = torch.float32
WITHIN = 1.25

Config = tuple[str, dict[str, Any], str, dict[str, Any]]   # solver, options, grid, grid options


#: what 'current' measured in the committed results (the run before default_config existed)
CURRENT_BEFORE = ("the previous default: unipc_bh2 (order 2) on logsnr, lower_order_final on "
                  "below 10 steps (sdekit before default_config)")


def alpha_reaches_zero(sde: Any) -> bool:
    return float(sde.alpha(sde.T)) == 0.0


#: candidate rules: (sde, N) -> config. Only the process's properties enter.
RULES: dict[str, Callable[[Any, int], Config]] = {
    "unipc3 logsnr": lambda sde, n: ("unipc_bh2", {"order": 3}, "logsnr", {}),
    "unipc2 quadratic": lambda sde, n: ("unipc_bh2", {}, "quadratic", {}),
    "unipc3 quadratic": lambda sde, n: ("unipc_bh2", {"order": 3}, "quadratic", {}),
    "unipc2 polyexp2": lambda sde, n: ("unipc_bh2", {}, "polyexponential", {"rho": 2.0}),
    "unipc3 polyexp2": lambda sde, n: ("unipc_bh2", {"order": 3}, "polyexponential",
                                       {"rho": 2.0}),
    "unipc2 karras": lambda sde, n: ("unipc_bh2", {}, "karras", {}),
    "unipc2 kl_optimal": lambda sde, n: ("unipc_bh2", {}, "kl_optimal", {}),
    "unipc3 kl_optimal": lambda sde, n: ("unipc_bh2", {"order": 3}, "kl_optimal", {}),
    "unipc2 logsnr lof=False": lambda sde, n: ("unipc_bh2", {"lower_order_final": False},
                                               "logsnr", {}),
    "unipc3 logsnr lof=False": lambda sde, n: ("unipc_bh2", {"order": 3,
                                                             "lower_order_final": False},
                                               "logsnr", {}),
    "unipc3 logsnr lof=True": lambda sde, n: ("unipc_bh2", {"order": 3,
                                                            "lower_order_final": True},
                                              "logsnr", {}),
    "dpmpp_3m quadratic": lambda sde, n: ("dpmpp_3m", {}, "quadratic", {}),
    "dpmpp_2m polyexp2": lambda sde, n: ("dpmpp_2m", {}, "polyexponential", {"rho": 2.0}),
}


FLOOR = {"lambda_floor": -2.5}
RULES["unipc3 logsnr floor"] = lambda sde, n: ("unipc_bh2", {"order": 3}, "logsnr", FLOOR)
RULES["unipc2 logsnr floor lof=False"] = lambda sde, n: ("unipc_bh2", {
    "lower_order_final": False}, "logsnr", FLOOR)


def previous_rule(sde: Any, n: int) -> Config:
    """default_config before the floor: unipc_bh2 on plain logsnr, order 3 where its lambda
    step (lambda range / n) is at most 1.2, else order 2 without the lower-order final step."""
    lam = sde.lambda_(make_grid(sde, "logsnr", n)).double()
    d = lam[torch.isfinite(lam)].diff()
    h = float(d.median()) if d.numel() else math.inf
    return ("unipc_bh2", {"order": 3} if h <= 1.2 else {"lower_order_final": False}, "logsnr",
            {})


RULES["previous default (plain logsnr)"] = previous_rule


def _split(rule: Callable[[Any, int], Config], low: Callable[[Any, int], Config],
           n_max: int) -> Callable[[Any, int], Config]:
    return lambda sde, n: low(sde, n) if n <= n_max else rule(sde, n)


# rules that switch at N <= 5 / by process kind (flow: alpha reaches 0 at T)
RULES["unipc2 quadratic (N<=5), unipc3 logsnr"] = _split(
    RULES["unipc3 logsnr"], RULES["unipc2 quadratic"], 5)
RULES["unipc2 quadratic (N<=5), unipc3 polyexp2"] = _split(
    RULES["unipc3 polyexp2"], RULES["unipc2 quadratic"], 5)
RULES["unipc2 quadratic (N<=5), unipc3 kl_optimal"] = _split(
    RULES["unipc3 kl_optimal"], RULES["unipc2 quadratic"], 5)
RULES["unipc2 logsnr lof=False (N<=5), unipc3 logsnr lof=False"] = _split(
    RULES["unipc3 logsnr lof=False"], RULES["unipc2 logsnr lof=False"], 5)
RULES["unipc2 quadratic (N<=5), unipc2 polyexp2"] = _split(
    RULES["unipc2 polyexp2"], RULES["unipc2 quadratic"], 5)


def proposed(sde: Any, n: int) -> Config:
    """The rule sdekit now uses (:func:`sdekit.solvers.default_config`), as its table label:
    options written out as the search spells them (corrector on; lower_order_final off, which is
    what order 3 on logsnr gets automatically where the rule picks it)."""
    from sdekit.solvers import default_config
    c = default_config(sde, n)
    o = dict(c["options"])
    opts = ({"lower_order_final": False, "order": 3} if o.get("order") == 3 else
            {"corrector": True, "lower_order_final": False})
    return c["solver"], opts, c["grid"], c["grid_options"]


def proposed_config(sde: Any, n: int) -> Config:
    from sdekit.solvers import default_config
    c = default_config(sde, n)
    return c["solver"], dict(c["options"]), c["grid"], dict(c["grid_options"])


RULES["proposed (default_config)"] = proposed_config


def table_label(cfg: Config) -> str:
    """``label`` with the order-2 options as the search writes them (no ``order`` key)."""
    s, o, g, go = cfg
    o = {k: v for k, v in o.items() if not (k == "order" and v == 2)}
    return label((s, o, g, go))


def rescore(result: dict[str, Any]) -> None:
    """Where a row has no measured proposed rule (results of an older run), add it from the
    row's own table (held-out RMS of that exact configuration on the same states); recompute
    the summaries."""
    for rows in (result["rows"], result["check_rows"]):
        for x in rows:
            if "proposed (default_config)" in x["rules"]:
                continue
            lab = table_label(proposed(SDES[x["sde"]](), x["nfe"]))
            hit = [t for t in x["best"]["table"] if t["config"] == lab]
            if not hit:
                raise KeyError(f"{lab} is not in the table of {x['problem']}/{x['sde']}/{x['nfe']}")
            x["rules"]["proposed (default_config)"] = {
                "config": lab, "heldout_rms": hit[0]["heldout_rms"],
                "calibration_rms": hit[0]["calibration_rms"], "from_table": True}
    result["summary"] = summarize(result["rows"], result["rows"])
    result["check_summary"] = summarize(result["check_rows"], result["check_rows"])


def label(cfg: Config) -> str:
    s, o, g, go = cfg
    opts = ",".join(f"{k}={v}" for k, v in sorted(o.items()))
    gopts = ",".join(f"{k}={v}" for k, v in sorted(go.items()))
    return f"{s}({opts}) {g}" + (f"({gopts})" if gopts else "")


def rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    e = float((out.double() - ref.double()).pow(2).mean().sqrt())
    return e if math.isfinite(e) else math.inf


class Cell:
    """One problem's batches, references and a cache of configuration errors."""

    def __init__(self, kind: str, sde_name: str, data_seed: int, seeds: tuple[int, int]):
        self.sde = SDES[sde_name]()
        builder = gaussian_problem if kind == "gaussian" else gmm_problem
        self.problem = builder(sde=self.sde, dim=DIM, seed=data_seed)
        self.model = self.problem.model
        self.x_cal = prior_states(self.sde, N_CAL, (DIM,), seed=seeds[0], dtype=DTYPE)
        self.x_ho = prior_states(self.sde, N_HELDOUT, (DIM,), seed=seeds[1], dtype=DTYPE)
        t0 = time.perf_counter()
        if self.problem.flow is not None:
            refs = {content_hash(x): self.problem.flow(x.double()).double()
                    for x in (self.x_cal, self.x_ho)}
            self.ref_method = "exact PF-ODE flow map"
        else:
            refs = {content_hash(x): sdekit.sample(self.sde, self.model, x.double(),
                                                   solver="dopri5", rtol=1e-8, atol=1e-8,
                                                   float64=True).x.double()
                    for x in (self.x_cal, self.x_ho)}
            self.ref_method = "dopri5 rtol=atol=1e-8 (float64)"
        self.ref_wall_s = time.perf_counter() - t0
        self.reference = CachedReference(refs, self.ref_method)
        self.ref_cal, self.ref_ho = self.reference(self.x_cal), self.reference(self.x_ho)
        self.cache: dict[tuple[str, int], tuple[float, float]] = {}

    def error(self, cfg: Config, n: int) -> tuple[float, float]:
        """(calibration, held-out) RMS of ``cfg`` at ``n`` steps."""
        key = (label(cfg), n)
        if key not in self.cache:
            s, o, g, go = cfg
            try:
                times = make_grid(self.sde, g, n, **go)
                out = [rms(sdekit.sample(self.sde, self.model, x, solver=s, grid=times, **o).x,
                           ref) for x, ref in ((self.x_cal, self.ref_cal),
                                               (self.x_ho, self.ref_ho))]
            except ValueError:
                out = [math.inf, math.inf]
            self.cache[key] = (out[0], out[1])
        return self.cache[key]

    def current(self, n: int) -> float:
        """The option-free call itself."""
        return rms(sdekit.sample(self.sde, self.model, self.x_ho, steps=n).x, self.ref_ho)

    def best_fixed(self, nfe: int) -> dict[str, Any]:
        res = search(self.sde, self.model, nfe, solvers=SEARCH_SOLVERS, calibration=self.x_cal,
                     heldout=self.x_ho, dtype=DTYPE, reference=self.reference, progress=False)
        rows = [{"config": f"{r['solver']}("
                 f"{','.join(f'{k}={v}' for k, v in sorted(r['options'].items()))}) "
                 f"{r['grid']}" + (f"({','.join(f'{k}={v}' for k, v in r['grid_options'].items())})"
                                   if r["grid_options"] else ""),
                 "calibration_rms": r["calibration_rms"], "heldout_rms": r["heldout_rms"]}
                for r in res["table"]]
        for s, o in EXTRA:   # 1 NFE per step
            for g, go in NAMED_GRIDS:
                c, h = self.error((s, o, g, dict(go)), nfe)
                if math.isfinite(c):
                    rows.append({"config": label((s, o, g, dict(go))), "calibration_rms": c,
                                 "heldout_rms": h})
        rows.sort(key=lambda r: r["calibration_rms"])
        return {"winner": rows[0], "best_heldout": min(r["heldout_rms"] for r in rows),
                "candidates": len(rows), "top5": rows[:5], "table": rows}


def measure(kind: str, sde_name: str, data_seed: int, seeds: tuple[int, int],
            with_best: bool) -> list[dict[str, Any]]:
    cell = Cell(kind, sde_name, data_seed, seeds)
    out = []
    for nfe in NFES:
        row: dict[str, Any] = {"problem": kind, "sde": sde_name, "nfe": nfe,
                               "data_seed": data_seed, "reference": cell.ref_method,
                               "current": cell.current(nfe), "rules": {}}
        for name, rule in RULES.items():
            cfg = rule(cell.sde, nfe)
            row["rules"][name] = {"config": label(cfg), "heldout_rms": cell.error(cfg, nfe)[1],
                                  "calibration_rms": cell.error(cfg, nfe)[0]}
        if with_best:
            row["best"] = cell.best_fixed(nfe)
        out.append(row)
    return out


def summarize(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rule: ratios to the best fixed (of ``base_rows``, matched by problem, SDE, NFE)."""
    best = {(r["problem"], r["sde"], r["nfe"]): r["best"]["winner"]["heldout_rms"]
            for r in base_rows}
    names = ["current"] + list(rows[0]["rules"])
    summ = {}
    for name in names:
        ratios = []
        for r in rows:
            v = r["current"] if name == "current" else r["rules"][name]["heldout_rms"]
            ratios.append(v / best[(r["problem"], r["sde"], r["nfe"])])
        fin = [x for x in ratios if math.isfinite(x)]
        summ[name] = {"within": sum(x <= WITHIN for x in ratios), "cells": len(ratios),
                      "geo_mean": math.exp(sum(map(math.log, fin)) / len(fin)) if fin else None,
                      "max": max(ratios)}
    return summ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="gaussian and gmm under vp only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--sdes", nargs="*", default=None,
                    help="only these processes (a shard); merge the shards with --merge")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="shard JSONs (from --sdes runs): combine into results/default_rule.*")
    ap.add_argument("--rescore", type=Path, default=None,
                    help="a results JSON: add the proposed rule from its tables, rewrite the md")
    ap.add_argument("--remeasure", nargs="*", default=None, metavar="SDE",
                    help="re-measure the option-free call ('current') and the proposed rule on "
                         "these processes' problems (both draws, the same states) in "
                         "results/default_rule.json, keeping its best fixed configurations (no "
                         "search: about a minute per process); rewrite results/default_rule.*")
    ap.add_argument("--minimax", action="store_true",
                    help="from results/default_rule.json (no solves): per process and N, the "
                         "one configuration of the stored search tables whose worse ratio over "
                         "the Gaussian and the mixture is least; writes "
                         "results/default_rule_minimax.md")
    ap.add_argument("--flow-scan", action="store_true",
                    help="candidate flow-matching rules on the 16-dim problems (both draws) and "
                         "benchmarks/peers/run.py --sde flow's problems (seeds 0, 1), against "
                         "the stored best; writes results/default_rule_flow_scan.md")
    args = ap.parse_args(argv)
    if args.flow_scan:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        table = flow_scan(args.out)
        (args.out / "default_rule_flow_scan.md").write_text(
            "`OMP_NUM_THREADS=1 python benchmarks/default_rule.py --flow-scan` "
            f"({time.perf_counter() - t0:.0f} s). Ratio of each rule's RMS to the best stored "
            "for the cell (docs/defaults.md, flow matching).\n\n" + table)
        print(table)
        return 0
    if args.minimax:
        table = minimax(json.loads((args.out / "default_rule.json").read_text()))
        (args.out / "default_rule_minimax.md").write_text(table)
        print(table)
        return 0
    if args.remeasure is not None:
        remeasure(args.out / "default_rule.json", args.remeasure)
        return 0
    if args.rescore is not None:
        result = json.loads(args.rescore.read_text())
        if any(x["rules"]["proposed (default_config)"].get("from_table")
               for x in result["rows"] if "proposed (default_config)" in x["rules"]):
            result.setdefault("current_is", CURRENT_BEFORE)   # a run before the rule existed
        rescore(result)
        args.rescore.write_text(json.dumps(result, separators=(",", ":")) + "\n")
        args.rescore.with_suffix(".md").write_text(markdown(result))
        return 0
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        result = dict(parts[0])
        order = {k: i for i, k in enumerate(SDES)}
        for key in ("rows", "check_rows"):
            result[key] = sorted((x for part in parts for x in part[key]),
                                 key=lambda x: (order[x["sde"]], x["problem"] != "gaussian",
                                                x["nfe"]))
        result["command"] = "OMP_NUM_THREADS=1 python benchmarks/default_rule.py"
        result["total_wall_s"] = sum(part["total_wall_s"] for part in parts)
        result["shards"] = [part["command"] for part in parts]
        rescore(result)
        write(result, args.out, "default_rule")
        return 0
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    sdes = ["vp"] if args.quick else (args.sdes or list(SDES))
    rows, check = [], []
    for sde_name in sdes:
        for kind in KINDS:
            t0 = time.perf_counter()
            rows += measure(kind, sde_name, 0, (0, 1), with_best=True)
            check += measure(kind, sde_name, 1, (2, 3), with_best=True)
            for r in rows[-3:]:
                print(f"{kind:8s} {sde_name:6s} NFE {r['nfe']:2d}: best "
                      f"{r['best']['winner']['config']} {r['best']['winner']['heldout_rms']:.3e}"
                      f"  current {r['current']:.3e}", flush=True)
            print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    result = {"description": __doc__.strip().splitlines()[0],
              "command": "OMP_NUM_THREADS=1 python benchmarks/default_rule.py"
                         + (" --quick" if args.quick else "")
                         + (" --sdes " + " ".join(args.sdes) if args.sdes else ""),
              "dim": DIM, "n_calibration": N_CAL, "n_heldout": N_HELDOUT,
              "search_solvers": SEARCH_SOLVERS, "extra": EXTRA,
              "grids": [label(("", {}, g, dict(go))).split(" ", 1)[1] for g, go in NAMED_GRIDS],
              "within": WITHIN,
              "rows": rows, "check_rows": check, "summary": summarize(rows, rows),
              "check_summary": summarize(check, check),
              "total_wall_s": time.perf_counter() - t_all,
              "environment": {"sdekit": sdekit.__version__, "torch": torch.__version__,
                              "python": platform.python_version(), "threads": 1,
                              "dtype": str(DTYPE).replace("torch.", "")}}
    rescore(result)
    write(result, args.out, "default_rule" + ("_quick" if args.quick else "")
          + ("_" + "_".join(args.sdes) if args.sdes else ""))
    for k, v in result["summary"].items():
        c = result["check_summary"][k]
        print(f"{k:45s} within {v['within']:2d}/{v['cells']} geo {v['geo_mean']:.2f} max "
              f"{v['max']:.2f} | check within {c['within']:2d}/{c['cells']} geo "
              f"{c['geo_mean']:.2f} max {c['max']:.2f}")
    print(f"{result['total_wall_s']:.0f} s")
    return 0


def remeasure(path: Path, sdes: list[str]) -> None:
    """``--remeasure``: 'current' and 'proposed (default_config)' measured anew on the rows of
    ``sdes`` (same problems and states as :func:`measure`), the stored best fixed kept."""
    result = json.loads(path.read_text())
    t0 = time.perf_counter()
    for key, data_seed, seeds in (("rows", 0, (0, 1)), ("check_rows", 1, (2, 3))):
        for kind in KINDS:
            for sde_name in sdes:
                cell = Cell(kind, sde_name, data_seed, seeds)
                for x in result[key]:
                    if (x["problem"], x["sde"]) != (kind, sde_name):
                        continue
                    cfg = proposed_config(cell.sde, x["nfe"])
                    c, h = cell.error(cfg, x["nfe"])
                    x["current"] = cell.current(x["nfe"])
                    x["rules"]["proposed (default_config)"] = {
                        "config": label(cfg), "heldout_rms": h, "calibration_rms": c}
    result["summary"] = summarize(result["rows"], result["rows"])
    result["check_summary"] = summarize(result["check_rows"], result["check_rows"])
    result["remeasured"] = {"sdes": sdes, "wall_s": time.perf_counter() - t0,
                            "command": "OMP_NUM_THREADS=1 python benchmarks/default_rule.py "
                                       "--remeasure " + " ".join(sdes)}
    write(result, path.parent, path.stem)


def minimax(result: dict[str, Any]) -> str:
    """``--minimax``: can any rule of ``(sde, N)`` alone be within WITHIN of the best fixed on
    both problems of a cell? Per draw, process and N, over the configurations of both problems'
    search tables (every one measured on its held-out states): the one whose larger ratio to its
    problem's best fixed (the calibration winner, held-out RMS) is least. Where even that one is
    over WITHIN, no rule that sees only the process and N meets the target there, among the
    configurations searched."""
    lines = [f"# Is any (process, N) rule within {WITHIN}x on both problems?", "",
             "`python benchmarks/default_rule.py --minimax` (no solves: from the search tables of "
             f"`{result['command']}`, results/default_rule.json). Per cell, over the "
             f"{result['rows'][0]['best']['candidates']} configurations measured on both the "
             "Gaussian and the mixture (each RMS on its held-out states, over its problem's best "
             "fixed: the calibration winner): the configuration whose larger ratio is least. "
             "'default': the option-free call as measured in the same file (`rules`, "
             "proposed).", "",
             "| draw | process | NFE | default: Gaussian / mixture | minimax configuration | "
             "its Gaussian / mixture | any within? |", "|---|---|---:|---|---|---|---|"]
    for key, draw in (("rows", "first"), ("check_rows", "second")):
        cells: dict[tuple[str, int], dict[str, Any]] = {}
        for x in result[key]:
            cells.setdefault((x["sde"], x["nfe"]), {})[x["problem"]] = x
        for (sde_name, nfe), pr in cells.items():
            best = {k: x["best"]["winner"]["heldout_rms"] for k, x in pr.items()}
            tabs = {k: {t["config"]: t["heldout_rms"] / best[k] for t in x["best"]["table"]}
                    for k, x in pr.items()}
            common = set.intersection(*(set(t) for t in tabs.values()))
            worst = {c: max(t[c] for t in tabs.values()) for c in common}
            c = min(worst, key=lambda k: (worst[k], k))
            dflt = " / ".join(
                f"{pr[k]['rules']['proposed (default_config)']['heldout_rms'] / best[k]:.2f}"
                for k in KINDS)
            lines.append(f"| {draw} | {sde_name} | {nfe} | {dflt} | `{c}` | "
                         f"{' / '.join(f'{tabs[k][c]:.2f}' for k in KINDS)} | "
                         f"{'yes' if worst[c] <= WITHIN else '**no**'} |")
    return "\n".join(lines) + "\n"


#: --flow-scan: candidate rules on flow matching, as (name, N -> config); the default first
FLOW_SCAN: list[tuple[str, Callable[[int], Config]]] = [
    ("default_config", lambda n: proposed_config(SDES["flow"](), n)),
    ("previous: unipc_bh2 floor (order 2 lof=False at h > 1.2, else 3)",
     lambda n: previous_floor(n)),
    ("unipc_bh2 karras", lambda n: ("unipc_bh2", {}, "karras", {})),
    ("unipc_bh2 quadratic order 3", lambda n: ("unipc_bh2", {"order": 3}, "quadratic", {})),
    ("unipc_bh2 uniform order 3", lambda n: ("unipc_bh2", {"order": 3}, "uniform", {})),
    ("unipc_bh2 logsnr order 3", lambda n: ("unipc_bh2", {"order": 3}, "logsnr", {}))] + [
    (f"unipc_bh2 order 3 floor {f}", lambda n, f=f: ("unipc_bh2", {"order": 3}, "logsnr",
                                                     {"lambda_floor": f}))
    for f in (-3.5, -3.0, -2.0, -1.5)] + [
    ("unipc_bh1 order 3 lof=True floor -2.5",
     lambda n: ("unipc_bh1", {"order": 3, "lower_order_final": True}, "logsnr", FLOOR))]


def previous_floor(n: int) -> Config:
    """default_config before the flow rule (the floored logsnr rule on every process)."""
    lam = SDES["flow"]().lambda_(make_grid(SDES["flow"](), "logsnr", n, **FLOOR)).double()
    h = float(lam[torch.isfinite(lam)].diff().median())
    return ("unipc_bh2", {"order": 3} if h <= 1.2 else
            {"order": 2, "lower_order_final": False}, "logsnr", dict(FLOOR))


#: --flow-scan: the step counts of its second table (rule / default_config, no best known)
FLOW_SCAN_NEIGHBOURS = (3, 4, 6, 8, 9, 12, 14, 16, 25, 30)


def flow_scan(results: Path) -> str:
    """``--flow-scan``: every :data:`FLOW_SCAN` rule on eight flow cells: this script's 16-dim
    Gaussian and mixture on both draws (ratio to the stored best fixed of
    results/default_rule.json) and benchmarks/peers/run.py --sde flow's 64-dim Gaussian and
    16-dim mixture, seeds 0 and 1 (ratio to the best sdekit RMS stored in
    benchmarks/peers/flow_results*.json, the same states and references), at NFE 5, 10, 20;
    then, at :data:`FLOW_SCAN_NEIGHBOURS` steps, each rule's RMS over default_config's.
    Markdown tables."""
    spec = importlib.util.spec_from_file_location("peers_run", ROOT / "benchmarks/peers/run.py")
    peers = importlib.util.module_from_spec(spec)   # type: ignore[arg-type]
    spec.loader.exec_module(peers)   # type: ignore[union-attr]
    stored = json.loads((results / "default_rule.json").read_text())
    # (name, held-out RMS of (config, n), best RMS at n in NFES)
    cells: list[tuple[str, Callable[[Config, int], float], dict[int, float]]] = []
    for kind in KINDS:
        for d, (key, ds, seeds) in enumerate((("rows", 0, (0, 1)), ("check_rows", 1, (2, 3)))):
            c = Cell(kind, "flow", ds, seeds)
            best = {x["nfe"]: x["best"]["winner"]["heldout_rms"] for x in stored[key]
                    if (x["sde"], x["problem"]) == ("flow", kind)}
            cells.append((f"{kind} draw {d}", lambda cfg, n, c=c: c.error(cfg, n)[1], best))
    for kind in KINDS:
        for seed in (0, 1):
            prob = peers.FlowProblem(kind, seed=seed)
            f = ROOT / "benchmarks/peers" / ("flow_results.json" if seed == 0 else
                                            f"flow_results_seed{seed}.json")
            recs = json.loads(f.read_text())["problems"][kind]["records"]
            pbest = {n: min(r["rms"] for r in recs if r["library"] == "sdekit"
                            and r["budget"] == n and "rms" in r) for n in NFES}
            rows = 1 if prob.linear else prob.x1.shape[0]   # as peers' flow_evaluate

            def err(cfg: Config, n: int, prob: Any = prob, rows: int = rows) -> float:
                s, o, g, go = cfg
                out = sdekit.sample(peers.FLOW, prob.model, prob.x1.clone(), solver=s,
                                    grid=make_grid(peers.FLOW, g, n, **go), **o).x.double()
                e = float((out - prob.at(peers.FLOW.t_min)).pow(2).sum()) / (rows * prob.dim)
                return math.sqrt(e)
            cells.append((f"peers {kind} seed {seed}", err, pbest))
    head = " | ".join(n for n, _, _ in cells)
    lines = ["Ratio to the cell's best:", "", f"| rule | NFE | {head} | max |",
             "|---|---:|" + "---:|" * (len(cells) + 1)]
    for name, rule in FLOW_SCAN:
        for n in NFES:
            v = [f(rule(n), n) / best[n] for _, f, best in cells]
            lines.append(f"| {name} | {n} | " + " | ".join(f"{x:.2f}" for x in v)
                         + f" | {max(v):.2f} |")
    lines += ["", "At other step counts, RMS over default_config's (no best known):", "",
              f"| rule | N | {head} |", "|---|---:|" + "---:|" * len(cells)]
    for name, rule in FLOW_SCAN[1:]:
        for n in FLOW_SCAN_NEIGHBOURS:
            base = FLOW_SCAN[0][1](n)
            v = [f(rule(n), n) / f(base, n) for _, f, _ in cells]
            lines.append(f"| {name} | {n} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    (out / f"{name}.md").write_text(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = ["# The option-free default vs the best fixed configuration", "",
             (f"`{r['command']}` ("
              + (f"{len(r['shards'])} shards side by side, {r['total_wall_s']:.0f} s of wall time "
                 "in all" if r.get("shards") else f"{r['total_wall_s']:.0f} s on one thread")
              + f"). {r['dim']}-dim "
              "problems with exact models. Best fixed: `sdekit.tune.search` over "
              f"{', '.join(r['search_solvers'])} (all their searched option sets) and "
              "unipc_bh2 (default options and order=3) on the named grids " + ", ".join(r["grids"])
              + f" (polyexponential rho = 2), chosen on {r['n_calibration']} calibration "
              f"states; every RMS on {r['n_heldout']} held-out states against the exact flow map "
              "(Gaussian) or dopri5 at rtol = atol = 1e-8 (mixture). Cells are ratios "
              f"default / best fixed (held-out RMS); **bold** > {r['within']}x."), "",
             (f"'current' is {r.get('current_is', 'the option-free call of the sdekit that ran')}. "
             "'proposed (default_config)' is the rule sdekit.sample now uses (see "
             "sdekit.solvers.default_config), measured on the same states (in runs before it "
             "existed: the held-out RMS of that configuration in each cell's search table); it was "
             "designed after looking at data-seed-0 problems, the data-seed-1 rows are the check."
             " Other rules: `unipcK` = unipc_bh2 of order K, `lof` = lower_order_final "
             "(unset: automatic, `ExpIntegrator.lof`); `floor` = the logsnr grid with "
             "`lambda_floor=-2.5`."), "",
             *([f"'current' and 'proposed (default_config)' on {', '.join(r['remeasured']['sdes'])}"
                f" re-measured by `{r['remeasured']['command']}` "
                f"({r['remeasured']['wall_s']:.0f} s; the best fixed configurations kept).", ""]
               if r.get("remeasured") else []),
             "## Summary (cells within 1.25x / geo-mean ratio / max ratio)", "",
             "| rule | in-sample (data seed 0) | check (data seed 1, other states) |",
             "|---|---|---|"]
    for k, v in r["summary"].items():
        c = r["check_summary"][k]
        lines.append(f"| {k} | {v['within']}/{v['cells']} / {v['geo_mean']:.2f} / "
                     f"{v['max']:.2f} | {c['within']}/{c['cells']} / {c['geo_mean']:.2f} / "
                     f"{c['max']:.2f} |")
    names = ["current", "previous default (plain logsnr)", "proposed (default_config)",
             "unipc3 logsnr floor", "unipc3 logsnr"]
    for title, rows in (("In-sample problems (data seed 0)", r["rows"]),
                        ("Check problems (data seed 1)", r["check_rows"])):
        lines += ["", f"## {title}: ratio to best fixed", "",
                  "| problem | SDE | NFE | best fixed (chosen on calibration) | its RMS | "
                  + " | ".join(names) + " |",
                  "|---|---|---:|---|---:|" + "---:|" * len(names)]
        for x in rows:
            b = x["best"]["winner"]["heldout_rms"]
            vals = [x["current"]] + [x["rules"][n]["heldout_rms"] for n in names[1:]]
            cells = [(f"**{v / b:.2f}**" if v / b > r["within"] else f"{v / b:.2f}")
                     for v in vals]
            lines.append(f"| {x['problem']} | {x['sde']} | {x['nfe']} | "
                         f"{x['best']['winner']['config']} | {b:.2e} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
