"""Where a `dpmpp_2m` image step's time goes: torch.profiler over sdekit and k-diffusion.

The near-free denoiser of benchmarks/step_overhead.py (x0 = x / 2) under EDM on a 20-step Karras
grid, 256x3x32x32 states, one thread: the per-op self CPU time of 3 solves each, then the same
out-of-place and in-place lerp timed in isolation. A diagnostic, not a target (the overhead
ratio is step_overhead.py's).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

from run import load_kdiffusion  # benchmarks/peers/run.py

import sdekit


def _isolated_ms(f, n: int = 50) -> float:
    for _ in range(5):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> int:
    torch.set_num_threads(1)
    sde = sdekit.EDMSDE()
    model = sdekit.DiffusionModel(lambda x, t: x * 0.5, sde, prediction="denoiser")
    grid = sdekit.make_grid(sde, "karras", 20)
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * sde.sigma_max
    runs = {"sdekit dpmpp_2m": lambda: sdekit.sample(sde, model, x, solver="dpmpp_2m",
                                                      grid=grid, seed=0)}
    kd = load_kdiffusion()
    if kd is not None:
        runs["k-diffusion sample_dpmpp_2m"] = lambda: kd.sample_dpmpp_2m(
            lambda y, s: y * 0.5, x, grid.float(), disable=True)
    for name, f in runs.items():
        for _ in range(2):
            f()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                f()
        print(f"{name}: 3 solves of 20 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
    a, b = torch.randn_like(x), torch.randn_like(x)
    c = a.clone()
    print(f"isolated: lerp {_isolated_ms(lambda: torch.lerp(a, b, 0.3)):.3f} ms, "
          f"lerp_ {_isolated_ms(lambda: c.lerp_(b, 0.3)):.3f} ms, "
          f"sub {_isolated_ms(lambda: a - b):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
