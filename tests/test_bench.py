"""`sdekit bench`: metrics against closed forms, the sweep's budget logic, an end-to-end CLI run,
resume, sharding and bad input."""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch

from sdekit.bench import metrics as M
from sdekit.bench import runner
from sdekit.bench.problems import BenchError, gaussian_problem, resolve_problem
from sdekit.bench.runner import SweepConfig, plan_cells, run_sweep, steps_for_budget
from sdekit.cli.main import main
from sdekit.solvers import get_solver, solver_names


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ------------------------------------------------------------------ metrics
def test_frechet_distance_diagonal_closed_form():
    m1, m2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    expected = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())  # 5 + 2
    assert M.frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected,
                                                                                       rel=1e-12)


def test_frechet_distance_general_matches_sqrtm_formula():
    S1, S2 = _spd(6, 1), _spd(6, 2)
    m1, m2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    cross = scipy.linalg.sqrtm(S1.numpy() @ S2.numpy()).real
    expected = float(((m1 - m2) ** 2).sum()) + np.trace(S1.numpy() + S2.numpy() - 2 * cross)
    assert M.frechet_distance(m1, S1, m2, S2) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(m1, S1, m1, S1) == pytest.approx(0.0, abs=1e-10)


def test_sliced_wasserstein_of_shifted_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    theta = M.random_directions(5, 64, seed=3)
    # the projections of x + c are those of x shifted by theta.c: W2^2 = (theta.c)^2 exactly
    expected = float(((theta @ c) ** 2).mean().sqrt())
    assert M.sliced_wasserstein(x + c, x, theta) == pytest.approx(expected, rel=1e-10)
    # over uniform directions E (theta.c)^2 = |c|^2 / D
    many = M.sliced_wasserstein(x + c, x, 4000, seed=1)
    assert many == pytest.approx(float(c.norm()) / math.sqrt(5), rel=0.03)
    # 1-D, unequal sizes: quantile functions shifted by 2
    y = torch.linspace(-1, 1, 301, dtype=torch.float64)[:, None]
    z = torch.linspace(-1, 1, 101, dtype=torch.float64)[:, None] + 2
    assert M.sliced_wasserstein(y, z, 4) == pytest.approx(2.0, rel=1e-2)


def test_mmd_identical_sets_zero_and_shift_positive():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    assert M.mmd(x, x) == pytest.approx(0.0, abs=1e-7)
    h = M.median_bandwidth(x)
    d1, d2 = M.mmd(x + 0.5, x, h), M.mmd(x + 1.0, x, h)
    assert 0 < d1 < d2
    assert M.mmd(x + 1.0, x, h, M.mmd_self_term(x, h)) == pytest.approx(d2, rel=1e-12)


def test_gaussian_kl_closed_forms():
    S = _spd(4, 5)
    m = torch.randn(4, dtype=torch.float64)
    assert M.gaussian_kl(m, S, m, S) == pytest.approx(0.0, abs=1e-10)
    # 1-D: KL(N(0,1) || N(1,2)) = (1/2 + 1/2 - 1 + ln 2) / 2
    assert M.gaussian_kl([0.0], [[1.0]], [1.0], [[2.0]]) == pytest.approx(0.5 * math.log(2),
                                                                          rel=1e-12)
    # shifted identity covariances: |dm|^2 / 2
    I3 = torch.eye(3, dtype=torch.float64)
    assert M.gaussian_kl(torch.zeros(3), I3, torch.tensor([1.0, 2.0, 2.0]), I3) == \
        pytest.approx(4.5, rel=1e-12)
    assert M.gaussian_kl(torch.zeros(2), torch.diag(torch.tensor([1.0, 0.0])), torch.zeros(2),
                         torch.eye(2)) == math.inf


def test_affine_gaussian_law_exact_for_affine_maps_only():
    D, n = 4, 60
    mean_in, cov_in = torch.randn(D, dtype=torch.float64), _spd(D, 7)
    x = torch.randn(n, D, dtype=torch.float64)
    A, b = torch.randn(D, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    law = M.affine_gaussian_law(x, x @ A.T + b, mean_in, cov_in)
    assert law is not None
    torch.testing.assert_close(law[0], A @ mean_in + b)
    torch.testing.assert_close(law[1], A @ cov_in @ A.T)
    noisy = x @ A.T + b + 0.1 * torch.randn(n, D, dtype=torch.float64)
    assert M.affine_gaussian_law(x, noisy, mean_in, cov_in) is None


def test_rms_error():
    x = torch.zeros(10, 2, 2)
    assert M.rms_error(x + 3.0, x) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.rms_error(torch.zeros(3, 2), torch.zeros(3, 3))


# ------------------------------------------------------------------ budgets
def test_budget_to_steps_uses_expected_nfe_and_skips_what_cannot_fit():
    for name in solver_names():  # every registered fixed-grid solver, discovered
        s = get_solver(name)
        if s.adaptive:
            continue
        steps, nfe, note = steps_for_budget(s, 50)
        assert steps is not None and nfe <= 50 and s.expected_nfe(steps) == nfe, name
        assert steps == 50 or s.expected_nfe(steps + 1) > 50, name  # the most that fit
    steps, nfe, note = steps_for_budget(get_solver("heun"), 5)
    assert (steps, nfe) == (2, 4) and "4 NFE" in note
    steps, nfe, reason = steps_for_budget(get_solver("rk4"), 3)
    assert steps is None and "minimum" in reason
    cells = plan_cells(SweepConfig(solvers=["rk4", "dopri5"], grids=["logsnr"], nfe=[3, 8],
                                   tols=[1e-3]))
    by_id = {c["id"]: c for c in cells}
    assert by_id["rk4/logsnr/nfe=3"]["status"] == "skipped"
    assert "minimum" in by_id["rk4/logsnr/nfe=3"]["reason"]
    assert by_id["rk4/logsnr/nfe=8"]["steps"] == 2
    assert by_id["dopri5/tol=0.001"]["tol"] == 1e-3  # adaptive: a tolerance cell, no budget


# ------------------------------------------------------------------ end to end
def test_cli_end_to_end_writes_json(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--solvers", "ddim,heun,rk4,dopri5,euler_maruyama", "--grids", "logsnr",
               "--nfe", "3,8", "--tols", "1e-3", "--n", "120", "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "NFE 3" in text and "heun" in text and "dopri5" in text
    for f in ("bench.json", "bench.csv", "bench.md", "bench.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "bench.json").read_text())
    assert res["format"] == "sdekit-bench/1" and res["problem"]["name"] == "gaussian"
    cells = {c["id"]: c for c in res["cells"]}
    assert set(cells) == {f"{s}/logsnr/nfe={b}" for s in ("ddim", "heun", "rk4", "euler_maruyama")
                          for b in (3, 8)} | {"dopri5/tol=0.001"}
    assert cells["rk4/logsnr/nfe=3"]["status"] == "skipped"
    assert cells["heun/logsnr/nfe=3"]["nfe"] == 2  # 1 step: measured, reported
    for c in res["cells"]:
        if c["status"] != "ok":
            continue
        assert isinstance(c["nfe"], int) and c["ms_per_sample"] > 0
        if c["kind"] == "ODE":  # deterministic on a Gaussian: exact output law
            assert c["rms"] is not None and c["fd_method"] == "exact" and c["kl_method"] == "exact"
        else:
            assert c["rms"] is None and c["fd_method"] == "fit"
        assert c["sw"] > 0 and c["mmd"] >= 0
    assert cells["dopri5/tol=0.001"]["nfe"] > 8
    # more NFE, smaller error, for a convergent ODE solver
    assert cells["heun/logsnr/nfe=8"]["rms"] < cells["heun/logsnr/nfe=3"]["rms"]
    assert cells["ddim/logsnr/nfe=8"]["kl"] < cells["ddim/logsnr/nfe=3"]["kl"]
    # the exact reference has zero exact error and a Monte-Carlo floor for SW / MMD
    ref = res["reference"]["metrics"]
    assert ref["rms"] == pytest.approx(0, abs=1e-6) and ref["kl"] == pytest.approx(0, abs=1e-6)
    assert "| solver | grid | NFE 3 | NFE 8 |" in (out / "bench.md").read_text()


def _small_config(**kw):
    return SweepConfig(**{"solvers": ["ddim", "euler", "heun"], "grids": ["logsnr", "uniform"],
                          "nfe": [4, 6], "n": 80, **kw})


def test_finite_blow_ups_count_as_diverged(tmp_path):
    """A finite error far above the data's scale counts as diverged (one Euler / Euler-Maruyama
    step over VE's whole range: RMS error ~370, FD ~1e6 on unit-scale data; the summary said
    0 diverged while torchsde_srk reached FD 3.1e7), with its metrics and reason kept; an
    ordinary coarse result (one DDIM step) stays ok, and the printed count states the rule."""
    import sdekit
    from sdekit.bench.report import terminal_report
    problem = gaussian_problem(sdekit.VESDE(), dim=4)
    config = SweepConfig(solvers=["ddim", "euler", "euler_maruyama"], grids=["logsnr"], nfe=[1],
                         n=80)
    res = run_sweep(problem, config, tmp_path, progress=False)
    cells = {c["solver"]: c for c in res["cells"]}
    assert res["summary"]["diverged"] == 2 and res["summary"]["ok"] == 1
    assert cells["ddim"]["status"] == "ok" and cells["ddim"]["rms"] < 1
    assert cells["euler"]["status"] == "diverged" and "RMS error" in cells["euler"]["reason"]
    assert cells["euler"]["rms"] > 100 and cells["euler"]["fd"] > 1e4
    em = cells["euler_maruyama"]
    assert em["status"] == "diverged" and "FD" in em["reason"] and em["fd"] > 1e4
    text = terminal_report(res)
    assert "2 diverged (diverged = NaN/Inf, or RMS error > 10x" in text
    assert "diverged: euler: RMS error" in text


def test_resume_recomputes_no_finished_cell(tmp_path, monkeypatch):
    problem = gaussian_problem(dim=4)
    calls: list[str] = []
    real = runner.compute_cell

    def counting(prep, cell, config):
        if len(calls) == 5 and not getattr(counting, "resumed", False):
            raise KeyboardInterrupt  # interrupted after 5 finished cells
        calls.append(cell["id"])
        return real(prep, cell, config)

    monkeypatch.setattr(runner, "compute_cell", counting)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(problem, _small_config(), tmp_path, progress=False)
    first = list(calls)
    assert len(first) == 5
    counting.resumed = True
    res = run_sweep(problem, _small_config(), tmp_path, progress=False)
    second = calls[5:]
    assert not set(first) & set(second) and len(first) + len(second) == 12
    assert res["summary"]["ok"] == 12
    n = len(calls)
    res2 = run_sweep(problem, _small_config(), tmp_path, progress=False)
    assert len(calls) == n  # nothing recomputed
    assert [c["rms"] for c in res2["cells"]] == [c["rms"] for c in res["cells"]]
    run_sweep(problem, _small_config(), tmp_path, progress=False, resume=False)
    assert len(calls) == n + 12  # --fresh recomputes


def test_cached_cells_are_recomputed_when_the_solver_code_changes(tmp_path, monkeypatch):
    problem = gaussian_problem(dim=4)
    cfg = SweepConfig(solvers=["ddim", "heun"], grids=["logsnr"], nfe=[4], n=40)
    calls: list[str] = []
    real = runner.compute_cell
    monkeypatch.setattr(runner, "compute_cell",
                        lambda p, c, k: (calls.append(c["id"]), real(p, c, k))[1])
    run_sweep(problem, cfg, tmp_path, progress=False)
    real_fp = runner.solver_code_fingerprint
    monkeypatch.setattr(runner, "solver_code_fingerprint",
                        lambda name, opts=None: real_fp(name, opts) + ("-edited" if name == "heun"
                                                                       else ""))
    run_sweep(problem, cfg, tmp_path, progress=False)
    assert calls == ["ddim/logsnr/nfe=4", "heun/logsnr/nfe=4", "heun/logsnr/nfe=4"]


@pytest.mark.parametrize("sde_name", ["vp", "flow"])
def test_default_row_is_the_option_free_call(tmp_path, sde_name):
    """``--solvers default``: at each budget N the cell is ``sample(sde, model, x, steps=N)``
    with no solver or grid, on the sweep's own initial states; its note names what the rule
    picked, and running that choice explicitly gives the same endpoints."""
    import sdekit
    from sdekit.solvers import default_config
    sde = sdekit.FlowSDE() if sde_name == "flow" else sdekit.VPSDE()
    problem = gaussian_problem(sde, dim=4)
    config = SweepConfig(solvers=["default", "ddim"], grids=["logsnr"], nfe=[5, 10], n=40)
    res = run_sweep(problem, config, tmp_path, progress=False)
    rows = {c["id"]: c for c in res["cells"]}
    assert set(rows) == {"default/rule/nfe=5", "default/rule/nfe=10", "ddim/logsnr/nfe=5",
                         "ddim/logsnr/nfe=10"}
    prep = runner.prepare(problem, config, tmp_path)
    ref = problem.flow(prep.x_init.double())
    for n in (5, 10):
        c = rows[f"default/rule/nfe={n}"]
        rule = default_config(sde, n)
        assert c["status"] == "ok" and c["nfe"] == n and c["grid"] == "rule"
        assert rule["solver"] in c["note"] and rule["grid"] in c["note"]
        plain = sdekit.sample(sde, problem.model, prep.x_init, steps=n).x
        explicit = sdekit.sample(sde, problem.model, prep.x_init, steps=n,
                                 solver=rule["solver"], grid=rule["grid"],
                                 grid_options=rule["grid_options"], **rule["options"]).x
        assert torch.equal(plain, explicit)
        rms = float((plain.double() - ref).pow(2).mean().sqrt())
        assert c["rms"] == pytest.approx(rms, rel=1e-6)
    assert res["solvers"]["default"]["name"] == "default"
    again = run_sweep(problem, config, tmp_path, progress=False)   # read back from the cache
    assert [c["rms"] for c in again["cells"]] == [c["rms"] for c in res["cells"]]


def test_cli_sweeps_the_default_row_unless_told_otherwise(tmp_path, capsys):
    """Without --solvers the CLI sweeps the option-free row beside every solver: excluding every
    registered solver leaves exactly that row."""
    out = tmp_path / "b"
    assert main(["bench", "--exclude", ",".join(solver_names()), "--nfe", "5", "-n", "40",
                 "--timing-repeats", "0", "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert [c["id"] for c in doc["cells"]] == ["default/rule/nfe=5"]
    assert main(["bench", "--exclude", ",".join(["default", *solver_names()]), "--out",
                 str(out), "--quiet"]) == 2
    assert "leave no solver to run" in capsys.readouterr().err


def test_default_row_takes_no_options(tmp_path, capsys):
    from sdekit.bench.runner import ConfigError
    with pytest.raises(ConfigError, match="the 'default' row takes no options"):
        SweepConfig(solvers=["default"], solver_options={"default": {"order": 3}})
    assert main(["bench", "--solvers", "default", "-O", "default.order=3", "--out",
                 str(tmp_path), "--quiet"]) == 2
    assert "takes no options" in capsys.readouterr().err


def test_sharded_sweep_merges_on_rank0(tmp_path, monkeypatch):
    problem = gaussian_problem(dim=4)
    calls: list[str] = []
    real = runner.compute_cell
    monkeypatch.setattr(runner, "compute_cell",
                        lambda p, c, cfg: (calls.append(c["id"]), real(p, c, cfg))[1])
    assert run_sweep(problem, _small_config(), tmp_path, progress=False, rank=1,
                     world_size=2) is None
    rank1 = list(calls)
    res = run_sweep(problem, _small_config(), tmp_path, progress=False, rank=0, world_size=2,
                    timeout=30)
    rank0 = calls[len(rank1):]
    assert len(rank1) == len(rank0) == 6 and not set(rank1) & set(rank0)
    assert res["summary"]["ok"] == 12 and len(res["cells"]) == 12


# ------------------------------------------------------------------ user models
FACTORY_MODULE = textwrap.dedent('''
    import torch
    from sdekit import VPSDE, GaussianMixtureData

    def make():
        sde = VPSDE()
        data = GaussianMixtureData(sde, [1.0, 1.0], [[1.0, 0.0], [-1.0, 0.5]], 0.05)
        return {"sde": sde, "model": data.model("eps"),
                "sample_init": lambda n, g: torch.randn(n, 2, generator=g),
                "reference": data.sample(200, torch.Generator().manual_seed(1))}

    def wrong():
        return {"sde": VPSDE(), "model": lambda x, t: x, "sample_init": None}

    def short():
        return (VPSDE(),)
''')


def test_user_factory_problem(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_bench_model.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["bench", "--problem", "my_bench_model:make", "--solvers", "ddim", "--grids", "logsnr",
            "--nfe", "5", "--n", "50", "--out", str(out), "--quiet", "--formats", "json"]
    assert main(argv) == 0
    res = json.loads((out / "bench.json").read_text())
    assert res["reference"]["method"].startswith("dopri5") and res["reference"]["nfe"] > 0
    assert res["reference"]["error_estimate"] < 1e-3
    (cell,) = res["cells"]
    assert cell["status"] == "ok" and cell["rms"] > 0 and cell["sw"] > 0
    assert cell["kl"] is None  # not a Gaussian problem
    assert main(argv) == 0  # cached reference and cell: loads, recomputes nothing
    capsys.readouterr()
    for spec, msg in (("my_bench_model:wrong", "not a DiffusionModel"),
                      ("my_bench_model:short", "tuple of 1 items"),
                      ("my_bench_model:nothere", "no callable 'nothere'"),
                      ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'")):
        assert main(["bench", "--problem", spec, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert msg in err and "expected a factory() returning" in err, (spec, err)


def test_cli_grids_with_options_keep_their_commas(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--sde", "flow", "--solvers", "dpmpp_2m", "--grids",
               "logsnr,logsnr(lambda_floor=-2.5),uniform(shift=3, shift_type=linear)",
               "--nfe", "6", "--n", "64", "--timing-repeats", "0", "--formats", "json",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    cells = {c["grid"]: c for c in json.loads((out / "bench.json").read_text())["cells"]}
    assert set(cells) == {"logsnr", "logsnr(lambda_floor=-2.5)",
                          "uniform(shift=3, shift_type=linear)"}
    assert all(c["status"] == "ok" for c in cells.values())
    assert cells["logsnr"]["rms"] != cells["logsnr(lambda_floor=-2.5)"]["rms"]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, msg", [
    (["--solvers", "ddim,nope"], "unknown solver 'nope': expected one of"),
    (["--grids", "cubic"], "unknown grid 'cubic': expected one of"),
    (["--grids", "logsnr(rho=2)"], "--grids: grid option 'rho' does not apply to grid 'logsnr'"),
    (["--problem", "mnist"], "unknown --problem 'mnist': expected one of ['gaussian', 'gmm']"),
    (["--nfe", "0"], "--nfe=[0] is invalid"),
    (["--exclude", "nope"], "--exclude: unknown solver 'nope'"),
    (["--sde", "nope"], "unknown SDE name='nope'"),
    (["--problem", "checkpoint:/no/such/file.pt"], "/no/such/file.pt: no such file"),
    (["--metrics", "fid"], "unknown metric(s) ['fid']"),
])
def test_bad_input_names_the_valid_choices(tmp_path, capsys, argv, msg):
    assert main(["bench", *argv, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert msg in err, err
    if "unknown solver" in msg:
        assert all(n in err for n in solver_names())


def test_checkpoint_hook_reports_missing_or_bad_loader(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["bench", "--problem", f"checkpoint:{bad}", "--out", str(tmp_path),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    # the trainers' loader rejects the file, naming it (or, without sdekit.training, the error
    # says what checkpoint problems need)
    assert str(bad) in err and ("corrupt" in err or "load_model" in err), err
    with pytest.raises(BenchError, match="expected one of"):
        resolve_problem("")


def test_solvers_command_lists_the_registry(capsys):
    assert main(["solvers"]) == 0
    text = capsys.readouterr().out
    for name in solver_names():
        assert name in text
    assert "NFE/step" in text and "paper" in text
    assert main(["solvers", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in meta} == set(solver_names())


def test_trained_checkpoint_problem(tmp_path, capsys):
    pytest.importorskip("sdekit.training")
    run = tmp_path / "run"
    assert main(["train", "--data", "two_moons", "--steps", "20", "--width", "32", "--depth", "1",
                 "--out", str(run), "--no-progress", "--ckpt-every", "20", "--sample-n", "4",
                 "--threads", "1"]) == 0
    out = tmp_path / "out"
    assert main(["bench", "--problem", f"checkpoint:{run / 'checkpoint.pt'}", "--solvers", "ddim",
                 "--grids", "logsnr", "--nfe", "4", "--n", "64", "--out", str(out), "--quiet",
                 "--formats", "json"]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert res["problem"]["name"] == "checkpoint-run" and res["problem"]["shape"] == [2]
    assert res["reference"]["method"].startswith("dopri5 rtol=atol=1e-06")
    (cell,) = res["cells"]
    assert cell["status"] == "ok" and cell["nfe"] == 4 and cell["rms"] > 0 and cell["mmd"] >= 0


def test_cell_fingerprint_covers_what_every_solve_runs_through():
    """A cached cell is recomputed when the noise sources, grids, forward processes or model
    contract change, not only the solver's own module (a change of the seeded-noise stream once
    left cached stochastic cells stale)."""
    from pathlib import Path

    from sdekit.bench import runner
    names = {Path(f).relative_to(Path(runner.__file__).parents[1]).as_posix()
             for f in runner.fingerprint_files("ancestral")}
    for need in ("noise.py", "grids.py", "integrate.py", "sde/vp.py", "sde/base.py",
                 "dynamics/parameterization.py", "solvers/ode.py", "solvers/base.py"):
        assert need in names, need


# ------------------------------------------------------------------ typed cells, one build
def test_cells_read_back_the_saved_results_and_write_the_same_json():
    """The schema in sdekit/bench/cells.py covers every key of recorded results: each saved
    cell reads back as a Cell whose to_dict is the same object; a key outside it is refused."""
    from pathlib import Path

    from sdekit.bench.cells import Cell
    saved = json.loads((Path(__file__).parents[1] / "benchmarks/results/analytic_gaussian.json")
                       .read_text())
    statuses = set()
    for c in saved["cells"]:
        cell = Cell.from_dict(c)
        assert cell.to_dict() == c, c["id"]
        statuses.add(cell.status)
        assert (cell.run is None) == ("nfe" not in c) and (cell.timing is None) == ("ms_min"
                                                                                   not in c)
    assert statuses == {"ok", "skipped", "diverged"}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rsm'\]"):
        Cell.from_dict({**saved["cells"][0], "rsm": 1.0})


def test_sweep_builds_each_solver_configuration_once(tmp_path, monkeypatch):
    """One build per solver configuration (and per tolerance cell), however many cells and
    timing rounds run it: every solve of a cell, first and timed, uses the planned solver.
    (The sweep used to build each solver five times per configuration and once more for every
    solve.)"""
    from sdekit.bench.cells import Cell
    builds: list[str] = []
    real_get = runner.get_solver

    def counting(name, **options):
        builds.append(name)
        return real_get(name, **options)

    solves: dict[str, set[int]] = {}
    real_sample = runner.sample

    def spy(*a, solver, **kw):
        solves.setdefault(current[0], set()).add(id(solver))
        return real_sample(*a, solver=solver, **kw)

    current = [""]
    real_cell_solve = runner.cell_solve

    def cell_solve(prep, cell, config):
        current[0] = cell.id
        return real_cell_solve(prep, cell, config)

    monkeypatch.setattr(runner, "get_solver", counting)
    monkeypatch.setattr(runner, "sample", spy)
    monkeypatch.setattr(runner, "cell_solve", cell_solve)
    config = SweepConfig(solvers=["ddim", "heun", "dopri5"], grids=["logsnr", "uniform"],
                         nfe=[4, 8], tols=[1e-2, 1e-3], n=16, timing_repeats=2)
    plan = runner.make_plan(config)
    assert sorted(builds) == ["ddim", "dopri5", "dopri5", "dopri5", "heun"]  # 2 tolerance cells
    assert all(isinstance(c, Cell) and c.built is plan.solvers[c.solver]
               for c in plan.cells if c.tol is None)
    builds.clear()
    res = run_sweep(gaussian_problem(dim=2), config, tmp_path, progress=False)
    assert res["summary"]["ok"] == 10
    # the sweep's own plan (5 builds), and an option-free instance per name for the class
    # whose source the cache fingerprints
    assert len(builds) == 5 + 3, builds
    assert set(solves) == {c["id"] for c in res["cells"]}
    assert all(len(objs) == 1 for objs in solves.values())   # 1 + 2 timed solves, one solver


def test_adaptive_solvers_are_swept_over_tolerances():
    """Tolerance cells come from the solver's declared kind (``adaptive``), not from probing
    its constructor for a TypeError: every registered adaptive solver gets one cell per
    tolerance, built with it; given its own rtol it runs on the budget grid instead."""
    adaptive = [n for n in solver_names() if get_solver(n).adaptive]
    assert adaptive
    cells = plan_cells(SweepConfig(solvers=adaptive, grids=["logsnr"], nfe=[8],
                                   tols=[1e-2, 1e-4]))
    assert [(c.solver, c.tol) for c in cells] == [(n, t) for n in adaptive for t in (1e-2, 1e-4)]
    assert all(c.built.rtol == c.built.atol == c.tol for c in cells)
    (fixed,) = plan_cells(SweepConfig(solvers=["dopri5"], grids=["logsnr"], nfe=[8],
                                      solver_options={"dopri5": {"rtol": 1e-3}}))
    assert fixed.tol is None and fixed.steps == 8 and fixed.status == "planned"


@pytest.mark.parametrize("kw, field", [
    ({"nfe": [0]}, "nfe"), ({"tols": [-1.0]}, "tols"), ({"n": 1}, "n"), ({"n_ref": 1}, "n_ref"),
    ({"solvers": ["nope"]}, "solvers"), ({"grids": ["cubic"]}, "grids"),
    ({"solver_options": {"nope": {}}}, "solver_options"), ({"reference_tol": 2.0},
                                                           "reference_tol"),
    ({"timing_repeats": -1}, "timing_repeats"), ({"reference_solver": "nope"},
                                                 "reference_solver"),
])
def test_library_errors_name_the_setting_not_a_flag(kw, field):
    """A SweepConfig is checked when made; its error names the field and no command-line flag
    (the CLI maps field -> flag: tests above see '--nfe=[0] is invalid')."""
    from sdekit.bench.runner import ConfigError
    with pytest.raises(ConfigError) as e:
        SweepConfig(**kw)
    assert e.value.field == field and str(e.value).startswith(field) and "--" not in str(e.value)


def test_report_and_option_errors_name_the_setting_not_a_flag():
    from sdekit.bench import report
    from sdekit.bench.runner import ConfigError
    for check, bad, field in ((report.check_formats, ["pdf"], "formats"),
                              (report.check_metrics, ["fid"], "metrics")):
        with pytest.raises(ConfigError, match=rf"^{field}: unknown .*'{bad[0]}'") as e:
            check(bad)
        assert e.value.field == field and "--" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^formats: unknown format\(s\) \['pdf'\]"):
        report.write_reports({"cells": []}, "unused", ["pdf"])
    with pytest.raises(ConfigError, match=r"^solver_options for 'heun': .*unknown options") as e:
        plan_cells(SweepConfig(solvers=["heun"], solver_options={"heun": {"bogus": 1}}))
    assert "--" not in str(e.value)


def test_affine_gaussian_law_is_bitwise_repeatable():
    """The exact law of an affine push-forward is the same bits on every call (it solved by
    torch.linalg.lstsq, which on the CPU gave different last bits on repeated identical calls,
    so the bench's FD/KL columns did not reproduce exactly)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 64, generator=g, dtype=torch.float64)
    A = torch.randn(64, 64, generator=g, dtype=torch.float64)
    Y = X @ A.T + 0.5
    m, C = torch.zeros(64, dtype=torch.float64), torch.eye(64, dtype=torch.float64)
    runs = [M.affine_gaussian_law(X, Y, m, C) for _ in range(5)]
    assert all(torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1]) for r in runs)
    torch.testing.assert_close(runs[0][1], A @ A.T)
