"""Benchmark problems: what to sample, and what to compare the samples with.

A :class:`BenchProblem` bundles a forward SDE, a counted model, a sampler of initial states at
``sde.T`` and whatever references exist: an exact probability-flow map, held-out samples of the
target law, the exact Gaussian parameters of that law. Built in:

* ``gaussian`` (the default): 16-dim Gaussian data, covariance eigenvalues log-spaced from 1 down
  to 1e-4 in a random basis, under the linear VP SDE, with the exact score. Everything is exact:
  the PF-ODE flow map (RMS reference), the target law, and the output law of deterministic
  solvers (they are affine maps of the Gaussian initial state, see
  :func:`~sdekit.bench.metrics.affine_gaussian_law`).
* ``gmm``: a 16-dim, 8-component Gaussian mixture with the exact mixture score; the RMS reference
  is a converged adaptive solve (cached on disk), the Frechet distance is to the exact mixture
  moments, SW and MMD are against exact held-out samples.

Plus ``checkpoint:PATH`` (a trained sdekit checkpoint, see :func:`problem_from_checkpoint`) and
``module:factory`` (a user's model, see :func:`problem_from_factory`). A ``module:factory`` spec
imports and runs that module's code: use it with trusted code only.

The target law is the marginal at ``t_end = sde.t_min``, where sampling stops: what an exact
sampler produces (for VP at t_min = 1e-3 it differs from the data law by a noise variance of
about 1e-4).
"""
from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._utils import sum_tensors
from ..analytic import GaussianData, GaussianMixtureData
from ..analytic.gaussian import random_covariance
from ..dynamics.parameterization import DiffusionModel
from ..sde.base import ForwardSDE
from ..sde.vp import VPSDE


class BenchError(ValueError):
    """Bad benchmark input (names, specs, factories); the message says what would be valid."""


Sampler = Callable[[int, torch.Generator], Tensor]


@dataclass
class BenchProblem:
    """One benchmark problem.

    Attributes:
        name: short label (used in file names and tables).
        sde: the forward process; sampling runs from ``sde.T`` to ``sde.t_min``.
        model: the counted model (with its parametrisation).
        sample_init: ``(n, generator) -> (n, *shape)`` initial states at ``sde.T``.
        heldout: ``(n, generator) -> samples`` of the target law, or a fixed tensor of them
            (for SW, MMD and, without ``target_gaussian``, a fitted Frechet target).
        flow: exact PF-ODE map ``x(T) -> x(t_min)`` (float64 in, float64 out); when None the
            RMS reference is a converged adaptive solve, cached on disk.
        target_gaussian: exact ``(mean, cov)`` of the target law (flattened); the Frechet
            distance is to it (for non-Gaussian data: its exact first two moments).
        gaussian_target: the target law *is* that Gaussian (enables KL).
        init_gaussian: exact ``(mean, cov)`` of the initial states, with ``linear`` (the model
            is affine in x) enabling the exact output law of deterministic solvers.
        exact_model: the model accepts float64 input (analytic oracles), so reference solves
            can run entirely in float64.
        features: optional feature map for the Frechet distance (e.g. a classifier's
            penultimate layer); SW and MMD stay in sample space.
        fingerprint: JSON-able identity used to key the on-disk cache.
    """

    name: str
    sde: ForwardSDE
    model: DiffusionModel
    sample_init: Sampler
    description: str = ""
    heldout: Sampler | Tensor | None = None
    flow: Callable[[Tensor], Tensor] | None = None
    target_gaussian: tuple[Tensor, Tensor] | None = None
    gaussian_target: bool = False
    init_gaussian: tuple[Tensor, Tensor] | None = None
    linear: bool = False
    exact_model: bool = False
    features: Callable[[Tensor], Tensor] | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ built-in problems
def _default_prediction(sde: ForwardSDE) -> str:
    """The exact model's output: eps, or flow where the prior has alpha = 0 (flow matching)."""
    return "flow" if sde.alpha_zero_at_T else "eps"


def gaussian_problem(sde: ForwardSDE | None = None, dim: int = 16, seed: int = 0,
                     eig_max: float = 1.0, eig_min: float = 1e-4, mean_scale: float = 1.0,
                     prediction: str | None = None) -> BenchProblem:
    """Gaussian data (see the module docstring); every reference is exact. ``prediction``:
    default eps, flow where alpha(T) = 0 (flow matching: an eps model has no x0 there)."""
    sde = sde if sde is not None else VPSDE()
    prediction = prediction or _default_prediction(sde)
    if not (isinstance(dim, int) and dim >= 1):
        raise BenchError(f"dim={dim!r} is invalid: expected an integer >= 1")
    data = GaussianData.random(sde, dim, eig_max, eig_min, seed, mean_scale)
    T, t_end = sde.T, sde.t_min
    return BenchProblem(
        name="gaussian", sde=sde, model=data.model(prediction),
        sample_init=lambda n, g: data.marginal_sample(n, T, g),
        heldout=lambda n, g: data.marginal_sample(n, t_end, g),
        flow=lambda x: data.flow(x, T, t_end),
        target_gaussian=(data.marginal_mean(t_end), data.marginal_cov(t_end)),
        gaussian_target=True,
        init_gaussian=(data.marginal_mean(T), data.marginal_cov(T)), linear=True,
        exact_model=True,
        description=(f"{dim}-dim Gaussian data (eigenvalues {eig_max:g}..{eig_min:g}, mean scale "
                     f"{mean_scale:g}, seed {seed}) under {sde!r}, exact {prediction} model"),
        fingerprint={"problem": "gaussian", "sde": repr(sde), "dim": dim, "seed": seed,
                     "eig_max": eig_max, "eig_min": eig_min, "mean_scale": mean_scale,
                     "prediction": prediction})


def gmm_problem(sde: ForwardSDE | None = None, dim: int = 16, components: int = 8, seed: int = 0,
                spread: float = 1.0, eig_max: float = 0.1, eig_min: float = 1e-3,
                prediction: str | None = None) -> BenchProblem:
    """A Gaussian mixture: ``components`` equally weighted modes with means ``spread * N(0, I)``
    and covariances with eigenvalues log-spaced from ``eig_max`` to ``eig_min`` in random bases
    (``prediction`` as for :func:`gaussian_problem`)."""
    sde = sde if sde is not None else VPSDE()
    prediction = prediction or _default_prediction(sde)
    for k, v, lo in (("dim", dim, 1), ("components", components, 1)):
        if not (isinstance(v, int) and v >= lo):
            raise BenchError(f"{k}={v!r} is invalid: expected an integer >= {lo}")
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
    covs = [random_covariance(dim, eig_max, eig_min, g) for _ in range(components)]
    data = GaussianMixtureData(sde, torch.ones(components), means, torch.stack(covs))
    T, t_end = sde.T, sde.t_min

    def moments(t: float) -> tuple[Tensor, Tensor]:
        w = data.weights
        ms = torch.stack([c.marginal_mean(t) for c in data.components])
        m = (w[:, None] * ms).sum(0)
        cov = sum_tensors(w[k] * (c.marginal_cov(t) + torch.outer(ms[k] - m, ms[k] - m))
                          for k, c in enumerate(data.components))
        return m, cov

    return BenchProblem(
        name="gmm", sde=sde, model=data.model(prediction),
        sample_init=lambda n, gen: data.marginal_sample(n, T, gen),
        heldout=lambda n, gen: data.marginal_sample(n, t_end, gen),
        target_gaussian=moments(t_end), exact_model=True,
        description=(f"{dim}-dim Gaussian mixture ({components} modes, spread {spread:g}, "
                     f"eigenvalues {eig_max:g}..{eig_min:g}, seed {seed}) under {sde!r}, exact "
                     f"{prediction} model"),
        fingerprint={"problem": "gmm", "sde": repr(sde), "dim": dim, "components": components,
                     "seed": seed, "spread": spread, "eig_max": eig_max, "eig_min": eig_min,
                     "prediction": prediction})


#: Built-in problems: name -> builder(sde=None, dim=None, seed=0).
PROBLEMS: dict[str, Callable[..., BenchProblem]] = {"gaussian": gaussian_problem,
                                                    "gmm": gmm_problem}


# ------------------------------------------------------------------ a user's model
FACTORY_CONTRACT = (
    "a factory() returning a dict {'sde': ForwardSDE, 'model': DiffusionModel (a network with its "
    "parametrisation, e.g. sdekit.DiffusionModel(net, sde, 'eps')), 'sample_init': "
    "callable(n, generator) -> Tensor of n initial states at sde.T, optional 'reference': a "
    "Tensor of held-out data samples or callable(n, generator) -> Tensor, optional 'flow': "
    "callable(x_T) -> exact PF-ODE solution at sde.t_min, optional 'name'}, or a tuple "
    "(sde, model, sample_init[, reference]), or a BenchProblem")


def _factory_error(spec: str, msg: str) -> BenchError:
    return BenchError(f"--problem {spec!r}: {msg}; expected {FACTORY_CONTRACT}")


def problem_from_factory(spec: str) -> BenchProblem:
    """Build a problem from ``'module:factory'`` (see :data:`FACTORY_CONTRACT`).

    **Trusted code only**: this imports ``module`` and calls ``factory()``, which can do
    anything the user can. The module is found on ``sys.path`` as it is; the current directory
    is not added (set ``PYTHONPATH`` to make a local module importable). The factory must
    return a benchmark problem (the contract above); anything else, or an exception or
    ``SystemExit`` while importing or calling it, is a :class:`BenchError` naming the spec."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise _factory_error(spec, "is not of the form 'module:factory'")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise _factory_error(spec, f"cannot import module {mod_name!r} ({e}; the current "
                                   "directory is not searched: set PYTHONPATH to the folder "
                                   "that holds it)") from e
    except (Exception, SystemExit) as e:  # any import failure is the user's to see
        raise _factory_error(spec, f"cannot import module {mod_name!r} "
                                   f"({type(e).__name__}: {e})") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise _factory_error(spec, f"module {mod_name!r} has no callable {fn_name!r}")
    try:
        out = fn()
    except (Exception, SystemExit) as e:  # exit() must not end sdekit silently
        raise _factory_error(spec, f"calling {fn_name}() raised {type(e).__name__}: {e}") from e
    return _problem_from_parts(spec, out, {"problem": "factory", "spec": spec})


def _problem_from_parts(spec: str, out: Any, fingerprint: dict[str, Any]) -> BenchProblem:
    if isinstance(out, BenchProblem):
        return out
    if isinstance(out, (tuple, list)):
        if len(out) not in (3, 4):
            raise _factory_error(spec, f"the factory returned a {type(out).__name__} of "
                                       f"{len(out)} items")
        out = dict(zip(("sde", "model", "sample_init", "reference"), out))
    if not isinstance(out, Mapping):
        raise _factory_error(spec, f"the factory returned a {type(out).__name__}")
    unknown = set(out) - {"sde", "model", "sample_init", "reference", "flow", "name", "features"}
    if unknown:
        raise _factory_error(spec, f"unknown keys {sorted(unknown)}")
    sde, model, init = out.get("sde"), out.get("model"), out.get("sample_init")
    if not isinstance(sde, ForwardSDE):
        raise _factory_error(spec, f"'sde' is {type(sde).__name__}, not a ForwardSDE")
    if not isinstance(model, DiffusionModel):
        raise _factory_error(spec, f"'model' is {type(model).__name__}, not a DiffusionModel")
    if model.sde is not sde:
        raise _factory_error(spec, "'model' was built for another forward SDE object than 'sde'")
    if not callable(init):
        raise _factory_error(spec, f"'sample_init' is {type(init).__name__}, not a callable")
    ref = out.get("reference")
    if ref is not None and not (callable(ref) or isinstance(ref, Tensor)):
        raise _factory_error(spec, f"'reference' is {type(ref).__name__}, not a Tensor or callable")
    flow = out.get("flow")
    if flow is not None and not callable(flow):
        raise _factory_error(spec, f"'flow' is {type(flow).__name__}, not a callable")
    probe = init(2, torch.Generator().manual_seed(0))
    if not isinstance(probe, Tensor) or probe.ndim < 2 or probe.shape[0] != 2:
        shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise _factory_error(spec, f"sample_init(2, generator) returned {shape}, not a Tensor of "
                                   "shape (2, *event_shape)")
    if isinstance(ref, Tensor) and tuple(ref.shape[1:]) != tuple(probe.shape[1:]):
        raise _factory_error(spec, f"'reference' has shape {tuple(ref.shape)} but the initial "
                                   f"states have event shape {tuple(probe.shape[1:])}")
    return BenchProblem(name=str(out.get("name") or spec.replace(":", "-").replace("/", "-")),
                        sde=sde, model=model, sample_init=init, heldout=ref, flow=flow,
                        features=out.get("features"), description=f"user model {spec}",
                        fingerprint=fingerprint)


# ------------------------------------------------------------------ a trained checkpoint
CHECKPOINT_CONTRACT = (
    "sdekit.training (the trainers): checkpoint.load_model(path) -> (net, sde, config), "
    "data.load_dataset(config['data']) for the held-out split, and sdekit.models.wrap")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_label(path: str) -> str:
    """``runs/digits-vp/checkpoint.pt`` -> ``digits-vp``; ``a/b/model_3.pt`` -> ``model_3``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent if stem == "checkpoint" and parent else stem


def problem_from_checkpoint(path: str) -> BenchProblem:
    """A problem from a trained sdekit checkpoint (``sdekit train``): the EMA network sampled
    from its prior (a class-conditional network unconditionally, through its null class),
    compared with the held-out split of its dataset; RMS against a converged solve (cached).
    For digits checkpoints the Frechet distance is FD-digits (features of the bundled digit
    classifier, trained and cached on first use).

    :mod:`sdekit.training` is imported lazily; where it is missing the error says so."""
    if not os.path.isfile(path):
        raise BenchError(f"--problem checkpoint:{path}: no such file")
    try:
        from ..models import wrap
        from ..training.checkpoint import CheckpointError, load_model
        from ..training.data import load_dataset
    except ImportError as e:
        raise BenchError(f"--problem checkpoint:{path}: checkpoint problems need "
                         f"{CHECKPOINT_CONTRACT}; this installation does not provide it "
                         f"({type(e).__name__}: {e})") from e
    try:
        net, sde, cfg = load_model(path)
    except CheckpointError as e:
        raise BenchError(f"--problem checkpoint:{path}: {e}") from e
    data = cfg.get("data")
    try:
        ds = load_dataset(data, seed=0, image_size=int(cfg.get("image_size", 8)))
    except (TypeError, ValueError) as e:
        raise BenchError(f"--problem checkpoint:{path}: cannot load its dataset {data!r}: "
                         f"{e}") from e
    shape = tuple(int(v) for v in getattr(net, "data_shape", ds.shape))
    x_test = ds.x_test.float()
    if tuple(x_test.shape[1:]) != shape:
        raise BenchError(f"--problem checkpoint:{path}: the network samples shape {shape} but "
                         f"its dataset {data!r} has shape {tuple(x_test.shape[1:])}")
    features: Callable[[Tensor], Tensor] | None = None
    if data == "digits":
        state: dict[str, Any] = {}

        def digit_features(x: Tensor) -> Tensor:
            if "fd" not in state:
                from ..training.fd_digits import FDDigits
                state["fd"] = FDDigits()
            return torch.from_numpy(state["fd"].features(x))
        features = digit_features

    std = float(sde.prior_std)
    model = wrap(net, sde)  # load_model froze the weights: no autograd graphs while sampling
    return BenchProblem(
        name="checkpoint-" + _checkpoint_label(path), sde=sde, model=model,
        sample_init=lambda n, g: std * torch.randn((n,) + shape, generator=g),
        heldout=x_test, features=features,
        description=f"checkpoint {path} ({data}, {cfg.get('sde')} SDE, "
                    f"{cfg.get('net', {}).get('name', '?')} network, EMA weights"
                    + (", FD in digit-classifier feature space" if features else "") + ")",
        fingerprint={"problem": "checkpoint", "sha256": _sha256(path)})


# ------------------------------------------------------------------ resolution
def resolve_problem(spec: str | BenchProblem, sde: ForwardSDE | None = None,
                    dim: int | None = None, seed: int = 0) -> BenchProblem:
    """A problem from a CLI spec: a built-in name (:data:`PROBLEMS`), ``checkpoint:PATH`` (or
    an existing ``.pt``/``.pth``/``.safetensors`` file), or ``module:factory``. ``sde``, ``dim``
    and ``seed`` configure the built-in problems only."""
    if isinstance(spec, BenchProblem):
        return spec
    if isinstance(spec, str) and spec in PROBLEMS:
        kw: dict[str, Any] = {"sde": sde, "seed": seed}
        if dim is not None:
            kw["dim"] = dim
        return PROBLEMS[spec](**kw)
    if isinstance(spec, str) and spec.startswith("checkpoint:"):
        return problem_from_checkpoint(spec[len("checkpoint:"):])
    if isinstance(spec, str) and spec.endswith((".pt", ".pth", ".safetensors")) \
            and os.path.isfile(spec):
        return problem_from_checkpoint(spec)
    if isinstance(spec, str) and ":" in spec:
        return problem_from_factory(spec)
    raise BenchError(f"unknown --problem {spec!r}: expected one of {sorted(PROBLEMS)}, "
                     "'checkpoint:PATH' (a trained sdekit checkpoint) or 'module:factory' "
                     "(your own model)")


__all__ = ["BenchError", "BenchProblem", "PROBLEMS", "gaussian_problem", "gmm_problem",
           "problem_from_factory", "problem_from_checkpoint", "resolve_problem",
           "FACTORY_CONTRACT", "CHECKPOINT_CONTRACT"]
