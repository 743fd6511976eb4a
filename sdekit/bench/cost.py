"""Compute accounting: multiply-accumulates (MACs) of the network passes a solve makes.

:func:`count_macs` installs a global forward hook (``torch.nn.modules.module.
register_module_forward_hook``) for the duration of a ``with`` block and adds up, for every
module call on the actual input shapes:

* ``nn.Linear``: ``rows * in_features * out_features`` (rows = every leading index);
* ``nn.Conv1d/2d/3d``: ``output elements * in_channels / groups * prod(kernel_size)``;
  ``nn.ConvTranspose*``: ``input elements * out_channels / groups * prod(kernel_size)``;
* the matrix products that are not modules of those kinds: sdekit's U-Net self-attention
  (``Q K^T`` and ``A V``: ``2 * batch * L^2 * channels``), the operator's temporal spectral
  convolution (a complex multiply, 4 real MACs, per kept mode, input and output channel and
  spatial site) and its per-slot linear path (``D x D`` per slot and expert for ``skip='full'``,
  ``D`` for ``'scalar'``, plus the gate's mixing of the experts).

Elementwise work (activations, normalisation, the schedule arithmetic of a solver step, FFTs
over the few slots) is not counted: for the networks here it is a small fraction, and it is
the same kind of work for every solver. A model that is not built from torch modules (the
analytic oracles) counts 0 MACs, so its cost in network passes is undefined (None).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class MacCounter:
    """The running total of a :func:`count_macs` block: ``macs`` (int) and ``calls`` (module
    calls that counted anything)."""

    def __init__(self) -> None:
        self.macs = 0
        self.calls = 0

    def add(self, macs: int) -> None:
        if macs:
            self.macs += int(macs)
            self.calls += 1


def module_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    """MACs of one call of ``module`` itself (not its children) on these inputs."""
    from ..models.fno import TemporalSpectralConv, TrajectoryOperator
    from ..models.unet import SelfAttention
    x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
    if isinstance(module, nn.Linear) and isinstance(output, Tensor):
        return output.numel() * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd) and isinstance(output, Tensor):
        k = math.prod(module.kernel_size)
        if module.transposed:
            return 0 if x is None else x.numel() * (module.out_channels // module.groups) * k
        return output.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, SelfAttention) and x is not None:
        B, C = x.shape[:2]
        L = math.prod(x.shape[2:])
        return 2 * B * L * L * C
    if isinstance(module, TemporalSpectralConv) and x is not None:
        B, K = x.shape[:2]
        modes = min(module.modes, K // 2 + 1)
        return 4 * B * modes * module.c_in * module.c_out * math.prod(x.shape[3:])
    if isinstance(module, TrajectoryOperator) and x is not None and not module.at_start:
        B, K, D, E = x.shape[0], module.slots, math.prod(module.state_shape), module.experts
        return B * E * K * (D * D if module.skip == "full" else D) + (B * K * E * D if E > 1
                                                                        else 0)
    return 0


@contextlib.contextmanager
def count_macs() -> Iterator[MacCounter]:
    """Count the MACs of every torch module call inside the block (see the module docstring).
    Counting changes nothing that is computed; blocks may nest (each has its own total)."""
    counter = MacCounter()

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        counter.add(module_macs(module, inputs, output))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def network_macs_per_sample(model: Any, x: Tensor, t: float) -> float | None:
    """MACs of one pass of ``model``'s network per sample (row of ``x``) at time ``t``: the unit
    "one teacher pass". None when the model's network is not built from counted torch modules
    (an analytic oracle). The model's NFE counter is left as it was."""
    counter = getattr(model, "net", None)
    before = getattr(counter, "count", None)
    with torch.no_grad(), count_macs() as c:
        model.raw(x, t)
    if counter is not None and before is not None:
        counter.count = before
    return c.macs / x.shape[0] if c.macs else None


__all__ = ["MacCounter", "count_macs", "module_macs", "network_macs_per_sample"]
