"""Checkpoints: weights plus a JSON-readable config, written atomically and loaded without ever
executing code from the file.

A checkpoint is a ``torch.save`` archive holding only tensors, numbers, strings, lists and dicts:

* ``format`` / ``version``: ``"sdekit-checkpoint"`` / 1
* ``config``: the training config as a JSON string (network, SDE name and kwargs, parametrisation,
  loss, data transform, optimiser settings, seed)
* ``model``, ``ema``: state dicts; ``optimizer``: the AdamW state dict; ``step``: steps completed
* ``rng``: the torch RNG state at save time (the trainer's own randomness is counter-based: a pure
  function of seed, rank and step, so a resumed run replays exactly the same batches and noise)
* ``weights_sha256``: the identity of the EMA weights (:func:`sdekit._io.content_hash` of the
  state dict: every tensor's dtype, shape and bytes, in key order); an operator distilled from
  this checkpoint records it as its teacher
* ``sha256``: the content hash of everything else, checked on every load (torch's zip reader
  does not check CRCs, so flipped bytes in a weight record would otherwise load silently).
  A checkpoint from an older sdekit, without it, loads with a warning.

It is read back with ``torch.load(..., weights_only=True)``, which refuses arbitrary pickled
objects. A ``<name>.json`` file beside it repeats the config and step for people and tools.
Writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d over the
target, so a crash never leaves a half-written checkpoint under the real name.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import (
    IntegrityError,
    atomic_write_bytes,
    content_hash,
    read_torch,
    save_verified,
    verify,
)

FORMAT = "sdekit-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "config", "model", "ema", "optimizer", "step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


def save_checkpoint(path: str | os.PathLike, *, config: Mapping[str, Any], model: Mapping,
                    ema: Mapping, optimizer: Mapping, step: int,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (and its ``.json`` sidecar); returns the path."""
    path = Path(path)
    cfg_json = json.dumps(dict(config), sort_keys=True)
    payload = {"format": FORMAT, "version": VERSION, "config": cfg_json, "model": dict(model),
               "ema": dict(ema), "optimizer": dict(optimizer), "step": int(step),
               "rng": {"torch": torch.get_rng_state()}}
    if extra:
        payload["extra"] = dict(extra)
    payload["weights_sha256"] = content_hash(payload["ema"])
    digest = save_verified(path, payload)
    side = {"format": FORMAT, "version": VERSION, "step": int(step), "checkpoint": path.name,
            "config": json.loads(cfg_json), "weights_sha256": payload["weights_sha256"],
            "sha256": digest}
    atomic_write_bytes(path.with_suffix(".json"),
                       (json.dumps(side, indent=2, sort_keys=True) + "\n").encode())
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint; ``config`` comes back parsed into a dict.

    Raises :class:`CheckpointError` naming the file if it is missing, corrupt (its content hash
    does not match), truncated, not an sdekit checkpoint, or from a newer format version. A
    checkpoint without a content hash (older sdekit) loads with a warning. ``weights_sha256``
    (the EMA weights' identity) is always present in the result.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        ck = read_torch(path, "checkpoint")
        if not isinstance(ck, dict) or ck.get("format") != FORMAT:
            raise CheckpointError(f"{str(path)!r} is not an sdekit checkpoint (expected a dict "
                                  f"with format={FORMAT!r})")
        ck = verify(path, ck, "checkpoint")
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    if not isinstance(ck["version"], int) or ck["version"] > VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {ck['version']!r}; "
                              f"this sdekit reads versions <= {VERSION}")
    try:
        ck["config"] = json.loads(ck["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable config: {e}") from None
    if "weights_sha256" not in ck:
        ck["weights_sha256"] = content_hash(ck["ema"])
    return ck


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The training config stored in a checkpoint."""
    return load_checkpoint(path)["config"]


def load_state(module: torch.nn.Module, state: Mapping[str, Any], path: str | os.PathLike,
               what: str = "model") -> None:
    """``module.load_state_dict(state)`` with an error that names the checkpoint file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(s.strip() for s in first[:4])[:500]
        raise CheckpointError(f"checkpoint {str(path)!r}: its {what} weights do not fit this "
                              f"network (was it written for a different network config?): "
                              f"{detail}") from None


def load_model(path: str | os.PathLike, ema: bool = True, device: Any = "cpu"):
    """Rebuild ``(net, sde, config)`` from a checkpoint; the EMA weights by default.

    The network and SDE are built from the stored config, so no code is read from the file.
    The network carries the loaded weights' identity as ``net.weights_sha256`` (checked against
    the teacher recorded in an operator checkpoint).
    """
    from ..models import build_network
    from ..sde import get_sde

    ck = load_checkpoint(path)
    cfg = ck["config"]
    if cfg.get("kind") == "operator":
        raise CheckpointError(f"{str(path)!r} is an operator checkpoint (made by `sdekit "
                              "distill`), but a training checkpoint (made by `sdekit train`) is "
                              "expected here; an operator is used as `--solver fno --operator "
                              "PATH` beside its teacher's training checkpoint")
    try:
        net = build_network(cfg["net"])
        sde = get_sde(cfg["sde"], **cfg.get("sde_kwargs", {}))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config: {e}") from None
    load_state(net, ck["ema" if ema else "model"], path, "EMA" if ema else "model")
    net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    # a plain attribute (not a parameter or buffer), found by sdekit.distill.weights_sha256_of
    setattr(net, "weights_sha256", ck["weights_sha256"] if ema else content_hash(ck["model"]))
    return net, sde, cfg
