"""Dependency-free PNG output: image grids and 2-D scatter densities."""
from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_write_bytes


def encode_png(img: np.ndarray) -> bytes:
    """Encode a uint8 array ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) as PNG bytes."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 2:
        color = 0
    elif img.ndim == 3 and img.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"shape mismatch: image has shape {img.shape}: expected (H, W) or "
                         "(H, W, 3)")
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 1, scale: int = 4,
               lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` with values in ``[lo, hi]`` into one uint8 image."""
    x = x.detach().float().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"shape mismatch: images have shape {tuple(x.shape)}: expected "
                         "(N, 1 or 3, H, W)")
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    v = ((x.clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8).numpy()
    v = v.repeat(scale, axis=2).repeat(scale, axis=3)
    H, W = h * scale + pad, w * scale + pad
    grid = np.full((c, ncol * H + pad, nrow * W + pad), 64, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * H: pad + r * H + h * scale, pad + q * W: pad + q * W + w * scale] = v[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def scatter_image(x: Tensor, size: int = 256, extent: float = 2.5) -> np.ndarray:
    """A 2-D point cloud as a log-density image on ``[-extent, extent]^2`` (white background)."""
    p = x.detach().double().cpu().numpy().reshape(x.shape[0], -1)
    if p.shape[1] != 2:
        raise ValueError(f"shape mismatch: points have {p.shape[1]} dims: expected 2")
    p = p[np.isfinite(p).all(1)]
    hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=size,
                                range=[[-extent, extent], [-extent, extent]])
    hist = np.log1p(hist[::-1])
    v = hist / hist.max() if hist.max() > 0 else hist
    return (255 * (1 - v) ** 2).astype(np.uint8)


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(img))


def save_samples_png(path: str | os.PathLike, x: Tensor, nrow: int | None = None) -> None:
    """Images -> a grid; 2-D points -> a density image."""
    if x.ndim == 4:
        save_png(path, image_grid(x, nrow=nrow))
    elif x.ndim == 2 and x.shape[1] == 2:
        save_png(path, scatter_image(x))
    else:
        raise ValueError(f"cannot draw samples of shape {tuple(x.shape)}: expected images "
                         "(N, C, H, W) or 2-D points (N, 2)")
