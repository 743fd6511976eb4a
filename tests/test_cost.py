"""Compute accounting (sdekit.bench.cost): MACs of a toy MLP against a direct count of its calls
and parameters, the operator's cost in slots mode (K backbone passes) and start mode (one), the
counter leaving results unchanged, and the bench columns."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sdekit
from sdekit.bench import runner
from sdekit.bench.cost import count_macs, network_macs_per_sample
from sdekit.bench.problems import BenchProblem
from sdekit.bench.report import markdown_report
from sdekit.bench.runner import SweepConfig, run_sweep
from sdekit.dynamics.parameterization import DiffusionModel
from sdekit.models import build_network
from sdekit.models.fno import TrajectoryOperator


class ToyNet(nn.Module):
    """An MLP on (x, cond): its MACs per row are the sum of in * out over its Linear layers."""

    def __init__(self, d: int = 3, h: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d + 1, h), nn.Linear(h, h), nn.Linear(h, d)])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, cond.to(x)[:, None]], 1)
        for i, lin in enumerate(self.layers):
            h = lin(h) if i == len(self.layers) - 1 else torch.tanh(lin(h))
        return 0.5 * x + 0.1 * h

    def macs_per_row(self) -> int:
        return sum(lin.in_features * lin.out_features for lin in self.layers)


def _toy_problem(d: int = 3) -> BenchProblem:
    torch.manual_seed(0)
    sde = sdekit.VPSDE()
    net = ToyNet(d).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return BenchProblem(name="toy", sde=sde, model=DiffusionModel(net, sde, "x0"),
                        sample_init=lambda n, g: torch.randn(n, d, generator=g),
                        heldout=lambda n, g: torch.randn(n, d, generator=g),
                        fingerprint={"toy": d})


def test_mlp_macs_are_calls_times_in_out_per_row():
    problem = _toy_problem()
    net = problem.model.net.fn
    x = torch.randn(37, 3)
    per_row = net.macs_per_row()
    assert per_row == 4 * 16 + 16 * 16 + 16 * 3
    # the parameters (less the biases) are the MACs per row of a plain MLP
    assert per_row == sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight"))
    assert network_macs_per_sample(problem.model, x, 1.0) == per_row
    assert problem.model.nfe == 0  # measuring the unit costs no NFE
    for solver, steps in (("euler", 7), ("heun", 5), ("dpmpp_2m", 6)):
        with count_macs() as c:
            sol = sdekit.sample(problem.sde, problem.model, x, solver=solver, steps=steps)
        assert c.macs == sol.nfe * 37 * per_row, solver
        assert c.calls == sol.nfe * 3, solver  # three Linear layers per network call


def test_counter_changes_no_result():
    problem = _toy_problem()
    x = torch.randn(20, 3)
    plain = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", steps=6)
    with count_macs() as c:
        counted = sdekit.sample(problem.sde, problem.model, x, solver="dpmpp_2m", steps=6)
    assert c.macs > 0
    assert torch.equal(plain.x, counted.x) and plain.nfe == counted.nfe
    with count_macs() as outer:
        with count_macs() as inner:
            problem.model.raw(x, 0.5)
        problem.model.raw(x, 0.5)
    assert outer.macs == 2 * inner.macs  # nested blocks each keep their own total
    with count_macs() as after:  # the hooks are gone outside the blocks
        pass
    problem.model.raw(x, 0.5)
    assert after.macs == 0


def _head_macs(op: TrajectoryOperator, B: int, width: int, layers: int, modes: int) -> int:
    """MACs of everything but the backbone, counted from the layer sizes."""
    K, C, D = op.slots, op.state_shape[0], math.prod(op.state_shape)
    m = min(modes, K // 2 + 1)
    head = B * K * (2 * C * width + layers * width * width + width * C)  # lift, mix, proj
    head += layers * 4 * B * m * width * width  # complex weights on the m kept modes
    if not op.at_start:
        head += B * op.experts * K * D * D
        if op.experts > 1:
            gw = op.gate[0].out_features
            head += B * (D * gw + gw * K * op.experts) + B * K * op.experts * D
    return head


@pytest.mark.parametrize("experts", [1, 3])
def test_operator_in_slots_mode_costs_k_backbone_passes(experts):
    torch.manual_seed(0)
    D, K, B, width, layers, modes = 5, 4, 6, 8, 2, 2
    backbone = build_network({"name": "mlp", "data_shape": [D], "width": 32, "depth": 2})
    op = TrajectoryOperator(backbone, (D,), [2.0, 0.5, -1.0, -3.0], width=width, layers=layers,
                            modes=modes, experts=experts, gate_width=10)
    x = torch.randn(B, D)
    with count_macs() as one:
        backbone(x, torch.zeros(B))
    with torch.no_grad(), count_macs() as c:
        op(x)
    assert c.macs == K * one.macs + _head_macs(op, B, width, layers, modes)


def test_operator_in_start_mode_costs_one_backbone_pass():
    torch.manual_seed(0)
    D, B, width = 5, 6, 8
    backbone = build_network({"name": "mlp", "data_shape": [D], "width": 32, "depth": 2})
    lams = [2.0, 0.5, -1.0, -3.0]
    op = TrajectoryOperator(backbone, (D,), lams, width=width, layers=2, modes=2,
                            start=(0.1, 0.99),
                            coeffs=([0.2, 0.5, 0.8, 0.99], [0.98, 0.8, 0.6, 0.1]))
    x = torch.randn(B, D)
    with count_macs() as one:
        backbone(x, torch.zeros(B))
    with torch.no_grad(), count_macs() as c:
        op(x)
    assert c.macs == one.macs + _head_macs(op, B, width, 2, 2)


def test_unet_conv_macs_match_a_direct_count():
    net = build_network({"name": "unet", "in_channels": 1, "image_size": 8, "base_channels": 8,
                         "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                         "groups": 4})
    x = torch.randn(2, 1, 8, 8)
    seen: list[int] = []

    def direct(m, inp, out):  # the textbook count, per module, by hand
        if isinstance(m, nn.Conv2d):
            seen.append(out.numel() * m.in_channels // m.groups * m.kernel_size[0]
                        * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            seen.append(out.numel() * m.in_features)
        elif type(m).__name__ == "SelfAttention":
            b, ch, h, w = inp[0].shape
            seen.append(2 * b * (h * w) ** 2 * ch)

    handles = [m.register_forward_hook(direct) for m in net.modules()]
    with torch.no_grad(), count_macs() as c:
        net(x, torch.ones(2))
    for h in handles:
        h.remove()
    assert any(type(m).__name__ == "SelfAttention" for m in net.modules())
    assert c.macs == sum(seen) > 0


def test_bench_cells_report_passes_and_side_by_side_time(tmp_path, monkeypatch):
    """Each ok cell: MACs per sample = NFE x one teacher pass, passes = NFE; the operator cell
    (slots mode, its own backbone) reports K backbone passes in teacher units; wall time from
    the interleaved rounds, min <= median; the markdown has the cost tables."""
    from sdekit.solvers.operator import OperatorSampler
    problem = _toy_problem()
    fno = OperatorSampler().for_problem(problem.sde, problem.model, (3,))
    op, cfg = fno.operator
    order: list[str] = []
    real = runner.cell_solve

    def spy(prep, cell, config):
        order.append(cell["id"])
        return real(prep, cell, config)

    monkeypatch.setattr(runner, "cell_solve", spy)
    config = SweepConfig(solvers=["ddim", "heun", "fno"], grids=["logsnr"], nfe=[1, 4], n=50,
                         solver_options={"fno": {"operator": (op, cfg)}}, timing_repeats=3)
    res = run_sweep(problem, config, tmp_path, progress=False)
    per_row = problem.model.net.fn.macs_per_row()
    assert res["cost"]["teacher_macs_per_sample"] == per_row
    cells = {c["id"]: c for c in res["cells"] if c["status"] == "ok"}
    assert len(cells) == 4  # ddim x 2, heun at 4 (2 steps), fno at 1
    for c in cells.values():
        assert c["ms_min"] <= c["ms_median"] and c["timing_repeats"] == 3
        if c["solver"] != "fno":
            assert c["macs_per_sample"] == c["nfe"] * per_row and c["passes"] == c["nfe"]
    f = next(c for c in cells.values() if c["solver"] == "fno")
    x = torch.randn(1, 3)
    with count_macs() as one:
        op.backbone(x, torch.zeros(1))
    head = _head_macs(op, 1, op.proj.in_features, len(op.mix), op.specs[0].modes)
    assert f["nfe"] == 1
    assert f["macs_per_sample"] == op.slots * one.macs + head
    assert f["passes"] == pytest.approx((op.slots * one.macs + head) / per_row, rel=1e-12)
    assert f["passes"] > op.slots  # its backbone is larger than this toy teacher
    # 4 cells solved once each, then 3 interleaved rounds, each rotated by one cell
    ids = sorted(cells)
    rounds = [order[4 + 4 * r: 8 + 4 * r] for r in range(3)]
    assert order[:4] == [c["id"] for c in res["cells"] if c["status"] == "ok"]
    assert all(sorted(r) == ids for r in rounds) and rounds[0] != rounds[1]
    md = markdown_report(res)
    assert "Compute per sample [teacher passes]" in md and "side by side" in md
    assert f"1 teacher pass = {per_row:.4g} MACs per sample" in md


def test_analytic_model_has_no_teacher_unit(tmp_path):
    from sdekit.bench.problems import gaussian_problem
    res = run_sweep(gaussian_problem(dim=3), SweepConfig(solvers=["ddim"], grids=["logsnr"],
                                                         nfe=[3], n=20, timing_repeats=0),
                    tmp_path, progress=False)
    c = res["cells"][0]
    assert res["cost"]["teacher_macs_per_sample"] is None
    assert c["macs_per_sample"] == 0 and c["passes"] is None and "ms_median" not in c


def test_bad_timing_repeats():
    # the library names its setting, not the command line's flag (sdekit bench maps it)
    with pytest.raises(ValueError, match=r"^timing_repeats=-1 is invalid: expected an integer"):
        SweepConfig(timing_repeats=-1).validate()
