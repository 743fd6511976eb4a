"""A noise-conditional classifier ``p(y | x_t, t)`` for classifier guidance (Dhariwal & Nichol
2021, Sec. 4): the encoder half of :class:`~sdekit.models.unet.UNet` (its residual blocks with the
noise-level embedding), global average pooling and a linear head to class logits.

Like the score networks it is conditioned on the half-logSNR ``lambda = log alpha - log sigma``
(``time_input = 'lambda'``), so one classifier serves every forward SDE it was trained on.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import require
from .embedding import make_embedding
from .unet import ResBlock, SelfAttention, _groups, check_backbone


class NoisyClassifier(nn.Module):
    """``logits = C(x_t, lambda)`` of shape ``(batch, num_classes)`` for images
    ``(in_channels, image_size, image_size)``; the arguments mean what they mean for
    :class:`~sdekit.models.unet.UNet` (its down path and middle block)."""

    time_input = "lambda"

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10,
                 base_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attn_resolutions: Sequence[int] = (),
                 num_heads: int = 1, groups: int = 8, dropout: float = 0.0,
                 embedding: str = "sinusoidal") -> None:
        super().__init__()
        require(isinstance(num_classes, int) and num_classes >= 2, "num_classes", num_classes,
                "an integer >= 2")
        channel_mult, attn_resolutions = check_backbone(in_channels, image_size, base_channels,
                                                        channel_mult, num_res_blocks,
                                                        attn_resolutions, dropout)
        self.config = {"name": "classifier", "in_channels": in_channels, "image_size": image_size,
                           "num_classes": num_classes, "base_channels": base_channels,
                           "channel_mult": list(channel_mult), "num_res_blocks": num_res_blocks,
                           "attn_resolutions": list(attn_resolutions), "num_heads": num_heads,
                           "groups": groups, "dropout": dropout, "embedding": embedding}
        self.num_classes = num_classes
        self.data_shape = (in_channels, image_size, image_size)
        C = base_channels
        emb_dim = 4 * C
        self.embed = make_embedding(embedding, C)
        self.emb_mlp = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, C, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch, res = C, image_size
        for i, m in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(ch, C * m, emb_dim, groups, dropout))
                ch = C * m
                if res in attn_resolutions:
                    self.blocks.append(SelfAttention(ch, num_heads, groups))
            if i < len(channel_mult) - 1:
                self.blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                res //= 2
        self.mid = ResBlock(ch, ch, emb_dim, groups, dropout)
        self.norm_out = nn.GroupNorm(_groups(ch, groups), ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Class logits for ``x`` at noise level ``cond`` (lambda; a scalar or one per sample)."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"shape mismatch: x has sample shape {tuple(x.shape[1:])} but the "
                             f"classifier was built for {self.data_shape}")
        cond = cond.to(x.device).float()
        if cond.ndim == 0:
            cond = cond.expand(x.shape[0])
        emb = self.emb_mlp(self.embed(cond))
        h = self.conv_in(x)
        for blk in self.blocks:
            h = blk(h, emb) if isinstance(blk, ResBlock) else blk(h)
        h = F.silu(self.norm_out(self.mid(h, emb)))
        return self.head(h.mean(dim=(2, 3)))

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"num_classes={self.num_classes}, data_shape={self.data_shape}, params={n}"
