"""Train a score network on a 2-D toy in about a minute, sample it with two solvers and check that
every mode is covered.

Run: python examples/train_toy.py [eight_gaussians|swiss_roll|two_moons|checkerboard]
(the same as `sdekit train --data checkerboard`, then `sdekit sample --checkpoint ...`)
"""
import sys

import torch

from sdekit.training import Trainer, generate, mode_coverage, recipe
from sdekit.training.images import save_samples_png

torch.set_num_threads(1)                      # small networks: one thread is fastest
name = sys.argv[1] if len(sys.argv) > 1 else "checkerboard"

cfg = recipe(name, sde="vp")   # residual MLP, EDM-preconditioned, 2000 steps, EMA, cosine lr
trainer = Trainer(cfg, out_dir=f"runs/{name}-vp")
result = trainer.train()
print(f"trained {result.step} steps in {result.elapsed_s:.0f} s, final loss {result.loss:.4f}")

for solver in ("ddim", "dpmpp_2m"):
    x, nfe = generate(trainer.ema, trainer.sde, 4000, solver=solver, steps=20, seed=0)
    cov = mode_coverage(name, x)
    print(f"{solver:9s} NFE={nfe}: {cov['modes_covered']}/{cov['n_modes']} modes covered, "
          f"{cov['on_support']:.1%} of samples on the data support -> "
          f"{'PASS' if cov['passed'] else 'FAIL'}")
    save_samples_png(f"runs/{name}-vp/{solver}.png", x)
