"""Interoperability with diffusers and k-diffusion (optional dependencies, imported on use)."""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "SdekitScheduler":   # built on first access: it subclasses diffusers' mixins
        from .scheduler import SdekitScheduler
        return SdekitScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
