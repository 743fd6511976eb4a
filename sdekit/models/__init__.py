"""Score networks: a small U-Net and an MLP, each declaring its output parametrisation.

Build one from a JSON-able config with :func:`build_network` and hand it to the samplers with
:func:`wrap`, which picks the right adapters (``prediction``) and noise-level input
(``time_input``) for :class:`~sdekit.dynamics.DiffusionModel`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..dynamics.parameterization import DiffusionModel
from ..sde.base import ForwardSDE
from .embedding import (EMBEDDINGS, NET_PREDICTIONS, FourierEmbedding, ScoreNet,
                        SinusoidalEmbedding)
from .classifier import NoisyClassifier
from .mlp import MLPScoreNet
from .unet import UNet

NETWORKS: dict[str, type[ScoreNet]] = {"unet": UNet, "mlp": MLPScoreNet}
#: noise-conditional classifiers (classifier guidance), built by :func:`build_network` too
CLASSIFIERS: dict[str, type[nn.Module]] = {"classifier": NoisyClassifier}


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a network (a score network or a noise-conditional classifier) from its
    ``config`` dict (``net.config``; ``name`` picks the class)."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    kinds = {**NETWORKS, **CLASSIFIERS}
    if name not in kinds:
        raise ValueError(f"network name={name!r} is invalid: expected one of {sorted(kinds)}")
    try:
        return kinds[name](**cfg)
    except TypeError as e:
        raise ValueError(f"network config for {name!r} is invalid: {e}") from None


class ConditionedNet(nn.Module):
    """``net(x, cond)`` with fixed class labels ``y`` and optional classifier-free guidance
    ``out = (1 + w) net(x, c, y) - w net(x, c, null)`` (Ho & Salimans 2022, Eq. 6). Guidance is
    linear in the network output, so it is valid for any of eps / x0 / v / denoiser outputs. Both
    branches run in one batched call (one counted function evaluation, twice the compute)."""

    def __init__(self, net: ScoreNet, y: Tensor | None, guidance: float = 0.0) -> None:
        super().__init__()
        if guidance and net.num_classes is None:
            raise ValueError(f"guidance={guidance!r} needs a class-conditional network, but this "
                             "one has num_classes=None")
        self.net, self.y, self.w = net, y, float(guidance)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        y = self.y
        if y is not None and y.ndim == 1 and y.shape[0] != x.shape[0]:
            raise ValueError(f"shape mismatch: {y.shape[0]} labels for a batch of {x.shape[0]}")
        if not self.w:
            return self.net(x, cond, y)
        b = x.shape[0]
        cond = torch.as_tensor(cond, device=x.device)
        cond = cond.expand(b) if cond.ndim == 0 else cond
        yy = torch.as_tensor(y, device=x.device).long().expand(b)
        null = torch.full_like(yy, self.net.num_classes)
        out = self.net(torch.cat([x, x]), torch.cat([cond, cond]), torch.cat([yy, null]))
        c, u = out[:b], out[b:]
        return (1 + self.w) * c - self.w * u


def wrap(net: ScoreNet, sde: ForwardSDE, y: Tensor | int | None = None,
         guidance: float = 0.0) -> DiffusionModel:
    """Wrap a trained network as a :class:`DiffusionModel` for ``sde`` (use the SDE it was trained
    on), with the network's declared ``prediction`` and ``time_input``; ``y`` fixes class labels
    (``None``: the null class for a conditional network) and ``guidance`` sets the CFG weight."""
    if not isinstance(net, ScoreNet):
        raise TypeError(f"net must be an sdekit ScoreNet (UNet, MLPScoreNet), got "
                        f"{type(net).__name__}: wrap other callables with DiffusionModel directly")
    if y is not None:
        y = torch.as_tensor(y).long()
    fn = ConditionedNet(net, y, guidance) if (y is not None or guidance) else net
    return DiffusionModel(fn, sde, prediction=net.prediction, time_input=net.time_input)


__all__ = ["UNet", "MLPScoreNet", "ScoreNet", "SinusoidalEmbedding", "FourierEmbedding",
           "NETWORKS", "NET_PREDICTIONS", "EMBEDDINGS", "build_network", "wrap", "ConditionedNet"]
