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

What else pipelines call. Flux and SD3 pipelines plan through diffusers' ``retrieve_timesteps``,
which passes custom ``sigmas=`` (with Flux's ``mu=``) or ``timesteps=`` only to a
``set_timesteps`` whose signature names them: a flow model's ``sigmas`` are read as
FlowMatchEulerDiscreteScheduler reads them (shifted by the config's shift or by ``mu``; they are
the grid, and its appended final 0 is the x0 prediction of ``denoise``), ``timesteps`` are the
network's time inputs as given. img2img pipelines noise their image with ``add_noise`` (DDPM /
DDIM) or ``scale_noise`` (flow matching), the forward marginal, at ``timesteps[t_start *
order]``, call ``set_begin_index(t_start * order)`` and loop over ``timesteps[t_start *
order:]``: the solve is then :func:`sdekit.sample` on the grid's tail ``times[t_start:]``
(SDEdit), for every solver whose solve on that tail makes the plan's remaining model calls
(checked by a dry run of the tail; refused otherwise: the torchsde backends, EDM churn).

diffusers is imported on first use of :class:`SdekitScheduler` only.
"""
from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import check_seed, compute_dtype
from ..dynamics.parameterization import DiffusionModel, convert
from ..grids import make_grid, shift_factor, shift_times
from ..integrate import configure, sample
from ..noise import sample_seeds
from ..sde.base import ForwardSDE, check_forward_sde
from ..sde.discrete import DiscreteDDPM
from ..sde.flow import FlowSDE
from ..solvers.base import Solver
from ..solvers.registry import DEFAULT_SOLVER, get_solver
from .config import DiffusersSchedule, TimestepScale, _as_config

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


def _near(x: Tensor, y: Tensor) -> bool:
    """Equal up to the rounding of a solver's change of variables (e.g. ``(x / alpha) alpha``)."""
    return torch.allclose(x.to(y.dtype), y, rtol=1e-5, atol=1e-6)


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
        assert self._pending is not None  # raw() set it just before this call
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
        except BaseException as e:  # noqa: BLE001  (handed to the main thread, raised there)
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
                 solver: str | Solver | None = None, grid: Any = None, *, denoise: bool = True,
                 seed: int = 0, seeds: Sequence[int] | None = None, float64: bool = False,
                 grid_options: dict[str, Any] | None = None, num_train_timesteps: int | None = None,
                 steps_offset: int = 0, solver_options: dict[str, Any] | None = None,
                 exact_timesteps: bool = False) -> None:
        # solver None: sdekit.sample's rule (its configure), with each set_timesteps' step count
        self.given_solver, self.solver_options = solver, dict(solver_options or {})
        self.solver = get_solver(DEFAULT_SOLVER if solver is None else solver,
                                 **self.solver_options)   # its options checked before any work
        self._base_solver = self.solver   # the solver of a solve the option-free rule does not set
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
        self.exact_timesteps = bool(exact_timesteps)  # float64 timesteps, never snapped
        self._clock = DiffusionModel(lambda x, c: x, sde, prediction, time_input)  # time input only
        self.prediction, self.time_input = prediction, self._clock.time_input
        self.times: Tensor | None = None     # the sdekit grid (continuous times)
        self.calls: list[float] = []         # the continuous time of every network call
        self.timesteps: Tensor | None = None  # the same in the network's time units
        self.lead_in = False
        self._worker: _Worker | None = None
        self._k = self.begin_index = 0     # the index of the solve's first call
        self._solve_times: Tensor | None = None  # the grid of the solve (its tail from begin)
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
        elif isinstance(ti, TimestepScale):   # flow models told N sigma, N != 1000
            t = v / ti.scale
        else:
            raise ValueError(f"timesteps cannot be given for a callable time_input: give sdekit "
                             f"times as grid= instead (time_input={ti!r})")
        return t.double()

    def make_times(self, num_inference_steps: int | None, timesteps: Any
                   ) -> tuple[Tensor, Solver]:
        """The sdekit grid for ``set_timesteps`` and the solver that runs on it: the option-free
        rule's (:func:`sdekit.integrate.configure`) where neither a solver nor a grid was given
        and the step count decides, else the scheduler's own."""
        grid, base = self.grid, self._base_solver
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("give num_inference_steps or timesteps, not both")
            return self.time_of_network_time(timesteps), base
        if grid is not None and not isinstance(grid, str):   # explicit sdekit times
            times = torch.as_tensor(grid, dtype=torch.float64)
            if num_inference_steps is not None and num_inference_steps != times.numel():
                raise ValueError(f"num_inference_steps={num_inference_steps!r} disagrees with the "
                                 f"explicit grid of {times.numel()} times: pass "
                                 f"num_inference_steps={times.numel()} (its points) or leave "
                                 "it out")
            return times, base
        if not (isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
                and num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid: expected "
                             "an integer >= 1")
        if grid in SPACINGS:
            assert self.num_train_timesteps is not None  # __init__ refuses a spacing without
            ts = spacing_timesteps(grid, num_inference_steps, self.num_train_timesteps,
                                   self.steps_offset)
            return self.time_of_network_time(ts), base
        steps = num_inference_steps - 1 if self.denoise else num_inference_steps
        if steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} is too few with "
                             "denoise=True: expected at least 2 (one step, then the final x0)")
        if self.given_solver is None and grid is None:   # the option-free call: default_config
            name, options, grid, grid_options = configure(self.sde, None, steps, None,
                                                          self.grid_options, self.solver_options)
            times = make_grid(self.sde, grid, steps, **grid_options or {})
            return times, get_solver(name, **options)
        name = base.grid_for(self.sde) if grid is None else grid
        return make_grid(self.sde, name, steps, **self.grid_options), base

    def _plan(self, times: Tensor) -> tuple[list[float], bool]:
        """The continuous time of every model call of the solve on ``times`` (a dry run on a
        (1, 4) state with a zero network) and whether the solver moves the state before its
        first call."""
        if times.numel() - 1 < self.solver.min_steps:
            raise ValueError(f"{times.numel()} grid points ({times.numel() - 1} steps) are too few "
                             f"for solver {self.solver.name!r}: it needs at least "
                             f"{self.solver.min_steps} steps")
        calls: list[float] = []
        moved: list[bool] = []
        x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))

        def record(x: Tensor, t: float) -> Tensor:
            if not calls:   # rounding aside, is the first call at the initial state?
                moved.append(not _near(x, x0))
            calls.append(t)
            return torch.zeros_like(x)

        sample(self.sde, _SteppedModel(record, self.sde, self.prediction, self.time_input),
               x0, solver=self.solver, grid=times, denoise=self.denoise, seeds=[0],
               float64=self.float64)
        return calls, bool(moved and moved[0])

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                      timesteps: Any = None, times: Tensor | None = None) -> None:
        """Plan a solve; ``times``: an sdekit grid already made (``num_inference_steps`` and
        ``timesteps`` are then None)."""
        self.close()
        if times is None:
            times, self.solver = self.make_times(num_inference_steps, timesteps)
        else:
            self.solver = self._base_solver
        calls, self.lead_in = self._plan(times)
        if self.lead_in:  # the solver moves the state before its first call (EDM's churn)
            calls.insert(0, float(times[0]))
        self.times, self.calls = times, calls
        ts = self.network_time(torch.tensor(calls, dtype=torch.float64))
        if not self.exact_timesteps:
            # a stage time a rounding away from a table point (e.g. 6.7e-16) is that timestep
            ts = torch.where((ts - ts.round()).abs() < 1e-6, ts.round(), ts).float()
            if bool((ts == ts.round()).all()):   # integer timesteps, as diffusers' DDPM ones
                ts = ts.long()
        self.timesteps = ts.to(device) if device is not None else ts
        self._k = self.begin_index = 0
        self._solve_times = times

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the planned solve at model call ``begin_index`` (img2img / SDEdit: the pipeline
        slices ``timesteps[begin_index:]`` and noises its image to ``timesteps[begin_index]``
        with :meth:`add_noise`): that call must open a step (``begin_index = j * order``), and
        the solve is then the one on the grid's tail ``times[j:]``, whose model calls must be
        the plan's remaining ones."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(...) before set_begin_index()")
        assert self.times is not None  # set with the timesteps
        n, order, name = len(self.calls), int(self.solver.nfe_per_step), self.solver.name
        if not (isinstance(begin_index, int) and not isinstance(begin_index, bool)
                and 0 <= begin_index < n):
            raise ValueError(f"begin_index={begin_index!r} is invalid: expected an integer in "
                             f"[0, {n}) (an index into scheduler.timesteps)")
        self.close()
        self._k = self.begin_index = 0
        self._solve_times = self.times
        if begin_index == 0:
            return
        if self.lead_in:
            raise ValueError(f"begin_index={begin_index} is not supported for solver {name!r} "
                             "with this grid: it moves the state (churn) before its first model "
                             "call, so its steps do not open at a timestep; use begin_index=0")
        j = begin_index // order
        if not begin_index % order and j == self.times.numel() - 1:
            raise ValueError(f"begin_index={begin_index} leaves no step of solver {name!r}: "
                             "timesteps[begin_index:] is only the final x0 prediction "
                             f"(denoise); expected a begin index below {begin_index} (a "
                             "larger img2img strength)")
        if begin_index % order or j >= self.times.numel() - 1:
            raise ValueError(f"begin_index={begin_index} is not the first model call of a step "
                             f"of solver {name!r}: expected a multiple of order={order} below "
                             f"{order * (self.times.numel() - 1)} (steps of {order} model calls)")
        tail = self.times[j:]
        calls, lead_in = self._plan(tail)
        rest = self.calls[begin_index:]
        if lead_in or len(calls) != len(rest) or any(
                abs(a - b) > 1e-9 * (1 + abs(b)) for a, b in zip(calls, rest)):
            raise ValueError(f"begin_index={begin_index} is not supported for solver {name!r}: "
                             f"its solve from step {j} (t={float(tail[0]):.6g}) makes other "
                             "model calls than the planned timesteps[begin_index:] (its steps "
                             "depend on the whole grid); use begin_index=0")
        self._k = self.begin_index = begin_index
        self._solve_times = tail

    def times_at(self, timesteps: Any, batch: int) -> Tensor:
        """The continuous times of ``timesteps`` (the network's units; a scalar or one per
        sample), float64 of shape ``(batch,)``: a planned timestep is its call's exact time."""
        v = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        if v.numel() not in (1, batch):
            raise ValueError(f"timesteps has {v.numel()} entries but the batch has {batch} "
                             "samples: expected one timestep, or one per sample")
        t = self.time_of_network_time(v)
        if self.timesteps is not None:
            ts = self.timesteps.detach().double().cpu()
            near = (v[:, None] - ts[None, :]).abs() <= 1e-5 * (1 + ts.abs())[None, :]
            exact = torch.tensor(self.calls, dtype=torch.float64)[near.double().argmax(1)]
            t = torch.where(near.any(1), exact, t)
        bad = (t < self.sde.t_min - 1e-12) | (t > self.sde.T + 1e-12) | ~torch.isfinite(t)
        if bool(bad.any()):
            ends = self.network_time(torch.tensor([self.sde.t_min, self.sde.T])).tolist()
            raise ValueError(f"timesteps={v.tolist()} are invalid: expected network times of "
                             f"{self.sde!r}'s range [t_min, T] = [{self.sde.t_min:g}, "
                             f"{self.sde.T:g}] (as timesteps: {ends})")
        return t.expand(batch)

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Any) -> Tensor:
        """The forward marginal ``alpha(t) x0 + sigma(t) noise`` at ``timesteps``."""
        if not (isinstance(x0, Tensor) and isinstance(noise, Tensor)
                and noise.shape == x0.shape):
            raise ValueError(f"shape mismatch: noise has shape "
                             f"{tuple(getattr(noise, 'shape', ()))} but the sample has shape "
                             f"{tuple(getattr(x0, 'shape', ()))}: expected the same shape")
        t = self.times_at(timesteps, x0.shape[0])
        dt = compute_dtype(x0.dtype)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = self.sde.alpha(t).reshape(shape).to(dt).to(x0.device)
        s = self.sde.sigma(t).reshape(shape).to(dt).to(x0.device)
        return (a * x0.to(dt) + s * noise.to(dt)).to(x0.dtype)

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
        solver, times, denoise, float64 = self.solver, self._solve_times, self.denoise, self.float64

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
        got = _time_value(timestep)
        if k == 0 and self._worker is None and not self._is_at(got, 0):
            # a loop that sliced timesteps[j * order:] without set_begin_index: begin there
            order = int(self.solver.nfe_per_step)
            at = [i for i in range(order, n, order) if self._is_at(got, i)]
            if at and not self.lead_in:
                self.set_begin_index(at[0])
                k = self._k
        expected = float(self.timesteps[k])
        if not self._is_at(got, k):
            raise ValueError(f"step() got timestep={got:g} but the next model call of solver "
                             f"{self.solver.name!r} (call {k} of {n}) is at timestep "
                             f"{expected:g}: pass the entries of scheduler.timesteps in order")
        if not isinstance(model_output, Tensor) or model_output.shape != x.shape:
            shape = tuple(model_output.shape) if isinstance(model_output, Tensor) else \
                type(model_output).__name__
            raise ValueError(f"shape mismatch: model_output has shape {shape} but sample has "
                             f"shape {tuple(x.shape)}: expected the network's output for sample")
        if self._worker is None:   # the solve's first call (0, or the begin index)
            msg = self._start(x, generator)
            if self.lead_in:  # the solver's first call is not at the pipeline's first sample
                self._k = 1
                return self._handle(msg, 1, n), None
            self._handle(msg, k, n)
            if not _near(msg[1], x):
                self.close()
                self.timesteps = None
                raise RuntimeError(f"solver {self.solver.name!r} made its first model call away "
                                   "from the initial sample, which its plan does not allow for")
        else:
            prev = self._prev
            assert prev is not None  # set by the solve's first call
            if x is not prev and not torch.equal(x.to(prev.dtype), prev):
                raise ValueError(
                    f"step() got a sample different from the prev_sample it returned at call "
                    f"{k - 1}: the sdekit solver keeps its own state (multistep history, "
                    "stages), so a pipeline that edits the latents between steps (inpainting "
                    "blends, callbacks) is not supported")
        x0 = self._x0(model_output, x, self.calls[k])
        assert self._worker is not None  # started by this solve's first call
        msg = self._worker.resume(model_output)
        self._k = k + 1
        return self._handle(msg, k + 1, n), x0

    def _is_at(self, timestep: float, k: int) -> bool:
        assert self.timesteps is not None  # called only after set_timesteps
        expected = float(self.timesteps[k])
        return abs(timestep - expected) <= 1e-5 * (1 + abs(expected))

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


#: the model config of a bare ``SdekitScheduler()``: diffusers' DDPMScheduler defaults
DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon"}
#: SdekitScheduler's own config fields (the rest of its config is the model's scheduler config)
OWN_FIELDS = ("solver", "grid", "denoise", "seed", "seeds", "float64", "grid_options",
              "solver_options", "source_class", "sde", "prediction", "time_input", "sdekit_sde")


def _sdekit_schedule(sde: ForwardSDE, prediction: str | None, time_input: Any,
                     scheduler_config: Any, source_class: str | None) -> tuple:
    """The schedule of an sdekit network given as ``(sde, prediction, time_input)``,
    and the config fields that record it."""
    check_forward_sde(sde)
    extra = sorted(k for k in dict(scheduler_config or {}) if not k.startswith("_"))
    if extra or source_class:
        raise ValueError(f"give sde= or a diffusers scheduler config, not both (got "
                         f"config fields {extra or [source_class]})")
    prediction = "eps" if prediction is None else prediction
    time_input = "model_time" if time_input is None else time_input
    model = DiffusionModel(lambda x, c: x, sde, prediction, time_input)  # validates both
    discrete = isinstance(sde, DiscreteDDPM)
    schedule = DiffusersSchedule(sde=sde, prediction=prediction,
                                 time_input=model.time_input,
                                 kind="ddpm" if discrete else "sdekit",
                                 num_train_timesteps=sde.N if isinstance(sde, DiscreteDDPM)
                                 else 0)
    record = {"sdekit_sde": repr(sde), "prediction": prediction,
              "time_input": model.time_input if isinstance(model.time_input, str)
              else repr(model.time_input)}
    return schedule, record


def _sigma_count(sigmas: Any, timesteps: Any, num_inference_steps: Any, sde: ForwardSDE) -> int:
    """The number of ``set_timesteps(sigmas=...)``'s sigmas, after the checks diffusers makes."""
    if timesteps is not None:
        raise ValueError("give sigmas or timesteps, not both (sigmas: a flow model's noise "
                         "levels; timesteps: the network's time inputs)")
    flow = isinstance(sde, FlowSDE)
    if not flow:
        raise ValueError(f"sigmas= (FlowMatchEulerDiscreteScheduler's custom sigmas) applies to "
                         f"flow-matching models; this scheduler's forward process is {sde!r}: "
                         "give timesteps= (the network's time inputs) or num_inference_steps")
    n = torch.as_tensor(sigmas).numel()
    if num_inference_steps is not None and num_inference_steps != n:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} disagrees with the "
                         f"{n} sigmas: leave it out or pass {n}")
    return n


def flow_times_of_sigmas(sde: ForwardSDE, sigmas: Any, grid_options: Mapping[str, Any]
                         ) -> Tensor:
    """The sdekit grid of FlowMatchEulerDiscreteScheduler's ``set_timesteps(sigmas=...)``:
    ``sigmas`` (decreasing, in (0, 1]) shifted by the static shift or ``mu`` of
    ``grid_options`` (``sigma' = s sigma / (1 + (s - 1) sigma)``), in float64."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    ok = (s.numel() >= 1 and bool(torch.isfinite(s).all()) and bool((s > 0).all())
          and bool((s <= 1).all()) and bool((s[1:] < s[:-1]).all()))
    if not ok:
        raise ValueError(f"sigmas={s.tolist()} is invalid: expected a strictly decreasing list "
                         "of noise levels in (0, 1] (diffusers appends the final 0 itself)")
    factor = shift_factor(**{k: grid_options[k] for k in ("shift", "mu", "image_seq_len",
                                                           "shift_type") if k in grid_options})
    times = s * factor / (1 + (factor - 1) * s) if factor != 1.0 else s  # shift_times' map
    if float(times[-1]) < sde.t_min or float(times[0]) > sde.T:
        raise ValueError(f"sigmas={s.tolist()} shifted by {factor:g} span "
                         f"[{float(times[-1]):.6g}, {float(times[0]):.6g}], outside the time "
                         f"range [{sde.t_min:g}, {sde.T:g}] of {sde!r}: expected sigmas "
                         "whose shifted values lie inside it")
    return shift_times(sde, s, factor)


# over 60 lines: the body is the class statement of SdekitScheduler, built lazily so that
# importing sdekit never imports diffusers; its methods are short and the logic lives in
# SchedulerCore above
def _build() -> dict[str, type]:
    try:
        from diffusers.configuration_utils import ConfigMixin
        from diffusers.schedulers.scheduling_utils import SchedulerMixin
        from diffusers.utils import BaseOutput
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("SdekitScheduler needs diffusers: pip install diffusers") from e
    from dataclasses import dataclass

    from ..grids import GRIDS
    from .config import read_scheduler_config

    @dataclass
    class SdekitSchedulerOutput(BaseOutput):
        """``prev_sample``: the state at which the pipeline calls the network next (after the
        last call: the result); ``pred_original_sample``: the x0 prediction of the output just
        given (None for an output the solver discards, see :class:`SdekitScheduler`)."""

        prev_sample: Tensor
        pred_original_sample: Tensor | None = None

    class SdekitScheduler(SchedulerMixin, ConfigMixin):
        """Any fixed-grid sdekit solver as a diffusers scheduler (see the module docstring for
        the design): ``pipe.scheduler = SdekitScheduler.from_config(pipe.scheduler.config,
        solver="dpmpp_3m")`` and the unchanged pipeline loop runs sdekit's solver.

        Args:
            solver: a registry name (``sdekit.solver_names()``) or a Solver; ``solver_options``
                are its options (e.g. ``order=3`` or ``S_churn=...``). Adaptive solvers and
                ``fno`` are refused (no timesteps list exists for them in advance). ``None``
                (default): :func:`sdekit.sample`'s rule, with no ``grid`` either the option-free
                :func:`sdekit.solvers.default_config` at each ``set_timesteps``' step count (its
                solver, options and grid; ``solver_options`` added to its), else
                ``DEFAULT_SOLVER`` (``unipc_bh2``) with its registry defaults.
            grid: ``None`` (the solver's own grid, as :func:`sdekit.sample`), an sdekit grid name
                (``logsnr``, ``karras``, ...; ``grid_options`` are its options), one of diffusers'
                spacings ``leading``, ``trailing``, ``linspace`` (integer timesteps spaced as
                DDIMScheduler does, with the config's ``steps_offset``), or an explicit array of
                sdekit times.
            denoise: finish with the x0 prediction at the grid's last time, as DDIM with
                ``set_alpha_to_one`` and DPM-Solver with ``final_sigmas_type='zero'`` do (the
                default). ``set_timesteps(n)`` on a named grid then takes ``n - 1`` steps and the
                final x0 (``n`` model calls for a one-call-per-step solver); without denoise
                ``n`` steps ending at the process's last time. A spacing grid's ``n`` timesteps,
                an explicit grid and ``set_timesteps(timesteps=...)`` are the grid's points
                (a pipeline's ``num_inference_steps`` must then equal their number).
            sde, prediction, time_input: instead of a scheduler config, the forward SDE of an
                sdekit network, its prediction and time input (as :class:`~sdekit.DiffusionModel`
                takes them; :func:`sdekit.interop.to_diffusers` passes them for a trained
                checkpoint): ``timesteps`` are then in that time input's units (``sigma_tilde``
                for an EDM-preconditioned denoiser, ``lambda``, ``t``, DDPM timesteps for a
                :class:`~sdekit.DiscreteDDPM`'s ``model_time``). Its config records
                ``sdekit_sde`` (the SDE's repr); ``from_config`` of it needs ``sde=`` again.
                These ``timesteps`` are float64, exactly the times :func:`sdekit.sample` gives
                the network (a network that computes its input scaling from them, as
                :class:`~sdekit.interop.DiffusersUNet` does for a denoiser, needs that
                precision: float32 would move it by ~1e-7).
            seed, seeds: per-sample seeds of a stochastic solver's noise: ``seeds`` (one per
                sample), else drawn from the pipeline's ``generator`` (one per sample from a list
                of generators), else derived from ``seed`` as :func:`sdekit.sample` does.
            float64: keep the solver state in float64 (the network still sees its dtype).
            scheduler_config: the model's diffusers scheduler config (default: DDPMScheduler's),
                read by :func:`sdekit.interop.read_scheduler_config`; its sampler fields
                (``clip_sample``, ``solver_order``, ``timestep_spacing``, ...) do not apply here:
                sdekit's solver, grid and options replace them. ``source_class``: its class name.

        ``timesteps`` holds one entry per network evaluation, in the network's time units (DDPM
        timesteps ``0 .. N-1``, fractional between table points; ``N sigma`` for flow models), so
        ``len(timesteps)`` is the NFE; ``order`` is the solver's NFE per step. ``step`` must be
        called with those timesteps in order, on the ``prev_sample`` it returned (the solver
        keeps its own history: latents edited between steps are refused). A solver that moves
        the state before its first model call (EDM churn where it applies at the first step)
        gets one extra leading timestep whose output it discards. img2img: ``add_noise`` /
        ``scale_noise`` and ``set_begin_index`` (see the module docstring); a loop that slices
        ``timesteps[j * order:]`` without calling it begins at its first ``step`` there.
        """

        config_name = "scheduler_config.json"  # type: ignore[assignment]  # diffusers: None

        def __init__(self, solver: str | Solver | None = None, grid: Any = None,
                     denoise: bool = True, seed: int = 0, seeds: Sequence[int] | None = None,
                     float64: bool = False, grid_options: dict[str, Any] | None = None,
                     source_class: str | None = None,
                     scheduler_config: dict[str, Any] | None = None,
                     sde: ForwardSDE | None = None, prediction: str | None = None,
                     time_input: Any = None, **solver_options: Any) -> None:
            if sde is not None:
                schedule, src = _sdekit_schedule(sde, prediction, time_input, scheduler_config,
                                                 source_class)
            elif prediction is not None or time_input is not None:
                raise ValueError("prediction / time_input describe an sdekit network and need "
                                 "its sde=; a diffusers scheduler config gives both itself")
            else:
                src = {k: v for k, v in dict(DDPM_DEFAULTS if scheduler_config is None
                                             else scheduler_config).items()
                       if not k.startswith("_") and k not in OWN_FIELDS}
                schedule = read_scheduler_config({**src, "_class_name": source_class}
                                                 if source_class else src)
            if isinstance(grid, str) and grid not in GRIDS and grid not in SPACINGS:
                raise ValueError(f"grid={grid!r} is invalid: expected None, an sdekit grid "
                                 f"{sorted(GRIDS)}, a diffusers spacing {list(SPACINGS)} or an "
                                 "array of times")
            if isinstance(grid, str) and grid in SPACINGS and schedule.kind != "ddpm":
                raise ValueError(f"grid={grid!r} (a diffusers timestep spacing) needs a DDPM "
                                 f"table; this model's scheduler config is {schedule.kind}")
            self._schedule = schedule
            self._grid_options = dict(grid_options or {})
            self._core = SchedulerCore(
                schedule.sde, schedule.prediction, schedule.time_input, solver, grid,
                denoise=denoise, seed=seed, seeds=seeds, float64=float64,
                num_train_timesteps=schedule.num_train_timesteps if schedule.kind == "ddpm"
                else None, steps_offset=schedule.steps_offset, solver_options=solver_options,
                exact_timesteps=sde is not None)
            self.num_inference_steps: int | None = None
            self.register_to_config(
                solver=None if solver is None else self._core.solver.name,
                solver_options=dict(solver_options),
                grid=grid if grid is None or isinstance(grid, str) else
                torch.as_tensor(grid, dtype=torch.float64).tolist(),
                denoise=bool(denoise), seed=seed, seeds=None if seeds is None else list(seeds),
                float64=bool(float64), grid_options=self._grid_options,
                source_class=source_class or schedule.scheduler_class, **src)

        @classmethod
        def from_config(cls, config: Any = None, return_unused_kwargs: bool = False,
                        **kwargs: Any) -> Any:
            """From any diffusers scheduler's config (or the scheduler itself, or a saved
            SdekitScheduler config): its model fields are kept, ``kwargs`` name the solver, the
            grid and the other arguments of :class:`SdekitScheduler`; any other keyword is a
            solver option. To change a model field, edit the config dict."""
            if config is None:
                raise ValueError("config is required: a diffusers scheduler or its .config")
            cfg, source = _as_config(config)   # source: the scheduler's class name
            own = {k: cfg.pop(k) for k in OWN_FIELDS if k in cfg}  # a saved SdekitScheduler's
            saved = own.pop("solver_options", None) or {}
            recorded = own.pop("sdekit_sde", None)
            if recorded is not None and kwargs.get("sde") is None:
                raise ValueError(f"this config is of an SdekitScheduler built for an sdekit "
                                 f"SDE (sdekit_sde={recorded!r}): pass that sde= again")
            if recorded is None and kwargs.get("sde") is not None:
                raise ValueError("sde= builds a scheduler for an sdekit network: call "
                                 "SdekitScheduler(sde=..., ...) (from_config reads a diffusers "
                                 "scheduler config)")
            if source != "SdekitScheduler":
                own["source_class"] = source
            given = {k: v for k, v in kwargs.items() if k in OWN_FIELDS}
            options = dict(given.pop("solver_options", None) or {})
            options.update({k: v for k, v in kwargs.items() if k not in OWN_FIELDS})
            if given.get("solver", own.get("solver")) == own.get("solver"):
                options = {**saved, **options}   # the saved solver's options still apply
            own.update(given)
            obj = cls(**own, scheduler_config=cfg, **options)
            return (obj, {}) if return_unused_kwargs else obj

        # --- what pipelines call ------------------------------------------------------
        @property
        def timesteps(self) -> Tensor | None:
            return self._core.timesteps

        @property
        def order(self) -> int:
            return int(self._core.solver.nfe_per_step)

        @property
        def init_noise_sigma(self) -> float:
            """The initial state's standard deviation for data of unit variance (1 for DDPM
            and flow models)."""
            sde, times = self._core.sde, self._core.times
            if times is None:
                return float(sde.prior_std)
            scale = sde.marginal_std(times[0])
            return 1.0 if abs(scale - 1.0) < 1e-9 else scale

        def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
            """The network's input is the state itself (DDPM and flow models)."""
            return sample

        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                          timesteps: Sequence[float] | None = None,
                          sigmas: Sequence[float] | None = None, mu: float | None = None
                          ) -> None:
            """Plan a solve: ``num_inference_steps`` on the scheduler's grid, or explicit
            ``timesteps`` in the network's units (the grid's points, used as given), or a flow
            model's ``sigmas`` as FlowMatchEulerDiscreteScheduler reads them (a decreasing list
            in (0, 1], shifted by the config's shift or by ``mu``, then the grid's points; with
            ``denoise`` the last step goes to sigma = 0, as its appended 0 does). ``mu``: the
            dynamic (resolution-dependent) shift of a flow config with
            ``use_dynamic_shifting``. A scheduler built with its own ``grid`` keeps it: of
            ``sigmas`` only their number counts (``num_inference_steps``)."""
            shift = (self._schedule.grid_options(mu=mu) if mu is not None
                     or self._schedule.dynamic_shift is not None
                     else self._schedule.grid_options())
            core = self._core
            core.grid_options = {**shift, **self._grid_options}
            times = None
            if sigmas is not None:
                n = _sigma_count(sigmas, timesteps, num_inference_steps, core.sde)
                if core.grid is None:
                    for f in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                        if self._schedule.config.get(f):
                            raise ValueError(
                                f"scheduler config field {f}=True makes diffusers replace the "
                                "given sigmas by another schedule on their range; sdekit uses "
                                "sigmas as given: set it False, or build the scheduler with "
                                "its own grid (e.g. grid='karras': then only the number of "
                                "sigmas counts)")
                    times = flow_times_of_sigmas(core.sde, sigmas, core.grid_options)
                    num_inference_steps = None
                else:
                    num_inference_steps = n
            core.set_timesteps(num_inference_steps, device, timesteps, times)
            assert core.times is not None  # set_timesteps sets it
            self.num_inference_steps = (num_inference_steps if num_inference_steps is not None
                                        else core.times.numel())

        def set_begin_index(self, begin_index: int = 0) -> None:
            """Start the planned solve at ``timesteps[begin_index]`` (img2img: diffusers'
            ``get_timesteps`` calls it with ``t_start * order``): a step's first model call;
            the solve is then :func:`sdekit.sample` on the grid's tail ``times[begin_index //
            order:]`` (a multistep solver starts its history afresh there, as diffusers'
            schedulers do). A loop that slices ``timesteps[t_start * order:]`` without calling
            it begins there too, at its first ``step``."""
            self._core.set_begin_index(begin_index)

        @property
        def begin_index(self) -> int:
            return self._core.begin_index

        def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Any) -> Tensor:
            """The forward marginal ``alpha(t) x0 + sigma(t) noise`` at ``timesteps`` (the
            network's units: one, or one per sample), as DDPMScheduler / DDIMScheduler's
            ``add_noise``; a planned timestep is its model call's exact time."""
            return self._core.add_noise(original_samples, noise, timesteps)

        def scale_noise(self, sample: Tensor, timestep: Any, noise: Tensor | None = None
                        ) -> Tensor:
            """FlowMatchEulerDiscreteScheduler's name (and argument order) for
            :meth:`add_noise`: ``(1 - sigma) sample + sigma noise`` for a flow model."""
            if noise is None:
                raise ValueError("noise is required: scale_noise(sample, timestep, noise)")
            return self._core.add_noise(sample, noise, timestep)

        def step(self, model_output: Tensor, timestep: Any, sample: Tensor,
                 generator: Any = None, return_dict: bool = True) -> Any:
            """Hand the network's output at ``(sample, timestep)`` to the solver; returns the
            state of the next network call (after the last one: the result)."""
            if self._schedule.learned_variance and model_output.shape[1] == 2 * sample.shape[1]:
                model_output = model_output[:, :sample.shape[1]]   # [eps, variance]
            prev, x0 = self._core.step(model_output, timestep, sample, generator)
            if not return_dict:
                return (prev,)
            return SdekitSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

        # --- sdekit's view --------------------------------------------------------------
        @property
        def times(self) -> Tensor | None:
            """The sdekit grid of the planned solve (continuous times, float64): the ``grid``
            that :func:`sdekit.sample` takes for the same solve."""
            return self._core.times

        @property
        def solver(self) -> Solver:
            return self._core.solver

        @property
        def sde(self) -> ForwardSDE:
            return self._core.sde

        def __len__(self) -> int:
            if not self._schedule.num_train_timesteps:
                raise TypeError(f"this scheduler's forward process {self._core.sde!r} is "
                                "continuous-time: it has no num_train_timesteps")
            return self._schedule.num_train_timesteps

        def __bool__(self) -> bool:   # not len(): a continuous-time scheduler has none
            return True

    for c in (SdekitScheduler, SdekitSchedulerOutput):
        c.__qualname__ = c.__name__
    return {"SdekitScheduler": SdekitScheduler, "SdekitSchedulerOutput": SdekitSchedulerOutput}


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name in ("SdekitScheduler", "SdekitSchedulerOutput"):
        if not _BUILT:
            _BUILT.update(_build())
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
