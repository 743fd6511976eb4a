"""One model contract: adapters between eps, x0, v, score and denoiser predictions.

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

Conversions to x0 are written directly (:func:`to_x0`), not through eps, so that x0 stays finite
where alpha = 0 for the kinds that determine it there (flow, v, x0); eps and score carry no
information about x0 at alpha = 0.

Every network call goes through an :class:`NFECounter`, so NFE is measured, never assumed.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._utils import append_dims, as_tensor, compute_dtype
from ..sde.base import ForwardSDE

PREDICTIONS = ("eps", "x0", "v", "score", "denoiser", "flow")
#: ``t1000``: 1000 t, the timestep scale diffusers' flow-matching transformers (SD3, Flux) take
TIME_INPUTS = ("model_time", "t", "sigma_tilde", "lambda", "t1000")


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


def _flow_det(kind: str, alpha: Tensor, sigma: Tensor, alpha_dot: Tensor | None,
              sigma_dot: Tensor | None) -> Tensor:
    """``D = alpha sigma' - sigma alpha'`` for the flow kind (an error without the derivatives)."""
    if alpha_dot is None or sigma_dot is None:
        raise ValueError(f"prediction={kind!r} needs alpha_dot and sigma_dot (d alpha/dt, "
                         "d sigma/dt: ForwardSDE.alpha_dot / sigma_dot) for its conversions")
    return alpha * sigma_dot - sigma * alpha_dot


def to_eps(kind: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor,
           alpha_dot: Tensor | None = None, sigma_dot: Tensor | None = None) -> Tensor:
    """Convert a prediction of type ``kind`` to eps (``alpha``, ``sigma`` broadcastable to x;
    ``alpha_dot``, ``sigma_dot`` are needed for ``kind='flow'`` only)."""
    if kind == "eps":
        return out
    if kind in ("x0", "denoiser"):
        return (x - alpha * out) / sigma
    if kind == "v":
        return (alpha * out + sigma * x) / (alpha * alpha + sigma * sigma)
    if kind == "score":
        return -sigma * out
    if kind == "flow":
        det = _flow_det(kind, alpha, sigma, alpha_dot, sigma_dot)
        return (alpha * out - alpha_dot * x) / det
    raise ValueError(f"prediction={kind!r} is invalid: expected one of {PREDICTIONS}")


def to_x0(kind: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor,
          alpha_dot: Tensor | None = None, sigma_dot: Tensor | None = None) -> Tensor:
    """Convert a prediction of type ``kind`` to x0 directly (finite at alpha = 0 for flow, v and
    x0 predictions; see the module docstring)."""
    if kind in ("x0", "denoiser"):
        return out
    if kind == "eps":
        return (x - sigma * out) / alpha
    if kind == "v":
        return (alpha * x - sigma * out) / (alpha * alpha + sigma * sigma)
    if kind == "score":
        return (x + sigma * sigma * out) / alpha
    if kind == "flow":
        det = _flow_det(kind, alpha, sigma, alpha_dot, sigma_dot)
        return (sigma_dot * x - sigma * out) / det
    raise ValueError(f"prediction={kind!r} is invalid: expected one of {PREDICTIONS}")


def from_eps(kind: str, eps: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor,
             alpha_dot: Tensor | None = None, sigma_dot: Tensor | None = None) -> Tensor:
    """Convert eps to a prediction of type ``kind`` (inverse of :func:`to_eps`)."""
    if kind == "eps":
        return eps
    if kind in ("x0", "denoiser"):
        return (x - sigma * eps) / alpha
    if kind == "v":
        x0 = (x - sigma * eps) / alpha
        return alpha * eps - sigma * x0
    if kind == "score":
        return -eps / sigma
    if kind == "flow":
        _flow_det(kind, alpha, sigma, alpha_dot, sigma_dot)
        return alpha_dot * (x - sigma * eps) / alpha + sigma_dot * eps
    raise ValueError(f"prediction={kind!r} is invalid: expected one of {PREDICTIONS}")


def convert(src: str, dst: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor,
            alpha_dot: Tensor | None = None, sigma_dot: Tensor | None = None) -> Tensor:
    """Convert a prediction of type ``src`` to type ``dst`` through x0 and eps, each computed
    directly from ``src`` (:func:`to_x0`, :func:`to_eps`), so the result is finite wherever
    ``src`` determines the two (at alpha = 0: flow, v, x0)."""
    c = (x, alpha, sigma, alpha_dot, sigma_dot)
    if src == dst or {src, dst} == {"x0", "denoiser"}:
        return out
    if dst in ("x0", "denoiser"):
        return to_x0(src, out, *c)
    if dst == "eps":
        return to_eps(src, out, *c)
    if dst == "score":
        return -to_eps(src, out, *c) / sigma
    if dst == "v":
        return alpha * to_eps(src, out, *c) - sigma * to_x0(src, out, *c)
    if dst == "flow":
        _flow_det(dst, alpha, sigma, alpha_dot, sigma_dot)
        return alpha_dot * to_x0(src, out, *c) + sigma_dot * to_eps(src, out, *c)
    raise ValueError(f"prediction={dst!r} is invalid: expected one of {PREDICTIONS}")


def time_cond(sde: ForwardSDE, time_input: str | Callable[[Tensor], Tensor], t: Tensor
              ) -> Tensor:
    """The network's conditioning ``time_input`` (one of :data:`TIME_INPUTS` or a callable
    ``t -> cond``) at times ``t``."""
    if callable(time_input):
        return time_input(t)
    fn = {"model_time": sde.model_time, "t": lambda u: sde._time(u)[0],
          "sigma_tilde": sde.sigma_tilde, "lambda": sde.lambda_,
          "t1000": lambda u: 1000 * sde._time(u)[0]}[time_input]
    return fn(t)


class DiffusionModel:
    """A network plus its forward SDE and output parametrisation, callable as any other one.

    Args:
        net: ``net(x, cond) -> Tensor`` of x's shape. For ``prediction='denoiser'`` it is called as
            ``net(x / alpha, sigma_tilde)`` and returns x0.
        sde: the forward process the network was trained on.
        prediction: what the network outputs: one of ``eps, x0, v, score, denoiser, flow``.
        time_input: the conditioning passed to the network: ``model_time`` (default:
            ``sde.model_time(t)``, the integer-timestep scale for :class:`DiscreteDDPM`, t otherwise),
            ``t``, ``sigma_tilde``, ``lambda``, ``t1000`` (1000 t: diffusers' flow transformers),
            or a callable ``t -> cond``.
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], sde: ForwardSDE,
                 prediction: str = "eps", time_input: str | Callable[[Tensor], Tensor] = "model_time"
                 ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is invalid: expected one of {PREDICTIONS}")
        if not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input={time_input!r} is invalid: expected one of "
                             f"{TIME_INPUTS} or a callable")
        if prediction == "denoiser":
            time_input = "sigma_tilde"
        self.net = NFECounter(net)
        self.sde = sde
        self.prediction = prediction
        self.time_input = time_input
        self._memo: dict[tuple, tuple[Tensor, ...]] = {}

    #: entries of the per-time cache of schedule factors (see :meth:`_cached`) before it is cleared
    MEMO_SIZE = 8192

    def _cached(self, what: str, x: Tensor, t: Any, fn: Callable[[], tuple[Tensor, ...]]
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
            if not any(v.requires_grad for v in out):
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

        def factors() -> tuple[Tensor, ...]:
            tb = self._batch_time(x, t)
            a = append_dims(self.sde.alpha(tb).to(x), x.ndim) if self.prediction == "denoiser" \
                else tb
            return a, self._cond(tb).to(compute_dtype(in_dtype))

        a, cond = (self._cached(("raw", in_dtype), x, t, factors) if not callable(self.time_input)
                   else factors())
        inp = x / a if self.prediction == "denoiser" else x
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

    def predict(self, x: Tensor, t: Any, kind: str, input_dtype: torch.dtype | None = None
                ) -> Tensor:
        """One network call (on ``x`` cast to ``input_dtype``, if given), returned in x's dtype
        and converted to the prediction ``kind`` in that dtype."""
        out = self.raw(x, t, input_dtype).to(x.dtype)
        if kind == self.prediction or {kind, self.prediction} == {"x0", "denoiser"}:
            return out
        if kind not in PREDICTIONS:
            raise ValueError(f"prediction={kind!r} is invalid: expected one of {PREDICTIONS}")
        c = self._coeffs(x, t, dots="flow" in (kind, self.prediction))
        return convert(self.prediction, kind, out, x, *c)

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
    """Return ``model`` if it already is a :class:`DiffusionModel`, else wrap the callable."""
    if isinstance(model, DiffusionModel):
        if model.sde is not sde:
            raise ValueError(f"the model was built for {model.sde!r} but is used with {sde!r}: "
                             "pass the same forward SDE object")
        return model
    if not callable(model):
        raise TypeError(f"model must be a DiffusionModel or a callable net(x, cond), got "
                        f"{type(model).__name__}")
    return DiffusionModel(model, sde, prediction)
