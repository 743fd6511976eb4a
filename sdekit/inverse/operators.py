"""Linear measurement operators ``y = H x`` given by their singular value decomposition.

``H = U diag(s) V^T`` acts on a state of shape ``(B, *event_shape)`` and returns a measurement of
shape ``(B, *obs_shape)``. DDRM (Kawar et al. 2022) works in the spectral coordinates
``x_bar = V^T x`` (all ``D`` of them, the ``M`` observed ones first) and ``y_bar = U^T y`` (``M``
of them); diffusion posterior sampling only calls the operator. Each operator applies its factors
without forming a ``D x D`` matrix where a closed form exists (a permutation for inpainting, a
per-block orthonormal basis for super-resolution, the identity for denoising).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import require


def _shape(event_shape: Any) -> tuple[Any, ...]:
    """``event_shape`` as a tuple, refused by name when it is not a sequence of sizes."""
    require(isinstance(event_shape, (tuple, list, torch.Size)), "event_shape", event_shape,
            "the shape of one sample, a tuple of integers >= 1 such as (1, 8, 8)")
    return tuple(event_shape)


class SVDOperator:
    """Base class: a linear operator ``H = U diag(s) V^T`` (``M`` singular values, ``M <= D``).

    Subclasses set ``event_shape``, ``obs_shape`` and ``s`` (float64, ``(M,)``, values >= 0) and
    implement ``Vt``, ``V``, ``Ut`` and ``U`` on flat batches.
    """

    event_shape: tuple[int, ...]
    obs_shape: tuple[int, ...]
    s: Tensor

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    @property
    def rank(self) -> int:
        return self.s.numel()

    def Vt(self, x: Tensor) -> Tensor:
        """``V^T x`` for ``x`` of shape ``(B, D)``: ``(B, D)``, the observed directions first."""
        raise NotImplementedError

    def V(self, xb: Tensor) -> Tensor:
        """``V x_bar``: ``(B, D) -> (B, D)``."""
        raise NotImplementedError

    def Ut(self, y: Tensor) -> Tensor:
        """``U^T y`` for ``y`` of shape ``(B, *obs_shape)``: ``(B, M)``."""
        raise NotImplementedError

    def U(self, yb: Tensor) -> Tensor:
        """``U y_bar``: ``(B, M) -> (B, *obs_shape)``."""
        raise NotImplementedError

    def check_state(self, name: str, shape: Sequence[int]) -> None:
        """Raise unless a state of shape ``shape = (B, *event)`` fits this operator."""
        if tuple(shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"shape mismatch: {name} has shape {tuple(shape)} but the operator "
                             f"{self!r} acts on states of shape (batch, *{self.event_shape})")

    def __call__(self, x: Tensor) -> Tensor:
        """``H x``: ``(B, *event_shape) -> (B, *obs_shape)`` (differentiable)."""
        self.check_state("x", x.shape)
        xb = self.Vt(x.reshape(x.shape[0], -1))
        return self.U(xb[:, :self.rank] * self.s.to(xb))

    def pinv(self, y: Tensor) -> Tensor:
        """The least-squares preimage ``H^+ y`` of a measurement: ``(B, *event_shape)``."""
        yb = self.Ut(y)
        s = self.s.to(yb)
        inv = torch.where(s > 0, 1 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        xb = torch.cat([yb * inv, yb.new_zeros(yb.shape[0], self.dim - self.rank)], 1)
        return self.V(xb).reshape((yb.shape[0],) + self.event_shape)


class MatrixOperator(SVDOperator):
    """A dense matrix ``H`` of shape ``(M, D)``, ``M <= D`` (small problems and tests); its SVD is
    computed once in float64."""

    def __init__(self, H: Any, event_shape: Sequence[int] | None = None) -> None:
        try:
            H = torch.as_tensor(H, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            require(False, "H", type(H).__name__, "a matrix of shape (M, D) (a tensor or nested "
                    "list of numbers)")
        require(H.ndim == 2 and 1 <= H.shape[0] <= H.shape[1], "H",
                f"(a tensor of shape {tuple(H.shape)})", "a matrix of shape (M, D) with M <= D")
        require(bool(torch.isfinite(H).all()), "H", "(a matrix with NaN or Inf)", "finite values")
        self.event_shape = tuple(event_shape) if event_shape is not None else (H.shape[1],)
        require(math.prod(self.event_shape) == H.shape[1], "event_shape", self.event_shape,
                f"a shape holding D={H.shape[1]} values (the columns of H)")
        self.obs_shape = (H.shape[0],)
        self.H = H
        Um, s, Vh = torch.linalg.svd(H, full_matrices=True)
        self._U, self.s, self._V = Um, s, Vh.T

    def Vt(self, x: Tensor) -> Tensor:
        return x @ self._V.to(x)

    def V(self, xb: Tensor) -> Tensor:
        return xb @ self._V.T.to(xb)

    def Ut(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], -1) @ self._U.to(y)

    def U(self, yb: Tensor) -> Tensor:
        return yb @ self._U.T.to(yb)

    def __repr__(self) -> str:
        return f"MatrixOperator(shape={tuple(self.H.shape)})"


class Inpainting(SVDOperator):
    """Observe the entries where ``mask`` is True: ``y = x[mask]`` (flat, ``M`` values in
    row-major order). Singular values 1, ``V`` a permutation (known entries first), ``U = I``."""

    def __init__(self, mask: Tensor) -> None:
        require(isinstance(mask, Tensor) and mask.ndim >= 1, "mask", type(mask).__name__,
                "a boolean tensor of the state's event shape")
        m = _as_bool_mask(mask)
        require(bool(m.any()), "mask", "(all False)", "a mask with at least one known entry")
        self.event_shape = tuple(m.shape)
        flat = m.flatten()
        self.known = flat.nonzero().flatten()
        self.perm = torch.cat([self.known, (~flat).nonzero().flatten()])
        self.inv_perm = torch.argsort(self.perm)
        self.obs_shape = (self.known.numel(),)
        self.s = torch.ones(self.known.numel(), dtype=torch.float64)
        self.mask = m

    def Vt(self, x: Tensor) -> Tensor:
        return x[:, self.perm.to(x.device)]

    def V(self, xb: Tensor) -> Tensor:
        return xb[:, self.inv_perm.to(xb.device)]

    def Ut(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], -1)

    def U(self, yb: Tensor) -> Tensor:
        return yb

    def __repr__(self) -> str:
        return f"Inpainting(event_shape={self.event_shape}, known={self.known.numel()})"


class SuperResolution(SVDOperator):
    """Block averaging by ``factor`` (``y`` = the means of ``factor x factor`` blocks, shape
    ``(B, C, H / factor, W / factor)``): ``factor``-times super-resolution. Each block's averaging
    row has singular value ``1 / factor`` and right singular vector ``ones / factor``; the block's
    other directions come from one fixed orthonormal basis of the block (unobserved)."""

    def __init__(self, event_shape: Sequence[int], factor: int = 4) -> None:
        shape = _shape(event_shape)
        require(isinstance(factor, int) and not isinstance(factor, bool) and factor >= 2,
                "factor", factor, "an integer >= 2")
        require(len(shape) == 3 and shape[1] % factor == 0 and shape[2] % factor == 0,
                "event_shape", shape, f"(C, H, W) with H and W divisible by factor={factor}")
        self.event_shape, self.factor = shape, factor
        c, h, w = shape
        self.obs_shape = (c, h // factor, w // factor)
        n = factor * factor
        basis = torch.eye(n, dtype=torch.float64)
        basis[:, 0] = 1.0
        Q, R = torch.linalg.qr(basis)
        self.Q = Q * torch.sign(torch.diagonal(R))   # first column = ones / factor
        self.s = torch.full((math.prod(self.obs_shape),), 1.0 / factor, dtype=torch.float64)

    def _blocks(self, x: Tensor) -> Tensor:      # (B, D) -> (B, C, h, w, f*f)
        c, h, w = self.event_shape
        f = self.factor
        b = x.reshape(x.shape[0], c, h // f, f, w // f, f).permute(0, 1, 2, 4, 3, 5)
        return b.reshape(x.shape[0], c, h // f, w // f, f * f)

    def Vt(self, x: Tensor) -> Tensor:
        coef = self._blocks(x) @ self.Q.to(x)
        return torch.cat([coef[..., 0].reshape(x.shape[0], -1),
                          coef[..., 1:].reshape(x.shape[0], -1)], 1)

    def V(self, xb: Tensor) -> Tensor:
        c, h, w = self.event_shape
        f, m = self.factor, self.rank
        first = xb[:, :m].reshape(xb.shape[0], c, h // f, w // f, 1)
        rest = xb[:, m:].reshape(xb.shape[0], c, h // f, w // f, f * f - 1)
        blocks = torch.cat([first, rest], -1) @ self.Q.T.to(xb)
        out = blocks.reshape(xb.shape[0], c, h // f, w // f, f, f).permute(0, 1, 2, 4, 3, 5)
        return out.reshape(xb.shape[0], -1)

    def Ut(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], -1)

    def U(self, yb: Tensor) -> Tensor:
        return yb.reshape((yb.shape[0],) + self.obs_shape)

    def __repr__(self) -> str:
        return f"SuperResolution(event_shape={self.event_shape}, factor={self.factor})"


class Denoising(SVDOperator):
    """The identity ``y = x`` (with measurement noise: denoising); ``U = V = I``, ``s = 1``."""

    def __init__(self, event_shape: Sequence[int]) -> None:
        shape = _shape(event_shape)
        require(len(shape) >= 1 and all(isinstance(d, int) and d >= 1 for d in shape),
                "event_shape", shape, "a tuple of integers >= 1")
        self.event_shape = self.obs_shape = shape
        self.s = torch.ones(math.prod(shape), dtype=torch.float64)

    def Vt(self, x: Tensor) -> Tensor:
        return x

    def V(self, xb: Tensor) -> Tensor:
        return xb

    def Ut(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], -1)

    def U(self, yb: Tensor) -> Tensor:
        return yb.reshape((yb.shape[0],) + self.obs_shape)

    def __repr__(self) -> str:
        return f"Denoising(event_shape={self.event_shape})"


def _as_bool_mask(mask: Tensor) -> Tensor:
    """A boolean mask from a bool tensor or one of 0/1 values (an error otherwise)."""
    if mask.dtype == torch.bool:
        return mask.detach().cpu()
    ok = bool(((mask == 0) | (mask == 1)).all()) if mask.numel() else False
    require(ok, "mask", f"(a {mask.dtype} tensor with values other than 0 and 1)",
            "a boolean tensor (True = known) or one of 0/1 values")
    return (mask != 0).detach().cpu()
