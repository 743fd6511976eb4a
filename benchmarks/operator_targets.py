"""The learned one-pass sampler (`fno`) against the fast samplers, measured by `sdekit bench`.

For each problem: distil an operator with `sdekit distill` (timed: trajectories + training; kept
and not redone on a rerun unless --redistill), then run `sdekit bench` with `fno` beside every
registered solver (digits: the solvers of the digits table in docs/benchmarks.md) on the same x_T
and the same reference (the converged PF-ODE solution of the teacher), and record the best
configuration per budget.

    python benchmarks/operator_targets.py                      # every problem
    python benchmarks/operator_targets.py --only gmm64         # one of them
    python benchmarks/operator_targets.py --report-only        # the summary from results on disk

Problems (teachers):
* ``eight_gaussians``: the trained toy MLP of `benchmarks/train_toys.py`
  (runs/bench-toys/eight_gaussians/checkpoint.pt; trained here with the toy recipe if missing);
* ``gmm64``: the 64-dimensional, 8-component Gaussian mixture of `sdekit bench --problem gmm`
  with its exact score;
* ``digits``: the U-Net of `benchmarks/train_digits.py` (runs/bench-digits/checkpoint.pt;
  trained here if missing), scored by FD-digits; ``digits_dmd``: the same teacher, the operator
  with its noise level folded, a small head and the distribution-matching stage.

Results: benchmarks/results/operator/<problem>/{distill.json, bench.json, bench.md} and a summary
benchmarks/results/operator/summary.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from sdekit.cli.main import main as cli

# digits: the solvers of the digits table in docs/benchmarks.md (a full sweep of the U-Net takes
# hours here)
DIGITS_SOLVERS = "fno,ddim,dpmpp_2m,dpmpp_3m,unipc_bh1,unipc_bh2,deis_tab3,ipndm,dpm_solver_3m"

PROBLEMS = {
    "eight_gaussians": {
        "teacher": ["--checkpoint", "runs/bench-toys/eight_gaussians/checkpoint.pt"],
        "bench": ["--problem", "checkpoint:runs/bench-toys/eight_gaussians/checkpoint.pt"],
        "train": ["train", "--data", "eight_gaussians", "--sde", "vp",
                  "--out", "runs/bench-toys/eight_gaussians", "--no-progress"],
        "distill": ["--n", "32768", "--train-steps", "4000", "--batch", "512", "--lr", "3e-3",
                    "--init-from-teacher", "--backbone-at", "start"],
        "nfe": "1,4", "n": "4000", "metric": "rms", "solvers": []},
    "gmm64": {
        "teacher": ["--problem", "gmm", "--dim", "64"],
        "bench": ["--problem", "gmm", "--dim", "64"],
        "distill": ["--n", "262144", "--solver", "unipc_bh2", "--shard-size", "8192",
                    "--train-steps", "6000", "--batch", "512", "--lr", "3e-3", "--experts", "8"],
        "nfe": "1,4", "n": "2000", "metric": "rms", "solvers": []},
    "digits": {
        "teacher": ["--checkpoint", "runs/bench-digits/checkpoint.pt"],
        "bench": ["--problem", "checkpoint:runs/bench-digits/checkpoint.pt"],
        "train": None,  # python benchmarks/train_digits.py writes runs/bench-digits
        "distill": ["--n", "16384", "--solver", "unipc_bh2", "--slots", "4",
                    "--train-steps", "4000", "--batch", "64", "--lr", "1e-3",
                    "--init-from-teacher", "--backbone-at", "start"],
        "nfe": "1,5,10", "n": "900", "metric": "fd",
        "solvers": ["--solvers", DIGITS_SOLVERS]},
    # the same teacher at the teacher's size: noise level folded, a 32 x 1 head, then DMD
    # (benchmarks/results/operator/digits/dmd/fold/)
    "digits_dmd": {
        "teacher": ["--checkpoint", "runs/bench-digits/checkpoint.pt"],
        "bench": ["--problem", "checkpoint:runs/bench-digits/checkpoint.pt"],
        "train": None,
        "distill": ["--n", "16384", "--solver", "unipc_bh2", "--slots", "4",
                    "--train-steps", "4000", "--batch", "64", "--lr", "1e-3",
                    "--init-from-teacher", "--backbone-at", "start", "--fold-time",
                    "--width", "32", "--layers", "1", "--dmd", "30"],
        "nfe": "1,5,10", "n": "900", "metric": "fd",
        "solvers": ["--solvers", DIGITS_SOLVERS]},
}


def best_per_budget(bench: dict, metric: str) -> dict[str, dict]:
    """The best ok cell per (solver, budget), and the best non-fno cell per budget."""
    rows: dict[str, dict] = {}
    for c in bench["cells"]:
        v = c.get(metric)
        if c["status"] != "ok" or v is None or not math.isfinite(v) or c["budget"] is None:
            continue
        key = "fno" if c["solver"] == "fno" else f"best fast @ {c['budget']}"
        if key not in rows or v < rows[key][metric]:
            rows[key] = {"config": f"{c['solver']} / {c['grid']}", "nfe": c["nfe"], metric: v}
        if c["solver"] == "ddim":
            k = f"ddim @ {c['budget']}"
            if k not in rows or v < rows[k][metric]:
                rows[k] = {"config": f"ddim / {c['grid']}", "nfe": c["nfe"], metric: v}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(PROBLEMS), action="append")
    ap.add_argument("--out", default="benchmarks/results/operator")
    ap.add_argument("--work", default="runs/operator", help="trajectories and operators")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--redistill", action="store_true",
                    help="distil again even where a timed distillation is recorded")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild summary.{json,md} from the results on disk")
    args = ap.parse_args()
    out = Path(args.out)
    for name in [] if args.report_only else (args.only or list(PROBLEMS)):
        p = PROBLEMS[name]
        ck = p["teacher"][1] if p["teacher"][0] == "--checkpoint" else None
        if ck and not Path(ck).exists():
            if not p.get("train"):
                raise SystemExit(f"{ck} is missing: run python benchmarks/train_digits.py first")
            assert cli(p["train"]) == 0
        work, res_dir = Path(args.work) / name, out / name
        if args.redistill or not (res_dir / "distill.json").exists():
            t0 = time.perf_counter()
            assert cli(["distill", *p["teacher"], "--out", str(work), "--threads", args.threads,
                        *p["distill"]]) == 0
            wall = time.perf_counter() - t0
            distill = json.loads((work / "distill.json").read_text())
            res_dir.mkdir(parents=True, exist_ok=True)
            (res_dir / "distill.json").write_text(json.dumps(
                {**distill, "wall_s": round(wall, 1), "args": p["distill"]}, indent=1))
        assert cli(["bench", *p["bench"], *p["solvers"], "--nfe", p["nfe"], "-n", p["n"],
                    "-O", f"fno.operator={work / 'operator.pt'}", "--threads", args.threads,
                    "--quiet", "--formats", "json,md", "--out", str(res_dir)]) == 0
    summary = {}  # from every problem's results on disk, so separate runs add up
    for name, p in PROBLEMS.items():
        res_dir = out / name
        if not (res_dir / "bench.json").exists():
            continue
        bench = json.loads((res_dir / "bench.json").read_text())
        distill = json.loads((res_dir / "distill.json").read_text())
        summary[name] = {"metric": p["metric"], "distill_s": distill["wall_s"],
                         "trajectories_s": distill["trajectories_s"],
                         "training_s": distill["training_s"], "distill_args": distill["args"],
                         "rows": best_per_budget(bench, p["metric"])}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| problem | metric | fno (1 NFE) | best fast, by budget | DDIM, by budget | "
             "distillation |", "|---|---|---:|---|---|---:|"]
    for name, s in summary.items():
        m, rows = s["metric"], s["rows"]
        fast = "; ".join(f"{r[m]:.3g} ({r['config']}, {r['nfe']})" for k, r in rows.items()
                         if k.startswith("best fast"))
        ddim = "; ".join(f"{r[m]:.3g} ({r['nfe']})" for k, r in rows.items()
                         if k.startswith("ddim"))
        fno = rows.get("fno", {}).get(m, float("nan"))
        lines.append(f"| {name} | {m} | {fno:.3g} | {fast} | {ddim} | "
                     f"{s['distill_s'] / 60:.1f} min |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
