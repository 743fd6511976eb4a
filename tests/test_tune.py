"""Tuned grids and the solver search (sdekit.tune): on exact Gaussian oracles, small and fast."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

import sdekit
from sdekit._io import load_verified
from sdekit.bench.problems import gaussian_problem
from sdekit.noise import SeededNoise, sample_seeds
from sdekit.tune import (
    FIT_GAP_WARN,
    NAMED_GRIDS,
    TuneError,
    _Run,
    _say_result,
    format_search,
    load_tuned_grid,
    ratio_interval,
    search,
    solver_variants,
    tune,
)

DIM = 4
KW = {"calibration": 12, "heldout": 12, "shape": (DIM,), "dtype": torch.float64, "progress": False}


@pytest.fixture(scope="module")
def problem():
    return gaussian_problem(dim=DIM)


@pytest.fixture(scope="module")
def tuned(problem, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "dpmpp_2m-5.json"
    tg = tune(problem.sde, problem.model, "dpmpp_2m", 5, reference=problem.flow, out=out,
              max_sweeps=12, **KW)
    return tg, out


def prior_states(sde, seed, n=12):
    """The held-out initial states as tune() draws them (prior, per-sample seeds)."""
    z = SeededNoise(sample_seeds(seed, n)).randn(torch.empty((n, DIM), dtype=torch.float64))
    return z * sde.prior_std


def rms(problem, x, **kw):
    out = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", **kw).x
    return float((out - problem.flow(x)).pow(2).mean().sqrt())


def test_tuned_grid_beats_every_named_grid_on_heldout_states(problem, tuned):
    tg, _ = tuned
    x = prior_states(problem.sde, 1)          # held-out seeds: seed + 1
    assert tg.record["heldout"]["seeds"] == sample_seeds(1, 12)
    assert not set(tg.record["heldout"]["seeds"]) & set(tg.record["calibration"]["seeds"])
    tuned_err = rms(problem, x, grid=tg.times)
    named = {(g, str(o)): rms(problem, x, grid=g, steps=5, grid_options=o)
             for g, o in NAMED_GRIDS}
    assert tuned_err == pytest.approx(tg.record["errors"]["heldout_rms"], rel=1e-9)
    assert tuned_err <= 0.7 * min(named.values()), (tuned_err, named)
    assert tg.record["errors"]["best_named_grid_heldout"]["heldout_rms"] == pytest.approx(
        min(named.values()), rel=1e-9)
    assert tg.record["measured_nfe"] == 5 and tg.record["cost"]["nfe"] > 0


def test_heldout_ratio_carries_its_paired_bootstrap_interval(problem, tuned):
    tg, _ = tuned
    e = tg.record["errors"]
    x = prior_states(problem.sde, 1)
    best = e["best_named_grid_heldout"]["grid"]
    g, o = next((g, o) for g, o in NAMED_GRIDS
                if best == g + ("(" + ",".join(f"{k}={v}" for k, v in o.items()) + ")" if o
                                else ""))

    def state_e2(**kw):
        out = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", **kw).x
        return (out - problem.flow(x)).pow(2).mean(1)

    e_t, e_n = state_e2(grid=tg.times), state_e2(grid=g, steps=5, grid_options=o)
    lo, hi = e["ratio_heldout_ci95"]
    assert (lo, hi) == pytest.approx(ratio_interval(e_t, e_n), rel=1e-9)
    assert lo <= e["ratio_heldout"] <= hi and "bootstrap" in e["ratio_ci_method"]


def test_ratio_interval_is_exact_for_proportional_errors_and_wide_for_one_outlier():
    e = torch.rand(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    assert ratio_interval(4 * e, e) == pytest.approx((2.0, 2.0), rel=1e-12)
    assert ratio_interval(e, e) == pytest.approx((1.0, 1.0), rel=1e-12)
    big = e.repeat(25)    # 5000 states: the resamples are drawn in chunks
    assert ratio_interval(9 * big, big) == pytest.approx((3.0, 3.0), rel=1e-12)
    heavy = e.clone()
    heavy[7] = 1e4        # one state holds nearly all of one grid's squared error
    lo, hi = ratio_interval(heavy, e)
    point = float((heavy.mean() / e.mean()).sqrt())
    assert lo < 0.3 * point and lo <= point <= hi


def test_tune_says_when_the_heldout_batch_cannot_tell_the_grids_apart(problem, capsys,
                                                                      monkeypatch):
    kw = dict(KW, progress=True)
    tune(problem.sde, problem.model, "dpmpp_2m", 5, reference=problem.flow, max_sweeps=2,
         polish=0, **kw)
    assert "cannot tell" not in capsys.readouterr().err    # exact Gaussian: a narrow interval
    # a wide interval that holds 1 (sdekit.tune is the function: patch its module)
    monkeypatch.setattr(importlib.import_module("sdekit.tune"), "ratio_interval",
                        lambda a, b: (0.4, 2.5))
    tune(problem.sde, problem.model, "dpmpp_2m", 5, reference=problem.flow, max_sweeps=2,
         polish=0, **kw)
    err = capsys.readouterr().err
    assert "95% interval 0.4-2.5" in err and "cannot tell the tuned grid" in err


def test_tune_says_when_the_calibration_batch_is_too_small(problem, capsys):
    """The held-out RMS over the fit RMS is recorded; above FIT_GAP_WARN tune says the grid fits
    states the others do not share and names the batch size."""
    tg = tune(problem.sde, problem.model, "dpmpp_2m", 5, reference=problem.flow, max_sweeps=2,
              polish=0, **dict(KW, progress=True))
    e = tg.record["errors"]
    assert e["heldout_over_fit"] == pytest.approx(e["heldout_rms"] / e["fit_rms"], rel=1e-12)
    assert e["heldout_over_fit"] < FIT_GAP_WARN     # exact Gaussian: the batches agree
    assert "too small" not in capsys.readouterr().err
    record = dict(tg.record, errors=dict(e, heldout_over_fit=3.7))
    _say_result(True, "dpmpp_2m", 5, record)
    err = capsys.readouterr().err
    n = tg.record["calibration"]["n"]
    assert "3.7x its RMS on the fitted" in err and f"({n} states) is likely too small" in err
    _say_result(True, "dpmpp_2m", 5, dict(tg.record, errors=dict(e, heldout_over_fit=None)))
    assert "too small" not in capsys.readouterr().err


def test_simplex_search_starts_where_the_coordinate_search_ends_and_only_improves(problem):
    """polish=N adds a multi-start Nelder-Mead stage on the fitted states: its grid's fit error
    is at most the coordinate search's best (which it also starts from), the solves it spent are
    recorded and stay near the budget; polish=0 runs the coordinate search alone."""
    kw = dict(reference=problem.flow, max_sweeps=6, validation=0.5, **KW)
    plain = tune(problem.sde, problem.model, "unipc_bh2", 5, polish=0, **kw)
    polished = tune(problem.sde, problem.model, "unipc_bh2", 5, polish=400, **kw)
    assert "simplex" not in plain.record["cost"]
    assert plain.record["errors"]["selected"] != "simplex search"
    simplex = polished.record["cost"]["simplex"]
    best_refined = min(r["fit_rms"] for r in plain.record["cost"]["starts"])
    assert simplex["fit_rms"] <= best_refined * (1 + 1e-12)
    # 9 starts of 4 free log steps: each start's simplex (5 solves) may exceed its share
    assert 200 <= simplex["solves"] <= 400 + 10 * 6
    # the same run before it, plus the simplex solves and the validation error of its grid
    assert (polished.record["cost"]["solves"] - plain.record["cost"]["solves"]
            == simplex["solves"] + 1)
    if polished.record["errors"]["selected"] == "simplex search":
        assert polished.record["errors"]["fit_rms"] == simplex["fit_rms"]


def test_file_round_trip_and_sample_with_the_file(problem, tuned):
    tg, path = tuned
    back = load_tuned_grid(path)
    assert torch.equal(back.times, tg.times)
    assert back.record == json.loads(json.dumps(tg.record))
    x = prior_states(problem.sde, 7, 3)
    a = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", grid=str(path))
    b = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", grid=tg.times)
    assert torch.equal(a.x, b.x) and a.nfe == 5
    c = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", grid=path, steps=5,
                      order=2)  # a Path, the recorded steps and a default option spelt out
    assert torch.equal(c.x, a.x)


def test_sample_takes_the_tuned_grid_object_with_the_same_checks(problem, tuned):
    tg, _ = tuned
    x = prior_states(problem.sde, 7, 3)
    a = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", grid=tg)
    b = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", grid=tg.times)
    assert torch.equal(a.x, b.x) and a.nfe == 5
    with pytest.raises(ValueError, match="solver: tuned for 'dpmpp_2m', given 'ddim'"):
        sdekit.sample(problem.sde, problem.model, x, solver="ddim", grid=tg)
    other = gaussian_problem(dim=DIM, seed=5)
    with pytest.raises(TuneError, match="model differs in object_sha256"):
        sdekit.sample(other.sde, other.model, x, solver="dpmpp_2m", grid=tg)


def test_a_grid_of_no_usable_type_is_refused_by_name(problem):
    x = prior_states(problem.sde, 3, 2)
    with pytest.raises(ValueError, match="grid of type object is invalid: expected a grid name"):
        sdekit.sample(problem.sde, problem.model, x, solver="ddim", grid=object())


@pytest.mark.parametrize("kw, what", [
    ({"solver": "ddim"}, "solver: tuned for 'dpmpp_2m', given 'ddim'"),
    ({"solver": "dpmpp_2m", "steps": 6}, "steps: tuned for 5, given 6"),
    ({"solver": "dpmpp_2m", "lower_order_final": False}, ("solver options differs in "
                                                       "lower_order_final")),
    ({"solver": "dpmpp_2m", "grid_options": {"rho": 2}}, "grid_options ['rho'] do not apply"),
    ({"solver": "dpmpp_2m", "t_start": 0.5}, "t_start=0.5 cannot be combined with a tuned grid"),
])
def test_mismatched_solver_steps_or_options_refused(problem, tuned, kw, what):
    _, path = tuned
    with pytest.raises(ValueError) as e:
        sdekit.sample(problem.sde, problem.model, prior_states(problem.sde, 3, 2), grid=path, **kw)
    assert what in str(e.value)


def test_other_forward_sde_or_model_refused(problem, tuned):
    _, path = tuned
    x = prior_states(problem.sde, 3, 2)
    other_sde = gaussian_problem(sde=sdekit.DiscreteDDPM(), dim=DIM)
    with pytest.raises(TuneError, match="forward SDE differs in lambda_sha256"):
        sdekit.sample(other_sde.sde, other_sde.model, x, solver="dpmpp_2m", grid=path)
    other_data = gaussian_problem(dim=DIM, seed=5)   # same SDE, other data: another model
    with pytest.raises(TuneError, match="model differs in object_sha256"):
        sdekit.sample(other_data.sde, other_data.model, x, solver="dpmpp_2m", grid=path)
    x0_model = gaussian_problem(dim=DIM, prediction="x0")
    with pytest.raises(TuneError, match="model differs in prediction"):
        sdekit.sample(x0_model.sde, x0_model.model, x, solver="dpmpp_2m", grid=path)


def test_bad_grid_files(problem, tmp_path):
    x = prior_states(problem.sde, 3, 2)
    with pytest.raises(ValueError, match="tuned grid file .*missing.json' does not exist"):
        sdekit.sample(problem.sde, problem.model, x, grid=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a tuned grid file"):
        sdekit.sample(problem.sde, problem.model, x, grid=str(bad))
    with pytest.raises(ValueError, match="unknown grid 'nope'.*tuned grid file"):
        sdekit.sample(problem.sde, problem.model, x, grid="nope", steps=3)


def test_resume_after_interruption_gives_the_same_grid(problem, tmp_path, monkeypatch):
    kw = dict(KW, reference=problem.flow, max_sweeps=4)
    full = tune(problem.sde, problem.model, "unipc_bh2", 5, state=tmp_path / "a.pt", **kw)
    assert full.record["cost"]["solves"] > 40
    real, calls = _Run.error, {"n": 0}

    def interrupted(self, *a):
        calls["n"] += 1
        # 18 named-grid solves (fit, validation, held-out), 1 of the DP grid, <= 8 per sweep
        # (4 interior points x 2 directions)
        if calls["n"] == 30:   # inside the second refinement sweep (or later)
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(_Run, "error", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(problem.sde, problem.model, "unipc_bh2", 5, state=tmp_path / "b.pt", **kw)
    saved = load_verified(tmp_path / "b.pt")
    assert saved["stage"] == "refine" and saved["runs"][0]["sweeps"] >= 1
    monkeypatch.setattr(_Run, "error", real)
    resumed = tune(problem.sde, problem.model, "unipc_bh2", 5, state=tmp_path / "b.pt", **kw)
    assert torch.equal(resumed.times, full.times)
    assert resumed.record["errors"] == full.record["errors"]
    # a state file of another run is refused, naming what differs
    with pytest.raises(TuneError, match=r"belongs to another tuning run .*'nfe'"):
        tune(problem.sde, problem.model, "unipc_bh2", 6, state=tmp_path / "b.pt", **kw)


@pytest.mark.parametrize("args, kw, what", [
    (("nope", 5), {}, "unknown solver 'nope'"),
    (("euler_maruyama", 5), {}, "cannot be tuned: it is stochastic"),
    (("dopri5", 5), {}, "cannot be tuned: it is adaptive"),
    (("dpmpp_2m", 0), {}, "nfe=0 is invalid"),
    (("dpmpp_2m", 1), {}, "nothing to tune"),
    (("heun", 1), {}, "below the minimum cost"),
    (("dpmpp_2m", 5), {"calibration": 1}, "calibration=1 is invalid"),
    (("dpmpp_2m", 5), {"prediction": "epss"}, "prediction='epss' is invalid"),
    (("dpmpp_2m", 5), {"shape": None}, "give shape="),
    (("dpmpp_2m", 5), {"heldout_seed": 0}, "heldout seeds overlap"),
    (("dpmpp_2m", 5), {"reference": "ddim"}, "reference='ddim' is invalid"),
    (("dpmpp_2m", 5), {"bogus": 1}, "unexpected keyword"),
    (("dpmpp_2m", 5), {"solver_options": {"bogus": 1}}, "unknown options"),
    # each of these used to end in Python's, NumPy's or the filesystem's own error (the
    # directory out= only after the whole tuning run)
    (("dpmpp_2m", 5), {"solver_options": "order"}, "solver_options='order' is invalid"),
    (("dpmpp_2m", 5), {"seed": -1}, "seed=-1 is invalid"),
    (("dpmpp_2m", 5), {"heldout_seed": "x"}, "heldout_seed='x' is invalid"),
    (("dpmpp_2m", 5), {"seeds": 5}, "calibration seeds=5 are invalid"),
    (("dpmpp_2m", 5), {"shape": 4}, "shape=4 is invalid"),
    (("dpmpp_2m", 5), {"shape": (0,)}, r"shape=\(0,\) is invalid"),
    (("dpmpp_2m", 5), {"dtype": torch.int32}, "dtype has dtype torch.int32"),
    # on/off flags used to be read for their truth (fresh='no' discarded the saved state)
    (("dpmpp_2m", 5), {"fresh": "no"}, "fresh='no' is invalid: expected True or False"),
    (("dpmpp_2m", 5), {"polish": -1}, "polish=-1 is invalid"),
    (("dpmpp_2m", 5), {"polish": 2.5}, "polish=2.5 is invalid"),
    (("dpmpp_2m", 5), {"progress": 0}, "progress=0 is invalid: expected True or False"),
])
def test_bad_input_is_refused_before_work(problem, args, kw, what):
    calls = problem.model.nfe
    with pytest.raises((TuneError, TypeError, ValueError), match=what):
        tune(problem.sde, problem.model, *args, **{**KW, **kw})
    assert problem.model.nfe == calls


@pytest.mark.parametrize("name", ["out", "state"])
def test_a_directory_for_out_or_state_is_refused_before_work(problem, name, tmp_path):
    """out= a directory used to end in IsADirectoryError after the whole tuning run."""
    calls = problem.model.nfe
    with pytest.raises(TuneError, match=f"{name}='{tmp_path}' is a directory"):
        tune(problem.sde, problem.model, "dpmpp_2m", 5, **{name: tmp_path}, **KW)
    assert problem.model.nfe == calls and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, what", [
    # solvers='ddim' was read letter by letter ("unknown solver 'd'"), [] searched nothing; the
    # others ended in TypeError/ValueError from unpacking; tune_options were read only when
    # tune_top > 0, after the whole search
    ({"solvers": "ddim"}, "solvers='ddim' is invalid"),
    ({"solvers": []}, r"solvers=\[\] is invalid"),
    ({"solvers": 5}, "solvers=5 is invalid"),
    ({"grids": "karras"}, "grids='karras' is invalid"),
    ({"grids": [("karras", "rho")]}, r"grids=\[\('karras', 'rho'\)\] is invalid"),
    ({"tune_options": "x"}, "tune_options='x' is invalid"),
    ({"tune_options": {"bogus": 1}}, r"tune_options \['bogus'\] are not options of tune"),
    ({"tune_options": {"out": "a.json"}}, r"tune_options \['out'\] are not options"),
])
def test_bad_search_input_is_refused_before_work(problem, kw, what):
    calls = problem.model.nfe
    with pytest.raises(TuneError, match=what):
        search(problem.sde, problem.model, 5, **{"solvers": ["ddim"], **KW, **kw})
    assert problem.model.nfe == calls


def test_search_progress_must_be_a_bool(problem):
    calls = problem.model.nfe
    with pytest.raises(ValueError, match="progress='yes' is invalid: expected True or False"):
        search(problem.sde, problem.model, 5, **{"solvers": ["ddim"], **KW, "progress": "yes"})
    assert problem.model.nfe == calls


def test_unidentifiable_model_needs_a_tag(problem):
    def net(x, t):
        return torch.zeros_like(x)

    with pytest.raises(TuneError, match="pass model_tag="):
        tune(problem.sde, net, "ddim", 3, **KW)


def test_search_ranks_on_calibration_and_reports_heldout(problem):
    grids = [("logsnr", {}), ("quadratic", {})]
    r = search(problem.sde, problem.model, 5, solvers=["ddim", "dpmpp_2m"], grids=grids,
               reference=problem.flow, **KW)
    table = r["table"]
    assert len(table) == 2 * len(solver_variants("dpmpp_2m")) + 2
    cal = [row["calibration_rms"] for row in table]
    assert cal == sorted(cal) and r["winner"] is table[0]
    w = table[0]
    x = prior_states(problem.sde, 1)
    out = sdekit.sample(problem.sde, problem.model, x, solver=w["solver"], steps=w["steps"],
                        grid=w["grid"], **w["options"]).x
    assert float((out - problem.flow(x)).pow(2).mean().sqrt()) == pytest.approx(
        w["heldout_rms"], rel=1e-9)
    assert w["solver"] == "dpmpp_2m"   # second order beats DDIM at 5 NFE here
    m = r["winner_vs_runner_up"]      # rank 1 / rank 2 on the held-out states, with its interval
    assert m["ratio"] == pytest.approx(w["heldout_rms"] / table[1]["heldout_rms"], rel=1e-9)
    assert m["ci95"][0] <= m["ratio"] <= m["ci95"][1]
    assert f"rank 1 / rank 2: {m['ratio']:.3g} (95% paired-bootstrap" in format_search(r)
    with pytest.raises(TuneError, match="cannot be tuned: it is stochastic"):
        search(problem.sde, problem.model, 5, solvers=["pc"], **KW)


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny trained two_moons checkpoint."""
    from helpers import TINY_TRAIN

    from sdekit.cli.main import main
    out = tmp_path_factory.mktemp("tunecli") / "run"
    assert main(["train", "--data", "two_moons", "--steps", "4", *TINY_TRAIN, "--out",
                 str(out)]) == 0
    return out / "checkpoint.pt"


def test_cli_tune_then_sample_and_bench_with_the_grid(ckpt, tmp_path, capsys):
    from helpers import run_cli
    grid = tmp_path / "g.json"
    rc, out, err = run_cli(["tune", "--problem", f"checkpoint:{ckpt}", "--solver", "dpmpp_2m",
                            "--nfe", "4", "--n", "8", "--max-sweeps", "2", "--out", grid,
                            "--quiet"], capsys)
    assert rc == 0, err
    tg = load_tuned_grid(grid)
    assert tg.solver == "dpmpp_2m" and tg.steps == 4 and "weights_sha256" in tg.record["model"]
    printed = json.loads(out)
    assert printed["heldout_rms"] == tg.record["errors"]["heldout_rms"]
    assert printed["heldout_over_fit"] == tg.record["errors"]["heldout_over_fit"]
    rc, out, err = run_cli(["sample", "--checkpoint", ckpt, "--grid", grid, "--n", "4",
                            "--out", tmp_path / "s"], capsys)
    assert rc == 0 and "4 NFE (dpmpp_2m, 4 steps)" in out, err
    for extra, what in ((["--solver", "ddim"], "solver: tuned for 'dpmpp_2m', given 'ddim'"),
                        (["--steps", "6"], "steps: tuned for 4, given 6")):
        rc, _, err = run_cli(["sample", "--checkpoint", ckpt, "--grid", grid, "--n", "4",
                              "--out", tmp_path / "s2", *extra], capsys)
        assert rc == 2 and what in err, err
    rc, _, err = run_cli(["sample", "--checkpoint", ckpt, "--grid", tmp_path / "none.json"],
                         capsys)
    assert rc == 2 and "does not exist" in err
    rc, out, err = run_cli(["bench", "--problem", f"checkpoint:{ckpt}", "--solvers", "dpmpp_2m",
                            "--grids", f"logsnr,{grid}", "--nfe", "4", "-n", "8", "--quiet",
                            "--formats", "json", "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    res = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    tuned = [c for c in res["cells"] if c.get("tuned")]
    assert len(tuned) == 1 and tuned[0]["status"] == "ok", tuned
    assert tuned[0]["label"] == "dpmpp_2m [tuned]" and tuned[0]["nfe"] == 4


@pytest.mark.parametrize("argv, what", [
    (["--nfe", "0"], "--nfe"),
    (["--nfe", "5", "--solver", "pc"], "cannot be tuned: it is stochastic"),
    (["--nfe", "5", "--out", "x.txt"], "expected a .json file name"),
    (["--nfe", "5", "--search", "-O", "order=2"], "goes with one --solver"),
    (["--nfe", "5", "--tune-top", "2"], "go with --search"),
    (["--nfe", "5", "-O", "bogus"], "expected OPTION=VALUE"),
    (["--nfe", "5", "--problem", "nope"], "unknown --problem 'nope'"),
    (["--nfe", "5", "--sde", "nope"], "--sde: unknown SDE"),
    # an empty --solvers (an unset shell variable) used to run the search over every solver
    (["--nfe", "5", "--search", "--solvers", ""], "--solvers='' is invalid"),
    (["--nfe", "5", "--polish", "-1"],
     "argument --polish: -1 is invalid: expected an integer >= 0"),
])
def test_cli_tune_bad_input(argv, what, capsys, tmp_path, monkeypatch):
    from helpers import run_cli
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["tune", *argv], capsys)
    assert rc == 2 and what in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_cli_search_writes_the_ranking(tmp_path, capsys):
    from helpers import run_cli
    out = tmp_path / "search.json"
    rc, text, err = run_cli(["tune", "--problem", "gaussian", "--dim", "4", "--nfe", "4",
                             "--search", "--solvers", "ddim,dpmpp_2m", "--n", "8", "--quiet",
                             "--out", out], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    cal = [r["calibration_rms"] for r in res["table"]]
    assert cal == sorted(cal) and res["winner"] == res["table"][0]
    assert "| 1 | " in text and "winner: " in text and "held-out RMS" in text


def test_tune_top_passes_over_configurations_that_behave_the_same():
    """`--tune-top 2` tuned two configurations differing only in an option that changed nothing
    on the searched grids (equal calibration errors everywhere): the second pick must be a
    configuration that does something else."""
    from sdekit.tune import _top_configs

    def row(solver, options, grid, rms):
        return {"solver": solver, "options": options, "grid": grid, "grid_options": {},
                "calibration_rms": rms}
    a, b, c = {"order": 3}, {"order": 3, "lower_order_final": True}, {"order": 2}
    ok = sorted([row("unipc_bh2", a, "logsnr", 0.1), row("unipc_bh2", b, "logsnr", 0.1),
                 row("unipc_bh2", a, "karras", 0.3), row("unipc_bh2", b, "karras", 0.3),
                 row("unipc_bh2", c, "logsnr", 0.2), row("unipc_bh2", c, "karras", 0.4)],
                key=lambda r: r["calibration_rms"])
    assert _top_configs(ok, 2) == [("unipc_bh2", a), ("unipc_bh2", c)]
    # an option that does change something on one grid keeps its configuration distinct
    ok = sorted([r if not (r["options"] == b and r["grid"] == "karras")
                 else row("unipc_bh2", b, "karras", 0.35) for r in ok],
                key=lambda r: r["calibration_rms"])
    assert _top_configs(ok, 2) == [("unipc_bh2", a), ("unipc_bh2", b)]
