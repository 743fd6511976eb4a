"""A feature-space (perceptual) loss for 8x8 digits, on a network that is *not* the FD-digits
evaluation network.

FD-digits (:mod:`sdekit.training.fd_digits`) scores samples in the features of its classifier.
A loss taken in those same features would be optimised against the score itself, which would
then measure the loss rather than the samples. The loss here uses a second classifier of
another architecture (:class:`FeatureNet`: strided convolutions instead of average pooling,
other widths, group-normalised) trained from another seed, on the same digits training half
(the held-out half, which FD-digits compares against, is never seen). It is trained on demand
(~10 s on a CPU) and cached beside the FD-digits classifier, keyed by its recipe and the torch
version.

The distance is LPIPS-like (Zhang et al. 2018, without the learned channel weights): at each
tapped layer the activations are unit-normalised along the channels, and the squared
difference is averaged over positions and channels; the layers' terms are summed.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_torch_save

#: the feature network's training recipe (seed 1; FD-digits' classifier uses seed 0 and
#: another architecture)
RECIPE: dict[str, Any] = {"version": 1, "seed": 1, "epochs": 30, "batch_size": 64, "lr": 2e-3,
                          "weight_decay": 1e-4, "widths": [24, 48, 96], "shift_aug": 1}


class FeatureNet(nn.Module):
    """conv(w0)-conv(w1, stride 2)-conv(w2, stride 2)-mean -> fc10 on 8x8 digits in [-1, 1];
    :meth:`features` returns the three stages' activations (the loss's layers)."""

    def __init__(self, widths: Sequence[int] = (24, 48, 96)) -> None:
        super().__init__()
        self.accuracy: float | None = None    # held-out accuracy, once trained
        w0, w1, w2 = (int(w) for w in widths)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(1, w0, 3, padding=1), nn.GroupNorm(4, w0), nn.GELU()),
            nn.Sequential(nn.Conv2d(w0, w1, 3, stride=2, padding=1), nn.GroupNorm(4, w1),
                          nn.GELU()),
            nn.Sequential(nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.GroupNorm(4, w2),
                          nn.GELU())])
        self.head = nn.Linear(w2, 10)

    def features(self, x: Tensor) -> list[Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)[-1].mean((2, 3)))


class FeatureLoss(nn.Module):
    """``loss(a, b)``: the mean over the batch of ``sum_l mean_{c,pos} (n_l(a) - n_l(b))^2``,
    ``n_l`` the layer-``l`` activations of ``net`` unit-normalised along the channel axis
    (dim 1). ``net.features(x)`` (or ``net(x)`` when it has no ``features`` method) returns the
    list of ``(B, C_l, ...)`` activations; the network is frozen (eval mode, no parameter
    gradients), so only the inputs receive gradients."""

    def __init__(self, net: nn.Module, eps: float = 1e-10) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net={net!r} is invalid: expected a torch.nn.Module")
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net.eval()
        self.eps = eps

    def train(self, mode: bool = True) -> FeatureLoss:
        """The feature network stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    def _normalised(self, x: Tensor) -> list[Tensor]:
        fn = getattr(self.net, "features", self.net)
        return [f / (f.pow(2).sum(1, keepdim=True) + self.eps).sqrt() for f in fn(x)]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: a has shape {tuple(a.shape)}, b has shape "
                             f"{tuple(b.shape)}")
        with torch.no_grad():
            fb = self._normalised(b)
        fa = self._normalised(a)
        per_layer = [(x - y).pow(2).flatten(1).mean(1) for x, y in zip(fa, fb)]
        return torch.stack(per_layer).sum(0).mean()


def _cache_path() -> Path:
    from .fd_digits import cache_dir
    key = hashlib.sha256(json.dumps({**RECIPE, "torch": torch.__version__},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"feature_net_{key}.pt"


def digits_feature_net(cache: str | os.PathLike | None = None, verbose: bool = False
                       ) -> FeatureNet:
    """The trained :class:`FeatureNet` (loaded from the cache, or trained on the digits
    training half and cached); its held-out accuracy is in ``.accuracy``."""
    from .fd_digits import fit_classifier
    path = Path(cache) if cache is not None else _cache_path()
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            net = FeatureNet(RECIPE["widths"])
            net.load_state_dict(blob["state_dict"])
            net.accuracy = float(blob["accuracy"])
            return net.eval()
        except Exception:  # a corrupt cache is rebuilt, never trusted
            pass
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        net = FeatureNet(RECIPE["widths"])
    net.accuracy = fit_classifier(net, RECIPE, verbose)
    try:
        atomic_torch_save(path, {"state_dict": net.state_dict(), "accuracy": net.accuracy,
                                 "recipe": json.dumps(RECIPE)})
    except OSError:
        pass  # a read-only cache only costs a retrain next time
    return net.eval()


def digits_feature_loss(cache: str | os.PathLike | None = None) -> FeatureLoss:
    """:class:`FeatureLoss` on :func:`digits_feature_net` (for ``(B, 1, 8, 8)`` states in the
    digits' [-1, 1] model space)."""
    return FeatureLoss(digits_feature_net(cache))
