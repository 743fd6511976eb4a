"""FD-digits: a Frechet distance for 8x8 digit samples (the FID recipe of Heusel et al. 2017 with
a small digit classifier in place of Inception).

The classifier is a recipe, not a shipped binary: it is trained on demand on the digits training
half (fixed seed, ~10 s on a CPU) and cached in the user cache directory (``$SDEKIT_CACHE``, else
``$XDG_CACHE_HOME/sdekit``, else ``~/.cache/sdekit``), keyed by a hash of the recipe and the torch
version. Its penultimate activations (64 features) are the embedding. The reference set is the
held-out half; the *floor* is the FD between the training half and the held-out half, i.e. what a
model that reproduced the training data exactly would score.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import atomic_torch_save
from ..analytic.gaussian import frechet_distance
from .data import load_dataset, to_source_resolution

RECIPE: dict[str, Any] = {"version": 1, "seed": 0, "epochs": 40, "batch_size": 64, "lr": 2e-3,
                          "weight_decay": 1e-4, "features": 64, "shift_aug": 1}


def cache_dir() -> Path:
    env = os.environ.get("SDEKIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdekit"


class DigitClassifier(nn.Module):
    """conv32-conv32-pool-conv64-pool-fc64 (features) -> fc10, on 8x8 inputs in [-1, 1]."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4, features), nn.SiLU())
        self.head = nn.Linear(features, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _shift(x: Tensor, g: torch.Generator, max_shift: int) -> Tensor:
    """Random integer translations by up to ``max_shift`` pixels (background -1 fills in)."""
    if max_shift <= 0:
        return x
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    out = torch.empty_like(x)
    d = torch.randint(0, 2 * p + 1, (x.shape[0], 2), generator=g)
    for i in range(x.shape[0]):
        r, c = int(d[i, 0]), int(d[i, 1])
        out[i] = xp[i, :, r:r + 8, c:c + 8]
    return out


def train_classifier(recipe: dict[str, Any] = RECIPE,
                     verbose: bool = False) -> tuple[DigitClassifier, float]:
    """Train the FD-digits classifier on the training half; returns it and held-out accuracy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        clf = DigitClassifier(recipe["features"])
    return clf, fit_classifier(clf, recipe, verbose)


def fit_classifier(clf: nn.Module, recipe: dict[str, Any], verbose: bool = False) -> float:
    """Train ``clf`` (a 10-class classifier of 8x8 digits) with ``recipe``'s settings (seed,
    epochs, batch_size, lr, weight_decay, shift_aug) on the training half; returns its held-out
    accuracy."""
    ds = load_dataset("digits")
    assert ds.y is not None  # the digits ship with their labels
    g = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.AdamW(clf.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    n = ds.x.shape[0]
    bs = recipe["batch_size"]
    steps = recipe["epochs"] * ((n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps)
    clf.train()
    for ep in range(recipe["epochs"]):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            xb = _shift(ds.x[idx], g, recipe["shift_aug"])
            loss = F.cross_entropy(clf(xb), ds.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"fd-digits classifier epoch {ep + 1}: loss {loss.item():.4f}")
    clf.eval()
    with torch.no_grad():
        return float((clf(ds.x_test).argmax(1) == ds.y_test).double().mean())


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


class FDDigits:
    """Frechet distance between digit samples and the held-out digits.

    >>> fd = FDDigits()                 # trains (or loads the cached) classifier
    >>> fd.floor                        # real-vs-real: training half vs held-out half
    >>> fd(samples)                     # samples: (N, 1, S, S) in [-1, 1]
    >>> fd.reference(16)[1]             # the floor for digits upsampled to 16x16
    """

    def __init__(self, cache: str | os.PathLike | None = None, retrain: bool = False,
                 verbose: bool = False) -> None:
        key = hashlib.sha256(json.dumps({**RECIPE, "torch": torch.__version__},
                                        sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(cache) if cache is not None else cache_dir() / f"fd_digits_{key}.pt"
        clf: DigitClassifier | None = None
        if not retrain and self.path.exists():
            try:
                blob = torch.load(self.path, map_location="cpu", weights_only=True)
                clf = DigitClassifier(RECIPE["features"])
                clf.load_state_dict(blob["state_dict"])
                clf.eval()
                self.accuracy = float(blob["accuracy"])
            except Exception:  # a corrupt cache is rebuilt, never trusted
                clf = None
        if clf is None:
            clf, self.accuracy = train_classifier(RECIPE, verbose)
            blob = {"state_dict": clf.state_dict(), "accuracy": self.accuracy,
                    "recipe": json.dumps(RECIPE)}
            try:
                atomic_torch_save(self.path, blob)
            except OSError:
                pass  # a read-only cache only costs a retrain next time
        self.clf: DigitClassifier = clf
        for p in self.clf.parameters():
            p.requires_grad_(False)
        ds = load_dataset("digits")
        self.n_train, self.n_test = ds.x.shape[0], ds.x_test.shape[0]
        self._refs: dict[int, tuple[tuple[np.ndarray, np.ndarray], float]] = {}
        self.test_stats, self.floor = self.reference(8)

    def reference(self, image_size: int = 8) -> tuple[tuple[np.ndarray, np.ndarray], float]:
        """Held-out feature statistics and the real-vs-real floor for samples of side
        ``image_size``: upsampled digits are compared with held-out digits that went through the
        same upsample/downsample round trip, so the floor stays meaningful."""
        if image_size not in self._refs:
            ds = load_dataset("digits", image_size=image_size)
            test = _stats(self.features(ds.x_test))
            self._refs[image_size] = (test, frechet_distance(*_stats(self.features(ds.x)), *test))
        return self._refs[image_size]

    def features(self, x: Tensor) -> np.ndarray:
        """Penultimate-layer features of images ``(N, 1, S, S)`` in [-1, 1] (clamped)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"shape mismatch: samples have shape {tuple(x.shape)}: expected "
                             "(N, 1, S, S) digit images")
        x = to_source_resolution(x.detach().float().cpu(), {"source_size": 8}).clamp(-1, 1)
        with torch.no_grad():
            return self.clf.features(x).double().numpy()

    def __call__(self, x: Tensor) -> float:
        if x.shape[0] < 2:
            raise ValueError(f"FD needs at least 2 samples, got {x.shape[0]}")
        test, _ = self.reference(int(x.shape[-1]))
        return frechet_distance(*_stats(self.features(x)), *test)
