"""The learned operator sampler (DSNO): spectral layer, linear teacher, dataset and training
resume, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import sdekit
from sdekit.distill import (
    generate_trajectories,
    load_operator,
    load_trajectories,
    output_times,
    train_operator,
)
from sdekit.models.fno import TemporalSpectralConv


def test_spectral_layer_matches_a_direct_dft():
    torch.manual_seed(0)
    B, K, Ci, Co, M = 2, 8, 3, 4, 3
    layer = TemporalSpectralConv(Ci, Co, M).double()
    h = torch.randn(B, K, Ci, 5, dtype=torch.float64)   # one trailing "spatial" axis
    W = torch.view_as_complex(layer.weight.detach().contiguous())      # (Ci, Co, M)
    t = torch.arange(K, dtype=torch.float64)
    out = torch.zeros(B, K, Co, 5, dtype=torch.float64)
    for k in range(M):
        basis = torch.exp(-2j * math.pi * k * t / K)                       # forward DFT row
        Hk = torch.einsum("t,btis->bis", basis, h.to(torch.complex128))
        Yk = torch.einsum("bis,io->bos", Hk, W[:, :, k])
        # real inverse DFT of a half spectrum: bin 0 once, bins 1..K/2-1 twice (conjugates)
        scale = 1.0 if k == 0 else 2.0
        out += scale * torch.real(torch.einsum("t,bos->btos", torch.exp(2j * math.pi * k * t / K),
                                               Yk)) / K
    torch.testing.assert_close(layer(h), out, rtol=1e-10, atol=1e-10)


def _gaussian():
    sde = sdekit.VPSDE()
    return sde, sdekit.GaussianData.random(sde, dim=4, eig_min=1e-2, seed=3, mean_scale=1.0)


def test_operator_reproduces_a_linear_teacher_exactly(tmp_path):
    """Gaussian data: the PF-ODE trajectory is affine in x_T, and a short fit reproduces the
    teacher (and so the exact flow to the teacher's accuracy) at every output time."""
    sde, data = _gaussian()
    generate_trajectories(tmp_path / "traj", sde, data.model(), (4,), 600, solver="rk4",
                          steps_per_segment=16, shard_size=300)
    op = train_operator(tmp_path / "traj", tmp_path / "op.pt", sde, steps=30,
                        batch=64, checkpoint_every=30)
    x_T = data.marginal_sample(64, sde.T, torch.Generator().manual_seed(9))
    times = output_times(sde, 4)
    with torch.no_grad():
        pred = op(x_T)
    for k, t in enumerate(times):
        exact = data.flow(x_T.double(), sde.T, float(t))
        assert (pred[:, k].double() - exact).abs().max() < 2e-3, f"slot {k}"
    # through the registry, with one measured NFE
    sol = sdekit.sample(sde, data.model(), x_T, solver="fno", operator=tmp_path / "op.pt",
                        grid=torch.cat([torch.tensor([sde.T], dtype=torch.float64), times]))
    assert sol.nfe == 1
    torch.testing.assert_close(sol.x, pred[:, -1])


def test_trajectory_dataset_resumes_and_refuses_other_settings(tmp_path):
    sde, data = _gaussian()
    model = data.model()
    kw = dict(solver="heun", steps_per_segment=4, shard_size=100)
    generate_trajectories(tmp_path, sde, model, (4,), 300, **kw)
    x1, tr1, meta = load_trajectories(tmp_path)
    assert x1.shape == (300, 4) and tr1.shape == (300, 4, 4) and meta["teacher_nfe"] > 0
    (tmp_path / "shard_00001.pt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_trajectories(tmp_path)
    before = model.nfe
    generate_trajectories(tmp_path, sde, model, (4,), 300, **kw)
    assert model.nfe - before == 4 * 4 * 2, "only the missing shard is recomputed"
    x2, tr2, _ = load_trajectories(tmp_path)
    torch.testing.assert_close(x2, x1)
    torch.testing.assert_close(tr2, tr1)
    with pytest.raises(ValueError, match="steps_per_segment"):
        generate_trajectories(tmp_path, sde, model, (4,), 300, solver="heun",
                              steps_per_segment=8, shard_size=100)


def test_training_resume_equals_an_uninterrupted_run(tmp_path):
    """3 steps, stop, resume to 6 == 6 steps in one go (counter-based batches, saved Adam
    state and EMA)."""
    sde, data = _gaussian()
    generate_trajectories(tmp_path / "traj", sde, data.model(), (4,), 200, steps_per_segment=4,
                          shard_size=200)
    kw = dict(batch=32, checkpoint_every=3)
    full = train_operator(tmp_path / "traj", tmp_path / "a.pt", sde, steps=6, **kw)
    train_operator(tmp_path / "traj", tmp_path / "b.pt", sde, steps=6, until=3, **kw)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 3
    resumed = train_operator(tmp_path / "traj", tmp_path / "b.pt", sde, steps=6, **kw)
    for (k, p1), p2 in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="another config"):
        train_operator(tmp_path / "traj", tmp_path / "b.pt", sde, steps=6,
                       batch=16, checkpoint_every=3)


def test_operator_bad_input(tmp_path):
    sde, data = _gaussian()
    generate_trajectories(tmp_path / "traj", sde, data.model(), (4,), 100, steps_per_segment=4,
                          shard_size=100)
    train_operator(tmp_path / "traj", tmp_path / "op.pt", sde, steps=0)
    x = data.marginal_sample(3, sde.T)
    with pytest.raises(ValueError, match="not in the operator's output grid"):
        sdekit.sample(sde, data.model(), x, solver="fno", operator=tmp_path / "op.pt", steps=3,
                      t_end=0.5)
    other = sdekit.VPSDE(beta_max=10.0)
    with pytest.raises(ValueError, match="distilled on VPSDE"):
        sdekit.sample(other, sdekit.GaussianData.random(other, dim=4).model(), x,
                      solver="fno", operator=tmp_path / "op.pt", steps=3)
    with pytest.raises(ValueError, match="needs a trained operator"):
        sdekit.sample(sde, data.model(), x, solver="fno", steps=3)
    with pytest.raises(ValueError, match="states of shape"):
        sdekit.sample(sde, lambda y, t: y, torch.zeros(3, 5), solver="fno",
                      operator=tmp_path / "op.pt",
                      grid=torch.cat([torch.tensor([sde.T], dtype=torch.float64),
                                      output_times(sde, 4)]))


def test_distill_and_sample_through_the_cli(tmp_path):
    """train a tiny toy model -> sdekit distill -> sdekit sample --solver fno (one NFE)."""
    import numpy as np

    from sdekit.cli.main import main as cli
    run = tmp_path / "run"
    assert cli(["train", "--data", "eight_gaussians", "--out", str(run), "--steps", "20",
                "--width", "32", "--depth", "1", "--ckpt-every", "20", "--no-progress",
                "--sample-n", "16"]) == 0
    op_dir = tmp_path / "op"
    assert cli(["distill", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(op_dir),
                "--n", "128", "--train-steps", "4", "--batch", "32"]) == 0
    assert (op_dir / "operator.pt").exists() and (op_dir / "distill.json").exists()
    out = tmp_path / "s"
    assert cli(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--solver", "fno",
                "--operator", str(op_dir / "operator.pt"), "--n", "10", "--out", str(out)]) == 0
    z = np.load(str(out) + ".npz")
    assert z["x"].shape == (10, 2) and np.isfinite(z["x"]).all()
    assert '"nfe": 1' in str(z["meta"])
    assert cli(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--solver", "ddim",
                "--operator", str(op_dir / "operator.pt"), "--n", "4", "--out", str(out)]) == 2
    # --init-from-teacher: by default one backbone pass at x_T's noise level (backbone_at start)
    assert cli(["distill", "--checkpoint", str(run / "checkpoint.pt"),
                "--out", str(tmp_path / "o2"), "--n", "128", "--train-steps", "2", "--batch", "32",
                "--init-from-teacher"]) == 0
    _, cfg = load_operator(tmp_path / "o2" / "operator.pt")
    assert "start" in cfg["operator"] and cfg["train"]["init_backbone"]
    assert "start" not in load_operator(op_dir / "operator.pt")[1]["operator"]
    # --fold-time: the folded start-mode operator has fewer parameters than the teacher's net
    assert cli(["distill", "--checkpoint", str(run / "checkpoint.pt"),
                "--out", str(tmp_path / "o3"), "--n", "128", "--train-steps", "2", "--batch", "32",
                "--init-from-teacher", "--fold-time", "--width", "4", "--layers", "1"]) == 0
    op3, cfg3 = load_operator(tmp_path / "o3" / "operator.pt")
    teacher = sdekit.training.checkpoint.load_model(run / "checkpoint.pt")[0]
    assert cfg3["operator"]["fold_time"] is True
    assert (sum(p.numel() for p in op3.parameters())
            < sum(p.numel() for p in teacher.parameters()))
    assert cli(["distill", "--checkpoint", str(run / "checkpoint.pt"), "--out",
                str(tmp_path / "o4"), "--n", "128", "--fold-time", "--backbone-at", "slots"]) == 2
    assert not (tmp_path / "o4" / "trajectories").exists(), "refused before any work"


def test_bench_runs_fno_once_at_its_own_nfe_and_rereads_a_changed_operator(tmp_path):
    """`sdekit distill --problem gaussian` then `sdekit bench ... -O fno.operator=PATH`: the
    operator of a linear teacher is exact, so its one-pass RMS is tiny; fno is planned on one
    grid and only at budget 1; a retrained operator at the same path is not served from cache."""
    import json

    from sdekit.bench.runner import SweepConfig, plan_cells
    from sdekit.cli.main import main as cli
    cells = plan_cells(SweepConfig(solvers=["fno", "ddim"], grids=["logsnr", "karras"],
                                   nfe=[1, 4], n=8))
    fno = [c for c in cells if c["solver"] == "fno"]
    assert [(c["budget"], c["status"]) for c in fno] == [(1, "planned"), (4, "skipped")]
    assert "always costs 1 NFE" in fno[1]["reason"]
    assert sum(c["solver"] == "ddim" for c in cells) == 4

    op_dir = tmp_path / "op"
    distill = ["distill", "--problem", "gaussian", "--dim", "3", "--out", str(op_dir),
               "--n", "256", "--solver", "rk4", "--steps-per-segment", "16"]
    assert cli(distill + ["--train-steps", "0", "--init-from-teacher"]) == 2  # not a checkpoint
    assert not (op_dir / "trajectories").exists(), "the error comes before any work"
    assert cli(distill + ["--train-steps", "0"]) == 0
    meta = json.loads((op_dir / "trajectories" / "meta.json").read_text())
    assert meta["teacher"].startswith("3-dim Gaussian data")
    bench = ["bench", "--problem", "gaussian", "--dim", "3", "--solvers", "fno,ddim",
             "--grids", "logsnr", "--nfe", "1,4", "-n", "64", "--quiet", "--formats", "json",
             "-O", f"fno.operator={op_dir / 'operator.pt'}", "--out", str(tmp_path / "b")]

    def rms() -> float:
        assert cli(bench) == 0
        res = json.loads((tmp_path / "b" / "bench.json").read_text())
        (cell,) = [c for c in res["cells"] if c["solver"] == "fno" and c["status"] == "ok"]
        assert cell["nfe"] == 1
        return cell["rms"]

    assert rms() < 2e-3
    from sdekit.training.checkpoint import load_checkpoint, save_checkpoint
    ck = load_checkpoint(op_dir / "operator.pt")
    save_checkpoint(op_dir / "operator.pt", config=ck["config"], model=ck["model"],
                    ema={k: torch.zeros_like(v) for k, v in ck["ema"].items()},
                    optimizer=ck["optimizer"], step=ck["step"])
    assert rms() > 0.1, "the cached cell of the old operator was reused"


def test_expert_linear_paths_recover_a_piecewise_affine_teacher():
    """Two modes, each reached by its own affine map of x_T: k-means on the endpoints plus
    per-cluster least squares recovers both maps exactly, and the gate's classifier fit learns
    which x_T goes where."""
    from sdekit.models import MLPScoreNet
    from sdekit.models.fno import TrajectoryOperator
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    A = torch.tensor([[[0.3, 0.1], [0.0, 0.2]], [[0.2, -0.1], [0.05, 0.4]]], dtype=torch.float64)
    b = torch.tensor([[4.0, 0.0], [-4.0, 1.0]], dtype=torch.float64)
    side = (x[:, 0] < 0).long()
    y = torch.einsum("bij,bj->bi", A[side], x) + b[side]
    traj = torch.stack([0.5 * y + 0.5 * x, y], 1)
    torch.manual_seed(0)
    op = TrajectoryOperator(MLPScoreNet((2,), width=16, depth=1), (2,), [0.0, 2.0],
                            experts=2).double()
    op.fit_linear_path(x, traj, gate_steps=0)
    fitted = {round(float(op.skip_bias[e, 1, 0].detach())): (op.skip_weight[e, 1].detach(),
                                                    op.skip_bias[e, 1].detach())
              for e in range(2)}
    for s, key in ((0, 4), (1, -4)):
        torch.testing.assert_close(fitted[key][0], A[s], rtol=0, atol=1e-6)
        torch.testing.assert_close(fitted[key][1], b[s], rtol=0, atol=1e-6)
    rms = lambda: float((op.linear_path(x) - traj).detach().pow(2).mean().sqrt())  # noqa: E731
    uniform = rms()  # the gate is not fitted yet
    op.fit_linear_path(x, traj)
    fitted = rms()
    assert uniform > 1.0 and fitted < 0.1 * uniform, (uniform, fitted)


def test_operator_passes_a_denoiser_backbone_its_sigma_tilde():
    from sdekit.models.fno import TrajectoryOperator

    class Recorder(torch.nn.Module):
        time_input = "sigma_tilde"

        def __init__(self):
            super().__init__()
            self.seen = None

        def forward(self, x, cond):
            self.seen = cond
            return x

    lam = [-2.0, 0.5, 3.0]
    op = TrajectoryOperator(Recorder(), (2,), lam)
    op(torch.zeros(4, 2))
    torch.testing.assert_close(op.backbone.seen, torch.tensor(lam).exp().reciprocal().repeat(4))
    with pytest.raises(ValueError, match="experts=0 is invalid"):
        TrajectoryOperator(Recorder(), (2,), lam, experts=0)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "denoiser"])
def test_start_mode_begins_as_the_teachers_one_step_ddim(sde_name, prediction):
    """backbone_at='start': one backbone pass at x_T's own noise level and, before any
    training (zero correction), every slot is exactly the one-step DDIM solve from T to its time
    with the same network, whatever its output parametrisation and forward SDE."""
    from sdekit.models import MLPScoreNet, wrap
    from sdekit.models.fno import TrajectoryOperator
    from sdekit.sde import get_sde
    sde = get_sde(sde_name)
    torch.manual_seed(0)
    net = MLPScoreNet((3,), width=32, depth=2, prediction=prediction).double()
    times = output_times(sde, 3)
    t = torch.cat([torch.tensor([sde.T], dtype=torch.float64), times])
    op = TrajectoryOperator(net, (3,), [float(sde.lambda_(s)) for s in times],
                            start=[float(sde.alpha(t[0])), float(sde.sigma(t[0]))],
                            coeffs=[sde.alpha(times).tolist(), sde.sigma(times).tolist()]).double()
    calls = []
    op.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x_T = float(sde.prior_std) * torch.randn(16, 3, generator=torch.Generator().manual_seed(1),
                                             dtype=torch.float64)
    with torch.no_grad():
        pred = op(x_T)
    assert calls == [16], "one backbone pass on the batch"
    for k in range(len(times)):
        ddim = sdekit.sample(sde, wrap(net, sde), x_T, solver="ddim", grid=t[[0, k + 1]],
                             dtype=torch.float64)
        torch.testing.assert_close(pred[:, k], ddim.x, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="start and coeffs go together"):
        TrajectoryOperator(net, (3,), [0.0, 1.0], start=[0.1, 0.99])
    with pytest.raises(ValueError, match="needs the linear path"):
        TrajectoryOperator(net, (3,), [0.0], start=[0.1, 0.99], coeffs=[[1.0], [0.0]], experts=2)


def test_start_mode_trains_resumes_and_samples(tmp_path):
    """train_operator(backbone_at='start') through its checkpoint and the fno solver; a bad
    backbone_at value is named."""
    sde, data = _gaussian()
    generate_trajectories(tmp_path / "traj", sde, data.model(), (4,), 256, solver="heun",
                          steps_per_segment=4, shard_size=256)
    kw = dict(backbone_at="start", batch=32, checkpoint_every=4)
    full = train_operator(tmp_path / "traj", tmp_path / "a.pt", sde, steps=8, **kw)
    train_operator(tmp_path / "traj", tmp_path / "b.pt", sde, steps=8, until=4, **kw)
    resumed = train_operator(tmp_path / "traj", tmp_path / "b.pt", sde, steps=8, **kw)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    x_T, traj, _ = load_trajectories(tmp_path / "traj")
    sol = sdekit.sample(sde, data.model(), x_T[:8], solver="fno", operator=tmp_path / "a.pt",
                        grid=torch.cat([torch.tensor([sde.T], dtype=torch.float64),
                                        output_times(sde, 4)]))
    assert sol.nfe == 1 and torch.isfinite(sol.x).all()
    with torch.no_grad():
        torch.testing.assert_close(sol.x, full(x_T[:8])[:, -1])
    with pytest.raises(ValueError, match="backbone_at='middle' is invalid"):
        train_operator(tmp_path / "traj", tmp_path / "c.pt", sde, backbone_at="middle")


def _unet(**kw):
    from sdekit.models import UNet
    return UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2),
                num_res_blocks=1, attn_resolutions=(), **kw)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_fix_noise_level_keeps_the_function_at_that_level_with_fewer_parameters(kind):
    """ScoreNet.fix_noise_level folds the embedding MLP and each block's projection of it into
    one vector per block: the same output at that noise level, fewer parameters and MACs (by a
    direct count of the removed layers), and a class-conditional network is refused."""
    from sdekit.bench.cost import count_macs
    from sdekit.models import MLPScoreNet
    torch.manual_seed(0)
    net = (MLPScoreNet((3,), width=16, depth=2) if kind == "mlp" else _unet()).double()
    with torch.no_grad():
        for p in net.parameters():   # leave no zero-initialised layer
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn((5,) + tuple(net.data_shape), dtype=torch.float64)
    lam = torch.tensor(-2.5, dtype=torch.float64)
    projections = [m for n, m in net.named_modules() if n.endswith(".emb")]
    removed = (sum(p.numel() for p in net.emb_mlp.parameters())
               + sum(p.numel() for m in projections for p in m.parameters()))
    kept = sum(m.out_features for m in projections)
    linears = projections + [m for m in net.emb_mlp.modules() if isinstance(m, torch.nn.Linear)]
    n0 = sum(p.numel() for p in net.parameters())
    with torch.no_grad(), count_macs() as before:
        ref = net(x, lam)
    net.fix_noise_level(float(lam))
    with torch.no_grad(), count_macs() as after:
        out = net(x, lam)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in net.parameters()) == n0 - removed + kept
    assert before.macs - after.macs == 5 * sum(m.in_features * m.out_features for m in linears)
    cond = MLPScoreNet((3,), width=16, depth=1, num_classes=3)
    with pytest.raises(ValueError, match="class-conditional"):
        cond.fix_noise_level(0.0)


@pytest.mark.parametrize("prediction", ["eps", "denoiser"])
def test_fold_time_operator_equals_the_unfolded_one_and_round_trips(tmp_path, prediction):
    """TrajectoryOperator(fold_time=True) on a teacher's network computes what the unfolded
    start-mode operator does (the teacher's one-step DDIM before training); train_operator
    records fold_time, and the checkpoint loads back to the same function; fold_time is
    refused without a start time."""
    from sdekit.models.fno import TrajectoryOperator
    sde = sdekit.VPSDE()
    times = output_times(sde, 3)
    start = [float(sde.alpha(torch.tensor(sde.T))), float(sde.sigma(torch.tensor(sde.T)))]
    kw = dict(start=start, coeffs=[sde.alpha(times).tolist(), sde.sigma(times).tolist()])
    lams = [float(sde.lambda_(s)) for s in times]
    torch.manual_seed(0)
    net = _unet(prediction=prediction).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    plain = TrajectoryOperator(net, (1, 8, 8), lams, **kw).double()
    other = _unet(prediction=prediction).double()
    other.load_state_dict(state)
    folded = TrajectoryOperator(other, (1, 8, 8), lams, fold_time=True, **kw).double()
    x_T = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x_T), plain(x_T), rtol=1e-10, atol=1e-10)
    assert (sum(p.numel() for p in folded.parameters())
            < sum(p.numel() for p in plain.parameters()))
    with pytest.raises(ValueError, match="fold_time=True needs start="):
        TrajectoryOperator(_unet(), (1, 8, 8), lams, fold_time=True)


def test_train_operator_fold_time_resumes_and_refuses_slots(tmp_path):
    sde, data = _gaussian()
    generate_trajectories(tmp_path / "traj", sde, data.model(), (4,), 128, solver="heun",
                          steps_per_segment=4, shard_size=128)
    kw = dict(backbone_at="start", fold_time=True, batch=32, checkpoint_every=4,
              backbone={"name": "mlp", "data_shape": [4], "width": 16, "depth": 2})
    full = train_operator(tmp_path / "traj", tmp_path / "a.pt", sde, steps=8, **kw)
    train_operator(tmp_path / "traj", tmp_path / "b.pt", sde, steps=8, until=4, **kw)
    resumed = train_operator(tmp_path / "traj", tmp_path / "b.pt", sde, steps=8, **kw)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    op, cfg = load_operator(tmp_path / "a.pt")
    assert cfg["operator"]["fold_time"] is True
    x_T, _, _ = load_trajectories(tmp_path / "traj")
    with torch.no_grad():
        torch.testing.assert_close(op(x_T[:8]), full(x_T[:8]))
    with pytest.raises(ValueError, match="fold_time=True is invalid"):
        train_operator(tmp_path / "traj", tmp_path / "c.pt", sde, backbone_at="slots",
                       fold_time=True)
    with pytest.raises(ValueError, match="class-conditional backbone"):
        train_operator(tmp_path / "traj", tmp_path / "c.pt", sde, **{
            **kw, "backbone": {**kw["backbone"], "num_classes": 3}})
