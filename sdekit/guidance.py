"""Guidance as model wrappers: classifier-free guidance (Ho & Salimans 2022) with CFG rescale
(Lin et al. 2024) and classifier guidance (Dhariwal & Nichol 2021). Both work with every solver
that calls the model (all registered ones but ``fno``, which replaces the model by a distilled
operator and refuses a guided one) and every forward SDE.

**NFE.** ``Solution.nfe`` counts network passes per sample: a classifier-free-guided call runs
the conditional and the unconditional branch as one batched call of twice the batch, and counts
as **2** function evaluations (:attr:`CFGNet.nfe_per_call`; with ``scale = 0`` only the
conditional branch runs: 1). Classifier guidance counts the diffusion network's passes (1 per
call) in ``nfe`` and the classifier's forward-and-backward passes separately in
:attr:`ClassifierGuidedModel.classifier_nfe`.

**Dynamic thresholding** (Saharia et al. 2022) of the guided data prediction is the
``thresholding=True`` option of the data-prediction solvers (``dpmpp_*``, ``unipc_*``,
``dpm_solver_*`` with ``predict_x0``), see :func:`sdekit.solvers.exp_integrator.dynamic_threshold`;
it applies to both guidance kinds unchanged.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import is_real
from .dynamics.parameterization import TIME_INPUTS, DiffusionModel, convert, time_cond
from .sde.base import ForwardSDE


def _check_scale(name: str, v: Any) -> float:
    if not is_real(v):
        raise ValueError(f"{name}={v!r} is invalid: expected a finite real number")
    return float(v)


def _batched(name: str, c: Tensor, b: int) -> Tensor:
    """``c`` with batch size ``b`` along dim 0: one condition per sample, or one shared
    (a scalar or a leading dimension of 1) expanded."""
    if c.ndim == 0:
        return c.expand(b)
    if c.shape[0] == b:
        return c
    if c.shape[0] == 1:
        return c.expand((b,) + tuple(c.shape[1:]))
    raise ValueError(f"shape mismatch: {name} has shape {tuple(c.shape)} but the batch has {b} "
                     f"samples: expected a leading dimension of {b} (one per sample) or 1")


class CFGNet(nn.Module):
    """Classifier-free guidance around a conditional network ``net(x, c_noise, cond, **kw)``:
    ``out = (1 + w) net(x, c, cond) - w net(x, c, null)`` (Ho & Salimans 2022, Eq. 6; ``w = 0``:
    the conditional network, ``w = -1``: the unconditional one). Guidance is linear in the
    output, so it holds for eps, x0, v, score, flow and denoiser outputs alike. Both branches run
    as one call on the concatenated batch; the wrapper counts as :attr:`nfe_per_call` = 2
    function evaluations (1 when ``w = 0``, where only the conditional branch runs).

    Args:
        net: the conditional network; ``cond`` and ``null`` are passed as its third positional
            argument, or as the keyword ``cond_arg`` when given.
        cond: the condition: a tensor with one entry per sample along dim 0 (class labels of
            shape ``(batch,)``, embeddings of shape ``(batch, ...)``), or one shared by all
            (a scalar or a leading dimension of 1).
        null: the null condition, shaped like one entry of ``cond`` (or broadcastable the same
            way): the null class label, an empty-prompt embedding.
        scale: the guidance weight ``w`` (finite; diffusers' ``guidance_scale`` is ``1 + w``).
        rescale: CFG rescale ``phi`` in ``[0, 1]`` (diffusers' ``guidance_rescale``; Lin et al.
            2024, Sec. 3.4, Eqs. 15-16): the guided output ``g`` is rescaled per sample to the
            standard deviation of the conditional output ``c``,
            ``phi g std(c) / std(g) + (1 - phi) g``. Applied to the network's own output type
            (Lin et al. used v-prediction).
        **net_kwargs: fixed keyword arguments of every network call.
    """

    def __init__(self, net: Callable[..., Tensor], cond: Any, null: Any, scale: float = 0.0,
                 rescale: float = 0.0, cond_arg: str | None = None, **net_kwargs: Any) -> None:
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, c_noise, cond), got "
                            f"{type(net).__name__}")
        self.scale = _check_scale("scale", scale)
        phi = _check_scale("rescale", rescale)
        if not 0.0 <= phi <= 1.0:
            raise ValueError(f"rescale={rescale!r} is invalid: expected a number in [0, 1]")
        for name, v in (("cond", cond), ("null", null)):
            if v is None:
                raise ValueError(f"{name}=None is invalid: expected a tensor (or number) "
                                 "condition")
        self.net, self.rescale = net, phi
        self.cond, self.null = torch.as_tensor(cond), torch.as_tensor(null)
        self.cond_arg, self.net_kwargs = cond_arg, net_kwargs

    @property
    def nfe_per_call(self) -> int:
        """Function evaluations one call costs: 2 network passes (conditional + unconditional,
        batched), 1 when ``scale = 0``."""
        return 1 if self.scale == 0 else 2

    def _call(self, x: Tensor, c: Tensor, cond: Tensor) -> Tensor:
        if self.cond_arg is None:
            return self.net(x, c, cond, **self.net_kwargs)
        return self.net(x, c, **{self.cond_arg: cond}, **self.net_kwargs)

    def forward(self, x: Tensor, c_noise: Any) -> Tensor:
        b = x.shape[0]
        cond = _batched("cond", self.cond.to(x.device), b)
        if self.scale == 0:
            return self._call(x, c_noise, cond)
        null = self.null.to(device=x.device, dtype=cond.dtype)
        if null.shape != cond.shape:   # one null entry for all samples
            try:
                null = null.expand(cond.shape[1:]).unsqueeze(0).expand(cond.shape)
            except RuntimeError:
                raise ValueError(f"shape mismatch: null has shape {tuple(self.null.shape)} but "
                                 f"one entry of cond has shape {tuple(cond.shape[1:])}: expected "
                                 "that shape (or one broadcastable to it)") from None
        c = torch.as_tensor(c_noise, device=x.device)
        c = c.expand(b) if c.ndim == 0 else c
        out = self._call(torch.cat([x, x]), torch.cat([c, c]), torch.cat([cond, null]))
        pos, neg = out[:b], out[b:]
        g = pos + self.scale * (pos - neg)
        if self.rescale:
            dims = tuple(range(1, x.ndim))
            ratio = pos.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)
            g = self.rescale * g * ratio + (1 - self.rescale) * g
        return g


def classifier_free(net: Callable[..., Tensor], sde: ForwardSDE, cond: Any, null: Any,
                    scale: float, *, prediction: str = "eps",
                    time_input: str | Callable[[Tensor], Tensor] = "model_time",
                    rescale: float = 0.0, cond_arg: str | None = None,
                    **net_kwargs: Any) -> DiffusionModel:
    """A :class:`DiffusionModel` for ``sde`` whose network is :class:`CFGNet` around ``net``
    (``prediction`` and ``time_input`` as for :class:`DiffusionModel`). For an sdekit
    :class:`~sdekit.models.ScoreNet` use :func:`sdekit.models.wrap` with ``guidance=``.

    ``net`` may also be a :class:`DiffusionModel` (e.g. one from
    :func:`sdekit.interop.from_diffusers`, with ``cond_arg="encoder_hidden_states"`` or
    ``"class_labels"``): its network is guided and its prediction and time input are kept."""
    if isinstance(net, DiffusionModel):
        if net.sde is not sde:
            raise ValueError(f"the model was built for {net.sde!r} but is guided for {sde!r}: "
                             "pass the same forward SDE object")
        model = net
        net, prediction, time_input = model.net.fn, model.prediction, model.time_input
    return DiffusionModel(CFGNet(net, cond, null, scale, rescale, cond_arg, **net_kwargs), sde,
                          prediction=prediction, time_input=time_input)


def _check_classifier(classifier: Any) -> None:
    """A classifier must take the noisy state and its time input: ``classifier(x_t, cond)``."""
    if not callable(classifier):
        raise TypeError(f"classifier must be callable as classifier(x_t, cond) -> logits, got "
                        f"{type(classifier).__name__}")
    fn = classifier.forward if isinstance(classifier, nn.Module) else classifier
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):   # a builtin: nothing to check
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        raise ValueError(
            f"classifier {type(classifier).__name__} takes {len(positional)} positional "
            "argument(s), but classifier guidance needs a noise-conditional classifier "
            "classifier(x_t, cond) -> logits (the noisy state and its time input): a classifier "
            "of clean data has no time input (train one with `sdekit train --objective "
            "classifier`)")


class ClassifierGuidedModel(DiffusionModel):
    """A diffusion model guided by a noise-conditional classifier (Dhariwal & Nichol 2021,
    Sec. 4.2, Eq. 14 for DDIM and every other sampler): ``eps <- eps - s sigma grad_x log
    p(y | x_t, t)``, i.e. ``score <- score + s grad_x log p(y | x_t, t)``, applied to every
    output type through eps. With the exact posterior ``p(y | x_t)`` and ``s = 1`` this is the
    score of the class-conditional marginal. Where ``alpha = 0`` (flow matching's ``t = 1``)
    the output is left unguided: ``x_t`` holds no information about ``y`` there and the shift of
    the data prediction, ``s sigma^2 grad / alpha``, is 0/0 (only its limit is finite); start a
    little below (``t_start < 1``) to guide from the first step.

    Gradients flow only through the classifier: the diffusion network runs without a graph, and
    the classifier's gradient is taken with respect to the state. Sample with
    ``sdekit.sample(..., grad="model")`` (each model call then gets a detached state that
    requires grad, so memory stays that of one call); outside a solve, call it under
    ``torch.enable_grad()`` on an ``x`` that requires grad. In a ``grad="full"`` solve the
    classifier gradient is itself differentiated (``create_graph``).

    Args:
        net, sde, prediction, time_input: the diffusion network, as for :class:`DiffusionModel`.
        classifier: ``classifier(x_t, cond) -> logits`` of shape ``(batch, num_classes)`` on the
            state ``x_t`` (not ``x_t / alpha``) and its time input ``classifier_time_input``.
        y: the requested class: one integer label, or one per sample (shape ``(batch,)``).
        scale: ``s`` (finite; 0: no guidance, the classifier is not called).
        classifier_time_input: one of :data:`~sdekit.dynamics.parameterization.TIME_INPUTS` or a
            callable ``t -> cond``; default: the classifier's ``time_input`` attribute, else
            ``lambda`` (what sdekit's :class:`~sdekit.models.NoisyClassifier` takes).
    """

    def __init__(self, net: Callable[..., Tensor], sde: ForwardSDE, classifier: Any, y: Any,
                 scale: float, *, prediction: str = "eps",
                 time_input: str | Callable[[Tensor], Tensor] = "model_time",
                 classifier_time_input: str | Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(net, sde, prediction=prediction, time_input=time_input)
        self.scale = _check_scale("scale", scale)
        _check_classifier(classifier)
        cti = classifier_time_input or getattr(classifier, "time_input", "lambda")
        if not callable(cti) and cti not in TIME_INPUTS:
            raise ValueError(f"classifier_time_input={cti!r} is invalid: expected one of "
                             f"{TIME_INPUTS} or a callable")
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim > 1:
            raise ValueError(f"y has dtype {y.dtype} and shape {tuple(y.shape)}: expected "
                             "integer class labels, one label or one per sample (batch,)")
        k = getattr(classifier, "num_classes", None)
        if isinstance(k, int) and bool(((y < 0) | (y >= k)).any()):
            raise ValueError(f"y contains labels outside 0..{k - 1}, the classifier's classes")
        if isinstance(classifier, nn.Module):
            classifier.eval()
        self.classifier, self.y, self.classifier_time_input = classifier, y.long(), cti
        self.classifier_nfe = 0

    def log_prob_grad(self, x: Tensor, t: Any, input_dtype: torch.dtype | None = None
                      ) -> Tensor:
        """``grad_x log p(y | x_t, t)`` (one classifier forward and backward pass; the
        classifier sees ``x`` cast to ``input_dtype``, the network's dtype, when given)."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            raise RuntimeError(
                "classifier guidance differentiates the classifier with respect to the state: "
                "sample with sdekit.sample(..., grad='model'), or call the model under "
                "torch.enable_grad() on an x that requires grad")
        y = self.y.to(x.device)
        b = x.shape[0]
        if y.ndim == 1 and y.shape[0] != b:
            raise ValueError(f"shape mismatch: y has {y.shape[0]} labels but the batch has {b} "
                             "samples: expected one label or one per sample")
        tb = self._batch_time(x, t)
        cond = time_cond(self.sde, self.classifier_time_input, tb)
        xin = x if input_dtype is None else x.to(input_dtype)   # differentiable cast
        logits = self.classifier(xin, cond.to(xin.dtype) if cond.is_floating_point() else cond)
        self.classifier_nfe += 1
        if not (isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[0] == b):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"shape mismatch: the classifier returned {shape} for a batch of "
                             f"{b}: expected logits of shape ({b}, num_classes)")
        if bool(((y < 0) | (y >= logits.shape[1])).any()):
            raise ValueError(f"y contains labels outside 0..{logits.shape[1] - 1}, the "
                             "classifier's classes")
        logp = torch.log_softmax(logits.double(), dim=1).gather(1, y.expand(b)[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, x, create_graph=x.grad_fn is not None)
        return grad

    def raw(self, x: Tensor, t: Any, input_dtype: torch.dtype | None = None) -> Tensor:
        full = x.grad_fn is not None   # a grad="full" solve: keep the network's graph
        with torch.enable_grad() if full else torch.no_grad():
            out = super().raw(x if full else x.detach(), t, input_dtype)
        if self.scale == 0:
            return out
        grad = self.log_prob_grad(x, t, input_dtype)
        c = self._coeffs(x, t, dots="flow" == self.prediction)
        eps = convert(self.prediction, "eps", out.to(x.dtype), x, *c)
        eps = eps - self.scale * c[1] * grad.to(x.dtype)
        guided = convert("eps", self.prediction, eps, x, *c).to(out.dtype)
        # at alpha = 0 (flow matching's t = 1) the x0 shift s sigma^2 grad / alpha is 0/0 (x_t
        # holds no information about y): the output there is left unguided
        return torch.where(c[0] == 0, out, guided) if bool((c[0] == 0).any()) else guided


def classifier_guidance(model: DiffusionModel, classifier: Any, y: Any, scale: float, *,
                        classifier_time_input: str | Callable[[Tensor], Tensor] | None = None
                        ) -> ClassifierGuidedModel:
    """``model`` (a :class:`DiffusionModel`, e.g. from :func:`sdekit.models.wrap`) guided by
    ``classifier`` towards class ``y`` with scale ``s``; see :class:`ClassifierGuidedModel`.
    The guided model counts its own NFE from zero."""
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model must be a DiffusionModel (see sdekit.models.wrap), got "
                        f"{type(model).__name__}")
    return ClassifierGuidedModel(model.net.fn, model.sde, classifier, y, scale,
                                 prediction=model.prediction, time_input=model.time_input,
                                 classifier_time_input=classifier_time_input)


def _per_sample_conditions(model: Any) -> bool:
    fn = getattr(getattr(model, "net", None), "fn", None)
    c = model.y if isinstance(model, ClassifierGuidedModel) else \
        getattr(fn, "cond", None) if isinstance(fn, CFGNet) else None
    return isinstance(c, Tensor) and c.ndim >= 1 and c.shape[0] > 1


def check_guided_solver(model: Any, solver: Any) -> None:
    """Raise before a solve where ``solver`` evaluates subsets of the batch (per-sample adaptive
    steps) and ``model`` holds one condition per sample, which cannot follow those calls."""
    if getattr(solver, "evaluates_subsets", False) and _per_sample_conditions(model):
        raise ValueError(
            f"solver {solver.name!r} evaluates the model on subsets of the batch (per-sample "
            "adaptive steps), so a guided model's per-sample conditions (one label per sample) "
            "cannot follow its calls: give one condition for the whole batch (sample each class "
            "separately) or use another solver")


def is_guided(model: Any) -> bool:
    """Whether ``model`` (a :class:`DiffusionModel`) applies guidance in its calls."""
    if isinstance(model, ClassifierGuidedModel):
        return model.scale != 0
    fn = getattr(getattr(model, "net", None), "fn", None)
    return isinstance(fn, CFGNet) and fn.scale != 0


__all__ = [
    "CFGNet",
    "ClassifierGuidedModel",
    "check_guided_solver",
    "classifier_free",
    "classifier_guidance",
    "is_guided",
]
