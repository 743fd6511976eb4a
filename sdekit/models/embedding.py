"""Noise-level embeddings and the base class every sdekit score network derives from.

A network declares what it outputs (``prediction``: eps, x0, v or denoiser) and what noise-level
input it expects (``time_input``), so :func:`sdekit.models.wrap` can hand it to
:class:`~sdekit.dynamics.DiffusionModel` with the right adapters. Networks are conditioned on the
half-logSNR ``lambda = log alpha - log sigma`` by default: it is defined for every forward SDE, has
a similar range for all of them (roughly -10..10), and so one architecture serves VP, VE, EDM and
discrete DDPM alike.

EDM preconditioning (Karras et al. 2022, Table 1, "EDM" column): for ``prediction='denoiser'`` the
network is called as ``D(x_tilde, sigma)`` in the VE-equivalent space and computes
``D = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``,
``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)`` and
``c_noise = -log(sigma) = lambda`` (EDM uses ``log(sigma) / 4``; we keep the lambda scale so the
same embedding serves every parametrisation).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import compute_dtype, require

NET_PREDICTIONS = ("eps", "x0", "v", "denoiser", "flow")
EMBEDDINGS = ("sinusoidal", "fourier")


class SinusoidalEmbedding(nn.Module):
    """``[cos(w_k c), sin(w_k c)]`` with ``dim/2`` frequencies geometric in
    ``[min_freq, max_freq]`` (Vaswani et al. 2017, as used by DDPM for timesteps)."""

    freqs: Tensor  # a registered buffer

    def __init__(self, dim: int, min_freq: float = 0.01, max_freq: float = 10.0) -> None:
        super().__init__()
        require(isinstance(dim, int) and dim >= 2 and dim % 2 == 0, "dim", dim,
                "an even integer >= 2")
        half = dim // 2
        k = torch.arange(half, dtype=torch.float64) / max(half - 1, 1)
        freqs = math.log(max_freq) + k * (math.log(min_freq) - math.log(max_freq))
        self.register_buffer("freqs", torch.exp(freqs).float(), persistent=False)
        # a float64 master copy that ``.to(dtype)`` does not round: in a bfloat16 network the
        # buffer's frequency 10 would be off by 0.04, the phase at lambda = 10 by 0.4 rad
        self._freqs64 = torch.exp(freqs)

    def forward(self, c: Tensor) -> Tensor:
        """Computed in float32 at least, returned in the network's dtype."""
        w = self._freqs64.to(device=c.device, dtype=compute_dtype(self.freqs.dtype))
        arg = c.to(w.dtype)[:, None] * w[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).to(self.freqs.dtype)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi b_k c), sin(2 pi b_k c)]`` with fixed
    ``b_k ~ N(0, scale^2)`` (Tancik et al. 2020; Song et al. 2021's Gaussian Fourier projection).
    The frequencies are a persistent buffer, so they travel with the checkpoint."""

    freqs: Tensor  # a registered buffer

    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        require(isinstance(dim, int) and dim >= 2 and dim % 2 == 0, "dim", dim,
                "an even integer >= 2")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, c: Tensor) -> Tensor:
        arg = 2 * math.pi * c.float()[:, None] * self.freqs[None, :].float()
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).to(self.freqs.dtype)


def make_embedding(kind: str, dim: int) -> nn.Module:
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim)
    raise ValueError(f"embedding={kind!r} is invalid: expected one of {EMBEDDINGS}")


class ScoreNet(nn.Module):
    """Base class: a network ``F(x, c_noise, y)`` plus its declared output parametrisation.

    Subclasses implement ``_forward(x, c_noise, y)`` and set ``self.config`` (a JSON-able dict that
    :func:`sdekit.models.build_network` turns back into the same architecture).

    ``forward(x, cond, y=None)`` receives what :class:`~sdekit.dynamics.DiffusionModel` passes:
    the half-logSNR ``lambda`` for eps / x0 / v networks (``time_input = 'lambda'``), ``t`` for
    flow (velocity) networks and
    ``sigma_tilde = exp(-lambda)`` for EDM-preconditioned denoisers. ``y`` is an optional integer
    class label per sample; the label ``num_classes`` (or ``None``) is the null class.
    """

    config: dict[str, Any]
    embed: nn.Module
    emb_mlp: nn.Module

    def __init__(self, prediction: str = "eps", sigma_data: float = 0.5,
                 num_classes: int | None = None) -> None:
        super().__init__()
        require(prediction in NET_PREDICTIONS, "prediction", prediction,
                f"one of {NET_PREDICTIONS}")
        require(sigma_data > 0, "sigma_data", sigma_data, "a number > 0")
        require(num_classes is None or (isinstance(num_classes, int) and num_classes >= 1),
                "num_classes", num_classes, "None or an integer >= 1")
        self.prediction = prediction
        self.sigma_data = float(sigma_data)
        self.num_classes = num_classes

    @property
    def time_input(self) -> str:
        """What :class:`DiffusionModel` should pass as ``cond``: ``t`` for flow networks (finite
        at t = 1 of flow matching, where lambda = -inf)."""
        if self.prediction == "flow":
            return "t"
        return "sigma_tilde" if self.prediction == "denoiser" else "lambda"

    def _labels(self, y: Tensor | None, batch: int, device: Any) -> Tensor | None:
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y was given but the network is unconditional (num_classes=None)")
            return None
        if y is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device).long()
        if y.ndim == 0:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"shape mismatch: y has shape {tuple(y.shape)} but x has batch size "
                             f"{batch}: expected one label per sample")
        if bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(f"y contains labels outside 0..{self.num_classes} "
                             f"({self.num_classes} is the null class)")
        return y

    def forward(self, x: Tensor, cond: Tensor, y: Tensor | None = None) -> Tensor:
        cond = torch.as_tensor(cond, device=x.device)
        if cond.ndim == 0:
            cond = cond.expand(x.shape[0])
        labels = self._labels(y, x.shape[0], x.device)
        # the noise level stays float32 for a half-precision x (see sdekit._utils.compute_dtype)
        cond = cond.to(compute_dtype(x.dtype))
        if self.prediction != "denoiser":
            return self._forward(x, cond, labels)
        sigma = cond
        sd = self.sigma_data
        shape = (-1,) + (1,) * (x.ndim - 1)
        s = sigma.reshape(shape)
        denom = s * s + sd * sd
        c_skip = sd * sd / denom
        c_out = s * sd / torch.sqrt(denom)
        c_in = 1 / torch.sqrt(denom)
        c_noise = -torch.log(sigma)
        out = self._forward((c_in * x).to(x.dtype), c_noise, labels)
        return (c_skip * x + c_out * out).to(x.dtype)

    def _forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None) -> Tensor:
        raise NotImplementedError

    def fix_noise_level(self, cond: float) -> None:
        """Fold the noise-level conditioning into constants, for a network only ever called at
        the one time input ``cond`` (the one-pass operator at its start time): the embedding MLP
        and each block's projection of it become one learned vector per block (the projection's
        output at ``cond``), so the network loses those parameters and multiply-accumulates and
        computes the same function at ``cond``. For an unconditional network with an
        ``emb_mlp`` and per-block ``emb`` projections (the MLP and the U-Net); in place,
        irreversible. Afterwards the network ignores the noise level it is given: call it at
        ``cond`` only."""
        if self.num_classes is not None:
            raise ValueError("fix_noise_level: a class-conditional network's embedding depends "
                             "on the label, so it cannot be folded into constants")
        mlp = getattr(self, "emb_mlp", None)
        blocks = [(m, c) for m in self.modules() for n, c in m.named_children()
                  if n == "emb" and isinstance(c, nn.Linear)]
        if not isinstance(mlp, nn.Module) or not blocks:
            raise ValueError(f"fix_noise_level: {type(self).__name__} has no emb_mlp and "
                             "per-block emb projections to fold")
        captured: list[Tensor] = []
        hook = mlp.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        p = next(self.parameters())
        try:
            with torch.no_grad():
                self(torch.zeros((1,) + tuple(getattr(self, "data_shape")), dtype=p.dtype,
                                 device=p.device),
                     torch.tensor([float(cond)], dtype=torch.float64, device=p.device))
        finally:
            hook.remove()
        with torch.no_grad():
            for module, lin in blocks:
                module.emb = _Constant(lin(captured[0])[0])
        self.embed = nn.Identity()
        self.emb_mlp = _NoEmbedding()


class _Constant(nn.Module):
    """``(B, ...) -> (B, n)``: one learned vector for every row, whatever the input (see
    :meth:`ScoreNet.fix_noise_level`)."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand(x.shape[0], -1)


class _NoEmbedding(nn.Module):
    """``(B, ...) -> (B, 0)``: the folded embedding MLP (its blocks hold constants instead)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], 0)
