r"""Per-step overhead of sdekit's solvers beside k-diffusion's equivalents, measured side by side.

A near-free denoiser (x0 = x / 2, one tensor op) under the EDM process (sigma(t) = t, so
k-diffusion's sigma grid is sdekit's time grid), one CPU thread, in one process. For every pair
the two contenders are timed interleaved (sdekit, k-diffusion, sdekit, ...; ``--rounds`` rounds),
on the same Karras grid of ``--steps`` steps ending at sigma_min (no final step to 0, so both
take exactly ``steps`` steps), from the same state, each through its natural model path: sdekit
a ``DiffusionModel(prediction="denoiser")`` (k-diffusion's convention, D(x, sigma) -> x0), and
k-diffusion the same callable. The network calls of both are counted and must agree. Reported:
min and median ms per step of each, and the ratio sdekit / k-diffusion of the medians (and of the
mins); and the same for the per-step overhead excluding the network (each round also times the
network alone, called as often on the same state, and that time is taken off both contenders':
``overhead_ratio_median``, ``overhead_ratio_min``). Two regimes: small states (64 x 2, 1,000
steps: Python overhead decides) and images (256 x 3 x 32 x 32, 20 steps). k-diffusion:
``pip install --no-deps k-diffusion`` is enough (only ``k_diffusion.sampling`` is loaded, as in
benchmarks/peers/run.py). Run:

    python benchmarks/step_overhead.py --out benchmarks/results/step_overhead.json

(``--regimes images --solvers ancestral,dpmpp_2m --rounds 15`` runs a part.)

``--peer diffusers`` compares with diffusers' schedulers instead (DDIM, DPM-Solver++ 2M, UniPC)
under DDPM's linear discrete schedule, each library's natural loop (see
:func:`measure_diffusers`):

    python benchmarks/step_overhead.py --peer diffusers \
        --out benchmarks/results/step_overhead_diffusers.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the sdekit of this checkout, not an installed one

import sdekit  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
from run import load_kdiffusion  # noqa: E402

PAIRS = [  # sdekit solver, k-diffusion sampler, its options: the same update rule and NFE
    ("ddim", "sample_euler", {}),
    ("edm_euler", "sample_euler", {}),
    ("edm_heun", "sample_heun", {}),
    ("ancestral", "sample_euler_ancestral", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpmpp_3m", "sample_dpmpp_3m_sde", {"eta": 0.0}),
]
REGIMES = {"small": ((64, 2), 1000), "images": ((256, 3, 32, 32), 20)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _side_by_side(ours, theirs, network, calls: dict[str, int], peer: str, what: str,
                  steps: int, rounds: int, row: dict, noise=None) -> dict:
    """Warm both up, check that they make the same number of network calls, then time them
    interleaved (A B N, ``rounds`` rounds; N: ``network(nfe)``, the same network called as
    often on the same state, alone); completes ``row`` with the NFE, min and median ms per step
    of each (keys ``sdekit_ms_*`` and ``<peer>_ms_*``, ``peer`` without a hyphen) and their
    ratios, and the same for the per-step overhead excluding the network (each round's time
    less that round's network time: ``*_overhead_ms_*``, ``overhead_ratio_*``), prints it and
    returns it. ``noise``: for a stochastic pair, the two contenders' noise draws of one solve
    (sdekit's, the peer's), timed in the same rounds (``*_noise_ms_*``) and also taken off
    (``*_rest_ms_*``, ``rest_ratio_*``: the overhead beyond the network and the noise)."""
    key = peer.replace("-", "")
    ours(), theirs()  # warm-up (also checks the work is the same)
    calls.update({"sdekit": 0, peer: 0})
    ours(), theirs()
    if calls["sdekit"] != calls[peer]:
        raise SystemExit(f"{what}: {calls} network calls differ")
    nfe = row["nfe"] = calls["sdekit"]
    a, b, n, za, zb = [], [], [], [], []
    for _ in range(rounds):  # interleaved A B N (and the noise draws of A and B)
        a.append(_timed(ours) / steps * 1e3)
        b.append(_timed(theirs) / steps * 1e3)
        n.append(_timed(lambda: network(nfe)) / steps * 1e3)
        if noise is not None:
            za.append(_timed(noise[0]) / steps * 1e3)
            zb.append(_timed(noise[1]) / steps * 1e3)
    oa, ob = [x - y for x, y in zip(a, n)], [x - y for x, y in zip(b, n)]
    series = [("sdekit_ms", a), (f"{key}_ms", b), ("network_ms", n),
              ("sdekit_overhead_ms", oa), (f"{key}_overhead_ms", ob)]
    if noise is not None:
        series += [("sdekit_noise_ms", za), (f"{key}_noise_ms", zb),
                   ("sdekit_rest_ms", [x - y for x, y in zip(oa, za)]),
                   (f"{key}_rest_ms", [x - y for x, y in zip(ob, zb)])]
    for name, v in series:
        row.update({f"{name}_min": min(v), f"{name}_median": statistics.median(v)})
    for pre in ("", "overhead_") + (("rest_",) if noise is not None else ()):
        for stat in ("median", "min"):
            row[f"{pre}ratio_{stat}"] = (row[f"sdekit_{pre}ms_{stat}"]
                                         / row[f"{key}_{pre}ms_{stat}"])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in row.items()}), flush=True)
    return row


def _selected(pairs: list, solvers: list[str] | None) -> list:
    """The pairs whose sdekit solver is in ``solvers`` (all for None)."""
    return [p for p in pairs if solvers is None or p[0] in solvers]


def _counted(calls: dict[str, int], who: str, factor: float):
    """A near-free network ``x -> factor * x`` that counts its calls in ``calls[who]``."""
    def net(x, _t):
        calls[who] += 1
        return x * factor
    return net


def _noise_draws(x: torch.Tensor, steps: int):
    """One solve's noise draws of each contender: sdekit's per-sample seeded source (what
    ``sample(..., seed=0)`` makes), one draw shaped like the state per step, and k-diffusion's
    default ``torch.randn_like`` per step (its ``default_noise_sampler``)."""
    def ours():
        src = sdekit.SeededNoise.from_seed(0, x.shape[0])
        for _ in range(steps):
            src.randn(x)

    def theirs():
        for _ in range(steps):
            torch.randn_like(x)
    return ours, theirs


def measure(kd, shape: tuple[int, ...], steps: int, rounds: int,
            solvers: list[str] | None = None) -> list[dict]:
    sde = sdekit.EDMSDE()
    calls = {"sdekit": 0, "k-diffusion": 0, "network": 0}

    def denoiser(who: str):
        return _counted(calls, who, 0.5)

    model = sdekit.DiffusionModel(denoiser("sdekit"), sde, prediction="denoiser")
    grid = sdekit.make_grid(sde, "karras", steps)
    sigmas = grid.float()  # EDM: t = sigma
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * sde.sigma_max
    D, sigma = denoiser("network"), sigmas[0] * x.new_ones([x.shape[0]])

    def network(nfe: int) -> None:
        for _ in range(nfe):
            D(x, sigma)

    rows = []
    for name, kname, kopts in _selected(PAIRS, solvers):
        kfn = getattr(kd.sampling if hasattr(kd, "sampling") else kd, kname)

        def ours():
            sdekit.sample(sde, model, x, solver=name, grid=grid, seed=0)

        def theirs():
            kfn(denoiser("k-diffusion"), x, sigmas, disable=True, **kopts)

        row = {"regime": f"{'x'.join(map(str, shape))}, {steps} steps", "solver": name,
               "kdiffusion": kname + (f"({', '.join(f'{k}={v}' for k, v in kopts.items())})"
                                      if kopts else "")}
        noise = (_noise_draws(x, steps) if sdekit.get_solver(name).stochastic else None)
        rows.append(_side_by_side(ours, theirs, network, calls, "k-diffusion",
                                  f"{name} vs {kname}", steps, rounds, row, noise))
    return rows


DIFFUSERS_PAIRS = [  # sdekit solver, diffusers scheduler: the same update rule and NFE
    ("ddim", "DDIMScheduler"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ("unipc_bh2", "UniPCMultistepScheduler"),
]
DIFFUSERS_REGIMES = {"small": ((64, 2), 1000), "images": ((256, 3, 32, 32), 20)}


def measure_diffusers(shape: tuple[int, ...], steps: int, rounds: int,
                      solvers: list[str] | None = None) -> list[dict]:
    """The same near-free network (eps = x / 10) under DDPM's linear discrete schedule, each
    library's natural loop: ``sdekit.sample`` on the option-free grid with ``steps`` steps, and
    the scheduler's ``set_timesteps(steps)`` + ``step`` loop; network calls counted and equal."""
    import diffusers
    sde = sdekit.DiscreteDDPM()
    calls = {"sdekit": 0, "diffusers": 0, "network": 0}
    net_a, net_b, net_n = (_counted(calls, who, 0.1) for who in ("sdekit", "diffusers", "network"))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def network(nfe: int) -> None:
        for _ in range(nfe):
            net_n(x, 999)

    rows = []
    for name, cls_name in _selected(DIFFUSERS_PAIRS, solvers):
        sched = getattr(diffusers, cls_name)(num_train_timesteps=1000)

        def ours():
            sdekit.sample(sde, net_a, x, solver=name, steps=steps, seed=0)

        def theirs():
            sched.set_timesteps(steps)
            y = x
            for t in sched.timesteps:
                y = sched.step(net_b(y, t), t, y).prev_sample

        row = {"regime": f"{'x'.join(map(str, shape))}, {steps} steps", "solver": name,
               "diffusers": cls_name}
        rows.append(_side_by_side(ours, theirs, network, calls, "diffusers",
                                  f"{name} vs {cls_name}", steps, rounds, row))
    return rows


def markdown_table(doc: dict) -> str:
    """The docs/benchmarks.md table of a results file (``--table FILE``)."""
    peer = "diffusers" if "diffusers" in doc["rows"][0] else "kdiffusion"
    name = {"diffusers": "diffusers scheduler", "kdiffusion": "k-diffusion sampler"}[peer]
    short = name.split()[0]
    lines = [f"| states, steps | sdekit solver | {name} | NFE | network ms/step (median) | "
             f"sdekit ms/step (median) | {short} ms/step (median) | ratio of medians | "
             "overhead ratio, excluding the network (median / min) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['regime']} | `{r['solver']}` | `{r[peer]}` | {r['nfe']} | "
                     f"{r['network_ms_median']:.3f} | {r['sdekit_ms_median']:.3f} | "
                     f"{r[peer + '_ms_median']:.3f} | {r['ratio_median']:.2f} | "
                     f"{r['overhead_ratio_median']:.2f} / {r['overhead_ratio_min']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--regimes", default="small,images")
    ap.add_argument("--peer", choices=["k-diffusion", "diffusers"], default="k-diffusion",
                    help="k-diffusion's samplers (default) or diffusers' schedulers")
    ap.add_argument("--solvers", default=None,
                    help="comma-separated sdekit solvers of the pairs to run (default: all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None, metavar="FILE",
                    help="print the markdown table of a results file (--out) and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    solvers = args.solvers.split(",") if args.solvers else None
    torch.set_num_threads(1)
    load_start = os.getloadavg()   # the machine's load beside the numbers (shared cores)
    rows = []
    if args.peer == "diffusers":
        for r in args.regimes.split(","):
            rows += measure_diffusers(*DIFFUSERS_REGIMES[r], args.rounds, solvers)
    else:
        kd = load_kdiffusion()
        if kd is None:
            sys.exit("k-diffusion is not importable: pip install --no-deps k-diffusion")
        for r in args.regimes.split(","):
            shape, steps = REGIMES[r]
            rows += measure(kd, shape, steps, args.rounds, solvers)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/step_overhead.py "
                       + " ".join(sys.argv[1:]), "rounds": args.rounds, "threads": 1,
                       "torch": torch.__version__,
                       "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
                       "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
