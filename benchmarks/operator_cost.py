"""The compute of the learned one-pass sampler (`fno`) beside the samplers it is compared with
(issue 18, section 1): MACs per sample in teacher passes, and wall time per sample measured side
by side (the bench runner's interleaved timing rounds), on the three problems of
`benchmarks/operator_targets.py`.

Compute does not depend on the weights, so each network is rebuilt in the architecture the
recorded distillations used (benchmarks/results/operator/*/distill.json and the `sdekit distill`
defaults) with random weights, and no quality is measured here (the quality of the trained
operators is in benchmarks/results/operator). Teachers: the toy MLP recipe (`sdekit train --data
eight_gaussians`), the exact 64-d mixture score (an analytic oracle: no torch network, so raw MACs
and no teacher unit) and the digits U-Net (a checkpoint of the default recipe, `--teacher`).

    python benchmarks/operator_cost.py --teacher runs/digits/checkpoint.pt

Writes benchmarks/results/operator/cost.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import sdekit
from sdekit.bench.cost import count_macs, network_macs_per_sample
from sdekit.bench.problems import BenchProblem, gmm_problem, problem_from_checkpoint
from sdekit.bench.runner import Prepared, SweepConfig, compute_cell, plan_cells, time_cells
from sdekit.distill import generate_trajectories, load_operator, train_operator
from sdekit.models import build_network, wrap

TOY_NET = {"name": "mlp", "data_shape": [2], "width": 256, "depth": 2, "emb_dim": 64,
           "embedding": "fourier", "prediction": "denoiser", "sigma_data": 1.0}


def toy_problem() -> BenchProblem:
    """The eight-Gaussians teacher's architecture (random weights)."""
    torch.manual_seed(0)
    sde = sdekit.VPSDE()
    net = build_network(TOY_NET).eval().requires_grad_(False)
    return BenchProblem(name="eight_gaussians", sde=sde, model=wrap(net, sde),
                        sample_init=lambda n, g: torch.randn(n, 2, generator=g))


#: problem -> (operator settings of its recorded distillation, the contenders of its summary row
#: as (solver, grid, NFE budget), samples per cell as in operator_targets.py)
SETUPS = {
    "eight_gaussians": ({"backbone_at": "start", "experts": 1},
                        [("dpm_solver_2m", "quadratic", 4), ("ddim", "quadratic", 4),
                         ("ddim", "quadratic", 1)], 4000),
    "gmm64": ({"backbone_at": "slots", "experts": 8},
              [("dpmpp_3m", "karras", 4), ("ddim", "uniform", 4), ("ddim", "uniform", 1)], 2000),
    "digits": ({"backbone_at": "start", "experts": 1},
               [("unipc_bh1", "quadratic", 5), ("unipc_bh2", "quadratic", 10),
                ("ddim", "quadratic", 5), ("ddim", "uniform", 1)], 900),
    # the folded recipe of benchmarks/results/operator/digits/dmd/fold/ (--fold-time --width 32
    # --layers 1): the same teacher, so only the operator's rows differ
    "digits_folded": ({"backbone_at": "start", "experts": 1, "fold_time": True, "width": 32,
                       "layers": 1}, [("unipc_bh1", "quadratic", 5), ("ddim", "uniform", 1)], 900),
}


def operator_for(problem: BenchProblem, shape: tuple[int, ...], work: Path,
                 backbone: dict | None, **settings):
    """An operator of the production architecture, built by the production code path
    (`train_operator` with 0 steps on a small trajectory set)."""
    generate_trajectories(work / "traj", problem.sde, problem.model, shape, 256,
                          steps_per_segment=1, shard_size=256)
    train_operator(work / "traj", work / "op.pt", problem.sde, backbone=backbone, steps=0,
                   **settings)
    return load_operator(work / "op.pt")


def measure(name: str, problem: BenchProblem, teacher_net: dict | None, repeats: int) -> dict:
    settings, contenders, n = SETUPS[name]
    x_init = problem.sample_init(n, torch.Generator().manual_seed(0))
    shape = tuple(x_init.shape[1:])
    with tempfile.TemporaryDirectory() as d:
        # start mode (--init-from-teacher): the backbone is the teacher's network
        op, cfg = operator_for(problem, shape, Path(d), backbone=teacher_net
                               if settings["backbone_at"] == "start" else None, **settings)
    config = SweepConfig(solvers=sorted({s for s, _, _ in contenders} | {"fno"}),
                         grids=sorted({g for _, g, _ in contenders}),
                         nfe=sorted({b for _, _, b in contenders}), n=n,
                         solver_options={"fno": {"operator": (op, cfg)}},
                         timing_repeats=repeats)
    want = {f"{s}/{g}/nfe={b}" for s, g, b in contenders}
    cells = [c for c in plan_cells(config) if c["status"] == "planned"
             and (c["solver"] == "fno" or c["id"] in want)]
    teacher = network_macs_per_sample(problem.model, x_init, problem.sde.T)
    prep = Prepared(problem, x_init, None, {}, None, None, "none", None, None, Path("."),
                    teacher_macs=teacher)
    res = [compute_cell(prep, c, config) for c in cells]
    bad = [c for c in res if c["status"] != "ok"]
    if bad:
        raise SystemExit(f"{name}: {bad[0]['id']}: {bad[0].get('reason')}")
    time_cells(prep, res, config)
    with count_macs() as one:  # one backbone pass per sample, at the start state
        lam = torch.full((n,), float(problem.sde.lambda_(problem.sde.T)))
        op._backbone(x_init.to(next(op.parameters())), lam)
    net = problem.model.net.fn
    params = {"teacher": sum(p.numel() for p in net.parameters())
              if isinstance(net, torch.nn.Module) else None,
              "backbone": sum(p.numel() for p in op.backbone.parameters()),
              "operator": sum(p.numel() for p in op.parameters())}
    rows = []
    for c in res:
        mode = ("start" if op.at_start else "slots") + (", folded" if op.fold_time else "")
        rows.append({"config": f"fno ({mode}, K={op.slots})" if c["solver"] == "fno"
                     else f"{c['solver']} / {c['grid']}",
                     "nfe": c["nfe"], "macs_per_sample": c["macs_per_sample"],
                     "passes": c["passes"], "ms_min": c["ms_min"], "ms_median": c["ms_median"]})
    return {"teacher_macs_per_sample": teacher, "backbone_macs_per_sample": one.macs / n,
            "params": params, "n": n, "timing_repeats": repeats, "rows": rows,
            "operator": {**settings, "slots": op.slots, "experts": op.experts,
                         "backbone": cfg["backbone"]}}


def write_report(out: dict, where: str) -> None:
    lines = [("| problem | sampler | NFE | MACs / sample | teacher passes | ms / sample, median "
              "(min) |"), "|---|---|---:|---:|---:|---:|"]
    for name, r in out.items():
        for row in r["rows"]:
            passes = "-" if row["passes"] is None else f"{row['passes']:.2f}"
            lines.append(f"| {name} | {row['config']} | {row['nfe']} | "
                         f"{row['macs_per_sample']:.3g} | {passes} | {row['ms_median']:.3g} "
                         f"({row['ms_min']:.3g}) |")
    lines.append("")
    for name, r in out.items():
        t, b, pr = r["teacher_macs_per_sample"], r["backbone_macs_per_sample"], r["params"]
        teacher = (f"teacher {pr['teacher']:,} parameters, {t:.4g} MACs per pass" if t else
                   "teacher: the exact score (no torch network: no teacher unit)")
        o = r["operator"]
        head = (f", noise level folded, head width {o.get('width', 64)}, {o.get('layers', 2)} "
                "layer(s)" if o.get("fold_time") else "")
        lines.append(f"- {name}: {teacher}; operator ({o['backbone_at']} mode{head}, "
                     f"K = {o['slots']}, {o['experts']} expert(s)) "
                     f"{pr['operator']:,} parameters, its backbone {pr['backbone']:,} parameters "
                     f"and {b:.4g} MACs per pass; n = {r['n']} samples per solve, "
                     f"{r['timing_repeats']} interleaved timing rounds")
    Path(where).mkdir(parents=True, exist_ok=True)
    Path(where, "cost.json").write_text(json.dumps(out, indent=1) + "\n")
    Path(where, "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/digits/checkpoint.pt",
                    help="a digits checkpoint of the default recipe (the U-Net teacher)")
    ap.add_argument("--only", choices=sorted(SETUPS), action="append")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--out", default="benchmarks/results/operator")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite cost.md from the cost.json on disk")
    args = ap.parse_args()
    if args.report_only:
        write_report(json.loads(Path(args.out, "cost.json").read_text()), args.out)
        return
    torch.set_num_threads(1)
    done = Path(args.out, "cost.json")   # --only: the other problems' rows are kept
    out: dict = json.loads(done.read_text()) if args.only and done.exists() else {}
    for name in args.only or list(SETUPS):
        if name == "eight_gaussians":
            problem, teacher_net = toy_problem(), TOY_NET
        elif name == "gmm64":
            problem, teacher_net = gmm_problem(dim=64), None
        else:
            problem = problem_from_checkpoint(args.teacher)
            from sdekit.training.checkpoint import load_model
            teacher_net = dict(load_model(args.teacher)[2]["net"])
        out[name] = measure(name, problem, teacher_net, args.repeats)
        print(name, json.dumps(out[name]["rows"], indent=None))
    write_report(out, args.out)


if __name__ == "__main__":
    main()
