"""The solver contract.

A solver is a small stateless object of one of four kinds (marker base classes, tested with
``isinstance`` by the driver, :func:`sdekit.sample`):

* :class:`FixedGridSolver`: ``init(problem, x) -> state`` and ``step(problem, i, x, state) ->
  (x_next, state)`` advance the state from ``problem.times[i]`` to ``problem.times[i + 1]``; the
  driver owns the loop. Multistep history lives in the state (a small immutable NamedTuple per
  family, indexed by step number, returned anew by each step), never on ``self``.
  :class:`OneCallStepper`: one whose step makes one model call, at ``(x, times[i])``, and can be
  handed that call's output (``step(..., given=ModelOutput)``; UniC's predictors).
* :class:`AdaptiveSolver`: picks its own steps, ``integrate(problem, x) -> x``.
* :class:`ExternalSolver`: runs a backend's loop, ``integrate(problem, x) -> x``.
* :class:`LearnedSampler`: an external solver that ignores the grid (a learned operator); its
  :meth:`LearnedSampler.for_problem` fits it to a problem when it has no trained artefact.

Options are constructor arguments stored as instance attributes; the declarations a solver
makes (``order``, ``nfe_per_step``, ``stochastic``, ...) are instance attributes whose class
body gives the default; class attributes (``ClassVar``) are constants of the class only.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims
from ..dynamics.parameterization import KINDS, Coeffs, DiffusionModel, convert, prediction_kind
from ..grids import make_grid
from ..sde.base import ForwardSDE


def lambda_step_ratios(sde: ForwardSDE, grid: str, steps: int = 100) -> Tensor:
    """The lambda steps of a named grid of ``steps`` steps over the SDE's whole range, divided by
    their mean (all 1 for a grid uniform in lambda)."""
    dl = torch.diff(sde.lambda_(make_grid(sde, grid, steps)))
    return dl / dl.mean()


class ModelOutputError(FloatingPointError):
    """The model returned NaN or Inf during a solve."""


def check_model_output(out: Tensor, t: Tensor, solver: str, step_of: Callable[[float], int],
                       pending: list[Any] | None) -> None:
    """Stop the solve with a :class:`ModelOutputError` (naming the step, time and solver) where
    ``out`` holds NaN or Inf, at the cost of one reading reduction.

    On the CPU (``pending`` None) that reduction is ``out.sum()`` in ``out``'s dtype (the
    cheapest pass there): NaN/Inf make it non-finite, and so can overflow of a large but finite
    output (a float16 sum exceeds 65504 easily), so a non-finite sum is confirmed by the exact
    ``isfinite`` test before raising: no false positive, and the exact pass runs only then.

    With ``pending`` (a list: the driver's fixed-grid loop off the CPU) the reduction is
    :func:`torch.aminmax`, exact by itself (min and max propagate NaN, an infinite element is an
    extreme, and no overflow can occur), queued on the device: a model call costs no
    host-device sync, and :func:`raise_pending` reads the queue once, at the end of the solve.
    The step is worked out (``step_of(t)``) only when raising."""
    if not out.numel():
        return
    if pending is not None:
        pending.append((t, solver, step_of, torch.aminmax(out)))
    elif has_nonfinite(out):
        _raise_model_output_error(t, solver, step_of)


def has_nonfinite(x: Tensor) -> bool:
    """Whether ``x`` holds NaN or Inf, in one reading pass where it does not: a finite
    ``x.sum()`` proves it (NaN/Inf propagate), a non-finite one (also from the overflow of a
    large finite sum) is confirmed by the exact ``isfinite`` test."""
    return not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all())


def _raise_model_output_error(t: Tensor, solver: str, step_of: Callable[[float], int]) -> None:
    t0 = float(t.flatten()[0])
    raise ModelOutputError(f"the model returned NaN or Inf at step {step_of(t0)} "
                           f"(t={t0:.6g}) of solver {solver!r}")


def raise_pending(pending: list[Any]) -> None:
    """The error :func:`check_model_output` would have raised for the first queued output that
    holds NaN or Inf (one host-device sync for the whole queue), then the queue is emptied."""
    if pending:
        extremes = torch.stack([v for c in pending for v in c[3]]).reshape(-1, 2)
        ok = torch.isfinite(extremes).all(1).tolist()
        bad = pending[ok.index(False)] if False in ok else None
        pending.clear()
        if bad is not None:
            _raise_model_output_error(*bad[:3])


#: whether this interpreter and torch let :func:`unshared` count references (CPython's
#: ``sys.getrefcount``, torch's storage use count); without them nothing is ever recycled
_CAN_COUNT = (hasattr(sys, "getrefcount") and hasattr(torch.Tensor, "_use_count")
              and hasattr(torch._C, "_storage_Use_Count"))


def unshared(x: Tensor) -> bool:
    """Whether nothing but the caller's one variable refers to ``x`` or to its memory: no other
    Python reference (a solver's history, a network that kept its input or output, a list), no
    view or alias of its storage (``x[0]``, ``x.detach()``, ``x.numpy()``), no autograd use.
    Then writing into ``x`` can change nothing anyone can see: the driver recycles such a
    state (:attr:`Problem.spare`), a data-prediction solver converts such a network output in
    place (:meth:`~sdekit.solvers.exp_integrator.ExpIntegrator.evaluate`). (References
    counted: the caller's variable, this parameter, ``getrefcount``'s argument.)"""
    return (_CAN_COUNT and sys.getrefcount(x) == 3
            and x._use_count() == 1  # type: ignore[attr-defined]
            and torch._C._storage_Use_Count(x.untyped_storage()._cdata) == 2)


#: :func:`linear_combination` takes a combination whose coefficients sum to 1 within this for
#: an affine one
AFFINE_TOL = 1e-12
#: ... and evaluates it as lerps only where every partial sum of the outputs' coefficients is
#: at least this large in magnitude (a lerp weight is a coefficient over a partial sum)
AFFINE_MIN_PARTIAL = 1e-3


def linear_combination(c_x: float, x: Tensor, cs: list[float], ms: list[Tensor],
                       out: Tensor | None = None) -> Tensor:
    """``c_x x + sum_j c_j m_j`` for scalar coefficients, in as few passes over the state as
    PyTorch's kernels allow, the first allocating the result and the rest in place (``x`` and the
    outputs ``ms`` are left as they are).

    In general that is ``x * c_x`` and one ``add_`` per output (n + 1 passes; n where c_x = 1,
    the same numbers). Where the
    coefficients sum to 1 (an affine combination: the data-prediction updates on a process with
    alpha = 1, VE and EDM, whose state coefficient is ``sigma_t / sigma_s = e^{-h}`` and whose
    outputs' weights sum to ``1 - e^{-h}``) it is a chain of lerps, one pass per output:
    ``y = m_0``, ``y <- lerp(y, m_j, c_j / (c_0 + ... + c_j))``, then ``lerp(y, x, c_x)``, each a
    difference form (DPM-Solver++(2M): ``m_0 + (m_0 - m_1) / (2 r)``, then ``y + c_x (x - y)``).

    ``out``: a tensor shaped like ``x``, sharing memory with neither ``x`` nor ``ms``, that the
    first pass writes into instead of allocating (the spare state of
    :meth:`Problem.take_spare`; the same numbers)."""
    partial, weights = cs[0] if cs else 0.0, []
    for cj in cs[1:]:
        partial += cj
        weights.append(cj / partial if abs(partial) >= AFFINE_MIN_PARTIAL else math.nan)
    affine = (abs(c_x + partial - 1.0) <= AFFINE_TOL and abs(cs[0]) >= AFFINE_MIN_PARTIAL
              and all(math.isfinite(w) for w in weights)) if cs else False
    if not affine:
        if c_x == 1.0 and ms:   # the noise-prediction forms on alpha = 1: no scaling pass
            y, cs, ms = torch.add(x, ms[0], alpha=cs[0], out=out), cs[1:], ms[1:]
        else:
            y = x * c_x if out is None else torch.mul(x, c_x, out=out)
        for cj, m in zip(cs, ms):
            y = y.add_(m, alpha=cj)
        return y
    if len(ms) == 1:
        return torch.lerp(ms[0], x, c_x, out=out)
    y = torch.lerp(ms[0], ms[1], weights[0], out=out)
    for w, m in zip(weights[1:], ms[2:]):
        y = y.lerp_(m, w)
    return y.lerp_(x, c_x)


def last_lambda_step_ratio(lam: Tensor) -> float:
    """The grid's last step in lambda over the step before it (1 on a uniform-logSNR grid); 1
    where the grid has fewer than two finite steps (nothing to compare)."""
    d = lam[torch.isfinite(lam)].double().diff()
    return float(d[-1] / d[-2]) if d.numel() >= 2 else 1.0


@dataclass(frozen=True)
class Schedule:
    """The grid and the forward process's coefficients at its points, float64, computed once
    per grid: ``times``, ``alpha``, ``sigma`` and the half-logSNR ``lam`` (read only)."""

    times: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor

    @classmethod
    def of(cls, sde: ForwardSDE, times: Tensor) -> Schedule:
        return cls(times, sde.alpha(times).double(), sde.sigma(times).double(),
                   sde.lambda_(times).double())

    @property
    def steps(self) -> int:
        return self.times.numel() - 1

    @cached_property
    def coeffs(self) -> tuple[Coeffs, ...]:
        """alpha and sigma at each grid point as plain float64 numbers (:class:`Coeffs`, what a
        model call's conversion takes), built on first use."""
        return tuple(Coeffs(a, s) for a, s in zip(self.alpha.tolist(), self.sigma.tolist()))

    @cached_property
    def last_lambda_step(self) -> tuple[float, float] | None:
        """The last finite step in lambda and its ratio to the step before it
        (:func:`last_lambda_step_ratio`); None without a finite step. Computed once per grid
        (the automatic lower-order-final rule reads it every step)."""
        d = self.lam[torch.isfinite(self.lam)].double().diff()
        return (float(d[-1]), last_lambda_step_ratio(self.lam)) if d.numel() else None

    def step_of(self, t: float) -> int:
        """The step a time belongs to: the index of the grid point within 1e-9 (relative) of
        ``t``, else that of the step whose interval holds ``t`` (a stage of a multistage
        method); ``steps`` for the last point (the final denoising call)."""
        grid = self.times.tolist()
        for i, ti in enumerate(grid):
            if abs(ti - t) <= 1e-9 * max(1.0, abs(t)):
                return i
        inside = [i for i in range(self.steps)
                  if min(grid[i], grid[i + 1]) < t < max(grid[i], grid[i + 1])]
        return inside[0] if inside else 0


class Problem:
    """What a solver sees: the forward SDE, the counted model, the grid's :class:`Schedule` (its
    ``times``, ``alpha``, ``sigma``, ``lam``: float64, precomputed) and the noise source.
    ``model_dtype`` is the network's input dtype where it is not the state's; with
    ``grad_in_model`` model calls run with autograd on their input (see :meth:`predict`)."""

    def __init__(self, sde: ForwardSDE, model: DiffusionModel, times: Tensor, noise: Any = None,
                 solver_name: str = "?", model_dtype: torch.dtype | None = None,
                 grad_in_model: bool = False) -> None:
        self.sde, self.model, self.noise, self.solver_name = sde, model, noise, solver_name
        self.model_dtype, self.grad_in_model = model_dtype, grad_in_model
        self.schedule = Schedule.of(sde, times)
        self.pending_checks: list[Any] | None = None   # see check_model_output
        #: a dead state of this solve that nothing else references (set by the driver, see
        #: :func:`unshared`), which the next step may write its result into
        self.spare: Tensor | None = None

    @property
    def times(self) -> Tensor:
        return self.schedule.times

    @property
    def alpha(self) -> Tensor:
        return self.schedule.alpha

    @property
    def sigma(self) -> Tensor:
        return self.schedule.sigma

    @property
    def lam(self) -> Tensor:
        return self.schedule.lam

    @property
    def steps(self) -> int:
        return self.schedule.steps

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
        grid: :attr:`Schedule.coeffs`) for a model call there."""
        return self.schedule.coeffs[i]

    def predict_at(self, i: int, x: Tensor, kind: str = "eps",
                   given: ModelOutput | None = None) -> Tensor:
        """:meth:`predict` at grid point ``i`` (with the grid's :meth:`coeffs`), or the output
        ``given`` for it (converted to ``kind`` at ``x``): the model call of a
        :class:`OneCallStepper`."""
        if given is None:
            return self.predict(x, self.times[i], kind, self.coeffs(i))
        return given.as_kind(self, kind, x)

    def predict_linear_at(self, i: int, x: Tensor,
                          given: ModelOutput | None = None) -> tuple[str, Tensor]:
        """``(kind, output)`` at grid point ``i`` in the :attr:`linear_form` (a call asking for
        it), or the output ``given`` for it in its own kind: for a solver whose update is linear
        in the model output and written in either form."""
        if given is None:
            kind = self.linear_form
            return kind, self.predict(x, self.times[i], kind, self.coeffs(i))
        return given.kind, given.value

    def _checked(self, out: Tensor, t: Tensor) -> Tensor:
        check_model_output(out, t, self.solver_name, self.schedule.step_of,
                           self.pending_checks)
        return out

    @staticmethod
    def lin(a: float, x: Tensor, b: float, y: Tensor, out: Tensor | None = None) -> Tensor:
        """``a x + b y`` for scalar coefficients in as few tensor passes as possible: one
        (``a = 1``, or ``a + b = 1``: a lerp), else two (:func:`linear_combination`, also for
        ``out``)."""
        return linear_combination(a, x, [b], [y], out)

    def take_spare(self, like: Tensor) -> Tensor | None:
        """The spare state (:attr:`spare`) if it can hold a tensor like ``like`` (same shape,
        dtype and device, no autograd), else None; either way the spare is used up. A step
        passes it as the ``out`` of its update's first pass (:func:`linear_combination`): on
        image-sized states that saves the allocation (and first touch) of a fresh result."""
        z, self.spare = self.spare, None
        if (z is None or z.shape != like.shape or z.dtype != like.dtype
                or z.device != like.device or z.requires_grad or like.requires_grad):
            return None
        return z

    def bcast(self, v: Any, like: Tensor) -> Tensor:
        """A scalar or per-sample value as a tensor broadcastable against ``like``."""
        return append_dims(torch.as_tensor(v, dtype=torch.float64).to(like.device),
                           like.ndim).to(like.dtype)


@dataclass(frozen=True)
class ModelOutput:
    """A model call already made at grid point ``i``: its ``value``, of kind ``kind`` (``"eps"``,
    or ``"x0"`` where alpha = 0). A :class:`OneCallStepper` takes it instead of calling the model
    (UniC hands its predictor the call it made at the uncorrected state: no extra NFE)."""

    i: int
    kind: str
    value: Tensor

    def as_kind(self, p: Problem, kind: str, x: Tensor) -> Tensor:
        """The output as ``kind``, converted (where it must be) at the state ``x`` through the
        prediction-kind table with the grid's coefficients (plain numbers: eps -> x0 is one
        fused pass, as :meth:`~sdekit.solvers.exp_integrator.ExpIntegrator.data_estimate`)."""
        if kind == self.kind:
            return self.value
        return convert(self.kind, kind, self.value, x, *p.coeffs(self.i))


class Solver:
    """The common base of the solver kinds (:class:`FixedGridSolver`, :class:`AdaptiveSolver`,
    :class:`ExternalSolver`, :class:`LearnedSampler`): the declarations and the grid rule.
    Subclass a kind, not this class."""

    # class constants
    family: ClassVar[str] = "?"
    paper: ClassVar[str] = ""
    # grid_for(): where default_grid, at 100 steps on a forward SDE, makes a step more than
    # this many times its mean step in lambda, an option-free call uses logsnr instead
    max_lambda_step_ratio: ClassVar[float] = 25.0
    # True where the model is called on subsets of the batch (per-sample adaptive steps): a
    # model wrapper holding one condition per sample cannot follow those calls
    evaluates_subsets: ClassVar[bool] = False

    # declarations: instance attributes (the class body gives the default; __init__ sets those
    # that depend on options)
    name: str = "?"                     # the registry key (set by get_solver)
    order: int | None = None            # deterministic (ODE) order; None: not declared
    strong_order: float | None = None   # strong order of stochastic solvers (additive noise)
    nfe_per_step: int = 1
    stochastic: bool = False
    min_steps: int = 1
    default_grid: str = "logsnr"        # the preferred grid; the one used is grid_for(sde)
    # with per-sample seeds, is a sample's result independent of the rest of its batch? True
    # (to float rounding), "tolerance" (batch-shared adaptive steps: equal to within the
    # solver's tolerance) or False (e.g. batch-averaged step sizes)
    batch_invariant: bool | str = True
    # True where the solver's first step from a grid point with alpha = 0 (lambda = -inf: the
    # flow-matching prior at t = 1) is well defined: the data-prediction exponential integrators
    # and DDIM take it in closed form, x_1 = sigma_1 / sigma_0 x + alpha_1 x0_hat. Every other
    # solver works in x / alpha, in lambda steps or in the SDE's f and g, all infinite there.
    starts_at_alpha_zero: bool = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(options)}")

    @property
    def adaptive(self) -> bool:
        """Picks its own steps (an :class:`AdaptiveSolver`): NFE known only afterwards."""
        return isinstance(self, AdaptiveSolver)

    @property
    def external_loop(self) -> bool:
        """Runs its own loop through a backend (an :class:`ExternalSolver`)."""
        return isinstance(self, ExternalSolver)

    @property
    def grid_free(self) -> bool:
        """Ignores the time grid and step count (a :class:`LearnedSampler` evaluates fixed
        output times at a fixed cost): a benchmark runs it once, at its own NFE."""
        return isinstance(self, LearnedSampler)

    def check_start(self, p: Problem) -> None:
        """Raise before any work when the grid starts where alpha = 0 and this solver, or the
        model's output type, cannot start there."""
        if float(p.alpha[0]) != 0.0:
            return
        t0 = float(p.times[0])
        if not self.starts_at_alpha_zero:
            from .registry import alpha_zero_starters
            ok = alpha_zero_starters()
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
        return steps * self.nfe_per_step

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "order": self.order,
                "strong_order": self.strong_order, "nfe_per_step": self.nfe_per_step,
                "kind": "SDE" if self.stochastic else "ODE", "adaptive": self.adaptive,
                "grid_free": self.grid_free, "default_grid": self.default_grid,
                "batch_invariant": self.batch_invariant, "grid_rule": self.grid_rule(),
                "starts_at_alpha_zero": self.starts_at_alpha_zero, "paper": self.paper}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedGridSolver(Solver):
    """A solver stepped by the driver's loop over the grid: :meth:`init` once per grid (tables,
    an empty history), then :meth:`step` from each grid point to the next."""

    def init(self, p: Problem, x: Tensor) -> Any:
        return None

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError


class OneCallStepper(FixedGridSolver):
    """A fixed-grid solver whose step makes one model call, at ``(x, times[i])``, and can take
    that call's output instead: ``step(p, i, x, state, given)`` with ``given`` a
    :class:`ModelOutput` (None: call the model). UniC runs on top of such a predictor."""

    def step(self, p: Problem, i: int, x: Tensor, state: Any,
             given: ModelOutput | None = None) -> tuple[Tensor, Any]:
        raise NotImplementedError


class OwnLoopSolver(Solver):
    """A solver that runs its own loop from ``times[0]`` to ``times[-1]``: the common base of
    :class:`AdaptiveSolver` and :class:`ExternalSolver`."""

    def integrate(self, p: Problem, x: Tensor) -> Tensor:
        raise NotImplementedError


class AdaptiveSolver(OwnLoopSolver):
    """Chooses its own steps (error control): the NFE is known only afterwards."""

    def expected_nfe(self, steps: int) -> int | None:
        return None


class ExternalSolver(OwnLoopSolver):
    """Runs a backend's loop (e.g. torchsde) over the grid."""


class LearnedSampler(ExternalSolver):
    """A trained sampler that replaces the solve (a learned operator): it ignores the grid and
    step count; :meth:`for_problem` fits it to a problem when it was built without a trained
    artefact."""

    def for_problem(self, sde: ForwardSDE, model: DiffusionModel, state_shape: Any
                    ) -> LearnedSampler:
        raise NotImplementedError


def for_problem(solver: Solver, sde: ForwardSDE, model: DiffusionModel, state_shape: Any
                ) -> Solver:
    """A solver ready for this problem: a :class:`LearnedSampler` fits itself
    (:meth:`LearnedSampler.for_problem`) when it has no trained artefact; every other solver
    is returned as it is."""
    return solver.for_problem(sde, model, state_shape) if isinstance(solver, LearnedSampler) \
        else solver
