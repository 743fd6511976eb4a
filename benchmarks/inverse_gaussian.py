"""Analytic targets: which inverse-problem methods sample the exact Gaussian posterior.

Gaussian data ``N(mu, S)`` with the exact model (``GaussianData.model``) and a linear measurement
``y = H x + sigma_y z`` have the posterior ``N(mu + K (y - H mu), S - K H S)`` with
``K = S H^T (H S H^T + sigma_y^2 I)^-1``. For each problem and method, ``--n`` samples (VP SDE,
100 steps; RePaint 20 steps x r = 5, jump 2) are compared with it: the largest |z| of the mean's
coordinates and of the covariance's entries (errors in units of their sampling standard error),
and the errors themselves. A method samples the posterior where both stay within about 4.

    python benchmarks/inverse_gaussian.py --n 1000
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sdekit
from sdekit.analytic import GaussianData
from sdekit.inverse import Inpainting, MatrixOperator, ddrm, dps, inpaint

VP = sdekit.VPSDE()


def problems() -> dict:
    S2 = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    corr = GaussianData(VP, torch.zeros(2, dtype=torch.float64), S2)
    diag = GaussianData(VP, torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=torch.float64),
                        torch.tensor([0.5, 1.0, 0.2, 0.8], dtype=torch.float64))
    rand = GaussianData.random(VP, dim=4, eig_max=1.0, eig_min=0.05, seed=3, mean_scale=1.0)
    g = torch.Generator().manual_seed(1)
    Hr = torch.randn(2, 4, generator=g, dtype=torch.float64)
    xr = rand.sample(1, torch.Generator().manual_seed(5), torch.float64)[0]
    return {
        "inpaint, correlated 2-D prior, noise-free": (corr, torch.tensor([True, False]),
                                                      torch.tensor([2.0, 0.0]), 0.0),
        "inpaint, diagonal 4-D prior, noise-free": (diag, torch.tensor([True, False, False, True]),
                                                    torch.tensor([1.0, 0.0, 0.0, -1.0]), 0.0),
        "H = [1 1], correlated 2-D prior, sigma_y 0.5": (corr, torch.tensor([[1.0, 1.0]]),
                                                          torch.tensor([1.5]), 0.5),
        "random 2x4 H, random 4-D prior, sigma_y 0.2": (
            rand, Hr, Hr @ xr + 0.2 * torch.randn(2, generator=g, dtype=torch.float64), 0.2),
    }


def posterior(g: GaussianData, H: torch.Tensor, y: torch.Tensor, sy: float):
    S, mu = g.cov, g.mean
    K = S @ H.T @ torch.linalg.inv(H @ S @ H.T + sy * sy * torch.eye(H.shape[0],
                                                                       dtype=torch.float64))
    return mu + K @ (y - H @ mu), S - K @ H @ S


def scores(x: torch.Tensor, m: torch.Tensor, C: torch.Tensor) -> dict:
    x = x.double()
    n = x.shape[0]
    d = torch.diag(C)
    keep = d > 1e-12                          # degenerate (observed, noise-free) coordinates:
    xm, xc = x.mean(0), torch.cov(x.T)        # compared by their error only
    se_c = ((d[:, None] * d[None] + C * C) / n).sqrt()
    zm = ((xm - m)[keep] / (d[keep] / n).sqrt()).abs().max()
    kk = keep[:, None] & keep[None]
    zc = ((xc - C)[kk] / se_c[kk]).abs().max()
    return {"mean_err": float((xm - m).norm()), "cov_err": float((xc - C).norm()),
            "max_z_mean": float(zm), "max_z_cov": float(zc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--results", type=Path,
                    default=Path("benchmarks/results/inverse_gaussian.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, t_all = [], time.perf_counter()
    for pname, (g, op_spec, yv, sy) in problems().items():
        model, n = g.model("eps"), args.n
        if op_spec.dtype == torch.bool:
            op, H = Inpainting(op_spec), torch.eye(g.dim, dtype=torch.float64)[op_spec]
            y_obs = yv.double()[op_spec]
        else:
            op, H, y_obs = MatrixOperator(op_spec), op_spec.double(), yv.double()
        m, C = posterior(g, H, y_obs, sy)
        yb = y_obs.float().expand(n, -1)
        full = yv.float().expand(n, -1)
        runs = []      # (label, function, arguments)
        if sy == 0:
            runs += [("replacement (ancestral)", inpaint, (full, op_spec),
                      {"solver": "ancestral", "steps": 100}),
                     ("replacement (ddim)", inpaint, (full, op_spec),
                      {"solver": "ddim", "steps": 100}),
                     ("RePaint (ancestral, r 5, jump 2)", inpaint, (full, op_spec),
                      {"solver": "ancestral", "steps": 20, "resample": 5, "jump": 2})]
        runs += [(f"DPS (ancestral, zeta {z})", dps, (yb, op), {"zeta": z, "steps": 100})
                 for z in (0.1, 0.3)]
        runs += [(f"DDRM (eta {eta}, eta_b 1)", ddrm, (yb, op),
                  {"sigma_y": sy, "eta": eta, "steps": 100, "float64": True})
                 for eta in (0.85, 0.0)]
        for mname, fn, fargs, kw in runs:
            t0 = time.perf_counter()
            x = fn(VP, model, *fargs, **kw).x
            row = {"problem": pname, "method": mname, **scores(x, m, C),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    rec = {"command": f"python benchmarks/inverse_gaussian.py --n {args.n}", "n": args.n,
           "seconds": round(time.perf_counter() - t_all, 1), "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rec, indent=1) + "\n")
    head = (f"Exact Gaussian posterior vs samples (`{rec['command']}`, n = {args.n} per row, VP "
            "SDE, exact model): max |z| of the mean and covariance errors (in sampling standard "
            "errors; noise-free observed coordinates are compared by error only).")
    lines = [head, "",
             "| problem | method | max z mean | max z cov | mean err | cov err (Frobenius) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['method']} | {r['max_z_mean']:.1f} | "
                     f"{r['max_z_cov']:.1f} | {r['mean_err']:.3f} | {r['cov_err']:.3f} |")
    args.results.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
