"""The tuned-grid file (:class:`TunedGrid`): the times of a grid tuned by :func:`sdekit.tune`
and the identity of what it was tuned for (solver and options, NFE, forward SDE, model), which
:func:`sdekit.sample`, ``sdekit sample --grid FILE`` and ``sdekit bench --grids FILE`` check
before any work. It sits below the driver (which reads these files); the tuning itself is
:mod:`sdekit.tune`."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_write_bytes, content_hash
from .dynamics.parameterization import DiffusionModel
from .grids import GRIDS
from .sde.base import ForwardSDE
from .solvers.base import Solver
from .solvers.registry import (
    _REGISTRY,
    built_options,
    get_solver,
    option_parameters,
    solver_names,
)

TUNED_FORMAT = "sdekit-tuned-grid/1"


class TuneError(ValueError):
    """Bad tuning input, or a tuned grid used with another solver, NFE, forward SDE or model."""


# ------------------------------------------------------------------ identities
def _json_norm(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(obj, default=str))


def solver_config(solver: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The effective options of registry solver ``solver`` (its class's defaults, the registry
    entry's and the given ones), JSON-normalised, so equal configurations compare equal however
    they were spelt (``dpmpp_2m`` with or without ``order=2``). Raises for unknown names/options."""
    if not isinstance(solver, str):
        raise TuneError(f"solver={solver!r} is invalid: expected a registry name (one of "
                        f"{solver_names()})")
    get_solver(solver, **dict(options or {}))  # validates the name and the options
    cls, defaults = _REGISTRY[solver]
    eff = {p.name: p.default for p in option_parameters(cls) if p.default is not p.empty}
    eff.update(defaults)
    eff.update(options or {})
    return _json_norm(eff)


def sde_fingerprint(sde: ForwardSDE) -> dict[str, Any]:
    """The forward process's identity: its repr, time range and a hash of its half-logSNR at 65
    times (12 significant digits), which tells apart e.g. two DDPM tables of the same length."""
    t = torch.linspace(sde.t_min, sde.T, 65, dtype=torch.float64)
    lam = sde.lambda_(t).double().tolist()
    digest = hashlib.sha256(json.dumps([f"{v:.12g}" for v in lam]).encode()).hexdigest()
    return {"repr": repr(sde), "T": float(sde.T), "t_min": float(sde.t_min),
            "lambda_sha256": digest[:16]}


def _object_tensors(obj: Any, depth: int = 0) -> Any:
    """The tensors an analytic model's object holds (nested through lists and objects)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if depth > 3:
        return None
    if isinstance(obj, (list, tuple)):
        items = [_object_tensors(v, depth + 1) for v in obj]
        return [v for v in items if v is not None] or None
    if hasattr(obj, "__dict__") and not isinstance(obj, (ForwardSDE, type)):
        d = {k: _object_tensors(v, depth + 1) for k, v in sorted(vars(obj).items())
             if not k.startswith("_")}
        d = {k: v for k, v in d.items() if v is not None}
        return d or None
    return None


def model_identity(model: DiffusionModel, tag: str | None = None) -> dict[str, Any]:
    """What identifies the model a grid is tuned for: its prediction kind plus the weights hash a
    ``sdekit train`` checkpoint records (``weights_sha256``), else a content hash of a torch
    module's parameters and buffers, else of the tensors an analytic model's object holds (the
    exact Gaussian oracles of :mod:`sdekit.analytic`), else the user's ``tag`` (required then)."""
    ident: dict[str, Any] = {"prediction": model.prediction}
    if tag is not None:
        if not isinstance(tag, str) or not tag:
            raise TuneError(f"model_tag={tag!r} is invalid: expected a non-empty string")
        return {**ident, "tag": tag}
    fn: Any = getattr(model.net, "fn", model.net)
    inner = getattr(fn, "net", fn)       # a ConditionedNet wraps the network
    for obj in (fn, inner):
        if isinstance(getattr(obj, "weights_sha256", None), str):
            return {**ident, "weights_sha256": obj.weights_sha256}
    if isinstance(fn, torch.nn.Module):
        return {**ident, "params_sha256": content_hash(dict(fn.state_dict()))}
    owner = getattr(fn, "__self__", None)
    if owner is None and getattr(fn, "__closure__", None):
        owner = next((c.cell_contents for c in fn.__closure__
                      if _object_tensors(c.cell_contents) is not None), None)
    tensors = _object_tensors(owner) if owner is not None else None
    if tensors is not None:
        return {**ident, "object": type(owner).__name__, "object_sha256": content_hash(tensors)}
    raise TuneError(f"cannot identify the model {fn!r} (no weights_sha256, not a torch module, "
                    "no tensors to hash): pass model_tag='<name of your model>'")


def _diff(what: str, recorded: Any, given: Any) -> str | None:
    """None where equal, else which entries differ (for dicts: only the differing keys)."""
    if recorded == given:
        return None
    if isinstance(recorded, dict) and isinstance(given, dict):
        keys = sorted(k for k in set(recorded) | set(given) if recorded.get(k) != given.get(k))
        return f"{what} differs in " + ", ".join(
            f"{k} (tuned for {recorded.get(k)!r}, given {given.get(k)!r})" for k in keys)
    return f"{what}: tuned for {recorded!r}, given {given!r}"


# ------------------------------------------------------------------ the result file
@dataclass
class TunedGrid:
    """A tuned grid and what it was tuned for (the content of the JSON file)."""

    times: Tensor
    record: dict[str, Any]
    path: str | None = None

    @property
    def solver(self) -> str:
        return self.record["solver"]

    @property
    def solver_options(self) -> dict[str, Any]:
        return dict(self.record.get("solver_options_given") or {})

    @property
    def nfe(self) -> int:
        return int(self.record["nfe"])

    @property
    def steps(self) -> int:
        return self.times.numel() - 1

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file atomically."""
        rec = {**self.record, "times": self.times.tolist()}
        atomic_write_bytes(Path(path), (json.dumps(rec, indent=1) + "\n").encode())
        self.path = str(path)

    def check(self, sde: ForwardSDE, model: DiffusionModel | None = None,
              solver: str | Solver | None = None, solver_options: Mapping[str, Any] | None = None,
              steps: int | None = None, nfe: int | None = None,
              model_tag: str | None = None) -> None:
        """Raise a :class:`TuneError` naming every difference between what this grid was tuned
        for and the given forward SDE, model, solver (with options), steps and NFE budget."""
        rec, where = self.record, f"tuned grid {self.path or ''!s}".rstrip()
        diffs = [_diff("forward SDE", rec["sde"], sde_fingerprint(sde))]
        if model is not None:
            mine = rec["model"]
            if "tag" in mine and model_tag is None:
                raise TuneError(f"{where} was tuned for the model tagged {mine['tag']!r}, which "
                                "cannot be verified: pass grid_options={'model_tag': "
                                f"{mine['tag']!r}}} (model_tag=) to confirm it")
            diffs.append(_diff("model", mine, model_identity(model, model_tag if "tag" in mine
                                                             else None)))
        if isinstance(solver, Solver):
            diffs.append(_diff("solver", rec["solver"], solver.name))
            built = built_options(solver)   # None: not an instance of a registered class
            if solver.name == rec["solver"] and built is not None:
                diffs.append(_diff("solver options", rec["solver_options"],
                                   solver_config(solver.name, built)))
        elif solver is not None:
            diffs.append(_diff("solver", rec["solver"], solver))
            if solver == rec["solver"]:
                diffs.append(_diff("solver options", rec["solver_options"],
                                   solver_config(solver, solver_options)))
        if steps is not None:
            diffs.append(_diff("steps", self.steps, int(steps)))
        if nfe is not None:
            diffs.append(_diff("NFE", self.nfe, int(nfe)))
        found = [d for d in diffs if d]
        if found:
            raise TuneError(f"{where} does not match: " + "; ".join(found)
                            + ". Tune a grid for this configuration (sdekit tune) or use a named "
                            "grid")


def is_grid_file(grid: Any) -> bool:
    """Whether a ``grid`` argument names a tuned-grid file rather than a named grid: a path
    object, or a string that is not a grid name and ends in ``.json`` or names a file."""
    if isinstance(grid, os.PathLike):
        return True
    return isinstance(grid, str) and grid not in GRIDS and (grid.endswith(".json")
                                                             or os.path.isfile(grid))


def load_tuned_grid(path: str | os.PathLike) -> TunedGrid:
    """Read a tuned-grid file written by :func:`tune` (:meth:`TunedGrid.save`)."""
    p = Path(path)
    if not p.is_file():
        raise TuneError(f"tuned grid file {str(p)!r} does not exist (grid names are "
                        f"{sorted(GRIDS)}; a tuned grid is a .json file made by sdekit tune)")
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise TuneError(f"tuned grid file {str(p)!r} is not valid JSON ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != TUNED_FORMAT:
        raise TuneError(f"{str(p)!r} is not a tuned grid file (expected format "
                        f"{TUNED_FORMAT!r}, found "
                        f"{rec.get('format') if isinstance(rec, dict) else type(rec).__name__!r})")
    missing = [k for k in ("times", "solver", "solver_options", "nfe", "sde", "model")
               if k not in rec]
    if missing:
        raise TuneError(f"tuned grid file {str(p)!r} lacks {missing}")
    times = torch.tensor(rec.pop("times"), dtype=torch.float64)
    return TunedGrid(times, rec, str(p))


# ------------------------------------------------------------------ helpers
