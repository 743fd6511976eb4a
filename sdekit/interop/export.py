"""Models out: an sdekit network (or a ``sdekit train`` checkpoint) as a diffusers-style model.

:func:`to_diffusers` returns ``(unet, scheduler)`` for a diffusers pipeline: ``unet`` is
:class:`DiffusersUNet`, a torch module called as diffusers calls a ``UNet2DModel``
(``unet(sample, timestep, class_labels=None, return_dict=True).sample``, with
``config.sample_size``, ``config.in_channels``, ``dtype`` and ``device``), and ``scheduler`` an
:class:`~sdekit.interop.SdekitScheduler` built for the network's own forward SDE, prediction and
time input (its ``timesteps`` are in that time input's units, which is what ``unet`` takes).
So ``DDPMPipeline(*to_diffusers("runs/digits/checkpoint.pt", solver="dpmpp_2m"))`` samples the
checkpoint inside diffusers' own loop, with the same result as :func:`sdekit.sample` on the same
solver, grid and initial noise. Only the scheduler needs diffusers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._utils import append_dims
from ..models import ScoreNet
from ..sde.base import ForwardSDE, check_forward_sde


@dataclass
class DiffusersUNetOutput:
    """What diffusers' ``UNet2DModel`` returns: the prediction as ``.sample``."""

    sample: Tensor


class _Config(dict):
    """A config readable as ``config.sample_size`` and ``config["sample_size"]`` (as diffusers'
    ``FrozenDict``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None


class DiffusersUNet(torch.nn.Module):
    """An sdekit :class:`~sdekit.models.ScoreNet` called as a diffusers ``UNet2DModel``.

    ``forward(sample, timestep, class_labels=None, return_dict=True)``: ``sample`` is the
    state of ``sde`` and ``timestep`` the network's own time input (``net.time_input``:
    ``sigma_tilde`` for an EDM-preconditioned denoiser, ``lambda`` for eps / x0 / v networks,
    ``t`` for flow networks), a number or one per sample. The output is the network's own
    prediction (``net.prediction``); a denoiser gets the state scaled to the VE space
    (``sample / alpha``) first, as :class:`~sdekit.DiffusionModel` does.
    """

    def __init__(self, net: ScoreNet, sde: ForwardSDE) -> None:
        super().__init__()
        if not isinstance(net, ScoreNet):
            raise TypeError(f"net must be an sdekit ScoreNet (UNet, MLPScoreNet), got "
                            f"{type(net).__name__}")
        check_forward_sde(sde, "the process the network was trained on")
        shape = tuple(getattr(net, "data_shape", ()))
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"net has sample shape {shape}: expected square images "
                             "(channels, size, size), as a diffusers UNet2DModel")
        self.net, self.sde = net, sde
        self.config = _Config({"sample_size": shape[1], "in_channels": shape[0],
                               "out_channels": shape[0], "num_class_embeds": net.num_classes,
                               "prediction": net.prediction, "time_input": net.time_input})

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(self, sample: Tensor, timestep: Any, class_labels: Tensor | None = None,
                return_dict: bool = True) -> Any:
        cond = torch.as_tensor(timestep, dtype=torch.float64, device=sample.device)
        x = sample
        if self.net.prediction == "denoiser":
            t = self.sde.t_of_sigma_tilde(cond)
            t = t.expand(sample.shape[0]) if t.ndim == 0 else t
            x = sample / append_dims(self.sde.alpha(t).to(sample), sample.ndim)
        out = self.net(x, cond, class_labels)
        return DiffusersUNetOutput(sample=out) if return_dict else (out,)


def to_diffusers(net_or_checkpoint: ScoreNet | str | os.PathLike, sde: ForwardSDE | None = None,
                 **scheduler_kwargs: Any) -> tuple[DiffusersUNet, Any]:
    """``(unet, scheduler)`` for a diffusers pipeline, e.g. ``DDPMPipeline(unet, scheduler)``.

    Args:
        net_or_checkpoint: a checkpoint written by ``sdekit train`` (its EMA weights and its
            recorded SDE are loaded, on the CPU; move the pipeline with ``pipe.to(...)``) or an
            sdekit ScoreNet, which then needs ``sde``.
        sde: the forward process the network was trained on (only with a network).
        scheduler_kwargs: :class:`~sdekit.interop.SdekitScheduler` arguments (``solver``,
            ``grid``, ``denoise``, seeds, solver options).

    ``unet`` is a :class:`DiffusersUNet`; ``scheduler`` an ``SdekitScheduler(sde=sde,
    prediction=net.prediction, time_input=net.time_input, ...)``. diffusers' image pipelines
    map the result ``x`` to ``(x / 2 + 0.5).clamp(0, 1)``, matching data in ``[-1, 1]`` (the
    bundled digits).
    """
    if isinstance(net_or_checkpoint, (str, os.PathLike)):
        if sde is not None:
            raise ValueError("sde= applies to a network only: a checkpoint records its own SDE "
                             f"({str(net_or_checkpoint)!r})")
        from ..training.checkpoint import load_model
        net, sde, _ = load_model(net_or_checkpoint)
    else:
        net = net_or_checkpoint
        if sde is None:
            raise ValueError("sde is required with a network: the forward SDE it was trained on "
                             "(a checkpoint path records it instead)")
    unet = DiffusersUNet(net, sde)
    from .scheduler import SdekitScheduler  # needs diffusers
    return unet, SdekitScheduler(sde=sde, prediction=net.prediction, time_input=net.time_input,
                                 **scheduler_kwargs)


__all__ = ["DiffusersUNet", "DiffusersUNetOutput", "to_diffusers"]
