"""The command line: every mistake is one line ``sdekit <command>: error: ...`` naming the flag,
exit status 2, before any work starts (nothing written); defaults shown in --help; one default
solver; consistent flag names with the old spellings kept; progress of ``sdekit bench``."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN, run_cli

from sdekit.cli import _args
from sdekit.cli.main import build_parser, main
from sdekit.training import load_checkpoint
from sdekit.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN
run = run_cli


def assert_usage_error(rc, err, *names):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err                      # one line, no usage block, no traceback
    assert lines[0].startswith("sdekit ") and ": error: " in lines[0], err
    assert "Traceback" not in err
    for n in names:
        assert n in lines[0], (n, err)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained two_moons run at step 4."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", "two_moons", "--steps", "4", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a directory")
    return f


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


# ------------------------------------------------------------------ bad input before any work
BAD = [  # (argv after the command, text the one line must contain)
    (["train", "--data", "two_moons", "--sample-solver", "foo"], ["--sample-solver", "'foo'"]),
    (["train", "--data", "two_moons", "--sample-steps", "0"], ["--sample-steps", "0"]),
    (["train", "--data", "two_moons", "--sde-kwargs", '{"beta_mx": 3}'],
     ["--sde-kwargs", "beta_mx", "beta_max"]),
    (["train", "--data", "two_moons", "--sde", "ve", "--sde-kwargs", '{"beta_max": 3}'],
     ["--sde-kwargs", "beta_max", "sigma_max"]),
    (["train", "--data", "two_moons", "--threads", "0"], ["--threads", "0"]),
    (["train", "--data", "two_moons", "--steps", "0"], ["--steps"]),
    (["train", "--data", "two_moons", "--batch-size", "-1"], ["--batch-size"]),
    (["train", "--data", "two_moons", "--width", "-3"], ["--width"]),
    (["train", "--data", "two_moons", "--lr", "0"], ["--lr"]),
    (["train", "--data", "two_moons", "--lr", "nan"], ["--lr"]),
    (["train", "--data", "two_moons", "--warmup", "-1"], ["--warmup"]),
    (["train", "--data", "two_moons", "--ema-decay", "1"], ["--ema-decay"]),
    (["train", "--data", "two_moons", "--seed", "-1"], ["--seed"]),
    (["train", "--data", "digits", "--channel-mult", "1,0"], ["--channel-mult"]),
    # used to train a U-Net with no attention layer at all (3 is no resolution of an 8x8 net)
    (["train", "--data", "digits", "--attn-resolutions", "3"], ["--attn-resolutions", "[8, 4]"]),
    (["sample", "--checkpoint", "{ckpt}", "--threads", "-2"], ["--threads", "-2"]),
    (["sample", "--checkpoint", "{ckpt}", "--threads", "0"], ["--threads", "0"]),
    (["sample", "--checkpoint", "{ckpt}", "--seed", "-1"], ["--seed", "-1"]),
    (["sample", "--checkpoint", "{ckpt}", "--seed", str(2 ** 63)], ["--seed"]),
    (["sample", "--checkpoint", "{ckpt}", "--n", "0"], ["--n"]),
    (["sample", "--checkpoint", "{ckpt}", "--steps", "0"], ["--steps"]),
    (["sample", "--checkpoint", "{ckpt}", "--batch-size", "0"], ["--batch-size"]),
    (["sample", "--checkpoint", "{ckpt}", "--solver", "foo"], ["--solver", "'foo'"]),
    (["sample", "--checkpoint", "{ckpt}", "--grid", "foo"], ["--grid", "'foo'"]),
    (["sample", "--checkpoint", "{ckpt}", "--grid", "karras(rho=2, floor=1)"],
     ["--grid", "'floor'", "'karras'"]),
    (["sample", "--checkpoint", "{tmp}/missing.pt"], ["--checkpoint", "missing.pt"]),
    (["sample", "--checkpoint", "{ckpt}", "--operator", "{tmp}/missing.pt"], ["--operator"]),
    (["distill", "--problem", "gaussian", "--width", "-3"], ["--width", "-3"]),
    (["distill", "--problem", "gaussian", "--layers", "0"], ["--layers"]),
    (["distill", "--problem", "gaussian", "--modes", "0"], ["--modes"]),
    (["distill", "--problem", "gaussian", "--n", "0"], ["--n"]),
    (["distill", "--problem", "gaussian", "--lr", "-1"], ["--lr"]),
    (["distill", "--problem", "gaussian", "--train-steps", "-1"], ["--train-steps"]),
    (["distill", "--problem", "gaussian", "--threads", "0"], ["--threads"]),
    (["distill", "--problem", "gaussian", "--seed", "-1"], ["--seed"]),
    (["bench", "--solvers", "ddim", "-O", "heun.order=2"], ["--solver-option", "heun"]),
    (["bench", "--threads", "-1"], ["--threads"]),
    (["bench", "-n", "0"], ["--n"]),
    (["bench", "--dim", "0"], ["--dim"]),
    (["bench", "--seed", "-1"], ["--seed"]),
    (["bench", "--shard-timeout", "0"], ["--shard-timeout"]),
    (["bench", "--reference-tol", "2"], ["--reference-tol"]),
    # each used to be accepted: the scale was ignored without a classifier; an empty --solvers
    # or --grids (an unset shell variable) ran the sweep over every solver or grid
    (["sample", "--checkpoint", "{ckpt}", "--classifier-scale", "2"],
     ["--classifier-scale", "--classifier"]),
    (["bench", "--solvers", ""], ["--solvers", "''"]),
    # --steps was echoed in the summary line and ignored: dopri5 picks its own steps
    (["sample", "--checkpoint", "{ckpt}", "--solver", "dopri5", "--steps", "7"],
     ["--steps=7", "dopri5", "its own steps"]),
    (["bench", "--grids", ","], ["--grids", "','"]),
]


@pytest.mark.parametrize("argv,names", BAD, ids=[" ".join(a[0:1] + a[-2:]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(argv, names, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{ckpt}", str(run_dir / "checkpoint.pt")).replace("{tmp}", str(tmp_path))
            for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out / "samples" if argv[0] == "sample" else out)]
    rc, _, err = run(argv, capsys)
    assert_usage_error(rc, err, *names)
    assert _listing(out) == []


def test_train_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """It used to end in a traceback: AssertionError: Torch not compiled with CUDA enabled."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    rc, _, err = run(["train", "--data", "two_moons", "--steps", "1", "--device", "cuda",
                      "--out", str(out)], capsys)
    assert_usage_error(rc, err, "device='cuda'", "no CUDA device")
    assert _listing(out) == []


@pytest.mark.parametrize("cmd", [
    ["train", "--data", "two_moons", "--out", "{f}"],
    ["train", "--data", "two_moons", "--out", "{f}/sub"],
    ["sample", "--checkpoint", "{ckpt}", "--out", "{f}/samples"],
    ["bench", "--out", "{f}"],
    ["bench", "--cache-dir", "{f}"],
    ["distill", "--problem", "gaussian", "--out", "{f}"],
])
def test_out_pointing_at_a_file_is_refused(cmd, afile, run_dir, capsys):
    flag = next(a for a in cmd if a in ("--out", "--cache-dir"))
    argv = [a.format(f=afile, ckpt=run_dir / "checkpoint.pt") for a in cmd]
    rc, _, err = run(argv, capsys)
    assert_usage_error(rc, err, flag, "existing file")
    assert afile.read_text() == "not a directory"


def test_resume_past_steps_is_an_error_and_changes_nothing(run_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    rc, out, err = run(["train", "--data", "two_moons", "--steps", "2", *TINY, "--out", run_dir,
                        "--resume"], capsys)
    assert_usage_error(rc, err, "steps=2", "already at step 4")
    assert "done:" not in out
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    # the same --steps: nothing to do, said plainly (not "loss nan, checkpoint None")
    rc, out, err = run(["train", "--data", "two_moons", "--steps", "4", *TINY, "--out", run_dir,
                        "--resume"], capsys)
    assert rc == 0 and "nothing to do" in out and "nan" not in out, (out, err)
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 4


def _nan_checkpoint(run_dir: Path, path: Path) -> Path:
    ck = load_checkpoint(run_dir / "checkpoint.pt")
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
           for k, v in ck["model"].items()}
    save_checkpoint(path, config=ck["config"], model=nan, ema=nan, optimizer=ck["optimizer"],
                    step=ck["step"])
    return path


def test_model_output_error_in_sample_is_one_line(run_dir, tmp_path):
    bad = _nan_checkpoint(run_dir, tmp_path / "nan.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "sdekit.cli.main", "sample", "--checkpoint",
                        str(bad), "--solver", "ddim", "--steps", "2", "--n", "4", "--out",
                        str(tmp_path / "s")], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("sdekit sample: error: ") and "NaN" in lines[0]
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.png").exists()


def test_model_output_error_in_bench_reference_is_one_line(run_dir, tmp_path, capsys):
    bad = _nan_checkpoint(run_dir, tmp_path / "nan.pt")
    rc, _, err = run(["bench", "--problem", f"checkpoint:{bad}", "--solvers", "ddim", "--nfe",
                      "2", "-n", "8", "--quiet", "--out", tmp_path / "b"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "NaN" in err, err


def test_top_level_guard_keeps_tracebacks_for_bugs(monkeypatch, capsys):
    """UsageError is one line with status 2; a ValueError from the middle of a run is a bug
    and propagates with its traceback."""
    from sdekit.cli import solvers_cmd

    def usage(args):
        raise _args.UsageError("--json: something the user typed")

    def bug(args):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(solvers_cmd, "run", usage)
    rc, _, err = run(["solvers"], capsys)
    assert_usage_error(rc, err, "sdekit solvers: error: --json")
    monkeypatch.setattr(solvers_cmd, "run", bug)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["solvers"])


def test_user_input_block_turns_validation_errors_into_usage_errors():
    with (pytest.raises(_args.UsageError, match=r"^--sde-kwargs: bad value$"),
          _args.user_input("--sde-kwargs")):
        raise TypeError("bad value")
    with pytest.raises(KeyError), _args.user_input("--x"):   # other exceptions pass through
        raise KeyError("k")


# ------------------------------------------------------------------ the front door
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_shows_its_default_in_help():
    missing = []
    for name, sp in _subparsers().items():
        fmt = sp._get_formatter()
        for a in sp._actions:
            if (not a.option_strings or a.help == argparse.SUPPRESS or a.nargs == 0
                    or a.required):
                continue  # positionals, hidden aliases, switches (off unless given), required
            text = fmt._expand_help(a) if a.help else ""
            if "default" not in text and "required" not in text:
                missing.append(f"{name} {a.option_strings[-1]}")
    assert not missing, f"flags whose --help does not state the default: {missing}"


def test_sample_default_solver_is_sample_functions(run_dir, capsys):
    from sdekit import sample
    want = inspect.signature(sample).parameters["solver"].default
    args = build_parser().parse_args(["sample", "--checkpoint", str(run_dir / "checkpoint.pt")])
    assert args.solver is want is None   # None: the option-free rule (default_config)
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "(default: sdekit.sample's option-free rule" in " ".join(
        capsys.readouterr().out.split())


def test_option_free_sample_runs_and_records_the_default_rule(run_dir, tmp_path, capsys):
    """`sdekit sample` without --solver/--grid draws what generate() (sdekit.sample's option-free
    rule, default_config) draws, and its .npz records the rule's solver, options and grid."""
    import numpy as np

    from sdekit.solvers import default_config
    from sdekit.training.checkpoint import load_model
    from sdekit.training.sampling import generate

    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--steps", "10",
                 "--n", "6", "--out", str(out)]) == 0
    z = np.load(out.with_name("s.npz"))
    meta = json.loads(str(z["meta"]))
    assert f"10 NFE ({meta['solver']}, 10 steps)" in capsys.readouterr().out   # not "None"
    net, sde, _ = load_model(run_dir / "checkpoint.pt")
    rule = default_config(sde, 10)
    assert meta["solver"] == "unipc_bh2(" + ", ".join(
        f"{k}={v}" for k, v in sorted(rule["options"].items())) + ")"
    assert meta["grid"] == rule["grid"] and meta["nfe"] == 10
    assert meta["grid_options"] == rule["grid_options"] == {"lambda_floor": -2.5}
    x, _ = generate(net, sde, 6, steps=10, seed=0)
    np.testing.assert_array_equal(z["x"], x.numpy())


def test_sample_with_an_adaptive_solver_says_it_picks_its_own_steps(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--solver",
                 "dopri5", "--n", "4", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "(dopri5, its own steps)" in line and "20 steps" not in line


def test_sample_grid_with_options_in_its_name(run_dir, tmp_path):
    import numpy as np

    from sdekit.training.checkpoint import load_model
    from sdekit.training.sampling import generate

    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--solver", "ddim",
                 "--steps", "6", "--grid", "logsnr(lambda_floor=-2.5)", "--n", "4",
                 "--out", str(out)]) == 0
    z = np.load(out.with_name("s.npz"))
    net, sde, _ = load_model(run_dir / "checkpoint.pt")
    x, _ = generate(net, sde, 4, solver="ddim", steps=6, seed=0, grid="logsnr",
                    grid_options={"lambda_floor": -2.5})
    np.testing.assert_array_equal(z["x"], x.numpy())


def test_old_flag_spellings_still_work_and_are_hidden(capsys):
    parse = build_parser().parse_args
    assert parse(["distill", "--problem", "gaussian", "--out", "o", "--batch", "7"]).batch_size == 7
    assert parse(["distill", "--problem", "gaussian", "--out", "o"]).batch_size == 256
    assert parse(["train", "--data", "digits", "--no-progress"]).quiet is True
    assert parse(["train", "--data", "digits"]).quiet is False
    for cmd, old, new in (("distill", "--batch ", "--batch-size"),
                          ("train", "--no-progress", "--quiet")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert new in text and old not in text


def test_print_config_prints_the_resolved_recipe_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    rc, text, err = run(["train", "--data", "digits", "--steps", "7", "--print-config", "--out",
                         out], capsys)
    assert rc == 0, err
    cfg = json.loads(text)
    assert cfg["steps"] == 7 and cfg["data"] == "digits" and cfg["net"]["name"] == "unet"
    assert not out.exists()


def test_default_threads_follow_the_measurement(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _args.default_threads() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert _args.default_threads() is None
    n = torch.get_num_threads()
    try:
        _args.apply_threads(3)
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        _args.apply_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def test_bench_reports_each_phase_on_stderr_and_quiet_silences_it(run_dir, tmp_path, capsys):
    argv = ["bench", "--problem", f"checkpoint:{run_dir / 'checkpoint.pt'}", "--solvers",
            "ddim", "--grids", "logsnr", "--nfe", "2", "-n", "16", "--formats", "json"]
    rc, out, err = run(argv + ["--out", tmp_path / "a"], capsys)
    assert rc == 0, err
    assert "preparing the initial states" in err and "reference solution (dopri5" in err
    assert "estimated RMS error of the reference itself" in err      # explained where shown
    assert "cell" in err                                              # the cell bar
    assert "estimated RMS error of the reference itself" in out and "not resolved" in out
    rc, out, err = run(argv + ["--out", tmp_path / "b", "--quiet"], capsys)
    assert rc == 0 and err == "", err


def test_reference_warning_when_its_error_exceeds_a_ranked_rms():
    from sdekit.bench.report import reference_warning, terminal_report
    cells = [{"label": "ddim", "grid": "logsnr", "budget": 10, "nfe": 10, "status": "ok",
              "rms": 2e-3, "tol": None},
             {"label": "heun", "grid": "logsnr", "budget": 10, "nfe": 10, "status": "ok",
              "rms": 5e-5, "tol": None}]
    res = {"cells": cells, "summary": {"cells": 2, "ok": 2, "skipped": 0, "diverged": 0,
                                       "error": 0, "wall_s": 1.0},
           "problem": {"name": "p", "description": "d", "n": 2, "n_ref": 2},
           "reference": {"method": "dopri5", "error_estimate": 1e-4,
                         "error_estimate_method": "RMS difference to a looser solve"}}
    w = reference_warning(res)
    assert w and "1 of the 2" in w and "heun" in w
    assert w in terminal_report(res, ["rms"])
    res["reference"]["error_estimate"] = 1e-5
    assert reference_warning(res) is None


def test_bench_plot_colours_by_family_and_labels_grids(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    import matplotlib.figure

    from sdekit.bench import report
    res = json.loads((ROOT / "benchmarks/results/digits_bench/bench.json").read_text())
    hlines, legend = [], []
    axhline, fig_legend = matplotlib.axes.Axes.axhline, matplotlib.figure.Figure.legend

    def spy_axhline(self, y=0, *a, **kw):
        hlines.append((self, y))
        return axhline(self, y, *a, **kw)

    def spy_legend(self, *a, **kw):
        legend.extend(kw["handles"])
        return fig_legend(self, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy_axhline)
    monkeypatch.setattr(matplotlib.figure.Figure, "legend", spy_legend)
    assert report.plot(res, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    family, colours, bold = None, {}, {}
    for h in legend:                       # a family header, then the family's lines
        if h.get_color() == "none":
            family = h.get_label().strip() or family
            continue
        assert "[" in h.get_label() and "]" in h.get_label()     # every line names its grid
        colours.setdefault(family, set()).add(h.get_color())
        bold[family] = bold.get(family, 0) + (h.get_linewidth() > 1)
    fams = {c["family"] for c in res["cells"] if c.get("status") == "ok"}
    assert set(colours) == fams
    assert all(len(c) == 1 for c in colours.values())             # one colour per family
    assert len({next(iter(c)) for c in colours.values()}) == len(fams)
    assert all(n == 1 for n in bold.values())                     # its best line bold
    fd_level = res["reference"]["metrics"]["fd"]                  # the FD panel's floor
    assert (report.TITLES["fd"], fd_level) in [(ax.get_title(), y) for ax, y in hlines]


def test_a_default_out_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "two_moons-vp").write_text("x")
    rc, _, err = run(["train", "--data", "two_moons"], capsys)
    assert_usage_error(rc, err, "default --out", "runs/two_moons-vp")


def test_bench_default_out_is_ignored_by_git():
    from sdekit.cli.bench import DEFAULT_OUT
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", str(DEFAULT_OUT / "gaussian" / "bench.json")],
                       cwd=ROOT, capture_output=True, check=False)
    assert r.returncode == 0, f"{DEFAULT_OUT} is not ignored by .gitignore"


def test_toy_training_defaults_to_one_thread_on_any_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["train", "--data", "two_moons", "--steps", "1", *TINY,
                     "--out", str(tmp_path / "r")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_diverged_run_is_reported_once_without_a_traceback(command, tmp_path, monkeypatch,
                                                             capsys):
    """TrainingDiverged (NaN loss) from either training loop ends in one error line from main,
    exit status 1; no traceback."""
    from sdekit.training.trainer import FitLoop, TrainingDiverged

    def diverge(*a, **k):
        raise TrainingDiverged("loss is nan at step 1")

    monkeypatch.setattr(FitLoop, "train", diverge)
    import sdekit.distill as distill
    monkeypatch.setattr(distill, "train_operator", diverge)
    monkeypatch.setattr(distill, "generate_trajectories", lambda *a, **k: tmp_path / "traj")
    if command == "train":
        argv = ["train", "--data", "two_moons", "--steps", "1", *TINY, "--out", str(tmp_path)]
    else:
        argv = ["distill", "--problem", "gaussian", "--dim", "4", "--out", str(tmp_path / "op"),
                "--n", "8", "--train-steps", "1", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"sdekit {command}: error: loss is nan at step 1" in err
    assert "Traceback" not in err


def test_a_closed_output_pipe_ends_quietly():
    """`sdekit solvers | head` where head has gone: no BrokenPipeError traceback (the reader is
    closed before the command writes, so every write fails)."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = subprocess.run([sys.executable, "-m", "sdekit.cli.main", "solvers", "--json"],
                             stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1
