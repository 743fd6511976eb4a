"""``sample()``: the single driver loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .dynamics.parameterization import DiffusionModel, as_model
from .grids import make_grid
from .noise import SeededNoise, sample_seeds
from .sde.base import ForwardSDE
from .solvers.base import Problem, Solver
from .solvers.registry import get_solver


@dataclass
class Solution:
    """Samples plus statistics: the *measured* NFE, the steps taken, the grid used and
    (optionally) the states at the requested times."""

    x: Tensor
    nfe: int
    steps: int
    times: Tensor
    solver: str
    trajectory: dict[float, Tensor] = field(default_factory=dict)


def sample(sde: ForwardSDE, model: DiffusionModel | Callable[..., Tensor],
           x_init: Tensor | None = None, *, shape: Sequence[int] | None = None,
           solver: str | Solver = "unipc_bh2", steps: int | None = 20,
           grid: str | Tensor | Sequence[float] | None = None, t_start: float | None = None,
           t_end: float | None = None, prediction: str = "eps", denoise: bool = False,
           float64: bool = False, seed: int = 0, seeds: Sequence[int] | None = None,
           noise: Any = None, save_at: Sequence[float] | None = None,
           callback: Callable[[int, float, Tensor], None] | None = None, progress: bool = False,
           dtype: torch.dtype = torch.float32, device: Any = None,
           grid_options: dict[str, Any] | None = None, **solver_options: Any) -> Solution:
    """Sample a diffusion model by solving its reverse-time SDE or probability-flow ODE.

    Args:
        sde: the forward process.
        model: a :class:`DiffusionModel` or a callable ``net(x, cond)`` whose output type is
            ``prediction``.
        x_init: the initial state at ``t_start``; if None, drawn from the prior with per-sample
            seeds (``shape`` is then required).
        solver: a registry name (see ``sdekit.solvers.solver_names()``) or a Solver instance;
            ``solver_options`` are passed to it.
        steps: number of steps (intervals of the grid); ignored when ``grid`` is an array.
        grid: a grid name (``uniform``, ``quadratic``, ``logsnr``, ``karras``) or an explicit
            decreasing array of times; default: the solver's grid for this SDE
            (``Solver.grid_for(sde)``).
        t_start, t_end: integration range (default ``sde.T`` down to ``sde.t_min``).
        denoise: finish with one extra model call returning the x0 prediction at ``t_end``.
        float64: keep the solver state in float64 (the model is still called in ``dtype``).
        seed, seeds: per-sample seeds (``seeds`` explicitly, else derived from ``seed``) for the
            initial state and the solver's noise; a sample does not depend on batch size or
            position.
        noise: a custom noise source (see :mod:`sdekit.noise`), e.g. BrownianNoise.
        save_at: grid times at which to record the state in ``Solution.trajectory``.
        callback: called as ``callback(i, t, x)`` after each step.
        progress: show a tqdm progress bar.
    """
    dm = as_model(model, sde, prediction)
    slv = get_solver(solver, **solver_options)
    explicit = grid is not None and not isinstance(grid, str)  # an array of times
    times = make_grid(sde, slv.grid_for(sde) if grid is None else grid,
                      None if explicit else steps, t_start, t_end, **(grid_options or {}))
    if times.numel() - 1 < slv.min_steps:
        raise ValueError(f"steps={times.numel() - 1} is too few for solver {slv.name!r}: it needs "
                         f"at least {slv.min_steps}")
    if x_init is None:
        if shape is None:
            raise ValueError("give either x_init or shape")
        n = int(shape[0])
        seeds = list(seeds) if seeds is not None else sample_seeds(seed, n)
        if noise is None:
            noise = SeededNoise(seeds)
        z = noise.randn(torch.empty(tuple(shape), dtype=dtype, device=device))
        if t_start is None:
            scale = sde.prior_std
        else:  # the marginal scale at t_start for data of unit variance
            scale = float((sde.alpha(times[0]) ** 2 + sde.sigma(times[0]) ** 2).sqrt())
        x = z * scale
    else:
        if shape is not None and tuple(shape) != tuple(x_init.shape):
            raise ValueError(f"shape mismatch: shape={tuple(shape)} but x_init has shape "
                             f"{tuple(x_init.shape)}")
        x = x_init.to(device=device) if device is not None else x_init
        dtype = x.dtype
        if noise is None:
            seeds = list(seeds) if seeds is not None else sample_seeds(seed, x.shape[0])
            noise = SeededNoise(seeds)
    save = {float(t) for t in (save_at or [])}
    missing = save - {float(t) for t in times}
    own_loop = slv.adaptive or slv.external_loop
    if own_loop and save - {float(times[0]), float(times[-1])}:
        raise ValueError(f"solver {slv.name!r} runs its own loop: save_at can only hold the "
                         "first and last times of the grid")
    if missing:
        raise ValueError(f"save_at times {sorted(missing)} are not points of the grid")
    model_dtype = None
    if float64:
        model_dtype, x = dtype, x.to(torch.float64)
    p = Problem(sde, dm, times, noise, solver_name=slv.name, model_dtype=model_dtype)
    nfe0 = dm.nfe
    traj: dict[float, Tensor] = {}
    if float(times[0]) in save:
        traj[float(times[0])] = x.clone()
    if own_loop:
        x = slv.integrate(p, x)
        if float(times[-1]) in save:
            traj[float(times[-1])] = x.clone()
    else:
        state = slv.init(p, x)
        it = range(p.steps)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=slv.name, leave=False)
        for i in it:
            p.step_index = i
            x, state = slv.step(p, i, x, state)
            t_next = float(times[i + 1])
            if t_next in save:
                traj[t_next] = x.clone()
            if callback is not None:
                callback(i, t_next, x)
    if denoise:
        p.step_index = p.steps
        x = p.predict(x, times[-1], "x0")
    return Solution(x=x.to(dtype), nfe=dm.nfe - nfe0, steps=p.steps, times=times,
                    solver=slv.name, trajectory=traj)
