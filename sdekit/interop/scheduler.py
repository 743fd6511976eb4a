"""Solvers out: :class:`SdekitScheduler`, a diffusers scheduler that runs an sdekit solver inside
a pipeline's own denoising loop.

Design. The solvers stay stateless and :func:`sdekit.sample` stays the one loop that runs them;
the adapter inverts control instead. A pipeline owns its loop: it calls the network at
``(sample, t)``, then ``scheduler.step(model_output, t, sample)``. Here the solve runs as a
coroutine that stops at every model call, hands the state and time out, and resumes with the
network output the pipeline computed there. A Python generator cannot yield from inside nested
calls (the model call sits deep inside ``Solver.step``, or inside a backend such as torchsde), so
the coroutine is one :func:`sdekit.sample` call on a worker thread with a strict hand-off
(:class:`_Worker`): exactly one of the two threads runs at any time while the other waits on a
queue, so the result is bit for bit that of a single-threaded solve. The thread is a daemon and is
ended, by an exception raised at its pending model call, when the solve finishes, when
``set_timesteps`` starts another, or when the scheduler is garbage collected.

A pipeline reads ``timesteps`` before its loop, so ``set_timesteps`` plans the solve: a dry run
of the same solve on a (1, 1) state with a zero network records the time of every model call
(for a fixed-grid solver these times do not depend on the network's output; the real solve is
checked call by call against the plan). ``timesteps`` therefore has one entry per network
evaluation (its length is the NFE): two per step for Heun, as in diffusers'
``HeunDiscreteScheduler``, and ``order`` is the solver's NFE per step. Refused: the adaptive
solvers (``dopri5``, ``dpm_solver_adaptive``, ``dpmpp_adaptive``: their call times depend on the
network's outputs, so no timesteps list exists in advance) and ``fno`` (a learned operator that
replaces the network: it makes no model call a pipeline could serve).

diffusers is imported on first use of :class:`SdekitScheduler` only.
"""
from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import check_seed, compute_dtype
from ..dynamics.parameterization import DiffusionModel, convert
from ..grids import make_grid
from ..integrate import sample
from ..noise import sample_seeds
from ..sde.base import ForwardSDE
from ..solvers.base import Solver
from ..solvers.registry import DEFAULT_SOLVER, get_solver

#: diffusers' ``timestep_spacing`` rules, accepted as ``grid`` names (integer timesteps of a
#: discrete table; see :func:`spacing_timesteps`)
SPACINGS = ("leading", "trailing", "linspace")


def spacing_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0
                      ) -> Tensor:
    """The ``n`` integer timesteps (decreasing) of diffusers' ``timestep_spacing`` rule:
    ``leading``: ``k * (N // n) + steps_offset``; ``trailing``: ``round(N - k N / n) - 1``;
    ``linspace``: ``round`` of ``n`` points evenly spaced over ``[0, N - 1]``."""
    N = num_train_timesteps
    if spacing == "leading":
        ts = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (N // n) + steps_offset
    elif spacing == "trailing":
        ts = torch.round(N - torch.arange(n, dtype=torch.float64) * (N / n)) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(N - 1, 0, n, dtype=torch.float64))
    else:
        raise ValueError(f"grid={spacing!r} is not a timestep spacing: expected one of {SPACINGS}")
    return ts


def _time_value(t: Any) -> float:
    return float(torch.as_tensor(t).flatten()[0])


class _SteppedModel(DiffusionModel):
    """A :class:`DiffusionModel` whose network is evaluated elsewhere: every call hands the state
    (in the network's input dtype) and the continuous time to ``ask(x, t) -> output``. The output
    goes through DiffusionModel's usual checks and conversions."""

    def __init__(self, ask: Callable[[Tensor, float], Tensor], sde: ForwardSDE, prediction: str,
                 time_input: Any) -> None:
        super().__init__(self._net, sde, prediction, time_input)
        self._ask = ask
        self._pending: tuple[Tensor, float] | None = None

    def raw(self, x: Tensor, t: Any, input_dtype: torch.dtype | None = None) -> Tensor:
        self._pending = (x if input_dtype is None else x.to(input_dtype), _time_value(t))
        return super().raw(x, t, input_dtype)

    def _net(self, inp: Tensor, cond: Tensor) -> Tensor:
        return self._ask(*self._pending)


class _Abort(BaseException):
    """Raised at the worker's pending model call to end an unfinished solve (a BaseException,
    so no ``except Exception`` on the way up can swallow it)."""


class _Worker:
    """``target(ask) -> Tensor`` run on a daemon thread as a coroutine: each ``ask(x, t)`` posts
    ``("call", x, t)`` and blocks until :meth:`resume` sends the output; the end posts
    ``("done", x)`` or ``("error", exception)``. The two threads never run at the same time."""

    def __init__(self, target: Callable[[Callable[[Tensor, float], Tensor]], Tensor],
                 inference_mode: bool) -> None:
        self._to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._to_main: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = False
        self._thread = threading.Thread(target=self._main, args=(target, inference_mode),
                                        daemon=True, name="sdekit-scheduler-solve")
        self._thread.start()

    def _ask(self, x: Tensor, t: float) -> Tensor:
        self._to_main.put(("call", x, t))
        out = self._to_worker.get()
        if out is _Abort:
            raise _Abort
        return out

    def _main(self, target: Callable, inference_mode: bool) -> None:
        try:
            with torch.inference_mode(inference_mode):
                msg: tuple = ("done", target(self._ask))
        except _Abort:
            msg = ("aborted",)
        except BaseException as e:  # handed to the main thread, raised there
            msg = ("error", e)
        self._to_main.put(msg)

    def resume(self, out: Tensor | None = None) -> tuple:
        """Send ``out`` (None: just wait, at the start) and wait for the next message."""
        if out is not None:
            self._to_worker.put(out)
        msg = self._to_main.get()
        if msg[0] != "call":
            self.finished = True
            self._thread.join()
        return msg

    def close(self) -> None:
        """End the solve if it is still waiting at a model call, and the thread with it."""
        if self.finished:
            return
        self._to_worker.put(_Abort)
        while self._to_main.get()[0] == "call":
            self._to_worker.put(_Abort)
        self.finished = True
        self._thread.join()


class SchedulerCore:
    """The diffusers-free part of :class:`SdekitScheduler`: the plan of one solve and its
    step-by-step execution. ``sde``, ``prediction``, ``time_input`` describe the network
    (:class:`~sdekit.DiffusionModel`); see :class:`SdekitScheduler` for the rest."""

    def __init__(self, sde: ForwardSDE, prediction: str, time_input: Any,
                 solver: str | Solver = DEFAULT_SOLVER, grid: Any = None, *, denoise: bool = True,
                 seed: int = 0, seeds: Sequence[int] | None = None, float64: bool = False,
                 grid_options: dict[str, Any] | None = None, num_train_timesteps: int | None = None,
                 steps_offset: int = 0, solver_options: dict[str, Any] | None = None) -> None:
        self.solver = get_solver(solver, **(solver_options or {}))
        name = self.solver.name
        if self.solver.adaptive:
            raise ValueError(f"solver {name!r} is adaptive: the times of its model calls depend on "
                             "the network's outputs, so it cannot follow a timesteps list fixed "
                             "before the pipeline's loop; use a fixed-grid solver")
        if self.solver.grid_free:
            raise ValueError(f"solver {name!r} is a learned operator that replaces the network: it "
                             "makes no model call inside the pipeline's loop; call sdekit.sample "
                             "with it instead")
        check_seed("seed", seed)
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            for s in seeds:
                check_seed("seeds", s)
        if isinstance(grid, str) and grid in SPACINGS and num_train_timesteps is None:
            raise ValueError(f"grid={grid!r} (a diffusers timestep spacing) needs a discrete "
                             "table: this scheduler's forward process has no num_train_timesteps")
        self.sde, self.grid, self.denoise, self.float64 = sde, grid, bool(denoise), bool(float64)
        self.seed, self.seeds, self.grid_options = seed, seeds, dict(grid_options or {})
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.prediction, self.time_input = prediction, time_input
        self._clock = DiffusionModel(lambda x, c: x, sde, prediction, time_input)  # time input only
        self.times: Tensor | None = None     # the sdekit grid (continuous times)
        self.calls: list[float] = []         # the continuous time of every network call
        self.timesteps: Tensor | None = None  # the same in the network's time units
        self.lead_in = False
        self._worker: _Worker | None = None
        self._k = 0
        self._prev: Tensor | None = None

    # --- the plan -------------------------------------------------------------------------
    def network_time(self, t: Tensor) -> Tensor:
        """Continuous times -> the network's time input (e.g. DDPM timesteps ``N t - 1``)."""
        return self._clock._cond(torch.as_tensor(t, dtype=torch.float64))

    def time_of_network_time(self, v: Any) -> Tensor:
        """The network's time input -> continuous times (the inverse of :meth:`network_time`)."""
        v = torch.as_tensor(v, dtype=torch.float64).flatten()
        ti, sde = self.time_input, self.sde
        if ti == "model_time":
            inv = getattr(sde, "timestep_to_t", None)
            t = inv(v) if inv is not None else v
        elif ti == "t":
            t = v
        elif ti == "t1000":
            t = v / 1000
        elif ti == "sigma_tilde":
            t = sde.t_of_sigma_tilde(v)
        elif ti == "lambda":
            t = sde.t_of_lambda(v)
        else:
            raise ValueError(f"timesteps cannot be given for a callable time_input: give sdekit "
                             f"times as grid= instead (time_input={ti!r})")
        return t.double()

    def make_times(self, num_inference_steps: int | None, timesteps: Any) -> Tensor:
        """The sdekit grid for ``set_timesteps``."""
        grid = self.grid
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("give num_inference_steps or timesteps, not both")
            return self.time_of_network_time(timesteps)
        if grid is not None and not isinstance(grid, str):   # explicit sdekit times
            times = torch.as_tensor(grid, dtype=torch.float64)
            if num_inference_steps is not None and num_inference_steps != times.numel() - 1:
                raise ValueError(f"num_inference_steps={num_inference_steps!r} disagrees with the "
                                 f"explicit grid of {times.numel()} times: leave it out")
            return times
        if not (isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
                and num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid: expected "
                             "an integer >= 1")
        if grid in SPACINGS:
            ts = spacing_timesteps(grid, num_inference_steps, self.num_train_timesteps,
                                   self.steps_offset)
            return self.time_of_network_time(ts)
        steps = num_inference_steps - 1 if self.denoise else num_inference_steps
        if steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} is too few with "
                             "denoise=True: expected at least 2 (one step, then the final x0)")
        name = self.solver.grid_for(self.sde) if grid is None else grid
        return make_grid(self.sde, name, steps, **self.grid_options)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                      timesteps: Any = None) -> None:
        self.close()
        times = self.make_times(num_inference_steps, timesteps)
        if times.numel() - 1 < self.solver.min_steps:
            raise ValueError(f"{times.numel()} grid points ({times.numel() - 1} steps) are too few "
                             f"for solver {self.solver.name!r}: it needs at least "
                             f"{self.solver.min_steps} steps")
        calls: list[float] = []
        moved: list[bool] = []
        x0 = torch.ones(1, 1)

        def record(x: Tensor, t: float) -> Tensor:
            if not calls:
                moved.append(not torch.equal(x.to(x0.dtype), x0))
            calls.append(t)
            return torch.zeros_like(x)

        sample(self.sde, _SteppedModel(record, self.sde, self.prediction, self.time_input),
               x0, solver=self.solver, grid=times, denoise=self.denoise, seeds=[0],
               float64=self.float64)
        self.lead_in = bool(moved and moved[0])
        if self.lead_in:  # the solver moves the state before its first call (EDM's churn)
            calls.insert(0, float(times[0]))
        self.times, self.calls = times, calls
        ts = self.network_time(torch.tensor(calls, dtype=torch.float64)).float()
        if bool((ts == ts.round()).all()):
            ts = ts.long()
        self.timesteps = ts.to(device) if device is not None else ts
        self._k = 0

    # --- the solve ------------------------------------------------------------------------
    def _seeds_for(self, n: int, generator: Any) -> list[int]:
        if self.seeds is not None:
            if len(self.seeds) != n:
                raise ValueError(f"seeds has {len(self.seeds)} entries but the batch has {n} "
                                 "samples: expected one seed per sample")
            return self.seeds
        if self.solver.stochastic and generator is not None:
            gens = generator if isinstance(generator, (list, tuple)) else None
            if gens is not None:
                if len(gens) != n:
                    raise ValueError(f"generator is a list of {len(gens)} generators but the batch "
                                     f"has {n} samples: expected one per sample")
                return [int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device))
                        for g in gens]
            return torch.randint(0, 2 ** 62, (n,), generator=generator,
                                 device=generator.device).tolist()
        return sample_seeds(self.seed, n)

    def _start(self, x: Tensor, generator: Any) -> tuple:
        seeds = self._seeds_for(x.shape[0], generator)
        model = (self.sde, self.prediction, self.time_input)
        solver, times, denoise, float64 = self.solver, self.times, self.denoise, self.float64

        def target(ask: Callable[[Tensor, float], Tensor]) -> Tensor:
            return sample(model[0], _SteppedModel(ask, *model), x, solver=solver, grid=times,
                          denoise=denoise, seeds=seeds, float64=float64).x

        self._worker = _Worker(target, torch.is_inference_mode_enabled())
        self._finalizer = weakref.finalize(self, self._worker.close)
        return self._worker.resume()

    def step(self, model_output: Tensor, timestep: Any, x: Tensor, generator: Any = None
             ) -> tuple[Tensor, Tensor | None]:
        """Feed the network's output at the expected call; returns ``(prev_sample,
        pred_original_sample)``: the state of the next call (the result after the last)."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(...) before step()")
        k, n = self._k, len(self.calls)
        if k >= n:
            raise ValueError(f"step() was called {k + 1} times but scheduler.timesteps has {n} "
                             "entries: call set_timesteps again for a new solve")
        expected = float(self.timesteps[k])
        got = _time_value(timestep)
        if abs(got - expected) > 1e-5 * (1 + abs(expected)):
            raise ValueError(f"step() got timestep={got:g} but the next model call of solver "
                             f"{self.solver.name!r} (call {k} of {n}) is at timestep "
                             f"{expected:g}: pass the entries of scheduler.timesteps in order")
        if not isinstance(model_output, Tensor) or model_output.shape != x.shape:
            shape = tuple(model_output.shape) if isinstance(model_output, Tensor) else \
                type(model_output).__name__
            raise ValueError(f"shape mismatch: model_output has shape {shape} but sample has "
                             f"shape {tuple(x.shape)}: expected the network's output for sample")
        if k == 0:
            msg = self._start(x, generator)
            if self.lead_in:  # the solver's first call is not at the pipeline's first sample
                self._k = 1
                return self._handle(msg, 1, n), None
            self._handle(msg, 0, n)
        else:
            prev = self._prev
            if x is not prev and not torch.equal(x.to(prev.dtype), prev):
                raise ValueError(
                    f"step() got a sample different from the prev_sample it returned at call "
                    f"{k - 1}: the sdekit solver keeps its own state (multistep history, "
                    "stages), so a pipeline that edits the latents between steps (inpainting "
                    "blends, callbacks) is not supported")
        x0 = self._x0(model_output, x, self.calls[k])
        msg = self._worker.resume(model_output)
        self._k = k + 1
        return self._handle(msg, k + 1, n), x0

    def _handle(self, msg: tuple, k: int, n: int) -> Tensor:
        kind = msg[0]
        if kind == "error":
            self.timesteps = None
            raise msg[1]
        if kind == "call":
            if k >= n or abs(msg[2] - self.calls[k]) > 1e-9 * (1 + abs(self.calls[k])):
                self.close()
                self.timesteps = None
                raise RuntimeError(f"solver {self.solver.name!r} asked for a model call at "
                                   f"t={msg[2]:.9g}, which its plan (set_timesteps) does not hold "
                                   f"at call {k} of {n}")
            self._prev = msg[1]
            return msg[1]
        if kind == "done":
            if k != n:
                raise RuntimeError(f"solver {self.solver.name!r} finished after {k} of the {n} "
                                   "planned model calls")
            self._prev = None
            return msg[1]
        raise RuntimeError(f"unexpected message {kind!r} from the solve")

    def _x0(self, out: Tensor, x: Tensor, t: float) -> Tensor:
        """The x0 prediction of the network's output at ``(x, t)``."""
        dt = compute_dtype(x.dtype)
        xs = x.to(dt)
        c = self._clock._coeffs(xs, t, dots="flow" in (self.prediction,))
        return convert(self.prediction, "x0", out.to(dt), xs, *c).to(x.dtype)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._finalizer.detach()
            self._worker = None
