"""Models in: a diffusers network with its scheduler config, or a k-diffusion denoiser, as
``(sde, model)`` for :func:`sdekit.sample` (diffusers and k-diffusion are not imported here).

Conditioning passes through: ``from_diffusers(sched, unet, encoder_hidden_states=emb)`` calls
``unet(x, timestep=..., encoder_hidden_states=emb, return_dict=False)`` at every model call, and
``from_k_diffusion(denoiser, cond=c)`` calls ``denoiser(x, sigma, cond=c)``. The wrapped network
(``model.net.fn``) keeps them in ``.cond``; calling it with keyword arguments overrides them for
that call (a classifier-free-guidance wrapper can pass the null condition so).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..dynamics.parameterization import DiffusionModel
from ..sde.base import ForwardSDE
from ..sde.discrete import DiscreteDDPM
from ..sde.ve import EDMSDE
from .config import DiffusersSchedule, read_scheduler_config

#: names diffusers' networks give their time argument, in the order they are looked for
TIME_KWARGS = ("timestep", "timesteps", "t")


def _signature(fn: Any) -> dict[str, inspect.Parameter] | None:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):   # a builtin or C extension: call it positionally
        return None


def _unwrap(out: Any) -> Any:
    """A network's output tensor: the first item of a tuple (``return_dict=False``), else the
    ``.sample`` of a diffusers output object, else the output itself."""
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    if not isinstance(out, Tensor) and isinstance(getattr(out, "sample", None), Tensor):
        return out.sample
    return out


class DiffusersNet:
    """``net(x, time, **overrides)`` for a diffusers network (or any callable
    ``network(x, timestep, **cond)``): the time goes to its ``timestep`` argument, ``cond`` and
    ``return_dict=False`` are passed where its signature takes them, the input is cast to the
    network's dtype (and the output back), and an output with twice the input's channels (a
    learned-variance network: ``[prediction, variance]``) is cut to its first half, as diffusers'
    DDPM / DiT pipelines do. Any other output shape is an error naming both shapes."""

    def __init__(self, network: Callable[..., Any], cond: dict[str, Any] | None = None) -> None:
        if not callable(network):
            raise TypeError(f"network must be callable as network(x, timestep, ...), got "
                            f"{type(network).__name__}")
        self.network = network
        self.cond = dict(cond or {})
        params = _signature(network)
        self._time_kw = None if params is None else next((k for k in TIME_KWARGS if k in params),
                                                         None)
        self._return_dict = params is not None and "return_dict" in params
        accepts_any = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [] if params is None or accepts_any else sorted(k for k in self.cond
                                                                   if k not in params)
        if unknown:
            raise TypeError(f"{type(network).__name__} does not take the conditioning "
                            f"arguments {unknown}: its arguments are {sorted(params or {})}")
        dtype = getattr(network, "dtype", None)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else None

    def __call__(self, x: Tensor, time: Tensor, **overrides: Any) -> Tensor:
        kwargs = {**self.cond, **overrides}
        if self._return_dict:
            kwargs["return_dict"] = False
        inp = x if self.dtype is None else x.to(self.dtype)
        if self._time_kw is not None:
            out = _unwrap(self.network(inp, **{self._time_kw: time}, **kwargs))
        else:
            out = _unwrap(self.network(inp, time, **kwargs))
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(self.network).__name__} returned {type(out).__name__}: "
                            "expected a tensor, a tuple starting with one or an output with "
                            ".sample")
        if out.shape != x.shape:
            split = out.ndim == x.ndim and out.ndim >= 2 and out.shape[0] == x.shape[0] and \
                out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]
            if not split:
                raise ValueError(
                    f"shape mismatch: {type(self.network).__name__} returned shape "
                    f"{tuple(out.shape)} for an input of shape {tuple(x.shape)}: expected the "
                    "input's shape, or twice its channels (dim 1) for a learned-variance "
                    "network, whose first half is the prediction")
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"DiffusersNet({type(self.network).__name__}, cond={sorted(self.cond)})"


def from_diffusers(scheduler_or_config: Any, network: Callable[..., Any], **cond: Any
                   ) -> tuple[ForwardSDE, DiffusionModel]:
    """A diffusers network plus its scheduler (or the scheduler's config) as ``(sde, model)``.

    Args:
        scheduler_or_config: a diffusers scheduler, its ``config`` or a dict of config fields
            (read by :func:`~sdekit.interop.config.read_scheduler_config`: forward process,
            prediction type, time input; an unsupported field raises ``ValueError``).
        network: ``UNet2DModel``, ``UNet2DConditionModel``, a transformer
            (``DiTTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
            ...) or any callable ``network(x, timestep, **cond)`` returning the prediction (a
            tensor, a tuple or an output with ``.sample``).
        cond: keyword arguments passed to the network at every call (``encoder_hidden_states``,
            ``class_labels``, ``added_cond_kwargs``, ``pooled_projections``, ...).

    The network is told diffusers' timestep: the integer index ``0 .. N-1`` of a DDPM table
    (fractional between table entries), ``N sigma`` for flow matching, and ``sigma`` itself for
    Flux transformers (which scale it by 1000 internally). Sample with
    ``sdekit.sample(sde, model, ...)``; for flow configs with a shift pass
    ``grid_options=read_scheduler_config(sched).grid_options(...)``.
    """
    spec = read_scheduler_config(scheduler_or_config)
    net = DiffusersNet(network, cond)
    time_input = spec.time_input
    if spec.kind == "flow" and type(network).__name__.startswith("Flux"):
        time_input = "t"     # Flux's forward multiplies its timestep by 1000
    return spec.sde, DiffusionModel(net, spec.sde, spec.prediction, time_input)


class KDiffusionNet:
    """``net(x_tilde, sigma, **overrides)`` calling a k-diffusion denoiser
    ``D(x_tilde, sigma, **extra_args)`` (extra_args kept in ``.cond``)."""

    def __init__(self, denoiser: Callable[..., Tensor], extra_args: dict[str, Any] | None = None
                 ) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as D(x, sigma, **extra_args), got "
                            f"{type(denoiser).__name__}")
        self.denoiser = denoiser
        self.cond = dict(extra_args or {})

    def __call__(self, x: Tensor, sigma: Tensor, **overrides: Any) -> Tensor:
        return self.denoiser(x, sigma, **{**self.cond, **overrides})

    def __repr__(self) -> str:
        return f"KDiffusionNet({type(self.denoiser).__name__}, extra_args={sorted(self.cond)})"


def _sigma_table(denoiser: Any) -> Tensor | None:
    """The discrete sigma table of k-diffusion's ``DiscreteSchedule`` wrappers (``sigmas``, or
    ``exp(log_sigmas)``), float64, or None."""
    for name, fn in (("sigmas", lambda v: v), ("log_sigmas", torch.exp)):
        v = getattr(denoiser, name, None)
        if v is not None:
            return fn(torch.as_tensor(v).detach().cpu().double()).flatten()
    return None


def from_k_diffusion(denoiser: Callable[..., Tensor], sigma_min: float | None = None,
                     sigma_max: float | None = None, **extra_args: Any
                     ) -> tuple[ForwardSDE, DiffusionModel]:
    """A k-diffusion-style denoiser ``D(x, sigma, **extra_args) -> x0`` (x in the VE-equivalent
    space, ``x = x0 + sigma eps``) as ``(sde, model)``.

    A denoiser with a discrete sigma table (k-diffusion's ``CompVisDenoiser``,
    ``DiscreteEpsDDPMDenoiser``, ``DiscreteVDDPMDenoiser``, ...: ``sigmas`` / ``log_sigmas``)
    gets the matching :class:`~sdekit.DiscreteDDPM` (``alphas_cumprod = 1 / (1 + sigma^2)``), so
    the VP network inside it is sampled on its own table; any other denoiser an EDM (VE) process
    on ``[sigma_min, sigma_max]`` (given, else the denoiser's ``sigma_min`` / ``sigma_max``
    attributes, else EDM's 0.002 and 80). ``extra_args`` are passed to every call."""
    table = _sigma_table(denoiser)
    net = KDiffusionNet(denoiser, extra_args)
    if table is not None:
        if sigma_min is not None or sigma_max is not None:
            raise ValueError("sigma_min / sigma_max apply to a denoiser without a discrete sigma "
                             f"table; {type(denoiser).__name__} has one ({table.numel()} sigmas "
                             f"from {float(table[0]):.4g} to {float(table[-1]):.4g})")
        if not bool((table[1:] > table[:-1]).all()) or not bool((table > 0).all()):
            raise ValueError(f"{type(denoiser).__name__}.sigmas is not a positive increasing "
                             "table: expected k-diffusion's DiscreteSchedule sigmas")
        sde: ForwardSDE = DiscreteDDPM(alphas_cumprod=1 / (1 + table ** 2))
    else:
        lo = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", 0.002)
        hi = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", 80.0)
        sde = EDMSDE(float(lo), float(hi))
    return sde, DiffusionModel(net, sde, "denoiser")


__all__ = ["DiffusersNet", "DiffusersSchedule", "KDiffusionNet", "from_diffusers",
           "from_k_diffusion"]
