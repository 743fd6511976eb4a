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
from ..dynamics.parameterization import KINDS, Coeffs, DiffusionModel, prediction_kind
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
    model_dtype: torch.dtype | None = None   # the network's input dtype, if not the state's
    grad_in_model: bool = False
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

    def predict(self, x: Tensor, t: Any, kind: str = "eps", coeffs: Coeffs | None = None
                ) -> Tensor:
        """One counted model call (the network sees ``model_dtype``), converted to ``kind`` in the
        state's dtype with ``coeffs`` (alpha, sigma at ``t``: :meth:`coeffs` at a grid point);
        NaN/Inf stops the solve. With ``grad_in_model`` the call runs with
        autograd enabled on a detached input that requires grad (a guidance wrapper can
        differentiate with respect to it) and its output is detached."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if not self.grad_in_model:
            return self._checked(self.model.predict(x, t, kind, self.model_dtype, coeffs), t)
        with torch.enable_grad():
            out = self.model.predict(x.detach().requires_grad_(True), t, kind, self.model_dtype,
                                     coeffs)
        return self._checked(out.detach(), t)

    @property
    def linear_form(self) -> str:
        """``"x0"`` or ``"eps"``: the form a model call gives in the fewest operations
        (:attr:`~sdekit.dynamics.PredictionKind.linear_form` of the model's kind); solvers whose
        update is linear in the model output ask for it and write the update in that form."""
        return self.model.linear_form

    def coeffs(self, i: int) -> Coeffs:
        """The precomputed alpha and sigma at grid point ``i`` (float64 numbers, built once per
        grid) for a model call there."""
        table = self.__dict__.get("_coeffs")
        if table is None:
            table = self.__dict__["_coeffs"] = [
                Coeffs(a, s) for a, s in zip(self.alpha.tolist(), self.sigma.tolist())]
        return table[i]

    def _checked(self, out: Tensor, t: Tensor) -> Tensor:
        # one reduction: the sum is NaN/Inf iff an element is (short of float overflow)
        if not math.isfinite(out.sum().item()):
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
    # with per-sample seeds, is a sample's result independent of the rest of its batch? True
    # (to float rounding), "tolerance" (batch-shared adaptive steps: equal to within the
    # solver's tolerance) or False (e.g. batch-averaged step sizes)
    batch_invariant: bool | str = True
    paper: ClassVar[str] = ""
    # True where the solver's first step from a grid point with alpha = 0 (lambda = -inf: the
    # flow-matching prior at t = 1) is well defined: the data-prediction exponential integrators
    # and DDIM take it in closed form, x_1 = sigma_1 / sigma_0 x + alpha_1 x0_hat. Every other
    # solver works in x / alpha, in lambda steps or in the SDE's f and g, all infinite there.
    starts_at_alpha_zero: bool = False
    # True where the model is called on subsets of the batch (per-sample adaptive steps): a
    # model wrapper holding one condition per sample cannot follow those calls
    evaluates_subsets: ClassVar[bool] = False

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

    def check_start(self, p: Problem) -> None:
        """Raise before any work when the grid starts where alpha = 0 and this solver, or the
        model's output type, cannot start there."""
        if float(p.alpha[0]) != 0.0:
            return
        t0 = float(p.times[0])
        if not self.starts_at_alpha_zero:
            from .registry import list_solvers
            ok = [d["name"] for d in list_solvers() if d["starts_at_alpha_zero"]]
            raise ValueError(
                f"solver {self.name!r} cannot start at t_start={t0:g}, where alpha = 0 (lambda = "
                "-inf): it steps in x / alpha, in lambda or with the SDE's f and g, all infinite "
                f"there. Use t_start < {t0:g} (e.g. t_start={t0 - 1e-3 * t0:g}) or a solver that "
                f"starts there: {ok}")
        if not prediction_kind(p.model.prediction).x0_at_alpha_zero:
            raise ValueError(
                f"a model with prediction={p.model.prediction!r} cannot be sampled from "
                f"t_start={t0:g}, where alpha = 0: there x = sigma eps carries no information "
                "about x0 (x0 = (x - sigma eps) / alpha is 0/0). Use t_start < "
                f"{t0:g}, or a network predicting one of "
                f"{[k for k, v in KINDS.items() if v.x0_at_alpha_zero]}")

    def for_problem(self, sde: ForwardSDE, model: DiffusionModel, state_shape: Any) -> Solver:
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
        if self.grid_free or self.default_grid == "logsnr":
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
                "batch_invariant": self.batch_invariant, "grid_rule": self.grid_rule(),
                "starts_at_alpha_zero": self.starts_at_alpha_zero, "paper": self.paper}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
