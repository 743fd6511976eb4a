"""``sample()``: the single driver loop."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._utils import (
    check_flags,
    check_float_dtype,
    check_seed,
    compute_dtype,
    is_collection,
    is_real,
)
from .dynamics.parameterization import DiffusionModel, as_model
from .grids import make_grid
from .guidance import check_guided_solver
from .noise import SeededNoise
from .sde.base import ForwardSDE, check_forward_sde
from .solvers.base import (
    FixedGridSolver,
    OwnLoopSolver,
    Problem,
    Solver,
    has_nonfinite,
    raise_pending,
    unshared,
)
from .solvers.registry import DEFAULT_SOLVER, default_config, get_solver

DEFAULT_STEPS = 20


@dataclass
class Solution:
    """Samples plus statistics: the *measured* NFE (network passes: a classifier-free-guided
    call, conditional and unconditional branch in one batch, counts 2; see
    :mod:`sdekit.guidance`), the steps taken, the grid used and (optionally) the states at the
    requested times."""

    x: Tensor
    nfe: int
    steps: int
    times: Tensor
    solver: str
    trajectory: dict[float, Tensor] = field(default_factory=dict)


def sample(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor],
           x_init: Tensor | None = None, *, shape: Sequence[int] | None = None,
           solver: str | Solver | None = None, steps: int | None = None,
           grid: str | Tensor | Sequence[float] | None = None, t_start: float | None = None,
           t_end: float | None = None, prediction: str = "eps", denoise: bool = False,
           float64: bool = False, seed: int = 0, seeds: Sequence[int] | None = None,
           noise: Any = None, save_at: Sequence[float] | None = None,
           callback: Callable[[int, float, Tensor], None] | None = None, progress: bool = False,
           dtype: torch.dtype = torch.float32, device: Any = None,
           project: Callable[[int, float, Tensor], Tensor] | None = None,
           grid_options: dict[str, Any] | None = None, grad: str = "none",
           **solver_options: Any) -> Solution:
    """Sample a diffusion model by solving its reverse-time SDE or probability-flow ODE.

    Args:
        sde: the forward process.
        model: a :class:`DiffusionModel` or a callable ``net(x, cond)`` whose output type is
            ``prediction``.
        x_init: the initial state at ``t_start`` (a floating tensor of shape ``(batch, ...)``);
            if None, drawn from the prior with per-sample seeds (``shape`` is then required).
        solver: the solver: a configured :class:`~sdekit.solvers.Solver` object (the primary
            form: ``sdekit.solvers.get_solver("dpmpp_2m", order=3)`` or an instance of a
            solver class), or, as a convenience, a registry name (see
            ``sdekit.solvers.solver_names()``) with its options as ``**solver_options`` (no
            registered solver has an option named like a keyword of ``sample``: registration
            refuses one). Default (None): with no ``grid`` either, the option-free rule
            :func:`sdekit.solvers.default_config` picks the solver, its options and the grid
            from the forward process and the step count (``solver_options`` given are added to
            its options); with a ``grid``, ``DEFAULT_SOLVER`` (``unipc_bh2``) with its registry
            defaults.
        steps: number of steps (intervals) of a named grid (default 20); with an explicit
            array ``grid`` leave it out (or give ``len(grid) - 1``).
        grid: a grid name (``uniform``, ``quadratic``, ``logsnr``, ``karras``,
            ``polyexponential``, ``kl_optimal``, ``interpolated``; see :mod:`sdekit.grids`) or
            an explicit decreasing array of times; default: the option-free rule's grid
            without ``solver``, else the solver's grid for this SDE (``Solver.grid_for(sde)``);
            or a tuned grid: the :class:`~sdekit.tuned_grid.TunedGrid` that
            :func:`sdekit.tune.tune` returns, or the path of its file (``.json``, written by
            ``tune(out=...)`` / ``sdekit tune``), which must have been tuned for this forward
            SDE, model, solver, solver options and step count (leave ``steps`` out).
            ``grid_options`` are the named grid's options (``rho`` for ``karras`` and
            ``polyexponential``, ``base`` for ``interpolated``;
            for every named grid a timestep shift: ``shift``, ``mu``, ``image_seq_len``,
            ``shift_type``, see :func:`sdekit.grids.shift_times`).
        t_start, t_end: integration range of a named grid (default ``sde.T`` down to
            ``sde.t_min``); an explicit grid carries its own range.
        denoise: finish with one extra model call returning the x0 prediction at ``t_end``.
        float64: keep the solver state in float64 (the model is still called in ``dtype``).
        dtype: the dtype of the network's input and of the result (default float32; taken from
            ``x_init`` when it is given). For float16 / bfloat16 the network runs in that dtype
            while the solver state is kept in float32: times, schedule coefficients and the
            network's time input never take a half-precision dtype.
        seed, seeds: per-sample seeds (``seeds`` explicitly, else derived from ``seed``) for the
            initial state and the solver's noise; a sample does not depend on batch size or
            position (for every solver whose registry entry says ``batch_invariant``).
        noise: a custom noise source (see :mod:`sdekit.noise`), e.g. BrownianNoise; it replaces
            the seeds, so do not give ``seeds`` with it.
        save_at: grid times at which to record the state in ``Solution.trajectory``.
        callback: called as ``callback(i, t, x)`` after each step.
        project: a state map applied after each step, ``x = project(i, t, x)`` with ``t`` the
            time the step reached (before ``save_at`` and ``callback`` see the state): the hook of
            the editing and inverse-problem methods (:mod:`sdekit.inverse`: replacement of a
            known region, a posterior-sampling correction). Fixed-grid solvers only: an adaptive
            or external-loop solver has no steps to hook, so it is refused.
        progress: show a tqdm progress bar.
        grad: autograd during the solve. ``"none"`` (default): no graph is built, memory does
            not grow with the number of steps. ``"model"``: each model call runs with gradients
            enabled on a state that requires grad, so a model wrapper can differentiate with
            respect to its input (classifier guidance, posterior sampling); its output is
            detached, so memory stays that of one call. ``"full"``: the whole solve is
            differentiable (memory grows with every step).
    """
    # long for its docstring only (the reference of every argument); the code is named steps
    _check_call(sde, grid_options, denoise=denoise, float64=float64, progress=progress)
    solver, solver_options, grid, grid_options = configure(sde, solver, steps, grid,
                                                           grid_options, solver_options)
    if grid is not None and not isinstance(grid, Tensor):
        from .tuned_grid import TunedGrid, is_grid_file
        if isinstance(grid, TunedGrid) or is_grid_file(grid):
            grid, grid_options = _tuned_grid(grid, sde, model, prediction, solver,
                                             solver_options, steps, t_start, t_end, grid_options)
            steps = None
    x_init, dtype = _check_inputs(x_init, shape, dtype, steps, grid, t_start, t_end, seed,
                                  seeds, noise, callback, grad, save_at, device)
    dm = as_model(model, sde, prediction)
    slv = get_solver(solver, **solver_options)
    if project is not None:
        check_projectable(slv, project)
    times = _times(sde, slv, grid, steps, t_start, t_end, grid_options)
    problem = Problem(sde, dm, times, None, solver_name=slv.name)
    slv.check_start(problem)  # alpha = 0 at t_start (flow matching at t = 1)
    check_guided_solver(dm, slv)
    with contextlib.nullcontext() if grad == "full" else torch.no_grad():
        start = None if t_start is None else times[0]
        x, problem.noise = _initial_state(sde, start, x_init, shape, dtype, device, seed, seeds,
                                         noise)
        return _solve(slv, problem, x, dtype, float64, denoise, save_at, callback, progress, grad,
                      project)


def configure(sde: ForwardSDE, solver: str | Solver | None, steps: int | None, grid: Any,
              grid_options: dict[str, Any] | None, solver_options: dict[str, Any]
              ) -> tuple[str | Solver, dict[str, Any], Any, dict[str, Any] | None]:
    """``(solver, solver_options, grid, grid_options)`` of a call: the option-free rule's
    (:func:`default_config`, with the given options added to its) where neither a solver nor a
    grid is given, ``DEFAULT_SOLVER`` where only a grid is, else as given. The one place that
    rule is applied: :func:`sample`, the inverse-problem methods and the diffusers scheduler
    call it."""
    if solver is None and grid is None:   # the option-free call
        cfg = default_config(sde, DEFAULT_STEPS if steps is None else steps)
        return (cfg["solver"], {**cfg["options"], **solver_options}, cfg["grid"],
                {**cfg["grid_options"], **(grid_options or {})})
    return (DEFAULT_SOLVER if solver is None else solver), solver_options, grid, grid_options


def _times(sde: ForwardSDE, slv: Solver, grid: Any, steps: int | None, t_start: float | None,
           t_end: float | None, grid_options: dict[str, Any] | None) -> Tensor:
    """The grid of the solve: an explicit array as given, else the named grid (``grid``, or the
    solver's grid for this SDE) of ``steps`` steps (default ``DEFAULT_STEPS``); refused when it
    has fewer steps than the solver needs."""
    explicit = grid is not None and not isinstance(grid, str)  # an array of times
    if not explicit and steps is None:
        steps = DEFAULT_STEPS
    times = make_grid(sde, slv.grid_for(sde) if grid is None else grid, steps, t_start, t_end,
                      **(grid_options or {}))
    if times.numel() - 1 < slv.min_steps:
        raise ValueError(f"steps={times.numel() - 1} is too few for solver {slv.name!r}: it needs "
                         f"at least {slv.min_steps}")
    return times


def _initial_state(sde: ForwardSDE, t_start: Any, x_init: Tensor | None,
                  shape: Sequence[int] | None, dtype: torch.dtype, device: Any, seed: int,
                  seeds: Sequence[int] | None, noise: Any) -> tuple[Tensor, Any]:
    """The initial state and the noise source of a solve (arguments checked by
    :func:`sample`): ``x_init`` (moved to ``device``), or a draw from the noise source scaled by
    the forward process's :attr:`~ForwardSDE.prior_std` (``t_start`` None: the solve starts at
    ``T``), else by its :meth:`~ForwardSDE.marginal_std` at ``t_start``. The noise source is
    ``noise``, else per-sample seeds (``seeds``, else derived from ``seed``)."""
    if x_init is not None:
        x = x_init.to(device=device) if device is not None else x_init
        return x, _noise_source(noise, seed, seeds, x.shape[0])
    if shape is None:
        raise ValueError("give either x_init or shape")
    noise = _noise_source(noise, seed, seeds, int(shape[0]))
    z = noise.randn(torch.empty(tuple(shape), dtype=compute_dtype(dtype), device=device))
    scale = sde.prior_std if t_start is None else sde.marginal_std(t_start)
    return z * scale, noise


def _noise_source(noise: Any, seed: int, seeds: Sequence[int] | None, n: int) -> Any:
    """``noise``, else per-sample seeded noise for ``n`` samples (``seeds``, else from ``seed``)."""
    if noise is not None:
        return noise
    return SeededNoise(list(seeds)) if seeds is not None else SeededNoise.from_seed(seed, n)


def check_projectable(slv: Solver, project: Any) -> None:
    """Raise unless a per-step ``project`` hook can run with ``slv`` (a fixed-grid solver)."""
    if not callable(project):
        raise TypeError(f"project must be callable as project(i, t, x) -> x, got "
                        f"{type(project).__name__}")
    if not isinstance(slv, FixedGridSolver):
        raise ValueError(f"solver {slv.name!r} runs its own loop (adaptive, external or "
                         "grid-free): a per-step hook (project=, used by sdekit.inverse) needs a "
                         "fixed-grid solver such as 'ancestral', 'ddim', 'dpmpp_2m', 'heun' or "
                         "'euler_maruyama'")


def _tuned_grid(grid: Any, sde: ForwardSDE, model: Any, prediction: str, solver: Any,
                solver_options: dict[str, Any], steps: int | None, t_start: Any, t_end: Any,
                grid_options: dict[str, Any] | None) -> tuple[Tensor, None]:
    """The times of a tuned grid (a file or the :class:`~sdekit.tuned_grid.TunedGrid` that
    :func:`sdekit.tune.tune` returns), after checking that it was tuned for
    this forward SDE, model, solver (and options) and step count."""
    from .tuned_grid import TunedGrid, load_tuned_grid
    opts = dict(grid_options or {})
    tag = opts.pop("model_tag", None)
    if opts:
        raise ValueError(f"grid_options {sorted(opts)} do not apply to a tuned grid file (only "
                         "model_tag does)")
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if v is not None:
            raise ValueError(f"{name}={v!r} cannot be combined with a tuned grid: its first and "
                             "last times are the range")
    tg = grid if isinstance(grid, TunedGrid) else load_tuned_grid(grid)
    tg.check(sde, as_model(model, sde, prediction), solver, solver_options, steps, model_tag=tag)
    return tg.times, None


def _solve(slv: Solver, p: Problem, x: Tensor, dtype: torch.dtype, float64: bool, denoise: bool,
           save_at: Sequence[float] | None, callback: Callable[[int, float, Tensor], None] | None,
           progress: bool, grad: str,
           project: Callable[[int, float, Tensor], Tensor] | None = None) -> Solution:
    """Solve ``p`` from ``x``: :meth:`OwnLoopSolver.integrate` for adaptive and external
    solvers, else the fixed-grid loop (:func:`_fixed_grid_loop`)."""
    times = p.times
    save = {float(t) for t in (save_at if save_at is not None else [])}
    grid_times = times.tolist()  # the grid as plain numbers (float(times[i]) for each i)
    missing = save - set(grid_times)
    if not isinstance(slv, (FixedGridSolver, OwnLoopSolver)):
        raise TypeError(f"solver {slv!r} is of no kind: subclass FixedGridSolver, "
                        "AdaptiveSolver, ExternalSolver or LearnedSampler (sdekit.solvers.base)")
    own_loop = isinstance(slv, OwnLoopSolver)
    if own_loop and save - {grid_times[0], grid_times[-1]}:
        raise ValueError(f"solver {slv.name!r} runs its own loop: save_at can only hold the "
                         "first and last times of the grid")
    if missing:
        raise ValueError(f"save_at times {sorted(missing)} are not points of the grid")
    state_dtype = torch.float64 if float64 else compute_dtype(dtype)
    p.model_dtype = dtype if state_dtype != dtype else None
    p.grad_in_model = grad == "model"
    x = x.to(state_dtype)
    nfe0 = p.model.nfe
    traj: dict[float, Tensor] = {}
    if grid_times[0] in save:
        traj[grid_times[0]] = x.clone()
    if isinstance(slv, OwnLoopSolver):
        x = _own_loop(slv, p, x, save, traj)
    else:
        p.pending_checks = _deferred_checks(x)
        x = _fixed_grid_loop(slv, p, x, grid_times, save, traj, callback, progress, project)
        if p.pending_checks is not None:
            raise_pending(p.pending_checks)
            p.pending_checks = None
    if denoise:
        x = p.predict(x, times[-1], "x0")
    return Solution(x=x.to(dtype), nfe=p.model.nfe - nfe0, steps=p.steps, times=times,
                    solver=slv.name, trajectory=traj)


def _deferred_checks(x: Tensor) -> list[Any] | None:
    """The queue of a fixed-grid loop's NaN/Inf checks (:func:`check_model_output`): on a device
    other than the CPU (CUDA), a list, read once after the loop instead of one host-device sync
    per model call; on the CPU None (each check is read at once: the read costs no sync)."""
    return None if x.device.type == "cpu" else []


def _own_loop(slv: OwnLoopSolver, p: Problem, x: Tensor, save: set[float],
              traj: dict[float, Tensor]) -> Tensor:
    """An adaptive, external-loop or learned solver's solve (it runs its own loop), recording
    the final state in ``traj`` when its time is in ``save``."""
    x = slv.integrate(p, x)
    if float(p.times[-1]) in save:
        traj[float(p.times[-1])] = x.clone()
    return x


def _fixed_grid_loop(slv: FixedGridSolver, p: Problem, x: Tensor, grid_times: list[float],
                     save: set[float], traj: dict[float, Tensor],
                     callback: Callable[[int, float, Tensor], None] | None, progress: bool,
                     project: Callable[[int, float, Tensor], Tensor] | None) -> Tensor:
    """The driver's loop: ``init`` once, then ``step`` from grid point ``i`` to ``i + 1`` (the
    solver gets ``i``; nothing on the problem changes from step to step), with the ``project``
    hook, the saved states (into ``traj``) and the callback after each step."""
    state = slv.init(p, x)
    it: Any = range(p.steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=slv.name, leave=False)
    # a state that only this loop still holds once its step is done becomes the next step's
    # spare (the buffer of its result); not with a callback or projection, which see the states
    recycle, x_in = callback is None and project is None, x
    for i in it:
        x_new, state = slv.step(p, i, x, state)
        if recycle and x is not x_in and x is not x_new and unshared(x):
            p.spare = x
        x = x_new
        t_next = grid_times[i + 1]
        if project is not None:
            x = project(i, t_next, x)
        if t_next in save:
            traj[t_next] = x.clone()
        if callback is not None:
            callback(i, t_next, x)
    p.spare = None
    return x


GRAD_MODES = ("none", "model", "full")


def _check_call(sde: Any, grid_options: Any, **flags: Any) -> None:
    """Check the arguments that :func:`configure` reads, before it reads them, and the on/off
    ``flags`` (True or False: a string such as 'no' is not read as true)."""
    check_flags(**flags)
    check_forward_sde(sde)
    if grid_options is not None and not isinstance(grid_options, Mapping):
        raise TypeError(f"grid_options={grid_options!r} is invalid: expected a dict of the "
                        "grid's options, e.g. {'rho': 7.0}")


def _check_device(device: Any) -> None:
    """Raise unless ``device`` names a device that torch can allocate on here."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, AssertionError) as e:   # unknown name, no such device
        raise ValueError(f"device={device!r} is invalid: expected a torch device available "
                         f"here, e.g. 'cpu' or 'cuda' ({e})") from None


def _check_state(x_init: Any, shape: Any, dtype: Any) -> torch.dtype:
    """Check ``x_init`` (or, without it, ``shape`` and ``dtype``); returns the solve's dtype."""
    if x_init is not None:
        if not isinstance(x_init, Tensor):
            raise TypeError(f"x_init must be a torch.Tensor of shape (batch, ...), got "
                            f"{type(x_init).__name__}: convert it with torch.as_tensor(x, "
                            "dtype=torch.float32)")
        if x_init.ndim < 1 or x_init.shape[0] < 1:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}: expected (batch, ...) "
                             "with batch >= 1")
        check_float_dtype("x_init", x_init.dtype)
        if has_nonfinite(x_init):   # an empty x_init sums to 0: finite
            raise ValueError("x_init contains NaN or Inf: expected finite initial states")
        if shape is not None and tuple(shape) != tuple(x_init.shape):
            raise ValueError(f"shape mismatch: shape={tuple(shape)} but x_init has shape "
                             f"{tuple(x_init.shape)}")
        return x_init.dtype
    if shape is None:
        raise ValueError("give either x_init or shape")
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                           for d in dims):
        raise ValueError(f"shape={shape!r} is invalid: expected a tuple of integers >= 1, "
                         "(batch, ...)")
    check_float_dtype("dtype", dtype)
    return dtype


def _check_seeds(seed: Any, seeds: Any, noise: Any, n: int) -> None:
    """Check ``seed``, or ``seeds`` (one per sample of the ``n``) beside ``noise``."""
    if seeds is not None:
        if noise is not None:
            raise ValueError("give seeds or noise, not both: a noise source carries its own "
                             "per-sample seeds")
        if not is_collection(seeds):
            raise TypeError(f"seeds={seeds!r} is invalid: expected a list of per-sample "
                            "integer seeds, one per sample (or seed= for one integer)")
        seeds = list(seeds)
        if len(seeds) != n:
            raise ValueError(f"seeds has {len(seeds)} entries but the batch has {n} samples: "
                             "expected one seed per sample")
    else:
        check_seed("seed", seed)


def _check_inputs(x_init: Any, shape: Any, dtype: Any, steps: Any, grid: Any, t_start: Any,
                  t_end: Any, seed: Any, seeds: Any, noise: Any, callback: Any, grad: Any,
                  save_at: Any = None, device: Any = None) -> tuple[Tensor | None, torch.dtype]:
    """Validate sample()'s arguments before any work; returns ``(x_init, dtype)``."""
    if grad not in GRAD_MODES:
        raise ValueError(f"grad={grad!r} is invalid: expected one of {GRAD_MODES}")
    dtype = _check_state(x_init, shape, dtype)
    _check_seeds(seed, seeds, noise, x_init.shape[0] if x_init is not None else shape[0])
    if grid is not None and not isinstance(grid, str):  # an explicit grid carries its range
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if v is not None:
                raise ValueError(f"{name}={v!r} cannot be combined with an explicit grid: the "
                                 "grid's first and last times are the range")
        if steps is not None and steps != len(grid) - 1:
            raise ValueError(f"steps={steps!r} disagrees with the given grid of {len(grid)} "
                             f"times ({len(grid) - 1} steps): leave steps out")
    if noise is not None and (isinstance(noise, type) or not all(
            callable(getattr(noise, m, None)) for m in ("randn", "increment"))):
        raise TypeError(f"noise={noise!r} is invalid: expected a noise source with randn(like) "
                        "and increment(t0, t1, like), e.g. an instance of sdekit.SeededNoise "
                        "or sdekit.BrownianNoise")
    if save_at is not None and not (is_collection(save_at) and all(
            is_real(t) or isinstance(t, Tensor) and t.numel() == 1 for t in save_at)):
        raise ValueError(f"save_at={save_at!r} is invalid: expected a list of grid times "
                         "(finite numbers, each a point of the grid)")
    if device is not None:
        _check_device(device)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(i, t, x), got "
                        f"{type(callback).__name__}")
    return x_init, dtype
