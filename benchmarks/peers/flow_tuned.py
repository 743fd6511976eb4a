#!/usr/bin/env python
"""Tuned grids on the flow-matching mixture of ``run.py --sde flow --problems gmm --states 4096``.

Can a grid tuned for the model (``sdekit.tune``) reach issue 14's target there (sdekit's best at
most half the RMS of diffusers' best), where no named grid does? For four solvers at NFE 5, 10
and 20, ``sdekit.tune`` tunes the grid on 256 calibration states (seed 100; its own held-out
batch: 256 states, seed 200) against a dopri5 solve at rtol = atol = 1e-10, in float64; the tuned
grid is then run on the bench's 4096 paired states (seed 1, never seen by the tuner) and scored
against the bench's reference at t_min, next to the best fixed sdekit and diffusers rows of
``flow_results_states4096.json`` (same states, same reference, same end point t_min: the tuned
grid ends at t_min; the best diffusers rows end at sigma = 0, as in the bench's own table), and
next to the same solver on each of the tuner's named grids (``sdekit.tune.NAMED_GRIDS``) on
those 4096 states: issue 16's tuned / best named ratio, on a batch large enough to count.
``--states N`` scores on run.py's N-state batch instead (``--states N`` of run.py, its
``flow_results_statesN.json``): at NFE 20 the mixture's RMS counts the few states sent to another
mode, and a larger batch counts more of them.

    OMP_NUM_THREADS=1 python benchmarks/peers/flow_tuned.py     # ~20 min on one core
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/peers/run.py: the problem and its reference)

import sdekit  # noqa: E402
from sdekit._io import content_hash  # noqa: E402
from sdekit.tune import NAMED_GRIDS, CachedReference, prior_states, tune  # noqa: E402

SOLVERS = [("unipc_bh2", {}), ("unipc_bh1", {"order": 3}), ("dpmpp_3m", {}), ("dpmpp_2m", {})]
NFES = (5, 10, 20)
N_CAL, N_HELDOUT, CAL_SEED, HO_SEED, TOL = 256, 256, 100, 200, 1e-10
STATES = 4096


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list, list[int]]:
    """The arguments, the solvers (name, options) and the NFE budgets to run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=N_CAL,
                    help=f"calibration states (default {N_CAL}; another value writes "
                         "flow_tuned_calN.*, other --nfe flow_tuned[_calN]_nfeA-B.*)")
    ap.add_argument("--n-heldout", type=int, default=N_HELDOUT,
                    help=f"the tuner's held-out states (default {N_HELDOUT})")
    ap.add_argument("--solvers", default=",".join(bench.label(s, o) for s, o in SOLVERS),
                    help="of the default list, the labels to run (comma-separated)")
    ap.add_argument("--nfe", default=",".join(map(str, NFES)), help="NFE budgets")
    ap.add_argument("--states", type=int, default=STATES,
                    help=f"the bench's paired states the tuned grids are scored on (default "
                         f"{STATES}; needs flow_results_statesN.json from run.py --sde flow "
                         "--problems gmm --states N; another value writes ..._statesN.*)")
    args = ap.parse_args(argv)
    labels = {bench.label(s, o): (s, o) for s, o in SOLVERS}
    unknown = [x for x in args.solvers.split(",") if x not in labels]
    if unknown or args.n < 2 or args.n_heldout < 2:
        ap.error(f"--solvers: unknown {unknown} (valid: {sorted(labels)})" if unknown
                 else "--n and --n-heldout must be at least 2")
    if not (HERE / f"flow_results_states{args.states}.json").exists():
        ap.error(f"--states {args.states}: flow_results_states{args.states}.json is missing "
                 f"(run: python benchmarks/peers/run.py --sde flow --problems gmm --states "
                 f"{args.states})")
    solvers = [labels[x] for x in args.solvers.split(",")]
    return args, solvers, [int(b) for b in args.nfe.split(",")]


def main(argv: list[str] | None = None) -> int:
    args, solvers, nfes = parse(argv)
    torch.set_num_threads(1)
    prob = bench.FlowProblem("gmm", seed=0, states=args.states)
    fixed = json.loads((HERE / f"flow_results_states{args.states}.json").read_text())
    rec = fixed["problems"]["gmm"]["records"]
    ref_end = prob.at(bench.FLOW.t_min)
    shape = (prob.dim,)
    x_cal = prior_states(bench.FLOW, args.n, shape, seed=CAL_SEED, dtype=torch.float64)
    x_ho = prior_states(bench.FLOW, args.n_heldout, shape, seed=HO_SEED, dtype=torch.float64)
    t0 = time.perf_counter()
    refs = {content_hash(x): sdekit.sample(bench.FLOW, prob.model, x, solver="dopri5", rtol=TOL,
                                           atol=TOL).x.double() for x in (x_cal, x_ho)}
    ref = CachedReference(refs, f"dopri5 rtol=atol={TOL:g}")
    rows = []
    for solver, opts in solvers:
        for nfe in nfes:
            tg = tune(bench.FLOW, prob.model, solver, nfe, solver_options=opts,
                      calibration=x_cal, heldout=x_ho, dtype=torch.float64, reference=ref,
                      max_sweeps=15, progress=False)
            out = sdekit.sample(bench.FLOW, prob.model, prob.x1.clone(), solver=solver, grid=tg,
                                **opts)
            named = {}      # the same solver on each of the tuner's named grids, bench states
            for g, go in NAMED_GRIDS:
                o = sdekit.sample(bench.FLOW, prob.model, prob.x1.clone(), solver=solver, grid=g,
                                  steps=tg.record["steps"], grid_options=go or None, **opts)
                named[bench.label(g, go)] = math.sqrt(float((o.x.double() - ref_end).pow(2)
                                                            .mean()))
            e, c = tg.record["errors"], tg.record["cost"]
            row = {"solver": bench.label(solver, opts), "nfe": nfe, "measured_nfe": out.nfe,
                   "bench_rms": math.sqrt(float((out.x.double() - ref_end).pow(2).mean())),
                   "bench_named_rms": named,
                   "tuner_heldout_rms": e["heldout_rms"], "tuner_ratio": e["ratio_heldout"],
                   "tuner_ratio_ci95": e["ratio_heldout_ci95"],
                   "tuner_best_named": e["best_named_grid_heldout"], "selected": e["selected"],
                   "tuning_wall_s": c["wall_s"], "tuning_nfe": c["nfe"],
                   "times": tg.times.tolist()}
            rows.append(row)
            print(f"{row['solver']:22s} NFE {nfe:2d}: bench RMS {row['bench_rms']:.3e} "
                  f"(tuner held-out {e['heldout_rms']:.3e}, ratio {e['ratio_heldout']:.3g}) "
                  f"[{c['wall_s']:.0f} s]", flush=True)
    best = {b: {lib: bench.best(rec, (lib,), b) for lib in ("sdekit", "diffusers")}
            for b in nfes}
    result = {"command": "OMP_NUM_THREADS=1 python benchmarks/peers/flow_tuned.py"
              + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
              "problem": fixed["problems"]["gmm"]["problem"], "calibration": args.n,
              "heldout": args.n_heldout, "states": args.states,
              "calibration_seed": CAL_SEED, "heldout_seed": HO_SEED, "reference_tol": TOL,
              "rows": rows, "total_wall_s": time.perf_counter() - t0,
              "best_fixed": {str(b): {lib: {"config": r["config"], "rms": r["rms"]}
                                      for lib, r in v.items()} for b, v in best.items()},
              "versions": {"sdekit": sdekit.__version__, "torch": torch.__version__,
                           "python": platform.python_version()}}
    stem = "flow_tuned" + (f"_cal{args.n}" if args.n != N_CAL else "") + (
        "_nfe" + "-".join(map(str, nfes)) if tuple(nfes) != NFES else "") + (
        f"_states{args.states}" if args.states != STATES else "")
    (HERE / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [f"`{r['command']}` ({r['total_wall_s']:.0f} s on one core). {r['problem']}. Tuned on "
             f"{r['calibration']} calibration states (seed {r['calibration_seed']}; the tuner's "
             f"held-out batch: {r.get('heldout', r['calibration'])} states, seed "
             f"{r['heldout_seed']}), scored on "
             f"the bench's {r.get('states', STATES)} states (seed 1) at t_min. 'tuner ratio': "
             "the tuner's own held-out ratio to the solver's best named grid, with its "
             "paired-bootstrap 95% interval.", "",
             "| solver | NFE | tuned: bench RMS | same solver, best named grid (bench) | tuned / "
             "it | best fixed sdekit (bench) | best diffusers (bench) | tuned / best diffusers | "
             "tuner ratio (95% interval) | tuning s | tuning NFE |",
             "|---|---:|---:|---|---:|---|---|---:|---|---:|---:|"]
    for x in r["rows"]:
        bf = r["best_fixed"][str(x["nfe"])]
        s, d = bf["sdekit"], bf["diffusers"]
        ci = x["tuner_ratio_ci95"]
        g = min(x["bench_named_rms"], key=x["bench_named_rms"].get)
        gn = x["bench_named_rms"][g]
        lines.append(f"| `{x['solver']}` | {x['measured_nfe']} | {x['bench_rms']:.3e} | "
                     f"`{g}` {gn:.3e} | {x['bench_rms'] / gn:.2f} | "
                     f"`{s['config']}` {s['rms']:.3e} | `{d['config']}` {d['rms']:.3e} | "
                     f"{x['bench_rms'] / d['rms']:.2f} | {x['tuner_ratio']:.3g}"
                     + (f" ({ci[0]:.3g}-{ci[1]:.3g})" if ci else "") + f" | "
                     f"{x['tuning_wall_s']:.0f} | {x['tuning_nfe']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
