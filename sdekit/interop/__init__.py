"""Interoperability with diffusers and k-diffusion (both optional: nothing here imports them).

* :func:`read_scheduler_config`: a diffusers scheduler config -> the forward SDE, the
  network's prediction kind and time input (:class:`DiffusersSchedule`).
* :func:`from_diffusers`: a scheduler (or its config) plus a diffusers network -> ``(sde, model)``.
* :func:`from_k_diffusion`: a k-diffusion denoiser ``D(x, sigma, **extra_args)`` ->
  ``(sde, model)``.
* :func:`k_sampler`: any registered solver as a k-diffusion sampler
  ``sample(model, x, sigmas, extra_args=None, callback=None, disable=None)``.
* :class:`SdekitScheduler`: any fixed-grid solver as a diffusers scheduler, inside an unchanged
  pipeline loop (the class is built on first access; it subclasses diffusers' mixins).
* :func:`to_diffusers`: an sdekit network or ``sdekit train`` checkpoint as ``(unet, scheduler)``
  for a diffusers pipeline (:class:`DiffusersUNet` plus an SdekitScheduler for its own SDE).

The submodules are imported on first attribute access, so ``import sdekit.interop`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiffusersSchedule": "config", "read_scheduler_config": "config",
    "from_diffusers": "models", "from_k_diffusion": "models",
    "k_sampler": "k_diffusion",
    "SdekitScheduler": "scheduler",
    "DiffusersUNet": "export", "to_diffusers": "export",
}

__all__ = ["DiffusersSchedule", "DiffusersUNet", "SdekitScheduler", "from_diffusers",
           "from_k_diffusion", "k_sampler", "read_scheduler_config", "to_diffusers"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdekit.interop' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
