"""A diffusers scheduler config as sdekit objects (diffusers itself is not imported).

:func:`read_scheduler_config` reads the fields that describe the *model* (the forward process it
was trained on, what it predicts, which time it is told) and returns a :class:`DiffusersSchedule`:

* DDPM-table schedulers (DDIM, DDPM, DPM-Solver, UniPC, Euler, ... with ``beta_schedule`` /
  ``trained_betas``): :class:`~sdekit.sde.discrete.DiscreteDDPM` built from the same
  ``alphas_cumprod`` table diffusers builds (computed as diffusers computes it, in float32, so
  the two tables are equal bit for bit), ``rescale_betas_zero_snr`` included (its last entry is
  alpha_T = 0 exactly; diffusers' DPM-Solver / UniPC / Euler schedulers replace that 0 by 2^-24
  for their own arithmetic, the model's table is the 0). The network is told the integer timestep
  ``n = 0 .. N-1`` (sdekit's ``model_time``).
* flow-matching schedulers (``FlowMatch*``, ``use_flow_sigmas`` / ``prediction_type=
  'flow_prediction'``, or a config with flow-shift fields and no beta table: an in-memory
  ``scheduler.config`` has no ``_class_name``): :class:`~sdekit.sde.flow.FlowSDE` on
  ``[1/N, 1]``, the network told ``N sigma`` (diffusers' flow transformers' 0..1000 scale); the
  static ``shift`` /
  ``flow_shift`` or the dynamic (resolution-dependent) shift become the grid options of
  :func:`sdekit.grids.make_grid` (:meth:`DiffusersSchedule.grid_options`).

Fields that only configure diffusers' own sampler (``solver_order``, ``use_karras_sigmas``,
``clip_sample``, ...) are kept in :attr:`DiffusersSchedule.config` and do not change the model.
A field value sdekit cannot represent raises ``ValueError`` naming the field, the value and what
is supported.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..dynamics.parameterization import DiffusionModel
from ..grids import SHIFT_TYPES, flux_mu
from ..sde.base import ForwardSDE
from ..sde.discrete import DiscreteDDPM
from ..sde.flow import FlowSDE

#: diffusers' ``prediction_type`` -> sdekit's prediction kind
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0",
                    "flow_prediction": "flow"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "exp", "laplace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
#: diffusers' ``variance_type`` values; the ``learned*`` ones mean a network with 2x the channels
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                  "learned", "learned_range")
_DDPM_KEYS = ("beta_schedule", "trained_betas", "beta_start", "beta_end")
#: fields of FlowMatchEulerDiscreteScheduler's config (which has no beta table)
_FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_image_seq_len", "max_image_seq_len",
              "invert_sigmas", "shift_terminal")
#: fields of the VE / EDM-type schedulers (EDMEuler, EDMDPMSolver, CMStochasticIterative,
#: ScoreSdeVe), which have no beta table either
_VE_KEYS = ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule")


class TimestepScale:
    """The time input ``scale * t`` (diffusers' flow timestep ``N sigma`` for ``N != 1000``)."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, t: Tensor) -> Tensor:
        return self.scale * t

    def __repr__(self) -> str:
        return f"TimestepScale({self.scale:g})"


@dataclass(frozen=True)
class DiffusersSchedule:
    """What a diffusers scheduler config says about the model.

    Attributes:
        sde: the forward process (DiscreteDDPM or FlowSDE).
        prediction: sdekit's prediction kind (``eps``, ``v``, ``x0`` or ``flow``).
        time_input: the network's time input for :class:`~sdekit.DiffusionModel`.
        kind: ``"ddpm"`` or ``"flow"``.
        num_train_timesteps: N.
        timestep_spacing, steps_offset: how diffusers spaces its inference timesteps (DDPM).
        learned_variance: the network outputs ``[eps, variance]`` (2x channels).
        shift: the static flow shift (1.0: none); ``dynamic_shift``: the parameters of the
            resolution-dependent shift (None unless ``use_dynamic_shifting``).
        scheduler_class: the config's class name (``_class_name`` or the object's type).
        config: the whole config as a plain dict.
    """

    sde: ForwardSDE
    prediction: str
    time_input: str | Callable[[Tensor], Tensor]
    kind: str
    num_train_timesteps: int
    timestep_spacing: str | None = None
    steps_offset: int = 0
    learned_variance: bool = False
    shift: float = 1.0
    dynamic_shift: dict[str, Any] | None = None
    scheduler_class: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def grid_options(self, image_seq_len: float | None = None, mu: float | None = None
                     ) -> dict[str, Any]:
        """The timestep shift as ``sdekit.sample(..., grid_options=...)``: ``{}`` without one,
        ``{'shift': s}`` for a static shift, and for a dynamic shift ``{'mu': mu, 'shift_type':
        ...}`` from ``mu`` or from the image's ``image_seq_len`` (number of latent patches)
        through the config's ``base_shift``, ``max_shift``, ``base_image_seq_len`` and
        ``max_image_seq_len`` (:func:`sdekit.grids.flux_mu`)."""
        if self.dynamic_shift is None:
            if image_seq_len is not None or mu is not None:
                raise ValueError("image_seq_len / mu apply to a config with use_dynamic_shifting="
                                 "True only; this one has a static shift")
            return {} if self.shift == 1.0 else {"shift": self.shift}
        if (image_seq_len is None) == (mu is None):
            raise ValueError("this config uses a dynamic (resolution-dependent) shift: give "
                             "exactly one of image_seq_len (latent patches) or mu")
        d = self.dynamic_shift
        if mu is None:
            assert image_seq_len is not None  # exactly one of the two (checked above)
            mu = flux_mu(image_seq_len, d["base_image_seq_len"], d["max_image_seq_len"],
                         d["base_shift"], d["max_shift"])
        return {"mu": float(mu), "shift_type": d["shift_type"]}

    def model(self, net: Callable[..., Tensor]) -> DiffusionModel:
        """``net(x, time) -> prediction`` wrapped as a :class:`~sdekit.DiffusionModel`."""
        return DiffusionModel(net, self.sde, self.prediction, self.time_input)


def _as_config(scheduler_or_config: Any) -> tuple[dict[str, Any], str | None]:
    obj = scheduler_or_config
    cls = None
    if not isinstance(obj, Mapping) and isinstance(getattr(obj, "config", None), Mapping):
        cls = type(obj).__name__
        obj = obj.config
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a diffusers scheduler, its config (a dict / FrozenDict) or a "
                        f"plain dict of its fields, got {type(scheduler_or_config).__name__}")
    cfg = dict(obj)
    return cfg, cls or cfg.get("_class_name")


def _field(cfg: Mapping[str, Any], name: str, allowed: Any, default: Any) -> Any:
    v = cfg.get(name, default)
    if v not in allowed:
        raise ValueError(f"scheduler config field {name}={v!r} is not supported: expected one of "
                         f"{list(allowed)}")
    return v


def _positive_int(cfg: Mapping[str, Any], name: str, default: int, least: int = 1) -> int:
    v = cfg.get(name, default)
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= least):
        raise ValueError(f"scheduler config field {name}={v!r} is invalid: expected an integer "
                         f">= {least}")
    return v


def _number(cfg: Mapping[str, Any], name: str, default: float) -> float:
    v = cfg.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"scheduler config field {name}={v!r} is invalid: expected a finite "
                         "number")
    return float(v)


def _alpha_bar_betas(n: int, kind: str, max_beta: float = 0.999) -> Tensor:
    """Betas discretising a continuous alpha_bar(t) on [0, 1] (Nichol & Dhariwal 2021, Eq. 17
    for the cosine): ``beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta)`` in Python floats,
    stored in float32 (diffusers' ``betas_for_alpha_bar``)."""
    def abar(t: float) -> float:
        if kind == "squaredcos_cap_v2":
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        if kind == "exp":
            return math.exp(-12.0 * t)
        # laplace: lambda = -(sign(0.5 - t)/2) log(1 - 2|0.5 - t| + 1e-6), abar = sqrt(sigmoid)
        lam = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * abs(0.5 - t) + 1e-6)
        return math.sqrt(math.exp(lam) / (1 + math.exp(lam)))
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024 (Common Diffusion Noise Schedules and Sample Steps are Flawed, Alg. 1):
    shift and scale sqrt(alphas_cumprod) so its last entry is 0 and its first unchanged (in the
    table's dtype, float32, as diffusers does)."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def ddpm_alphas_cumprod(cfg: Mapping[str, Any]) -> Tensor:
    """The ``alphas_cumprod`` table of a DDPM-type scheduler config, float64, equal to the
    float32 table diffusers builds from the same config."""
    n = _positive_int(cfg, "num_train_timesteps", 1000, least=2)
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float32).flatten().clone()
        if betas.numel() < 2:
            raise ValueError(f"scheduler config field trained_betas has {betas.numel()} "
                             "entries: expected a 1-D table of at least 2 betas")
    else:
        schedule = _field(cfg, "beta_schedule", BETA_SCHEDULES, "linear")
        b0, b1 = _number(cfg, "beta_start", 1e-4), _number(cfg, "beta_end", 0.02)
        if schedule == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        elif schedule == "scaled_linear":   # latent diffusion's: linear in sqrt(beta)
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        elif schedule == "sigmoid":         # GeoDiff's
            betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (b1 - b0) + b0
        else:
            betas = _alpha_bar_betas(n, schedule)
    if cfg.get("rescale_betas_zero_snr", False):
        betas = _zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, 0).double()


def _is_flow(cfg: Mapping[str, Any], cls: str | None) -> bool:
    """A flow-matching config: a FlowMatch* class, flow sigmas / prediction, or (an in-memory
    ``scheduler.config`` carries no class name) flow-shift fields without a beta table."""
    if (cls or "").startswith("FlowMatch") or cfg.get("use_flow_sigmas", False) or \
            cfg.get("prediction_type") == "flow_prediction":
        return True
    return not any(k in cfg for k in _DDPM_KEYS) and any(k in cfg for k in _FLOW_KEYS)


def read_scheduler_config(scheduler_or_config: Any) -> DiffusersSchedule:
    """Map a diffusers scheduler (or its config: a dict or FrozenDict) to sdekit objects.

    Raises ``ValueError`` naming the field, its value and what is supported when the config
    describes something sdekit cannot represent; see the module docstring.
    """
    cfg, cls = _as_config(scheduler_or_config)
    flow = _is_flow(cfg, cls)
    n = _positive_int(cfg, "num_train_timesteps", 1000, least=2)
    common: dict[str, Any] = {"num_train_timesteps": n, "scheduler_class": cls, "config": cfg}
    if flow:
        return _read_flow(cfg, n, common)
    ve = [k for k in _VE_KEYS if k in cfg]
    if not any(k in cfg for k in _DDPM_KEYS) and (cls is not None or ve):  # else: defaults
        raise ValueError(f"scheduler {cls or 'config with ' + str(ve)} is not supported: its "
                         "config has neither a DDPM beta "
                         f"table ({', '.join(_DDPM_KEYS)}) nor flow-matching sigmas; sdekit reads "
                         "DDPM-table schedulers (DDIM, DDPM, DPM-Solver, UniPC, Euler, ...) and "
                         "flow-matching ones (FlowMatch*, use_flow_sigmas=True)")
    ptype = _field(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"), "epsilon")
    spacing = _field(cfg, "timestep_spacing", TIMESTEP_SPACINGS, "leading")
    _field(cfg, "timestep_type", ("discrete",), "discrete")
    variance = _field(cfg, "variance_type", VARIANCE_TYPES, None)
    offset = _positive_int(cfg, "steps_offset", 0, least=0)
    ac = ddpm_alphas_cumprod(cfg)
    if ac.numel() != n and cfg.get("trained_betas") is not None:
        raise ValueError(f"scheduler config field trained_betas has {ac.numel()} entries but "
                         f"num_train_timesteps={n}: expected one beta per training timestep")
    return DiffusersSchedule(sde=DiscreteDDPM(alphas_cumprod=ac),
                             prediction=PREDICTION_TYPES[ptype],
                             time_input="model_time", kind="ddpm", timestep_spacing=spacing,
                             steps_offset=offset,
                             learned_variance=variance in ("learned", "learned_range"), **common)


def _read_flow(cfg: Mapping[str, Any], n: int, common: dict[str, Any]) -> DiffusersSchedule:
    ptype = _field(cfg, "prediction_type", ("flow_prediction",), "flow_prediction")
    if cfg.get("invert_sigmas", False):
        raise ValueError("scheduler config field invert_sigmas=True is not supported: expected "
                         "False (sigma decreasing from 1 towards 0)")
    if cfg.get("shift_terminal") is not None:
        raise ValueError(f"scheduler config field shift_terminal={cfg['shift_terminal']!r} is not "
                         "supported: expected None (sdekit's shifts are shift, mu / "
                         "image_seq_len; stretch the grid to its end yourself)")
    static = "flow_shift" if "flow_shift" in cfg or "shift" not in cfg else "shift"
    shift = _number(cfg, static, 1.0)
    if not shift > 0:
        raise ValueError(f"scheduler config field {static}={shift!r} is invalid: expected a "
                         "number > 0")
    dynamic = None
    if cfg.get("use_dynamic_shifting", False):
        shift = 1.0   # diffusers applies either the static or the dynamic shift
        dynamic = {"shift_type": _field(cfg, "time_shift_type", SHIFT_TYPES, "exponential"),
                   "base_shift": _number(cfg, "base_shift", 0.5),
                   "max_shift": _number(cfg, "max_shift", 1.15),
                   "base_image_seq_len": _number(cfg, "base_image_seq_len", 256),
                   "max_image_seq_len": _number(cfg, "max_image_seq_len", 4096)}
    return DiffusersSchedule(sde=FlowSDE(t_min=1.0 / n), prediction=PREDICTION_TYPES[ptype],
                             time_input="t1000" if n == 1000 else TimestepScale(n), kind="flow",
                             shift=shift, dynamic_shift=dynamic, **common)
