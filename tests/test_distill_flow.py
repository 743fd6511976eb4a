"""Operator distillation on the flow processes (alpha = 0 at T = 1): the teacher trajectories
start at t = 1 with a data-prediction solver (Heun cannot start there), recorded in the dataset
and the operator checkpoint; the CLI distils a flow checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

import sdekit
from sdekit.distill import (
    ALPHA_ZERO_TEACHER,
    generate_trajectories,
    load_operator,
    load_trajectories,
    output_times,
    teacher_solver,
    train_operator,
)


def _problem(sde):
    data = sdekit.GaussianData.random(sde, dim=4, eig_min=1e-2, seed=3, mean_scale=1.0)
    return data, data.model("flow")


@pytest.mark.parametrize("sde", [sdekit.FlowSDE(), sdekit.TrigFlowSDE()], ids=repr)
def test_flow_teacher_trajectories_follow_the_exact_flow_map(tmp_path, sde):
    """Before: Heun was the teacher and raised at t = 1. Now the default teacher on a process
    starting at alpha = 0 is the data-prediction UniPC of order 3, recorded in meta.json, and
    its trajectories are the exact Gaussian flow map to 1e-3 at every output time; the operator
    fitted to them (linear teacher: exact) samples from t = 1 with one NFE."""
    data, model = _problem(sde)
    assert float(sde.alpha(sde.T)) == 0.0
    generate_trajectories(tmp_path / "traj", sde, model, (4,), 256, steps_per_segment=16,
                          shard_size=128)
    x_T, traj, meta = load_trajectories(tmp_path / "traj")
    assert (meta["solver"], meta["solver_options"]) == ALPHA_ZERO_TEACHER
    assert meta["t_start"] == 1.0 and meta["teacher_nfe"] == 4 * 16
    torch.testing.assert_close(x_T.std(0), torch.ones(4), atol=0.15, rtol=0)   # the N(0, I) prior
    for k, t in enumerate(meta["times_out"]):
        exact = data.flow(x_T.double(), sde.T, t)
        err = (traj[:, k].double() - exact).abs().max()
        assert err < 1e-3, f"slot {k} (t={t:.4g}): max error {err:.2e}"
    train_operator(tmp_path / "traj", tmp_path / "op.pt", sde, steps=0)
    op, cfg = load_operator(tmp_path / "op.pt")
    assert cfg["teacher_solver"] == {"name": "unipc_bh2", "options": {"order": 3}}
    x = data.marginal_sample(32, sde.T, torch.Generator().manual_seed(5))
    grid = torch.cat([torch.tensor([sde.T], dtype=torch.float64), output_times(sde, 4)])
    sol = sdekit.sample(sde, model, x, solver="fno", operator=(op, cfg), grid=grid)
    assert sol.nfe == 1
    err = (sol.x.double() - data.flow(x.double(), sde.T, float(grid[-1]))).abs().max()
    assert err < 2e-3, err


def test_teacher_solver_choice_and_refusal(tmp_path):
    vp, flow = sdekit.VPSDE(), sdekit.FlowSDE()
    assert teacher_solver(vp) == ("heun", {})                    # unchanged off alpha = 0
    assert teacher_solver(flow) == ("unipc_bh2", {"order": 3})
    assert teacher_solver(flow, None, {"order": 2}) == ("unipc_bh2", {"order": 2})
    assert teacher_solver(flow, "dpmpp_3m") == ("dpmpp_3m", {})
    assert teacher_solver(vp, "rk4") == ("rk4", {})
    _, model = _problem(flow)
    with pytest.raises(ValueError, match=r"solver='heun' cannot start .* alpha = 0.*unipc_bh2"):
        generate_trajectories(tmp_path / "t", flow, model, (4,), 8, solver="heun")
    assert not (tmp_path / "t").exists(), "refused before any file is written"


@pytest.mark.parametrize("solver, match", [
    # off alpha = 0 both used to pass: meta.json was written, then sample() failed ("unknown
    # solver", or dopri5's "save_at can only hold the first and last times")
    ("nope", "unknown solver 'nope'"),
    ("dopri5", "solver='dopri5' is invalid for the teacher: it runs its own loop"),
    # used to be accepted: the operator learned the mean of the teacher's random draws
    ("euler_maruyama", "solver='euler_maruyama' is invalid for the teacher: it is stochastic"),
    ("ancestral", "solver='ancestral' is invalid for the teacher: it is stochastic"),
])
def test_teacher_solver_unknown_own_loop_or_stochastic_is_refused(tmp_path, solver, match):
    sde = sdekit.VPSDE()
    _, model = _problem(sde)
    with pytest.raises(ValueError, match=match):
        generate_trajectories(tmp_path / "t", sde, model, (4,), 8, solver=solver)
    assert not (tmp_path / "t").exists(), "refused before any file is written"


def test_vp_operator_config_is_unchanged(tmp_path):
    """Off alpha = 0 the teacher is Heun as before and the operator config has no new key."""
    sde = sdekit.VPSDE()
    data = sdekit.GaussianData.random(sde, dim=4, eig_min=1e-2, seed=3, mean_scale=1.0)
    generate_trajectories(tmp_path / "traj", sde, data.model(), (4,), 64, steps_per_segment=2,
                          shard_size=64)
    assert load_trajectories(tmp_path / "traj")[2]["solver"] == "heun"
    train_operator(tmp_path / "traj", tmp_path / "op.pt", sde, steps=0)
    assert "teacher_solver" not in load_operator(tmp_path / "op.pt")[1]


def _tiny_flow_checkpoint(tmp_path, steps: int, batch: int, sample_n: int) -> str:
    """A few steps of `sdekit train --objective flow` on two_moons: its checkpoint's path."""
    from sdekit.cli.main import main as cli
    run = tmp_path / "run"
    assert cli(["train", "--data", "two_moons", "--objective", "flow", "--steps", str(steps),
                "--width", "16", "--depth", "1", "--batch-size", str(batch), "--ckpt-every",
                str(steps), "--sample-n", str(sample_n), "--sample-steps", "2", "--no-progress",
                "--device", "cpu", "--out", str(run)]) == 0
    return str(run / "checkpoint.pt")


def test_cli_distills_a_flow_checkpoint(tmp_path):
    """`sdekit train --objective flow` -> `sdekit distill` (raised before: Heun from t = 1)
    -> `sdekit sample --solver fno` from t = 1 with one NFE; an explicit --solver heun is a
    usage error naming the solvers that start there."""
    import numpy as np

    from sdekit.cli.main import main as cli
    ck = _tiny_flow_checkpoint(tmp_path, steps=3, batch=32, sample_n=16)
    op_dir = tmp_path / "op"
    assert cli(["distill", "--checkpoint", ck, "--out", str(op_dir), "--n", "64",
                "--steps-per-segment", "2", "--train-steps", "2", "--batch", "16",
                "--quiet"]) == 0
    meta = json.loads((op_dir / "trajectories" / "meta.json").read_text())
    assert (meta["solver"], meta["solver_options"], meta["t_start"]) == ("unipc_bh2",
                                                                         {"order": 3}, 1.0)
    assert load_operator(op_dir / "operator.pt")[1]["teacher_solver"]["name"] == "unipc_bh2"
    out = tmp_path / "s"
    assert cli(["sample", "--checkpoint", ck, "--solver", "fno", "--operator",
                str(op_dir / "operator.pt"), "--n", "8", "--out", str(out)]) == 0
    z = np.load(str(out) + ".npz")
    assert z["x"].shape == (8, 2) and np.isfinite(z["x"]).all() and '"nfe": 1' in str(z["meta"])
    assert cli(["distill", "--checkpoint", ck, "--out", str(tmp_path / "h"), "--n", "8",
                "--solver", "heun", "--quiet"]) == 2


def test_start_mode_is_refused_at_alpha_zero_and_auto_picks_slots(tmp_path):
    """backbone_at='start' runs the backbone at lambda(T) = -inf on a flow process: before, a
    bare 'math domain error' after the trajectories; now a clear error before any work, and
    the CLI's auto (with --init-from-teacher) picks slots there."""
    from sdekit.cli.main import main as cli
    sde = sdekit.FlowSDE()
    with pytest.raises(ValueError, match=r"backbone_at='start' .* alpha = 0.*'slots'"):
        train_operator(tmp_path / "none", tmp_path / "op.pt", sde, backbone_at="start")
    ck = _tiny_flow_checkpoint(tmp_path, steps=2, batch=16, sample_n=8)
    assert cli(["distill", "--checkpoint", ck, "--out", str(tmp_path / "o"), "--n", "32",
                "--steps-per-segment", "1", "--train-steps", "1", "--batch", "16",
                "--init-from-teacher", "--quiet"]) == 0
    cfg = load_operator(tmp_path / "o" / "operator.pt")[1]
    assert "start" not in cfg["operator"] and cfg["train"]["init_backbone"]
    assert cli(["distill", "--checkpoint", ck, "--out", str(tmp_path / "s"), "--n", "8",
                "--backbone-at", "start", "--quiet"]) == 2
    assert not (tmp_path / "s" / "trajectories").exists(), "refused before the trajectories"


def test_distill_a_flow_problem_then_bench_fno(tmp_path):
    """`sdekit distill --problem gaussian --sde flow` (exact flow teacher, Heun before: an
    error) then `sdekit bench --sde flow -O fno.operator=...`: the operator of the linear
    teacher is exact, one NFE from t = 1."""
    from sdekit.cli.main import main as cli
    op = tmp_path / "op"
    assert cli(["distill", "--problem", "gaussian", "--sde", "flow", "--dim", "3", "--out",
                str(op), "--n", "256", "--steps-per-segment", "16", "--train-steps", "0",
                "--quiet"]) == 0
    assert json.loads((op / "trajectories" / "meta.json").read_text())["solver"] == "unipc_bh2"
    assert cli(["bench", "--problem", "gaussian", "--sde", "flow", "--dim", "3", "--solvers",
                "fno", "--grids", "logsnr", "--nfe", "1", "-n", "64", "--quiet", "--formats",
                "json", "-O", f"fno.operator={op / 'operator.pt'}", "--out",
                str(tmp_path / "b")]) == 0
    (cell,) = json.loads((tmp_path / "b" / "bench.json").read_text())["cells"]
    assert (cell["status"], cell["nfe"]) == ("ok", 1) and cell["rms"] < 2e-3, cell
