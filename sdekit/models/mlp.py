"""An MLP score network for low-dimensional data (2-D toys, flattened small images)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._utils import require
from .embedding import ScoreNet, make_embedding


class _ResBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(self.act(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.drop(self.act(z)))


class MLPScoreNet(ScoreNet):
    """Residual MLP ``F(x, c_noise, y)`` on data of shape ``data_shape`` (flattened internally).

    Args:
        data_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        width: hidden width. depth: number of residual blocks.
        emb_dim: size of the noise-level (and class) embedding.
        embedding: ``sinusoidal`` or ``fourier``.
        num_classes: enables class conditioning (label ``num_classes`` is the null class).
        prediction: declared output: ``eps``, ``x0``, ``v`` or ``denoiser`` (EDM preconditioned).
    """

    def __init__(self, data_shape: Sequence[int] = (2,), width: int = 256, depth: int = 3,
                 emb_dim: int = 64, embedding: str = "sinusoidal", dropout: float = 0.0,
                 num_classes: int | None = None, prediction: str = "eps",
                 sigma_data: float = 0.5) -> None:
        super().__init__(prediction, sigma_data, num_classes)
        data_shape = tuple(int(s) for s in data_shape)
        require(len(data_shape) >= 1 and all(s >= 1 for s in data_shape), "data_shape",
                data_shape, "a non-empty tuple of positive sizes")
        require(isinstance(width, int) and width >= 1, "width", width, "an integer >= 1")
        require(isinstance(depth, int) and depth >= 1, "depth", depth, "an integer >= 1")
        require(0 <= dropout < 1, "dropout", dropout, "0 <= dropout < 1")
        self.config = dict(name="mlp", data_shape=list(data_shape), width=width, depth=depth,
                           emb_dim=emb_dim, embedding=embedding, dropout=dropout,
                           num_classes=num_classes, prediction=prediction, sigma_data=sigma_data)
        self.data_shape = data_shape
        d = math.prod(data_shape)
        self.embed = make_embedding(embedding, emb_dim)
        self.emb_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                     nn.Linear(emb_dim, emb_dim))
        self.label_emb = (nn.Embedding(num_classes + 1, emb_dim) if num_classes else None)
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(_ResBlock(width, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"shape mismatch: x has sample shape {tuple(x.shape[1:])} but the "
                             f"network was built for data_shape={self.data_shape}")
        emb = self.embed(c_noise)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        emb = self.emb_mlp(emb)
        h = self.inp(x.reshape(x.shape[0], -1))
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, data_shape={self.data_shape}"


