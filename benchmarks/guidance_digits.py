"""Benchmark: classifier-free and classifier guidance on digits, at 10 NFE, labelled by an
independent classifier.

Trains (or reuses, under ``--run-dir``) two models with sdekit:

* ``RUN/cond``: the class-conditional digits model, ``sdekit train --data digits --class-cond``
  (the default digits recipe; 10% label dropout to the null class);
* ``RUN/classifier``: the noise-conditional classifier, ``sdekit train --data digits --objective
  classifier``.

A missing checkpoint is trained, a partial one resumed (``--resume``), a finished one reused.
Samples are then labelled by the FD-digits classifier (trained on the real digits' training half,
held-out accuracy 96.2%; it is not the guidance classifier) and scored by FD-digits against the
held-out half. Rows, all with ``dpmpp_2m`` on its default grid:

* ``conditional``: the conditional model without guidance (w = 0), 10 steps = 10 NFE;
* ``cfg``: classifier-free guidance, 5 steps = 10 NFE (each call runs the conditional and the
  unconditional branch: 2 network passes); also 10 steps = 20 NFE;
* ``classifier``: the unconditional model (the null class) guided by the noise-conditional
  classifier, 10 steps = 10 NFE of the diffusion network (plus 10 classifier forward-and-backward
  passes, reported beside it); also the unconditional model alone (s = 0).

The scale is chosen on calibration seeds (``--calib-seed``, ``--calib-n`` samples, classes
cycling 0..9): among the grid's scales > 0 whose calibration accuracy reaches ``--select-at``
(default 0.97: the 95% target plus a margin), the one with the lowest calibration FD-digits;
else the most accurate one. Every row is then reported on held-out seeds (``--seed``, ``--n``
samples).

    python benchmarks/guidance_digits.py --run-dir runs/guidance --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import sdekit
from sdekit.cli.main import main as cli
from sdekit.guidance import classifier_guidance
from sdekit.models import wrap
from sdekit.noise import sample_seeds
from sdekit.training import load_checkpoint, load_model
from sdekit.training.fd_digits import FDDigits

SOLVER = "dpmpp_2m"
CFG_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
CLS_SCALES = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
TRAIN = {"cond": ["--data", "digits", "--class-cond"],
         "classifier": ["--data", "digits", "--objective", "classifier"]}


def train(run: Path, name: str, threads: int) -> tuple[list[str], float | None]:
    """Train ``run/name`` unless its checkpoint is finished; returns the command and seconds."""
    out = run / name
    cmd = ["train", *TRAIN[name], "--threads", str(threads), "--out", str(out), "--no-progress"]
    ck = out / "checkpoint.pt"
    if ck.exists():
        c = load_checkpoint(ck)
        if int(c["step"]) >= int(c["config"]["steps"]):
            return cmd, None
        cmd = [*cmd, "--resume"]
    t0 = time.perf_counter()
    rc = cli(cmd)
    if rc:
        raise SystemExit(f"sdekit {' '.join(cmd)} failed with exit status {rc}")
    return cmd, time.perf_counter() - t0


def draw(kind: str, scale: float, steps: int, n: int, seed: int, net, clf, sde) -> tuple:
    """``(samples, labels, nfe, classifier passes, seconds)`` of one configuration."""
    y = torch.arange(n) % 10
    seeds = sample_seeds(seed, n)
    t0 = time.perf_counter()
    extra, grad = 0, "none"
    if kind == "classifier":
        model = classifier_guidance(wrap(net, sde), clf, y, scale)   # the null class + guidance
        grad = "model"
    else:
        model = wrap(net, sde, y=y, guidance=scale)
    sol = sdekit.sample(sde, model, shape=(n, 1, 8, 8), solver=SOLVER, steps=steps, seeds=seeds,
                        grad=grad)
    if kind == "classifier":
        extra = model.classifier_nfe
    return sol.x.detach().float(), y, sol.nfe, extra, time.perf_counter() - t0


def score(x: torch.Tensor, y: torch.Tensor, fd: FDDigits, with_fd: bool) -> dict:
    with torch.no_grad():
        pred = fd.clf(x.clamp(-1, 1)).argmax(1)
    acc = float((pred == y).double().mean())
    n = x.shape[0]
    out = {"accuracy": acc, "accuracy_se": (acc * (1 - acc) / n) ** 0.5,
           "per_class": [float((pred[y == k] == k).double().mean()) for k in range(10)]}
    if with_fd:
        out["fd_digits"] = fd(x)
    return out


def choose(rows: list[dict], select_at: float) -> dict:
    """Among the guided scales (> 0), the lowest calibration FD-digits of those whose
    calibration accuracy reaches ``select_at``; else the most accurate."""
    guided = [r for r in rows if r["scale"] > 0]
    ok = [r for r in guided if r["accuracy"] >= select_at]
    if ok:
        return min(ok, key=lambda r: (r["fd_digits"], r["scale"]))
    return max(guided, key=lambda r: (r["accuracy"], -r["scale"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/guidance"),
                    help="where the two trained models are cached (trained if missing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=500, help="held-out samples per row")
    ap.add_argument("--seed", type=int, default=2, help="seed of the held-out samples")
    ap.add_argument("--calib-n", type=int, default=200, help="calibration samples per scale")
    ap.add_argument("--calib-seed", type=int, default=1, help="seed of the calibration samples")
    ap.add_argument("--select-at", type=float, default=0.97)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/guidance_digits.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rec: dict = {"solver": SOLVER, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "machine": platform.processor() or platform.machine(), "train": {}}
    for name in TRAIN:
        cmd, secs = train(args.run_dir, name, args.threads)
        log = args.run_dir / name / "log.csv"   # the training time, also of a reused run
        last = log.read_text().strip().splitlines()[-1].split(",") if log.exists() else []
        rec["train"][name] = {"command": "sdekit " + " ".join(cmd), "seconds_this_run": secs,
                              "training_elapsed_s": float(last[-1]) if last else None}
    net, sde, _ = load_model(args.run_dir / "cond" / "checkpoint.pt")
    clf, _, _ = load_model(args.run_dir / "classifier" / "checkpoint.pt")
    fd = FDDigits()
    rec["labeller"] = {"name": "FD-digits classifier", "held_out_accuracy": fd.accuracy}
    rec["fd_floor"] = fd.floor
    with torch.no_grad():
        ds = sdekit.training.load_dataset("digits")
        gen_clf = clf(ds.x_test, sde.lambda_(torch.full((ds.x_test.shape[0],), sde.t_min)))
        rec["guidance_classifier_clean_accuracy"] = float(
            (gen_clf.argmax(1) == ds.y_test).double().mean())

    configs = [("cfg", 5, CFG_SCALES), ("cfg", 10, CFG_SCALES), ("classifier", 10, CLS_SCALES)]
    rec["calibration"], rec["rows"] = [], []
    for kind, steps, scales in configs:
        cal = []
        for s in scales:
            x, y, nfe, extra, secs = draw(kind, s, steps, args.calib_n, args.calib_seed, net,
                                          clf, sde)
            r = {"kind": kind, "steps": steps, "scale": s, "nfe": nfe,
                 "classifier_passes": extra, **score(x, y, fd, True)}
            cal.append(r)
            print(f"calibration {kind} steps={steps} scale={s:g}: acc {r['accuracy']:.3f}, FD "
                  f"{r['fd_digits']:.3f} ({secs:.1f} s)", flush=True)
        rec["calibration"].extend(cal)
        best = choose(cal, args.select_at)
        rows = [("conditional", 0.0)] if (kind, steps) == ("cfg", 10) else []
        if kind == "classifier":
            rows.append(("unconditional", 0.0))
        rows.append((kind, best["scale"]))
        for label, s in rows:
            x, y, nfe, extra, secs = draw("classifier" if label == "unconditional" else
                                          "cfg" if label == "conditional" else kind, s, steps,
                                          args.n, args.seed, net, clf, sde)
            r = {"row": label, "kind": kind, "steps": steps, "scale": s, "nfe": nfe,
                 "classifier_passes": extra, "seconds": secs, **score(x, y, fd, True)}
            rec["rows"].append(r)
            print(f"held-out {label} steps={steps} scale={s:g} nfe={nfe}: acc "
                  f"{r['accuracy']:.3f} +- {r['accuracy_se']:.3f}, FD {r['fd_digits']:.3f}",
                  flush=True)
    rec["selection"] = (f"among the scales > 0 whose accuracy on {args.calib_n} calibration "
                        f"samples (seed {args.calib_seed}) reaches {args.select_at}, the one "
                        "with the lowest calibration FD-digits (else the most accurate); "
                        "reported on held-out seeds")
    rec["command"] = (f"python benchmarks/guidance_digits.py --run-dir {args.run_dir} "
                      f"--threads {args.threads}")
    rec["n"], rec["seed"], rec["calib_n"], rec["calib_seed"] = (args.n, args.seed, args.calib_n,
                                                                 args.calib_seed)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rec, indent=2) + "\n")
    write_markdown(rec, args.results.with_suffix(".md"))


def write_markdown(rec: dict, path: Path) -> None:
    lines = [
        (f"Guidance on digits, `{rec['command']}`: {SOLVER}, {rec['n']} held-out samples per row "
        f"(classes cycling 0..9, seed {rec['seed']}); labelled by the FD-digits classifier "
        f"(held-out accuracy {100 * rec['labeller']['held_out_accuracy']:.1f}% on real digits; "
        "not the guidance classifier). Scale chosen on "
        f"{rec['calib_n']} calibration samples (seed {rec['calib_seed']}): {rec['selection']}. "
        "NFE counts network passes: a CFG call is 2 (conditional + unconditional, batched); "
        "classifier guidance counts the diffusion network's passes, its classifier's "
        "forward+backward passes beside them."),
        "",
        "| row | steps | NFE | classifier passes | scale | label accuracy | FD-digits |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rec["rows"]:
        lines.append(f"| {r['row']} | {r['steps']} | {r['nfe']} | {r['classifier_passes']} | "
                     f"{r['scale']:g} | {100 * r['accuracy']:.1f}% +- "
                     f"{100 * r['accuracy_se']:.1f} | {r['fd_digits']:.3f} |")
    lines += ["", (f"FD-digits real-vs-real floor (901 vs 900): {rec['fd_floor']:.3f}; FD of "
                   f"{rec['n']} samples is biased upward against it. Guidance classifier "
                   "accuracy on the clean held-out digits (t_min): "
                   f"{100 * rec['guidance_classifier_clean_accuracy']:.1f}%."), ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
