"""One model contract: the prediction kinds (eps, x0, v, score, denoiser, flow), their
conversions, the network's time input, and :class:`DiffusionModel`.

Conventions (``x = alpha x0 + sigma eps``, any forward SDE):

* eps:      eps
* x0:       x0 = (x - sigma eps) / alpha
* v:        v = alpha eps - sigma x0   (Salimans & Ho 2022; for VP alpha^2 + sigma^2 = 1)
* score:    score = -eps / sigma
* denoiser: k-diffusion / EDM style ``D(x / alpha, sigma / alpha) = x0`` in the VE-equivalent
  space (``sigma_tilde = sigma / alpha = exp(-lambda)``).
* flow:     u = alpha'(t) x0 + sigma'(t) eps, the velocity ``dx_t/dt`` of the interpolant (flow
  matching, Lipman et al. 2023; rectified flow, Liu et al. 2023: ``u = eps - x0`` for
  ``alpha = 1 - t``, ``sigma = t``). Its conversions need ``alpha' = d alpha/dt`` and
  ``sigma' = d sigma/dt`` (``ForwardSDE.alpha_dot`` / ``sigma_dot``). Solving the 2x2 system
  ``x = alpha x0 + sigma eps``, ``u = alpha' x0 + sigma' eps`` with determinant
  ``D = alpha sigma' - sigma alpha' = -alpha sigma dlambda/dt > 0``:
  ``x0 = (sigma' x - sigma u) / D`` and ``eps = (alpha u - alpha' x) / D``, both finite at
  alpha = 0 (flow matching at t = 1: ``x0 = x - t u``, ``eps = x + (1 - t) u``).

Each kind is one :class:`PredictionKind` in the table :data:`KINDS`: its conversion to x0 and
to eps, its construction from x0 and eps, and what solvers and checks need to know about it.
Every conversion in sdekit (:func:`convert`, :func:`to_eps`, :func:`to_x0`, :func:`from_eps`,
:meth:`DiffusionModel.predict`, the losses, every solver) goes through that table, so a new
kind is one :func:`register_prediction` call (see docs/extending.md).

Conversions to x0 are written directly (:func:`to_x0`), not through eps, so that x0 stays finite
where alpha = 0 for the kinds that determine it there (flow, v, x0); eps and score carry no
information about x0 at alpha = 0.

Solvers hand the model their precomputed schedule coefficients (:class:`Coeffs`, alpha and sigma
at the call's time) so a conversion evaluates nothing of the SDE; solvers whose update is linear
in the model output ask for the kind's :attr:`PredictionKind.linear_form` (x0 or eps, whichever
the network gives in the fewest operations) and write their update in that form.

Every network call goes through an :class:`NFECounter`, so NFE is measured, never assumed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import torch
from torch import Tensor

from .._utils import append_dims, as_tensor, compute_dtype
from ..sde.base import ForwardSDE, check_forward_sde

#: ``t1000``: 1000 t, the timestep scale diffusers' flow-matching transformers (SD3, Flux) take
TIME_INPUTS = ("model_time", "t", "sigma_tilde", "lambda", "t1000")


class Coeffs(NamedTuple):
    """The schedule at one time, as a conversion needs it: ``alpha``, ``sigma`` and (for the flow
    kind) ``alpha_dot = d alpha/dt``, ``sigma_dot = d sigma/dt``. Each is a tensor broadcastable
    against the state, or a plain number (a solver's precomputed grid value)."""

    alpha: Any
    sigma: Any
    alpha_dot: Any = None
    sigma_dot: Any = None


def _flow_det(kind: str, c: Coeffs) -> Any:
    """``D = alpha sigma' - sigma alpha'`` for the flow kind (an error without the derivatives)."""
    if c.alpha_dot is None or c.sigma_dot is None:
        raise ValueError(f"prediction={kind!r} needs alpha_dot and sigma_dot (d alpha/dt, "
                         "d sigma/dt: ForwardSDE.alpha_dot / sigma_dot) for its conversions")
    return c.alpha * c.sigma_dot - c.sigma * c.alpha_dot


def _eps_to_x0(out: Tensor, x: Tensor, c: Coeffs) -> Tensor:
    if isinstance(c.alpha, float) and isinstance(c.sigma, float):
        return torch.add(x, out, alpha=-c.sigma).mul_(1 / c.alpha)  # grid numbers: one fused pass
    return (x - c.sigma * out) / c.alpha


#: ``(out, x, coeffs) -> x0`` or ``-> eps``
ToFn = Callable[[Tensor, Tensor, Coeffs], Tensor]
#: ``(x0, eps, x, coeffs) -> out``: ``x0`` and ``eps`` are thunks (a kind evaluates only the ones
#: it needs)
FromFn = Callable[[Callable[[], Tensor], Callable[[], Tensor], Tensor, Coeffs], Tensor]


@dataclass(frozen=True)
class PredictionKind:
    """One prediction kind of the model contract.

    Args:
        name: its name (``DiffusionModel(prediction=name)``, ``sdekit.sample(prediction=...)``).
        to_x0, to_eps: ``(out, x, coeffs) -> x0`` / ``eps`` for an output ``out`` at state ``x``.
        from_x0_eps: ``(x0, eps, x, coeffs) -> out``, with ``x0()`` and ``eps()`` thunks.
        linear_form: ``"x0"`` or ``"eps"``: the one of the two the kind gives in one linear
            combination (finite at alpha = 0 where the kind determines x0 there); solvers whose
            update is linear in the model output ask for it.
        x0_at_alpha_zero: whether the output determines x0 where alpha = 0 (a solve can start at
            flow matching's t = 1 only with such a network).
        needs_dots: whether the conversions need ``alpha_dot`` and ``sigma_dot``.
        values_of: the name of a kind whose values this kind's outputs are (``denoiser``: ``x0``),
            so no conversion is made between the two.
        scaled_input: the network is called as ``net(x / alpha, sigma_tilde)`` (the denoiser).
    """

    name: str
    to_x0: ToFn
    to_eps: ToFn
    from_x0_eps: FromFn
    linear_form: str = "eps"
    x0_at_alpha_zero: bool = False
    needs_dots: bool = False
    values_of: str | None = None
    scaled_input: bool = False

    @property
    def values(self) -> str:
        return self.values_of or self.name


def _x0_to_eps(out: Tensor, x: Tensor, c: Coeffs) -> Tensor:
    if isinstance(c.alpha, float) and c.alpha == 1.0:  # the VE-equivalent variables (EDM)
        return (x - out).div_(c.sigma)
    return (x - c.alpha * out) / c.sigma


def _x0_kind(name: str, **kw: Any) -> PredictionKind:
    return PredictionKind(name, to_x0=lambda out, x, c: out, to_eps=_x0_to_eps,
                          from_x0_eps=lambda x0, eps, x, c: x0(), linear_form="x0", **kw)


def _v_to_x0(out: Tensor, x: Tensor, c: Coeffs) -> Tensor:
    return (c.alpha * x - c.sigma * out) / (c.alpha * c.alpha + c.sigma * c.sigma)


def _v_to_eps(out: Tensor, x: Tensor, c: Coeffs) -> Tensor:
    return (c.alpha * out + c.sigma * x) / (c.alpha * c.alpha + c.sigma * c.sigma)


def _flow_to_x0(out: Tensor, x: Tensor, c: Coeffs) -> Tensor:
    det = _flow_det("flow", c)
    return (c.sigma_dot * x - c.sigma * out) / det


def _flow_to_eps(out: Tensor, x: Tensor, c: Coeffs) -> Tensor:
    det = _flow_det("flow", c)
    return (c.alpha * out - c.alpha_dot * x) / det


def _flow_from(x0: Callable[[], Tensor], eps: Callable[[], Tensor], x: Tensor, c: Coeffs
               ) -> Tensor:
    _flow_det("flow", c)
    return c.alpha_dot * x0() + c.sigma_dot * eps()


#: the prediction kinds by name (extend with :func:`register_prediction`)
KINDS: dict[str, PredictionKind] = {}


def register_prediction(kind: PredictionKind) -> PredictionKind:
    """Add a prediction kind to the model contract: every conversion, :class:`DiffusionModel`,
    the losses and every solver pick it up. Names are unique."""
    if not isinstance(kind, PredictionKind):
        raise TypeError(f"kind must be a PredictionKind, got {type(kind).__name__}")
    if not (isinstance(kind.name, str) and kind.name.isidentifier()):
        raise ValueError(f"name={kind.name!r} is invalid: expected an identifier such as 'eps'")
    if kind.name in KINDS:
        raise ValueError(f"prediction kind {kind.name!r} is already registered")
    if kind.values_of is not None and kind.values_of not in KINDS:
        raise ValueError(f"values_of={kind.values_of!r} is invalid: expected a registered kind, "
                         f"one of {tuple(KINDS)}")
    if kind.linear_form not in ("x0", "eps"):
        raise ValueError(f"linear_form={kind.linear_form!r} is invalid: expected 'x0' or 'eps'")
    KINDS[kind.name] = kind
    return kind


for _k in (
    PredictionKind("eps", to_x0=_eps_to_x0, to_eps=lambda out, x, c: out,
                   from_x0_eps=lambda x0, eps, x, c: eps()),
    _x0_kind("x0", x0_at_alpha_zero=True),
    PredictionKind("v", to_x0=_v_to_x0, to_eps=_v_to_eps,
                   from_x0_eps=lambda x0, eps, x, c: c.alpha * eps() - c.sigma * x0(),
                   x0_at_alpha_zero=True),
    PredictionKind("score", to_x0=lambda out, x, c: (x + c.sigma * c.sigma * out) / c.alpha,
                   to_eps=lambda out, x, c: -c.sigma * out,
                   from_x0_eps=lambda x0, eps, x, c: -eps() / c.sigma),
    _x0_kind("denoiser", values_of="x0", scaled_input=True),
    PredictionKind("flow", to_x0=_flow_to_x0, to_eps=_flow_to_eps, from_x0_eps=_flow_from,
                   linear_form="x0", x0_at_alpha_zero=True, needs_dots=True),
):
    register_prediction(_k)


class _KindNames(Sequence[str]):
    """The registered kinds' names, in registration order (a live, read-only view of
    :data:`KINDS` that compares and prints as a tuple)."""

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return tuple(KINDS)[i]

    def __len__(self) -> int:
        return len(KINDS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(KINDS))

    def __contains__(self, name: object) -> bool:
        return name in KINDS

    def __eq__(self, other: object) -> bool:
        return tuple(KINDS) == (tuple(other) if isinstance(other, (tuple, list, _KindNames))
                                else other)

    __hash__ = None  # type: ignore[assignment]  # a live view: mutable, so unhashable

    def __repr__(self) -> str:
        return repr(tuple(KINDS))


#: the names of the prediction kinds (live: includes kinds added by :func:`register_prediction`)
PREDICTIONS: Sequence[str] = _KindNames()


def prediction_kind(name: str) -> PredictionKind:
    """The registered kind ``name`` (a clear error naming the valid ones otherwise)."""
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"prediction={name!r} is invalid: expected one of {PREDICTIONS}")
    return kind


def _coeffs(alpha: Any, sigma: Any, alpha_dot: Any, sigma_dot: Any) -> Coeffs:
    return Coeffs(alpha, sigma, alpha_dot, sigma_dot)


def to_eps(kind: str, out: Tensor, x: Tensor, alpha: Any, sigma: Any,
           alpha_dot: Any = None, sigma_dot: Any = None) -> Tensor:
    """Convert a prediction of type ``kind`` to eps (``alpha``, ``sigma`` broadcastable to x;
    ``alpha_dot``, ``sigma_dot`` are needed for ``kind='flow'`` only)."""
    return prediction_kind(kind).to_eps(out, x, _coeffs(alpha, sigma, alpha_dot, sigma_dot))


def to_x0(kind: str, out: Tensor, x: Tensor, alpha: Any, sigma: Any,
          alpha_dot: Any = None, sigma_dot: Any = None) -> Tensor:
    """Convert a prediction of type ``kind`` to x0 directly (finite at alpha = 0 for flow, v and
    x0 predictions; see the module docstring). With plain-number ``alpha`` and ``sigma`` (a
    solver's grid values) eps -> x0 is one fused pass over the state."""
    return prediction_kind(kind).to_x0(out, x, _coeffs(alpha, sigma, alpha_dot, sigma_dot))


def convert(src: str, dst: str, out: Tensor, x: Tensor, alpha: Any, sigma: Any,
            alpha_dot: Any = None, sigma_dot: Any = None) -> Tensor:
    """Convert a prediction of type ``src`` to type ``dst`` through x0 and eps, each computed
    directly from ``src`` (``to_x0``, ``to_eps`` of its :class:`PredictionKind`), so the result
    is finite wherever ``src`` determines the two (at alpha = 0: flow, v, x0)."""
    s, d = prediction_kind(src), prediction_kind(dst)
    if s.values == d.values:
        return out
    c = _coeffs(alpha, sigma, alpha_dot, sigma_dot)
    return d.from_x0_eps(lambda: s.to_x0(out, x, c), lambda: s.to_eps(out, x, c), x, c)


def from_eps(kind: str, eps: Tensor, x: Tensor, alpha: Any, sigma: Any,
             alpha_dot: Any = None, sigma_dot: Any = None) -> Tensor:
    """Convert eps to a prediction of type ``kind`` (inverse of :func:`to_eps`)."""
    return convert("eps", kind, eps, x, alpha, sigma, alpha_dot, sigma_dot)


def time_cond(sde: ForwardSDE, time_input: str | Callable[[Tensor], Tensor], t: Tensor
              ) -> Tensor:
    """The network's conditioning ``time_input`` (one of :data:`TIME_INPUTS` or a callable
    ``t -> cond``) at times ``t``: the one time-input dispatch of the samplers' model calls,
    the losses and guidance."""
    if callable(time_input):
        return time_input(t)
    if time_input not in TIME_INPUTS:
        raise ValueError(f"time_input={time_input!r} is invalid: expected one of "
                         f"{TIME_INPUTS} or a callable")
    fn = {"model_time": sde.model_time, "t": lambda u: sde._time(u)[0],
          "sigma_tilde": sde.sigma_tilde, "lambda": sde.lambda_,
          "t1000": lambda u: 1000 * sde._time(u)[0]}[time_input]
    return fn(t)


def network_time_input(prediction: str, time_input: str | Callable[[Tensor], Tensor]
                       ) -> str | Callable[[Tensor], Tensor]:
    """The time input a network of kind ``prediction`` is called with: ``sigma_tilde`` for a
    kind with ``scaled_input`` (the denoiser), ``time_input`` otherwise."""
    return "sigma_tilde" if prediction_kind(prediction).scaled_input else time_input


def network_input(prediction: str, x: Tensor, alpha: Any) -> Tensor:
    """The state a network of kind ``prediction`` sees: ``x / alpha`` for a kind with
    ``scaled_input`` (the denoiser), ``x`` otherwise (and where alpha is the number 1, as on
    variance-exploding processes: no division, no copy)."""
    if not prediction_kind(prediction).scaled_input or (isinstance(alpha, float) and alpha == 1.0):
        return x
    return x / alpha


def _bcast(v: Any, like: Tensor) -> Tensor:
    """A number, a 0-d or a per-sample tensor, broadcastable against ``like`` in its dtype."""
    if isinstance(v, Tensor) and v.ndim == like.ndim and v.dtype == like.dtype:
        return v
    v = torch.as_tensor(v, dtype=torch.float64, device=like.device)
    return append_dims(v, like.ndim).to(like.dtype)


class NFECounter:
    """Wrap a callable and count its calls (one call on a batch = one function evaluation; a
    callable that runs several network passes per call, e.g. classifier-free guidance's
    conditional and unconditional branch, says so in its ``nfe_per_call`` attribute and counts
    that many)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.count += int(getattr(self.fn, "nfe_per_call", 1))
        return self.fn(*args, **kwargs)

    def reset(self) -> None:
        self.count = 0


class DiffusionModel:
    """A network plus its forward SDE and output parametrisation, callable as any other one.

    Args:
        net: ``net(x, cond) -> Tensor`` of x's shape. For ``prediction='denoiser'`` it is called as
            ``net(x / alpha, sigma_tilde)`` and returns x0.
        sde: the forward process the network was trained on.
        prediction: what the network outputs: a kind of :data:`PREDICTIONS` (``eps, x0, v,
            score, denoiser, flow`` and any added by :func:`register_prediction`).
        time_input: the conditioning passed to the network: ``model_time`` (default:
            ``sde.model_time(t)``, the integer-timestep scale for :class:`DiscreteDDPM`, t
            otherwise),
            ``t``, ``sigma_tilde``, ``lambda``, ``t1000`` (1000 t: diffusers' flow transformers),
            or a callable ``t -> cond``.
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], sde: ForwardSDE,
                 prediction: str = "eps",
                 time_input: str | Callable[[Tensor], Tensor] = "model_time") -> None:
        if not callable(net):
            raise TypeError(f"net must be a callable net(x, cond) -> Tensor, got "
                            f"{type(net).__name__}")
        check_forward_sde(sde, "the process the network was trained on")
        prediction_kind(prediction)
        if not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input={time_input!r} is invalid: expected one of "
                             f"{TIME_INPUTS} or a callable")
        time_input = network_time_input(prediction, time_input)
        self.net = NFECounter(net)
        self.sde = sde
        self.prediction = prediction
        self.time_input = time_input
        self._memo: dict[tuple[Any, ...], tuple[Tensor, ...]] = {}

    #: entries of the per-time cache of schedule factors (see :meth:`_cached`) before it is cleared
    MEMO_SIZE = 8192

    def _cached(self, what: Any, x: Tensor, t: Any, fn: Callable[[], tuple[Tensor, ...]]
                ) -> tuple[Tensor, ...]:
        """``fn()`` (factors that depend only on a scalar time, the batch size, device and
        dtypes), computed once per key: a solver calls the model at the same grid times with
        the same batch, and validating and evaluating the schedule there on every call is most
        of a small state's step. Per-sample times, a callable ``time_input`` and factors that
        require grad (a learned schedule) are not cached.
        The cached tensors are shared between calls; the network gets a copy of its
        conditioning (see :meth:`raw`), so modifying it in place is harmless."""
        if isinstance(t, Tensor):
            if t.ndim != 0 or t.device.type != "cpu":
                return fn()
            tv = float(t)
        elif isinstance(t, (int, float)):
            tv = float(t)
        else:
            return fn()
        key = (what, tv, x.shape[0], x.ndim, x.dtype, x.device)
        out = self._memo.get(key)
        if out is None:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            out = fn()
            if not any(isinstance(v, Tensor) and v.requires_grad for v in out):
                self._memo[key] = out
        return out

    @property
    def nfe(self) -> int:
        return self.net.count

    def _cond(self, t: Tensor) -> Tensor:
        return time_cond(self.sde, self.time_input, t)

    def _batch_time(self, x: Tensor, t: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        elif t.shape != (x.shape[0],):
            raise ValueError(f"shape mismatch: t has shape {tuple(t.shape)} but x has shape "
                             f"{tuple(x.shape)} (batch size {x.shape[0]}): expected a scalar time "
                             "or one time per sample")
        return t

    def raw(self, x: Tensor, t: Any, input_dtype: torch.dtype | None = None) -> Tensor:
        """Call the network (counted) on ``x`` cast to ``input_dtype`` (default: x's dtype) and
        check the output. The time conditioning is never rounded to a half-precision dtype
        (float32 then; a DDPM network's timestep 999 stays 999)."""
        in_dtype = x.dtype if input_dtype is None else input_dtype

        def factors() -> tuple[Any, Tensor]:
            tb = self._batch_time(x, t)
            a: Any = tb   # unused unless the input is scaled
            if prediction_kind(self.prediction).scaled_input:   # 1.0: no pass over x
                a = 1.0 if self.sde.unit_alpha else append_dims(self.sde.alpha(tb).to(x), x.ndim)
            return a, self._cond(tb).to(compute_dtype(in_dtype))

        a, cond = (self._cached(("raw", in_dtype), x, t, factors) if not callable(self.time_input)
                   else factors())
        inp = network_input(self.prediction, x, a)
        if input_dtype is not None:
            inp = inp.to(input_dtype)
        out = self.net(inp, cond.clone())   # the cached conditioning stays intact
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"shape mismatch: the model returned shape {shape} for an input "
                             f"of shape {tuple(x.shape)}: expected the input's shape")
        if not out.is_floating_point():
            raise TypeError(f"the model returned dtype {out.dtype}: expected a floating dtype "
                            "(float16, bfloat16, float32 or float64)")
        return out

    def _coeffs(self, x: Tensor, t: Any, dots: bool = False) -> tuple[Tensor, ...]:
        """alpha, sigma (and with ``dots`` alpha', sigma') broadcastable against ``x``."""
        def factors() -> tuple[Tensor, ...]:
            tb = self._batch_time(x, t)
            fns = [self.sde.alpha, self.sde.sigma] + ([self.sde.alpha_dot, self.sde.sigma_dot]
                                                       if dots else [])
            return tuple(append_dims(fn(tb).to(x), x.ndim) for fn in fns)
        return self._cached(("coeffs", dots), x, t, factors)

    @property
    def linear_form(self) -> str:
        """``"x0"`` or ``"eps"``: the form this network's output gives in the fewest operations
        (:attr:`PredictionKind.linear_form`); what solvers with linear updates ask for."""
        return prediction_kind(self.prediction).linear_form

    def predict(self, x: Tensor, t: Any, kind: str, input_dtype: torch.dtype | None = None,
                coeffs: Coeffs | None = None) -> Tensor:
        """One network call (on ``x`` cast to ``input_dtype``, if given), returned in x's dtype
        and converted to the prediction ``kind`` in that dtype: the one call every solver
        makes. ``coeffs``: alpha and sigma at ``t`` (a solver's precomputed schedule: numbers
        or tensors broadcastable against x) for the conversion, so nothing of the SDE is
        evaluated for it; without them (or without the derivatives a flow conversion needs)
        they come from the SDE."""
        if kind == self.prediction:   # no conversion (the common case): no look-ups either
            return self.raw(x, t, input_dtype).to(x.dtype)
        dst, src = prediction_kind(kind), prediction_kind(self.prediction)
        out = self.raw(x, t, input_dtype).to(x.dtype)
        if dst.values == src.values:
            return out
        dots = dst.needs_dots or src.needs_dots
        c = self._coeffs(x, t, dots) if coeffs is None else self._given(coeffs, x, t, dots)
        return convert(self.prediction, kind, out, x, *c)

    def _given(self, coeffs: Coeffs, x: Tensor, t: Any, dots: bool) -> tuple[Tensor, ...]:
        """A solver's coefficients as tensors broadcastable against ``x`` in its dtype (the
        derivatives from the SDE where a flow conversion needs them and they are not given);
        scalar ones are cached per value, as :meth:`_coeffs` caches per time."""
        given = [coeffs.alpha, coeffs.sigma]
        if dots and coeffs.alpha_dot is not None and coeffs.sigma_dot is not None:
            given += [coeffs.alpha_dot, coeffs.sigma_dot]

        def factors() -> tuple[Tensor, ...]:
            c = tuple(_bcast(v, x) for v in given)
            return c + self._coeffs(x, t, True)[2:] if dots and len(c) == 2 else c

        if all(isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.ndim == 0
                                                and v.device.type == "cpu") for v in given):
            return self._cached(("given", dots, *(float(v) for v in given)), x, t, factors)
        return factors()

    def eps(self, x: Tensor, t: Any) -> Tensor:
        return self.predict(x, t, "eps")

    def x0(self, x: Tensor, t: Any) -> Tensor:
        return self.predict(x, t, "x0")

    def v(self, x: Tensor, t: Any) -> Tensor:
        return self.predict(x, t, "v")

    def score(self, x: Tensor, t: Any) -> Tensor:
        return self.predict(x, t, "score")

    def flow(self, x: Tensor, t: Any) -> Tensor:
        """The velocity ``u = alpha' x0 + sigma' eps`` (= the probability-flow ODE's dx/dt)."""
        return self.predict(x, t, "flow")

    __call__ = eps

    def denoiser(self, x_tilde: Tensor, sigma_tilde: Any) -> Tensor:
        """k-diffusion-style ``D(x_tilde, sigma_tilde) -> x0`` with ``x_tilde = x / alpha``."""
        # keep the caller's dtype: t_of_sigma_tilde allows for its rounding at the range ends
        s = as_tensor(sigma_tilde).to(x_tilde.device)
        t = self.sde.t_of_sigma_tilde(s).double()
        a = append_dims(self.sde.alpha(self._batch_time(x_tilde, t)).to(x_tilde), x_tilde.ndim)
        return self.x0(x_tilde * a, t)

    def __repr__(self) -> str:
        return f"DiffusionModel(prediction={self.prediction!r}, sde={self.sde!r}, nfe={self.nfe})"


def as_model(model: Any, sde: ForwardSDE, prediction: str = "eps") -> DiffusionModel:
    """Return ``model`` if it already is a :class:`DiffusionModel`, else wrap the callable;
    ``prediction`` is checked either way (a DiffusionModel carries its own and would ignore a
    misspelt one)."""
    prediction_kind(prediction)
    if isinstance(model, DiffusionModel):
        if model.sde is not sde:
            raise ValueError(f"the model was built for {model.sde!r} but is used with {sde!r}: "
                             "pass the same forward SDE object")
        return model
    if not callable(model):
        raise TypeError(f"model must be a DiffusionModel or a callable net(x, cond), got "
                        f"{type(model).__name__}")
    return DiffusionModel(model, sde, prediction)
