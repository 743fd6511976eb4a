"""Drawing samples from a trained network through sdekit's solver driver."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models import ScoreNet, wrap
from ..sde.base import ForwardSDE


def generate(net: ScoreNet, sde: ForwardSDE, n: int, *, solver: str | None = None,
             steps: int = 20, seed: int = 0, y: Tensor | int | None = None, guidance: float = 0.0,
             batch_size: int = 1000, shape: tuple[int, ...] | None = None,
             rescale: float = 0.0, classifier: Any = None, classifier_scale: float = 0.0,
             **solver_kwargs: Any) -> tuple[Tensor, int]:
    """``n`` samples from ``net`` with ``sdekit.sample`` (in batches); returns ``(x, nfe)`` where
    ``nfe`` is the number of network evaluations per batch, as counted by the driver.

    Sample ``i`` uses the per-sample seed derived from ``(seed, i)``, so results do not depend on
    ``batch_size``. ``y``: one label per sample (or one for all); for a class-conditional network
    without ``y`` the null class is used. ``guidance`` and ``rescale``: classifier-free guidance
    and CFG rescale (:func:`sdekit.models.wrap`); ``classifier`` (a noise-conditional
    classifier, e.g. from ``sdekit train --objective classifier``) with ``classifier_scale``:
    classifier guidance towards ``y`` (:func:`sdekit.guidance.classifier_guidance`; the solve
    runs with ``grad="model"``). ``solver_kwargs`` go to :func:`sdekit.sample` (e.g. ``grid``,
    ``denoise``, solver options). ``solver`` None: :func:`sdekit.sample`'s default (without a
    ``grid``, the option-free rule :func:`sdekit.solvers.default_config`).
    """
    from ..guidance import classifier_guidance
    from ..integrate import sample  # the solver driver; imported lazily
    from ..noise import sample_seeds

    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r} is invalid: expected an integer >= 1")
    shape = tuple(shape or getattr(net, "data_shape"))
    device = next(net.parameters()).device
    ys = None
    if y is not None:
        ys = torch.as_tensor(y).long()
        ys = ys.expand(n) if ys.ndim == 0 else ys
        if ys.shape != (n,):
            raise ValueError(f"shape mismatch: y has shape {tuple(ys.shape)}: expected one label "
                             f"or {n} labels")
    if classifier is not None and ys is None:
        raise ValueError("classifier guidance needs the requested classes y")
    seeds = sample_seeds(seed, n)
    out, nfe = [], 0
    with torch.no_grad():
        for s in range(0, n, batch_size):
            b = min(batch_size, n - s)
            yb = None if ys is None else ys[s:s + b].to(device)
            # an unconditional network with classifier guidance: y is the classifier's
            cond = yb if (net.num_classes or classifier is None) else None
            model = wrap(net, sde, y=cond, guidance=guidance, rescale=rescale)
            if classifier is not None:
                model = classifier_guidance(model, classifier, yb, classifier_scale)
            sol = sample(sde, model, shape=(b,) + shape, solver=solver, steps=steps,
                         seeds=seeds[s:s + b], device=device,
                         grad="none" if classifier is None else "model", **solver_kwargs)
            out.append(sol.x.detach().float().cpu())
            nfe = int(sol.nfe)
    return torch.cat(out), nfe
