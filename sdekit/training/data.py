"""Data that ships with sdekit (nothing is downloaded).

* 2-D toys, generated from a seed: ``eight_gaussians``, ``swiss_roll``, ``two_moons``,
  ``checkerboard``. Each point carries a mode label, used by :func:`mode_coverage`.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, labels 0-9), scaled
  from [0, 16] to [-1, 1], optionally upsampled (bilinear), split 50/50 (stratified, fixed seed)
  into a training half and a held-out half for evaluation.

A :class:`Dataset` records its ``transform`` (a JSON-able dict) so a checkpoint knows how to map
samples back to data space (:func:`to_data_space`).
"""
from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TOY_SIZE = 20000          # points generated for a toy training set (and again for its test set)


@dataclass
class Dataset:
    """A training set plus held-out data. ``x``: float32 tensor ``(N, *shape)``; ``y``: int64
    labels (class labels for digits, mode labels for toys) or None."""

    name: str
    x: Tensor
    y: Tensor | None
    x_test: Tensor
    y_test: Tensor | None
    num_classes: int | None = None      # class labels usable for conditioning
    num_modes: int | None = None        # mode labels (toys) for coverage checks
    transform: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    def __len__(self) -> int:
        return self.x.shape[0]


# --------------------------------------------------------------------------------- toys
def _eight_gaussians(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    k = torch.randint(0, 8, (n,), generator=g)
    ang = k.double() * (2 * math.pi / 8)
    centers = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    x = centers + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x / 1.414, k            # unit-ish std


def _swiss_roll(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    u = torch.rand(n, generator=g, dtype=torch.float64)
    theta = 1.5 * math.pi * (1 + 2 * u)                # 1.5 pi .. 4.5 pi, as in sklearn
    x = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], 1)
    x = x + 0.25 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    k = torch.clamp((u * 6).long(), max=5)             # six arc-length-ish segments as modes
    return x / 7.5, k


def _two_moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    k = torch.randint(0, 2, (n,), generator=g)
    a = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    x = torch.where(k[:, None] == 0, upper, lower)
    x = x + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 0.7, k


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # a 4x4 board on [-2, 2]^2 with the 8 squares of (row + col) even filled
    k = torch.randint(0, 8, (n,), generator=g)
    row = k // 2
    col = 2 * (k % 2) + (row % 2)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    x = torch.stack([col + u[:, 0], row + u[:, 1]], 1) - 2.0
    return x / 1.15, k


TOYS: dict[str, tuple[Callable[[int, torch.Generator], tuple[Tensor, Tensor]], int]] = {
    "eight_gaussians": (_eight_gaussians, 8),
    "swiss_roll": (_swiss_roll, 6),
    "two_moons": (_two_moons, 2),
    "checkerboard": (_checkerboard, 8),
}
DATASETS = tuple(TOYS) + ("digits",)


def sample_toy(name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` fresh points (float32) and their mode labels from the toy ``name``."""
    if name not in TOYS:
        raise ValueError(f"unknown toy dataset {name!r}: expected one of {sorted(TOYS)}")
    g = torch.Generator().manual_seed(seed)
    x, k = TOYS[name][0](n, g)
    return x.float(), k


def load_digits_tensors(image_size: int = 8) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(N, 1, S, S)`` float32 in [-1, 1] and their labels."""
    x, y = _digits_cached(image_size)
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=4)
def _digits_cached(image_size: int) -> tuple[Tensor, Tensor]:
    images, target = _read_sklearn_digits()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, torch.tensor(target, dtype=torch.long)


def _read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits table bundled with scikit-learn. Read straight from its CSV when it can be
    found (importing sklearn costs seconds); else through ``sklearn.datasets.load_digits``."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn), "
                          "which bundles it")
    root = Path(list(spec.submodule_search_locations)[0])
    csv_path = root / "datasets" / "data" / "digits.csv.gz"
    if csv_path.is_file():
        table = np.loadtxt(csv_path, delimiter=",", dtype=np.float64)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - layout changed
    d = load_digits()
    return d.data, d.target


def digits_split(n_labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified 50/50 split: per class, a seeded permutation, the first half trains."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(int(n_labels.max()) + 1):
        idx = (n_labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        h = (idx.numel() + 1) // 2
        train.append(idx[:h])
        test.append(idx[h:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def load_dataset(name: str, seed: int = 0, image_size: int = 8) -> Dataset:
    """Load a bundled dataset by name (one of :data:`DATASETS`)."""
    if name in TOYS:
        x, k = sample_toy(name, TOY_SIZE, seed)
        xt, kt = sample_toy(name, TOY_SIZE, seed + 1_000_003)
        return Dataset(name, x, k, xt, kt, num_classes=None, num_modes=TOYS[name][1],
                       transform={"kind": "identity"})
    if name == "digits":
        if not (isinstance(image_size, int) and image_size >= 8):
            raise ValueError(f"image_size={image_size!r} is invalid: expected an integer >= 8")
        x, y = load_digits_tensors(image_size)
        tr, te = digits_split(y, seed=0)   # the split is fixed: FD-digits depends on it
        return Dataset(name, x[tr], y[tr], x[te], y[te], num_classes=10,
                       transform={"kind": "affine", "scale": 8.0, "offset": 8.0,
                                  "data_range": [0, 16], "image_size": image_size,
                                  "source_size": 8})
    raise ValueError(f"unknown dataset {name!r}: expected one of {list(DATASETS)}")


def to_data_space(x: Tensor, transform: dict[str, Any]) -> Tensor:
    """Undo a dataset transform (e.g. digits in [-1, 1] -> pixel values in [0, 16])."""
    if transform.get("kind", "identity") == "identity":
        return x
    if transform["kind"] == "affine":
        return x * transform["scale"] + transform["offset"]
    raise ValueError(f"transform kind {transform['kind']!r} is unknown: expected identity or "
                     "affine")


def to_source_resolution(x: Tensor, transform: dict[str, Any]) -> Tensor:
    """Downsample upsampled digits back to their 8x8 source size (no-op otherwise)."""
    src = transform.get("source_size")
    if src and x.ndim == 4 and x.shape[-1] != src:
        return F.interpolate(x, size=(src, src), mode="area")
    return x


# ----------------------------------------------------------------------------- coverage
def _nearest(a: Tensor, b: Tensor, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """For each row of a: distance to and index of its nearest row of b."""
    d_out, i_out = [], []
    for s in range(0, a.shape[0], chunk):
        d = torch.cdist(a[s:s + chunk].double(), b.double())
        m, i = d.min(1)
        d_out.append(m)
        i_out.append(i)
    return torch.cat(d_out), torch.cat(i_out)


def toy_skeleton(name: str, n: int = 5000) -> tuple[Tensor, Tensor, float, Tensor]:
    """The noise-free set a toy is generated from, in data coordinates: ``(points, mode labels,
    radius, mode weights)``. A point is *on support* if it lies within ``radius`` of the set:
    3 noise standard deviations for the noisy toys (eight Gaussians: a 3-sigma disc around each
    centre; swiss roll and two moons: a 3-sigma band around the curve), and 0.05 of a square's
    side around the filled squares of the checkerboard."""
    if name == "eight_gaussians":
        k = torch.arange(8)
        ang = k.double() * (2 * math.pi / 8)
        pts = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1) / 1.414
        return pts, k, 3 * 0.1 / 1.414, torch.full((8,), 1 / 8, dtype=torch.float64)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if name == "swiss_roll":
        theta = 1.5 * math.pi * (1 + 2 * u)
        pts = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], 1) / 7.5
        k = torch.clamp((u * 6).long(), max=5)
        return pts, k, 3 * 0.25 / 7.5, torch.full((6,), 1 / 6, dtype=torch.float64)
    if name == "two_moons":
        a = u * math.pi
        upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
        lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
        off = torch.tensor([0.5, 0.25], dtype=torch.float64)
        pts = (torch.cat([upper, lower]) - off) / 0.7
        k = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        return pts, k, 3 * 0.05 / 0.7, torch.full((2,), 0.5, dtype=torch.float64)
    if name == "checkerboard":
        m = 30                                       # a 30x30 lattice inside each square
        g = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        gy, gx = torch.meshgrid(g, g, indexing="ij")
        cell = torch.stack([gx.flatten(), gy.flatten()], 1)
        squares: list[Tensor] = []
        labels: list[Tensor] = []
        for j in range(8):
            row = j // 2
            col = 2 * (j % 2) + (row % 2)
            squares.append(cell + torch.tensor([col, row], dtype=torch.float64) - 2.0)
            labels.append(torch.full((m * m,), j, dtype=torch.long))
        # lattice spacing 1/30 of a side: any point of a square is within 0.024 of the lattice
        return (torch.cat(squares) / 1.15, torch.cat(labels), 0.05 / 1.15,
                torch.full((8,), 1 / 8, dtype=torch.float64))
    raise ValueError(f"mode coverage is defined for the toys {sorted(TOYS)}, not {name!r}")


def mode_coverage(name: str, samples: Tensor, min_share: float = 0.25,
                  min_on_support: float = 0.9, seed: int = 12345) -> dict[str, Any]:
    """Mode-coverage check for a 2-D toy.

    Each sample is matched to the nearest point of the toy's noise-free skeleton
    (:func:`toy_skeleton`); it is *on support* if it lies within the skeleton's radius (3 noise
    standard deviations; real data: ~99%), and then belongs to that point's mode. A mode is
    *covered* if it receives at least ``min_share`` times its expected share of the samples. The
    check passes if every mode is covered and at least ``min_on_support`` of the samples are on
    support. The same statistics for as many fresh real points are returned as a reference.
    """
    if name not in TOYS:
        raise ValueError(f"mode coverage is defined for the toys {sorted(TOYS)}, not {name!r}")
    samples = samples.reshape(samples.shape[0], -1).detach().cpu().double()
    if samples.shape[1] != 2:
        raise ValueError(f"shape mismatch: samples have {samples.shape[1]} dims: expected 2")
    pts, labels, r, weights = toy_skeleton(name)
    n_modes = weights.numel()

    def stats(x: Tensor) -> dict[str, Any]:
        finite = torch.isfinite(x).all(1)
        d, i = _nearest(torch.where(finite[:, None], x, torch.full_like(x, 1e6)), pts)
        on = finite & (d <= r)
        counts = torch.bincount(labels[i[on]], minlength=n_modes).double()
        share = counts / (weights * x.shape[0])
        return {"on_support": float(on.double().mean()),
                "mode_share_ratio": [round(float(v), 4) for v in share],
                "modes_covered": int((share >= min_share).sum())}

    out = stats(samples)
    real, _ = sample_toy(name, samples.shape[0], seed)
    out.update(n_modes=n_modes, radius=r, n_samples=int(samples.shape[0]),
               passed=bool(out["modes_covered"] == n_modes and out["on_support"] >= min_on_support),
               real=stats(real.double()),
               criteria={"min_share": min_share, "min_on_support": min_on_support})
    return out
