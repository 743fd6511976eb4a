"""Forward processes ("physics")."""
from __future__ import annotations

from typing import Any

from .base import ForwardSDE
from .custom import CustomSDE
from .discrete import DiscreteDDPM
from .flow import FlowSDE, LinearInterpolantSDE, TrigFlowSDE
from .ve import EDMSDE, VESDE
from .vp import VPSDE, CosineVPSDE, SubVPSDE

SDES: dict[str, type[ForwardSDE]] = {
    "vp": VPSDE, "cosine": CosineVPSDE, "subvp": SubVPSDE, "ve": VESDE, "edm": EDMSDE,
    "ddpm": DiscreteDDPM, "flow": FlowSDE, "trigflow": TrigFlowSDE,
}


def get_sde(name: str, **kwargs: Any) -> ForwardSDE:
    """Build a forward SDE from its name (``vp``, ``cosine``, ``subvp``, ``ve``, ``edm``, ``ddpm``,
    ``flow``, ``trigflow``)."""
    if name not in SDES:
        raise ValueError(f"unknown SDE name={name!r}: expected one of {sorted(SDES)}")
    return SDES[name](**kwargs)


__all__ = ["ForwardSDE", "VPSDE", "CosineVPSDE", "SubVPSDE", "VESDE", "EDMSDE", "DiscreteDDPM",
           "FlowSDE", "TrigFlowSDE", "LinearInterpolantSDE", "CustomSDE", "SDES", "get_sde"]
