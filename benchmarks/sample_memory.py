"""Peak memory of ``sdekit.sample`` against the number of steps (issue 12, section 1).

A small conv net whose weights require grad (as any freshly built or loaded ``nn.Module``) is
sampled with DDIM on a batch of 64 x 1 x 16 x 16 for 10 to 1,000 steps in three modes:

* ``default``: ``sample(...)`` as a user calls it (no autograd graph: ``grad="none"``);
* ``no_grad``: the same call inside ``with torch.no_grad():``, the reference;
* ``full``: ``sample(..., grad="full")``, the old behaviour, whose graph grows with every step.

Each (mode, steps) cell runs in a fresh process and reports the growth of its peak resident set
size (VmHWM) over the RSS after one warm-up sample, so torch's own footprint cancels. Cells run
interleaved (steps outer, modes inner). Run:

    python benchmarks/sample_memory.py --out benchmarks/results/sample_memory.json

Target: ``default`` is flat in the number of steps and equal to ``no_grad`` (within a few MB
of allocator noise).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import sys, torch, sdekit
torch.manual_seed(0)
torch.set_num_threads(1)
mode, steps = sys.argv[1], int(sys.argv[2])
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.SiLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(),
                          torch.nn.Conv2d(32, 1, 3, padding=1))
sde = sdekit.VPSDE()
model = sdekit.DiffusionModel(lambda x, t: net(x), sde, "eps", time_input="t")
kw = dict(shape=(64, 1, 16, 16), solver="ddim", seed=0)

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MiB
def run(n):
    if mode == "no_grad":
        with torch.no_grad():
            return sdekit.sample(sde, model, steps=n, **kw)
    return sdekit.sample(sde, model, steps=n, grad="full" if mode == "full" else "none", **kw)

run(2)  # warm-up: allocator pools, lazy imports
base = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
sol = run(steps)
print(rss("VmHWM") - base, bool(sol.x.requires_grad))
"""

MODES = ("default", "no_grad", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="10,100,300,1000")
    ap.add_argument("--full-max", type=int, default=1000,
                    help="largest step count run in the 'full' (graph-keeping) mode")
    ap.add_argument("--out", default="benchmarks/results/sample_memory.json")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for n in steps:
        for mode in MODES:
            if mode == "full" and n > args.full_max:
                continue
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(n)], env=env,
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} {n}: the child process failed:\n{out.stderr}")
            out = out.stdout.split()
            rows.append({"mode": mode, "steps": n, "peak_growth_mib": round(float(out[0]), 1),
                         "x_requires_grad": out[1] == "True"})
            print(f"{mode:>8} {n:>5} steps: peak growth {float(out[0]):8.1f} MiB"
                  f"  (x.requires_grad={out[1]})", flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/sample_memory.py " + " ".join(sys.argv[1:]),
                   "net": "3-layer conv net, 32 channels, 19k parameters requiring grad",
                   "batch": [64, 1, 16, 16], "solver": "ddim", "rows": rows}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
