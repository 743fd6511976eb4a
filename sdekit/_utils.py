"""Small shared helpers: broadcasting, validation and dtype handling."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions to ``v`` until it has ``ndim`` dimensions.

    Used to broadcast per-sample scalars (shape ``()`` or ``(B,)``) against states of any shape,
    so 2-D points and images run the same code.
    """
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of shape {tuple(v.shape)} to {ndim} dims")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_tensor(t: Any, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
    """Convert a float, sequence or tensor to a tensor (float64 unless a float tensor was given)."""
    if isinstance(t, Tensor):
        if dtype is not None or device is not None:
            return t.to(dtype=dtype or t.dtype, device=device or t.device)
        return t if t.is_floating_point() else t.double()
    return torch.as_tensor(t, dtype=dtype or torch.float64, device=device)


def require(cond: bool, name: str, value: Any, valid: str) -> None:
    """Raise ``ValueError`` naming the argument, its value and what would be valid."""
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: expected {valid}")


def require_finite_positive(name: str, value: float) -> None:
    require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
            name, value, "a finite number > 0")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} has shape {tuple(a.shape)} but "
                         f"{name_b} has shape {tuple(b.shape)}")
