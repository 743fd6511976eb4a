"""Small shared helpers: broadcasting, validation and dtype handling."""
from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a solver state, times and schedule coefficients are held for data of
    ``dtype``: its own for float32/float64, float32 for half precision (times and coefficients
    rounded to 8-11 mantissa bits would move DDPM timesteps and stall small steps)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def check_float_dtype(name: str, dtype: Any) -> None:
    """Raise unless ``dtype`` is a real floating torch dtype (the error names the argument)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}: a floating dtype is needed (one of "
                        "torch.float16, torch.bfloat16, torch.float32, torch.float64)")


def check_seed(name: str, seed: Any) -> None:
    """Raise unless ``seed`` is an integer in [0, 2**63)."""
    if not (isinstance(seed, int) and not isinstance(seed, bool) or _is_int_tensor(seed)):
        raise TypeError(f"{name}={seed!r} is invalid: expected an integer in [0, 2**63) "
                        f"(got {type(seed).__name__})")
    if not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"{name}={seed!r} is invalid: expected an integer in [0, 2**63)")


def _is_int_tensor(v: Any) -> bool:
    import numpy as np
    return isinstance(v, np.integer) or (isinstance(v, Tensor) and v.ndim == 0
                                         and not v.is_floating_point() and v.dtype != torch.bool)


def sum_tensors(terms: Iterable[Tensor]) -> Tensor:
    """``t_0 + t_1 + ...`` in that order (the built-in ``sum``, typed as a tensor; at least one
    term)."""
    return functools.reduce(operator.add, terms)


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


def is_flag(value: Any, allow_none: bool = False) -> bool:
    """A Python or NumPy bool (or None where ``allow_none``): what an on/off option takes, so
    that ``'no'`` or ``0.5`` is refused instead of read as true."""
    import numpy as np
    return isinstance(value, (bool, np.bool_)) or (allow_none and value is None)


def check_flags(**flags: Any) -> None:
    """Raise a ValueError naming the first of the on/off ``flags`` that is not True or False."""
    for name, v in flags.items():
        require(is_flag(v), name, v, "True or False")


def is_real(value: Any) -> bool:
    """A finite real Python/NumPy number (not a bool, string or tensor)."""
    return is_number(value) and math.isfinite(value)


def is_number(value: Any) -> bool:
    """A real Python/NumPy number that is not NaN (infinities allowed; not a bool, string or
    tensor): what a comparison such as ``0 < v <= 1`` can be trusted on."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def is_collection(value: Any) -> bool:
    """An iterable that is not a string or bytes (a list, tuple, array or tensor of values)."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def is_int(value: Any) -> bool:
    """A Python/NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_finite_positive(name: str, value: float) -> None:
    require(is_real(value) and value > 0, name, value, "a finite number > 0")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} has shape {tuple(a.shape)} but "
                         f"{name_b} has shape {tuple(b.shape)}")
