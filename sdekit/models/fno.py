"""A Fourier neural operator over the trajectory-time axis (Zheng et al. 2023, DSNO).

``TrajectoryOperator`` maps an initial state ``x_T`` to the whole probability-flow trajectory at
``K`` fixed output times in one pass:

1. a backbone score network (the MLP for vectors, the U-Net for images, any
   :class:`~sdekit.models.embedding.ScoreNet`) runs on the ``B * K`` stacked slots, slot k
   conditioned on its output time's half-logSNR;
2. its output and ``x_T`` are lifted to ``width`` channels and pass through temporal Fourier
   layers ``h <- h + act(W h + irfft_K(R . rfft_K(h)[:M]))`` mixing the K slots;
3. a projection back to the state's channels, plus a per-slot linear path in ``x_T`` (a full
   ``D x D`` matrix per slot for vectors, ``skip='full'``, or one scalar per slot, ``'scalar'``),
   initialised by least squares on the teacher data, so a linear teacher (Gaussian data) is
   reproduced exactly.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn


class TemporalSpectralConv(nn.Module):
    """``h (B, K, C_in, *spatial) -> (B, K, C_out, *spatial)``: real FFT along the slot axis, a
    learned complex multiplication ``R in C^{C_in x C_out x M}`` on the lowest ``modes`` frequencies,
    inverse FFT. Computed in float32 or float64 (never half precision)."""

    def __init__(self, c_in: int, c_out: int, modes: int) -> None:
        super().__init__()
        if not (isinstance(modes, int) and modes >= 1):
            raise ValueError(f"modes={modes!r} is invalid: expected an integer >= 1")
        self.c_in, self.c_out, self.modes = c_in, c_out, modes
        self.weight = nn.Parameter(torch.randn(c_in, c_out, modes, 2) / (c_in * c_out) ** 0.5)

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[2] != self.c_in:
            raise ValueError(f"shape mismatch: expected {self.c_in} channels at dim 2, got shape "
                             f"{tuple(h.shape)}")
        K = h.shape[1]
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        H = torch.fft.rfft(h.to(dt), dim=1)
        m = min(self.modes, H.shape[1])
        W = torch.view_as_complex(self.weight[:, :, :m].to(dt).contiguous())
        out = torch.zeros((h.shape[0], H.shape[1], self.c_out) + tuple(h.shape[3:]),
                          dtype=H.dtype, device=h.device)
        out[:, :m] = torch.einsum("bmi...,iom->bmo...", H[:, :m], W)
        return torch.fft.irfft(out, n=K, dim=1).to(h.dtype)


def _pointwise(lin: nn.Linear, h: Tensor) -> Tensor:
    """Apply a Linear over the channel axis (dim 2) of ``(B, K, C, *spatial)``."""
    return lin(h.movedim(2, -1)).movedim(-1, 2)


class TrajectoryOperator(nn.Module):
    """One-pass trajectory operator (see the module docstring).

    Args:
        backbone: a ScoreNet built for the state shape (called as ``backbone(x, lambda)``).
        state_shape: the shape of one state, e.g. ``(2,)`` or ``(1, 8, 8)``.
        lambdas: half-logSNR of the K output times (the last one is the sample).
        width, layers, modes: temporal Fourier layers.
        skip: ``'full'`` (a D x D linear map per slot; vectors) or ``'scalar'``.
    """

    def __init__(self, backbone: nn.Module, state_shape: Sequence[int], lambdas: Sequence[float],
                 width: int = 64, layers: int = 2, modes: int = 2, skip: str = "full") -> None:
        super().__init__()
        if skip not in ("full", "scalar"):
            raise ValueError(f"skip={skip!r} is invalid: expected 'full' or 'scalar'")
        self.backbone = backbone
        self.state_shape = tuple(int(s) for s in state_shape)
        self.register_buffer("lambdas", torch.as_tensor(lambdas, dtype=torch.float32))
        K, C = len(lambdas), self.state_shape[0]
        D = math.prod(self.state_shape)
        self.lift = nn.Linear(2 * C, width)
        self.specs = nn.ModuleList(TemporalSpectralConv(width, width, modes) for _ in range(layers))
        self.mix = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.proj = nn.Linear(width, C)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.skip = skip
        shape = (K, D, D) if skip == "full" else (K,)
        self.skip_weight = nn.Parameter(torch.zeros(shape))
        self.skip_bias = nn.Parameter(torch.zeros(K, D))

    @property
    def slots(self) -> int:
        return self.lambdas.numel()

    def linear_path(self, x_T: Tensor) -> Tensor:
        flat = x_T.reshape(x_T.shape[0], -1)
        if self.skip == "full":
            out = torch.einsum("kde,be->bkd", self.skip_weight, flat)
        else:
            out = self.skip_weight[None, :, None] * flat[:, None, :]
        return (out + self.skip_bias).reshape((x_T.shape[0], self.slots) + self.state_shape)

    def forward(self, x_T: Tensor) -> Tensor:
        if tuple(x_T.shape[1:]) != self.state_shape:
            raise ValueError(f"shape mismatch: the operator was built for states of shape "
                             f"{self.state_shape} but got x_T of shape {tuple(x_T.shape)}")
        B, K = x_T.shape[0], self.slots
        xs = x_T.unsqueeze(1).expand((B, K) + self.state_shape)
        lam = self.lambdas.to(x_T).repeat(B)
        feat = self.backbone(xs.reshape((B * K,) + self.state_shape), lam)
        feat = feat.reshape((B, K) + self.state_shape)
        h = _pointwise(self.lift, torch.cat([feat, xs], 2))
        for spec, mix in zip(self.specs, self.mix):
            h = h + nn.functional.silu(spec(h) + _pointwise(mix, h))
        return self.linear_path(x_T) + _pointwise(self.proj, h)

    @torch.no_grad()
    def fit_linear_path(self, x_T: Tensor, traj: Tensor, ridge: float = 1e-8) -> None:
        """Least-squares fit of the per-slot linear path to teacher data (exact for a linear
        teacher, such as Gaussian data)."""
        B = x_T.shape[0]
        X = torch.cat([x_T.reshape(B, -1).double(), torch.ones(B, 1, dtype=torch.float64)], 1)
        Y = traj.reshape(B, self.slots, -1).double()
        for k in range(self.slots):
            if self.skip == "full":
                A = X.T @ X + ridge * torch.eye(X.shape[1], dtype=torch.float64)
                coef = torch.linalg.solve(A, X.T @ Y[:, k])          # (D+1, D)
                self.skip_weight[k] = coef[:-1].T.to(self.skip_weight)
                self.skip_bias[k] = coef[-1].to(self.skip_bias)
            else:
                x = X[:, :-1].reshape(-1)
                y = Y[:, k].reshape(-1)
                a = float((x * y).sum() / (x * x).sum().clamp_min(1e-30))
                self.skip_weight[k] = a
                self.skip_bias[k] = (Y[:, k] - a * X[:, :-1]).mean(0).to(self.skip_bias)
