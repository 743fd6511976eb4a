"""Score networks: a small U-Net and an MLP, each declaring its output parametrisation.

Build one from a JSON-able config with :func:`build_network` and hand it to the samplers with
:func:`wrap`, which picks the right adapters (``prediction``) and noise-level input
(``time_input``) for :class:`~sdekit.dynamics.DiffusionModel`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..dynamics.parameterization import DiffusionModel
from ..guidance import CFGNet, _check_scale
from ..sde.base import ForwardSDE
from .classifier import NoisyClassifier
from .embedding import EMBEDDINGS, NET_PREDICTIONS, FourierEmbedding, ScoreNet, SinusoidalEmbedding
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


class ConditionedNet(CFGNet):
    """``net(x, cond)`` with fixed class labels ``y`` and optional classifier-free guidance
    ``out = (1 + w) net(x, c, y) - w net(x, c, null)`` (Ho & Salimans 2022, Eq. 6), the null
    class being ``net.num_classes``: :class:`sdekit.guidance.CFGNet` for an sdekit
    :class:`ScoreNet`. Both branches run in one batched call, counted as 2 function
    evaluations (``nfe_per_call``; 1 without guidance). ``rescale``: CFG rescale (Lin et al.
    2024), see :class:`~sdekit.guidance.CFGNet`."""

    def __init__(self, net: ScoreNet, y: Tensor | int | None, guidance: float = 0.0,
                 rescale: float = 0.0) -> None:
        _check_scale("guidance", guidance)
        if guidance and net.num_classes is None:
            raise ValueError(f"guidance={guidance!r} needs a class-conditional network, but this "
                             "one has num_classes=None")
        if y is None:
            raise ValueError("y=None is invalid: ConditionedNet needs class labels (one, or one "
                             "per sample); for the null class call the network itself")
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.ndim > 1:
            raise ValueError(f"y has dtype {y.dtype} and shape {tuple(y.shape)}: expected "
                             "integer class labels, one label or one per sample (batch,)")
        super().__init__(net, y.long(), null=net.num_classes if net.num_classes else 0,
                         scale=guidance, rescale=rescale)
        self.y, self.w = self.cond, self.scale


def wrap(net: ScoreNet, sde: ForwardSDE, y: Tensor | int | None = None,
         guidance: float = 0.0, rescale: float = 0.0) -> DiffusionModel:
    """Wrap a trained network as a :class:`DiffusionModel` for ``sde`` (use the SDE it was trained
    on), with the network's declared ``prediction`` and ``time_input``; ``y`` fixes class labels
    (``None``: the null class for a conditional network), ``guidance`` sets the CFG weight and
    ``rescale`` the CFG rescale (see :class:`ConditionedNet`)."""
    if not isinstance(net, ScoreNet):
        raise TypeError(f"net must be an sdekit ScoreNet (UNet, MLPScoreNet), got "
                        f"{type(net).__name__}: wrap other callables with DiffusionModel directly")
    if guidance and y is None:
        raise ValueError(f"guidance={guidance!r} needs class labels y: guiding the null class "
                         "towards itself changes nothing")
    fn = ConditionedNet(net, y, guidance, rescale) if y is not None else net
    return DiffusionModel(fn, sde, prediction=net.prediction, time_input=net.time_input)


__all__ = ["UNet", "MLPScoreNet", "ScoreNet", "SinusoidalEmbedding", "FourierEmbedding",
           "NETWORKS", "NET_PREDICTIONS", "EMBEDDINGS", "build_network", "wrap", "ConditionedNet",
           "NoisyClassifier", "CLASSIFIERS"]
