"""The solver contract.

A solver is a small stateless object: ``init(problem, x) -> state`` and
``step(problem, i, x, state) -> (x_next, state)`` advance the state from ``problem.times[i]``
to ``problem.times[i + 1]``. Multistep history lives in the state (indexed by step number),
never on ``self``. The driver (:func:`sdekit.sample`) owns the loop. Solvers that choose their
own steps (``adaptive = True``) or run a backend's loop (``external_loop = True``) implement
``integrate(problem, x) -> x`` instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims
from ..dynamics.parameterization import DiffusionModel
from ..grids import make_grid
from ..sde.base import ForwardSDE


def lambda_step_ratios(sde: ForwardSDE, grid: str, steps: int = 100) -> Tensor:
    """The lambda steps of a named grid of ``steps`` steps over the SDE's whole range, divided by
    their mean (all 1 for a grid uniform in lambda)."""
    dl = torch.diff(sde.lambda_(make_grid(sde, grid, steps)))
    return dl / dl.mean()


class ModelOutputError(FloatingPointError):
    """The model returned NaN or Inf during a solve."""


@dataclass
class Problem:
    """What a solver sees: the forward SDE, the counted model, the grid and the noise source.

    Schedule quantities at the grid points are precomputed in float64 (``alpha``, ``sigma``,
    ``lam``); use :meth:`coef` to get them in the state's dtype.
    """

    sde: ForwardSDE
    model: DiffusionModel
    times: Tensor
    noise: Any
    solver_name: str = "?"
    model_dtype: torch.dtype | None = None
    step_index: int = 0
    alpha: Tensor = field(init=False)
    sigma: Tensor = field(init=False)
    lam: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.alpha = self.sde.alpha(self.times).double()
        self.sigma = self.sde.sigma(self.times).double()
        self.lam = self.sde.lambda_(self.times).double()

    @property
    def steps(self) -> int:
        return self.times.numel() - 1

    def predict(self, x: Tensor, t: Any, kind: str = "eps") -> Tensor:
        """One counted model call, converted to ``kind``; NaN/Inf stops the solve."""
        t = torch.as_tensor(t, dtype=torch.float64)
        inp = x if self.model_dtype is None else x.to(self.model_dtype)
        return self._checked(self.model.predict(inp, t, kind).to(x.dtype), t)

    def predict_native(self, x: Tensor, t: Any) -> tuple[str, Tensor]:
        """One counted model call returned as ``("x0", x0)`` for x0/denoiser networks and
        ``("eps", eps)`` otherwise, so linear update rules skip a conversion."""
        kind = "x0" if self.model.prediction in ("x0", "denoiser") else "eps"
        return kind, self.predict(x, t, kind)

    def _checked(self, out: Tensor, t: Tensor) -> Tensor:
        # one reduction: the sum is NaN/Inf iff an element is (short of float overflow)
        if not bool(torch.isfinite(out.sum())):
            raise ModelOutputError(
                f"the model returned NaN or Inf at step {self.step_index} "
                f"(t={float(t.flatten()[0]):.6g}) of solver {self.solver_name!r}")
        return out

    @staticmethod
    def lin(a: float, x: Tensor, b: float, y: Tensor) -> Tensor:
        """``a x + b y`` for scalar coefficients in as few tensor passes as possible."""
        return torch.add(x if a == 1.0 else x * a, y, alpha=b)

    def bcast(self, v: Any, like: Tensor) -> Tensor:
        """A scalar or per-sample value as a tensor broadcastable against ``like``."""
        return append_dims(torch.as_tensor(v, dtype=torch.float64).to(like.device), like.ndim).to(like.dtype)


class Solver:
    """Base class. Subclasses set the class attributes and implement ``step`` (and ``init`` when
    they keep history)."""

    name: ClassVar[str] = "?"
    family: ClassVar[str] = "?"
    order: int | None = None            # deterministic (ODE) order; None: not declared
    strong_order: float | None = None   # strong order of stochastic solvers (additive noise)
    nfe_per_step: int = 1
    stochastic: bool = False
    adaptive: ClassVar[bool] = False       # picks its own steps: NFE known only afterwards
    external_loop: ClassVar[bool] = False  # runs its own loop (a backend) through integrate()
    # True where the time grid and step count are ignored (a learned operator evaluates fixed
    # output times at a fixed cost): a benchmark runs it once, at its own NFE
    grid_free: ClassVar[bool] = False
    min_steps: int = 1
    default_grid: ClassVar[str] = "logsnr"   # the preferred grid; the one used is grid_for(sde)
    # grid_for(): where default_grid, at 100 steps on a forward SDE, makes a step more than this
    # many times its mean step in lambda, an option-free call uses logsnr instead
    max_lambda_step_ratio: ClassVar[float] = 25.0
    # False where a sample's result depends on the rest of its batch (a backend's own RNG,
    # batch-averaged step sizes): then batch-size invariance is not promised
    per_sample_noise: bool = True
    paper: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(options)}")

    # the fixed-grid interface
    def init(self, p: Problem, x: Tensor) -> Any:
        return None

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError

    # the adaptive interface
    def integrate(self, p: Problem, x: Tensor) -> Tensor:
        raise NotImplementedError

    def for_problem(self, sde: ForwardSDE, model: DiffusionModel, state_shape: Any) -> "Solver":
        """A solver ready for this problem: learned solvers fit themselves here when they were
        built without a trained artefact; classic solvers return themselves."""
        return self

    def grid_for(self, sde: ForwardSDE) -> str:
        """The grid an option-free call uses on ``sde`` (the driver, bench and CLI read this):
        ``default_grid``, or ``logsnr`` where ``default_grid`` (100 steps) makes a step more than
        ``max_lambda_step_ratio`` times its mean step in lambda. The 25 keeps the papers'
        uniform grid on VP, sub-VP, cosine, VE and DDPM (largest step 1-22x the mean: their last
        step, below the data's scale) and moves EDM (sigma = t: 57x, one step from sigma 0.8 to
        0.002, where data of unit scale resolves; covariance z-scores 9-58 at 200 NFE), as well
        as the squared-cosine DDPM table (39x, its last beta is 0.999) and constant-beta VP (30x).
        """
        if self.grid_free or self.default_grid == "logsnr":
            return self.default_grid
        try:
            ratio = float(lambda_step_ratios(sde, self.default_grid).max())
        except ValueError:  # the grid cannot be built on this SDE: logsnr always can
            return "logsnr"
        return self.default_grid if ratio <= self.max_lambda_step_ratio else "logsnr"

    def grid_rule(self) -> str:
        """:meth:`grid_for` in words (shown by ``sdekit solvers``)."""
        if self.grid_free or self.default_grid == "logsnr" or self.max_lambda_step_ratio == math.inf:
            return self.default_grid
        return (f"{self.default_grid}; logsnr where a step > {self.max_lambda_step_ratio:g}x "
                "the mean lambda step")

    def expected_nfe(self, steps: int) -> int | None:
        """The NFE a fixed-grid solve of ``steps`` steps costs (None where it is not known in
        advance, e.g. adaptive solvers)."""
        return None if self.adaptive else steps * self.nfe_per_step

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "order": self.order,
                "strong_order": self.strong_order, "nfe_per_step": self.nfe_per_step,
                "kind": "SDE" if self.stochastic else "ODE", "adaptive": self.adaptive,
                "grid_free": self.grid_free, "default_grid": self.default_grid,
                "grid_rule": self.grid_rule(), "paper": self.paper}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
