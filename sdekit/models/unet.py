"""A small U-Net score network (Ronneberger et al. 2015 as adapted by Ho et al. 2020):
residual blocks with group norm and adaptive scale/shift from the noise-level embedding,
self-attention at chosen resolutions, configurable widths and depth, optional class conditioning
with a null class for classifier-free guidance (Ho & Salimans 2022)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import require
from .embedding import ScoreNet, make_embedding


def _groups(ch: int, groups: int) -> int:
    g = min(groups, ch)
    while ch % g:
        g -= 1
    return g


def _zero_init(conv: nn.Conv2d) -> None:
    """Zero a layer's weight and bias: a residual branch that starts as the identity."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv, plus a skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        _zero_init(self.conv2)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, heads: int, groups: int) -> None:
        super().__init__()
        require(ch % heads == 0, "num_heads", heads, f"a divisor of the channel count {ch}")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch, groups), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        _zero_init(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def check_backbone(in_channels: int, image_size: int, base_channels: int,
                   channel_mult: Sequence[int], num_res_blocks: int,
                   attn_resolutions: Sequence[int], dropout: float
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate a U-Net backbone's shape arguments (the U-Net's and the noise-conditional
    classifier's encoder); returns ``channel_mult`` and ``attn_resolutions`` as int tuples."""
    channel_mult = tuple(int(m) for m in channel_mult)
    attn_resolutions = tuple(int(r) for r in attn_resolutions)
    require(isinstance(in_channels, int) and in_channels >= 1, "in_channels", in_channels,
            "an integer >= 1")
    require(isinstance(base_channels, int) and base_channels >= 1, "base_channels",
            base_channels, "an integer >= 1")
    require(len(channel_mult) >= 1 and all(m >= 1 for m in channel_mult), "channel_mult",
            channel_mult, "a non-empty sequence of integers >= 1")
    require(isinstance(num_res_blocks, int) and num_res_blocks >= 1, "num_res_blocks",
            num_res_blocks, "an integer >= 1")
    down = 2 ** (len(channel_mult) - 1)
    require(isinstance(image_size, int) and image_size >= down and image_size % down == 0,
            "image_size", image_size,
            f"a multiple of {down} (2^(len(channel_mult)-1) for channel_mult={channel_mult})")
    require(0 <= dropout < 1, "dropout", dropout, "0 <= dropout < 1")
    return channel_mult, attn_resolutions


class UNet(ScoreNet):
    """U-Net ``F(x, c_noise, y)`` for images of shape ``(in_channels, image_size, image_size)``.

    Args:
        in_channels, image_size: the sample shape (square images).
        base_channels: width at full resolution; level ``i`` has
            ``base_channels * channel_mult[i]``.
        channel_mult: one entry per resolution level (each further level halves the resolution).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (side lengths) at which self-attention is applied; the
            bottleneck always has one attention layer.
        num_heads, groups, dropout: attention heads, group-norm groups, dropout rate.
        embedding: ``sinusoidal`` or ``fourier`` noise-level embedding.
        num_classes: enables class conditioning; label ``num_classes`` is the null class.
        prediction: declared output: ``eps``, ``x0``, ``v`` or ``denoiser`` (EDM preconditioned).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (4,), num_heads: int = 1, groups: int = 8,
                 dropout: float = 0.0, embedding: str = "sinusoidal",
                 num_classes: int | None = None, prediction: str = "eps",
                 sigma_data: float = 0.5) -> None:
        super().__init__(prediction, sigma_data, num_classes)
        channel_mult, attn_resolutions = check_backbone(in_channels, image_size, base_channels,
                                                        channel_mult, num_res_blocks,
                                                        attn_resolutions, dropout)
        self.config = dict(name="unet", in_channels=in_channels, image_size=image_size,
                           base_channels=base_channels, channel_mult=list(channel_mult),
                           num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                           num_heads=num_heads, groups=groups, dropout=dropout,
                           embedding=embedding, num_classes=num_classes, prediction=prediction,
                           sigma_data=sigma_data)
        self.data_shape = (in_channels, image_size, image_size)
        C = base_channels
        emb_dim = 4 * C
        self.embed = make_embedding(embedding, C)
        self.emb_mlp = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, C, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [C]
        ch, res = C, image_size
        for i, m in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blk = nn.ModuleList([ResBlock(ch, C * m, emb_dim, groups, dropout)])
                ch = C * m
                if res in attn_resolutions:
                    blk.append(SelfAttention(ch, num_heads, groups))
                self.down.append(blk)
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid1 = ResBlock(ch, ch, emb_dim, groups, dropout)
        self.mid_attn = SelfAttention(ch, num_heads, groups)
        self.mid2 = ResBlock(ch, ch, emb_dim, groups, dropout)

        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blk = nn.ModuleList([ResBlock(ch + skips.pop(), C * m, emb_dim, groups, dropout)])
                ch = C * m
                if res in attn_resolutions:
                    blk.append(SelfAttention(ch, num_heads, groups))
                self.up.append(blk)
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(ch, groups), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        _zero_init(self.conv_out)

    @staticmethod
    def _run(blk: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        for layer in blk.children():
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def _forward(self, x: Tensor, c_noise: Tensor, y: Tensor | None) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"shape mismatch: x has sample shape {tuple(x.shape[1:])} but the "
                             f"U-Net was built for {self.data_shape}")
        emb = self.embed(c_noise)
        emb = self.emb_mlp(emb)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            h = self._run(blk, h, emb)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blk in self.up:
            if isinstance(next(blk.children()), ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blk, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"prediction={self.prediction!r}, data_shape={self.data_shape}, params={n}"


