"""The learned one-pass sampler: a trained trajectory operator used as a solver."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import LearnedSampler, Problem
from .registry import register


@register("fno")
class OperatorSampler(LearnedSampler):
    """DSNO-style learned sampler (Zheng et al. 2023, ICML, "Fast Sampling of Diffusion Models
    via Operator Learning"): one pass of a :class:`~sdekit.models.fno.TrajectoryOperator`
    replaces the ODE solve. Order undeclared; NFE = its network passes (1). ``operator`` is an
    operator checkpoint path (from ``sdekit distill``) or a ``(TrajectoryOperator, config)``
    pair. The call's ``t_start`` must be the operator's and ``t_end`` one of its output times;
    the forward SDE must be the one it was distilled on, and a model whose network was loaded
    from a checkpoint must be the operator's teacher (same weights hash).
    """

    family = "learned"
    default_grid = "uniform"
    paper = "Zheng et al. 2023, Fast Sampling of Diffusion Models via Operator Learning (ICML)"

    def __init__(self, operator: Any = None) -> None:
        self.source = "the operator"
        if isinstance(operator, (str, bytes)) or hasattr(operator, "__fspath__"):
            from ..distill import load_operator
            self.source = f"operator {str(operator)!r}"
            operator = load_operator(operator)
        if operator is not None and not (isinstance(operator, tuple) and len(operator) == 2):
            raise ValueError("operator must be a checkpoint path or an (operator, config) pair")
        self.operator = operator

    def check_teacher(self, model: Any) -> None:
        """Raise a ValueError when ``model`` is known not to be the operator's teacher."""
        if self.operator is not None:
            from ..distill import check_teacher
            check_teacher(self.operator[1], model, self.source)

    def expected_nfe(self, steps: int) -> int:
        return 1

    def check_start(self, p: Problem) -> None:
        """A guided model cannot be sampled: the operator replaces the model's calls, so its
        guidance would be silently dropped. A start at alpha = 0 (flow matching at t = 1) is
        fine: the operator maps x_T to the trajectory without a step or a model call, from the
        start it was distilled from (checked in :meth:`integrate`). The registry's
        ``starts_at_alpha_zero`` stays False: it declares a stepping solver's first step."""
        from ..guidance import is_guided
        if is_guided(p.model):
            raise ValueError("solver 'fno' replaces the model by its distilled operator and never "
                             "calls it, so it cannot apply the model's guidance (classifier-free "
                             "or classifier): use a solver that calls the model (any other "
                             "registered solver)")
        if float(p.alpha[0]) != 0.0:
            super().check_start(p)

    def for_problem(self, sde: Any, model: Any, state_shape: Any) -> OperatorSampler:
        """A quick distillation on this problem when no operator was given (used by the
        registry's contract tests): 512 teacher trajectories (Heun, or where the process starts
        at alpha = 0 the data-prediction teacher of :func:`sdekit.distill.teacher_solver`) and
        the operator's linear path fitted by least squares (no gradient steps; exact for
        Gaussian data)."""
        if self.operator is not None:
            return self
        import tempfile

        from ..distill import generate_trajectories, load_operator, train_operator
        with tempfile.TemporaryDirectory() as d:
            generate_trajectories(f"{d}/traj", sde, model, state_shape, 512, steps_per_segment=8,
                                  shard_size=512)
            train_operator(f"{d}/traj", f"{d}/op.pt", sde, steps=0)
            return OperatorSampler(load_operator(f"{d}/op.pt"))

    def integrate(self, p: Problem, x: Tensor) -> Tensor:
        if self.operator is None:
            raise ValueError("the fno solver needs a trained operator: pass operator=<checkpoint "
                             "path> (made by `sdekit distill`) or an (operator, config) pair")
        op, cfg = self.operator
        self.check_teacher(p.model)
        if cfg["sde_repr"] != repr(p.sde):
            raise ValueError(f"the operator was distilled on {cfg['sde_repr']} but sampling uses "
                             f"{p.sde!r}")
        if tuple(x.shape[1:]) != tuple(cfg["state_shape"]):
            raise ValueError(f"the operator was distilled on states of shape "
                             f"{tuple(cfg['state_shape'])}, not {tuple(x.shape[1:])}")
        t0, t1 = float(p.times[0]), float(p.times[-1])
        if abs(t0 - cfg["t_start"]) > 1e-9 * max(1.0, abs(t0)):
            raise ValueError(f"t_start={t0:.6g} differs from the operator's start time "
                             f"{cfg['t_start']:.6g}")
        hits = [k for k, t in enumerate(cfg["times_out"]) if abs(t - t1) <= 1e-9 * max(1.0, t1)]
        if not hits:
            raise ValueError(f"t_end={t1:.6g} is not in the operator's output grid "
                             f"{[round(t, 6) for t in cfg['times_out']]}")
        p.model.net.count += 1  # one network pass = one function evaluation
        with torch.no_grad():
            out = op(x.to(next(op.parameters()).dtype))[:, hits[0]]
        return p._checked(out.to(x.dtype), p.times[-1])
