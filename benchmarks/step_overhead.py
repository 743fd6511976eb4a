"""Per-step overhead of each solver, excluding the model, beside k-diffusion's equivalent.

A trivial denoiser (x0 = x / 2, one tensor op) on a batch of 256 x 3 x 32 x 32 under the EDM
process (sigma(t) = t, so k-diffusion's sigma grid is sdekit's time grid). Both libraries run in
the same process, interleaved, and the ratio sdekit / k-diffusion of the median time per step is
reported. k-diffusion needs torchvision, so run this in its own environment:

    python3 -m venv /tmp/kd && /tmp/kd/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        k-diffusion -e .
    /tmp/kd/bin/python benchmarks/step_overhead.py --out benchmarks/results/step_overhead.json

Without k-diffusion it still times sdekit alone. Target: ratio <= 1.0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import sdekit

PAIRS = {  # sdekit solver -> k-diffusion sampler with the same update rule and NFE
    "ddim": "sample_euler",
    "edm_euler": "sample_euler",
    "edm_heun": "sample_heun",
    "ancestral": "sample_euler_ancestral",
    "dpmpp_2m": "sample_dpmpp_2m",
    "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
}


def _time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import k_diffusion as K
    except ImportError:
        K = None
        print("k-diffusion not importable: timing sdekit alone")
    sde = sdekit.EDMSDE()
    model = sdekit.DiffusionModel(lambda x, s: x * 0.5, sde, prediction="x0", time_input="t")
    x = torch.randn(args.batch, 3, 32, 32) * sde.sigma_max
    grid = sdekit.make_grid(sde, "karras", args.steps)
    rows = []
    for name in sdekit.solver_names():
        s = sdekit.get_solver(name)
        if s.adaptive or s.external_loop:
            continue

        def run_ours():
            sdekit.sample(sde, model, x, solver=name, grid=grid)

        ours = _time(run_ours, args.repeats) / args.steps
        row = {"solver": name, "sdekit_ms_per_step": ours * 1e3}
        kname = PAIRS.get(name)
        if K is not None and kname and hasattr(K.sampling, kname):
            sigmas = torch.cat([grid.float(), grid.new_zeros(1).float()])[:-1]
            # same grid, ending at sigma_min (no final step to 0), same trivial denoiser
            kfn = getattr(K.sampling, kname)

            def run_kd():
                kfn(lambda y, sg: y * 0.5, x, torch.cat([sigmas, sigmas[-1:] * 0.999]),
                    disable=True)

            theirs = _time(run_kd, args.repeats) / args.steps
            row.update(kdiffusion=kname, kdiffusion_ms_per_step=theirs * 1e3,
                       ratio=ours / theirs)
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": args.batch, "steps": args.steps, "rows": rows,
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
