"""The trainer: AdamW with warm-up, gradient clipping, EMA, fixed seeds, atomic checkpoints with
exact resume, CSV log, sample grids, and data-parallel training under ``torchrun``.

The loop itself is :class:`FitLoop` (with its schedule, :class:`FitSettings`): :class:`Trainer`
and the operator distillation (:func:`sdekit.distill.train_operator`) both run it, each
supplying the loss of a step and its checkpoint config.

Randomness is counter-based: the batch indices, training times, noise and label dropout of step
``k`` on rank ``r`` come from a generator seeded with a hash of ``(seed, r, k)``, and dropout
layers run under a forked global RNG seeded the same way. A run resumed from a checkpoint
therefore replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._utils import is_real, require
from ..models import build_network
from ..sde import SDES, get_sde
from .checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint
from .data import DATASETS, Dataset, load_dataset
from .losses import LOSSES, T_SAMPLINGS, ClassifierLoss, checkpoint_loss

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "elapsed_s")
# config keys that must match when resuming (they define the model and the training problem)
IDENTITY_KEYS = ("net", "sde", "sde_kwargs", "data", "image_size", "loss", "class_cond", "seed",
                 "batch_size")
# config keys added after checkpoints were first written: a checkpoint without them was trained
# with these values (the flow loss's t sampling before it was configurable)
ADDED_KEYS = ("t_sampling", "logit_mean", "logit_std")
LR_DECAYS = ("cosine", "constant")


class TrainingDiverged(RuntimeError, FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite (a FloatingPointError too, as the
    operator distillation raised before it shared the loop)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; JSON-serialisable (stored in checkpoints).

    ``net`` is a network config for :func:`sdekit.models.build_network`; missing entries are
    filled from the recipe for ``data`` (see :func:`recipe`).
    """

    data: str = "digits"
    sde: str = "vp"
    sde_kwargs: dict[str, Any] = field(default_factory=dict)
    net: dict[str, Any] = field(default_factory=dict)
    loss: str = "eps"
    importance: bool = True            # likelihood loss: sample lambda uniformly
    t_sampling: str = "logit_normal"   # flow loss: t = sigmoid(logit_mean + logit_std z),
                                       # or uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    image_size: int = 8
    class_cond: bool = False
    label_dropout: float = 0.1         # CFG: probability of replacing a label by the null class
    steps: int = 4000
    batch_size: int = 128              # global batch (split across ranks)
    lr: float = 2e-3
    lr_decay: str = "cosine"           # "cosine" (to 0 at `steps`) or "constant"
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 1000
    log_every: int = 50
    sample_every: int = 0              # 0: a sample grid at each checkpoint
    sample_solver: str | None = None   # None: sdekit.sample's option-free rule
    sample_steps: int = 20
    sample_n: int = 64
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}: expected some of "
                             f"{sorted(names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ------------------------------------------------------------------------------ recipes
RECIPES: dict[str, dict[str, Any]] = {
    # 8x8 digits: a compact U-Net with EDM preconditioning and the EDM loss (on any SDE; the
    # default SDE is VP). See benchmarks/train_digits.py for the measured time and FD-digits.
    "digits": dict(net=dict(name="unet", base_channels=32, channel_mult=[1, 2],
                            num_res_blocks=1, attn_resolutions=[], prediction="denoiser",
                            sigma_data=0.75),
                   loss="edm", steps=3000, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.999,
                   ckpt_every=1000, sample_n=100),
    # 2-D toys: a residual MLP, EDM-preconditioned, trained for 2,000 steps.
    "toy": dict(net=dict(name="mlp", width=256, depth=2, emb_dim=64, embedding="fourier",
                         prediction="denoiser", sigma_data=1.0),
                loss="edm", steps=2000, batch_size=256, lr=3e-3, warmup=100, ema_decay=0.995,
                ckpt_every=2000, sample_n=4000),
}

# Flow matching (``objective='flow'``): what differs from the recipes above. The rectified-flow
# process, a velocity network (conditioned on t; no EDM preconditioning, so sigma_data is
# unused) and the conditional flow-matching loss. t sampling: logit-normal(0, 1) for digits,
# SD3's default for images (Esser et al. 2024, Sec. 3.1); uniform for the 2-D toys, as in
# rectified flow and flow matching (Liu et al. 2023; Lipman et al. 2023), whose fine structure
# near t = 0 a logit-normal t would rarely train.
FLOW_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"sde": "flow", "net": {"prediction": "flow"}, "loss": "flow",
               "t_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0},
    "toy": {"sde": "flow", "net": {"prediction": "flow"}, "loss": "flow", "t_sampling": "uniform"},
}
# A noise-conditional classifier for classifier guidance (``objective='classifier'``): the
# U-Net's encoder half (sdekit.models.NoisyClassifier) trained with cross-entropy on x_t.
CLASSIFIER_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"net": {"name": "classifier", "base_channels": 32, "channel_mult": [1, 2],
                       "num_res_blocks": 1}, "loss": "classifier", "steps": 2000,
               "batch_size": 128},
}
OBJECTIVES = ("dsm", "flow", "classifier")


def recipe(data: str, objective: str = "dsm", **overrides: Any) -> TrainConfig:
    """The default training config for a bundled dataset, with ``overrides`` applied
    (``net`` overrides are merged into the recipe's network config). ``objective='flow'``
    applies the flow-matching changes of :data:`FLOW_RECIPES` first; the flow loss chosen
    without it (``loss='flow'``) takes its t sampling from there too."""
    if data not in DATASETS:
        raise ValueError(f"unknown dataset {data!r}: expected one of {list(DATASETS)}")
    require(objective in OBJECTIVES, "objective", objective, f"one of {OBJECTIVES}")
    kind = "digits" if data == "digits" else "toy"
    base = copy.deepcopy(RECIPES[kind])
    net = dict(base.pop("net"))
    if objective == "classifier":
        if data not in CLASSIFIER_RECIPES:
            raise ValueError(f"objective='classifier' needs labelled image data: expected data "
                             f"in {sorted(CLASSIFIER_RECIPES)}, got {data!r}")
        net = {}   # the classifier's own network, not the score network's
        cls = copy.deepcopy(CLASSIFIER_RECIPES[data])
        net.update(cls.pop("net"))
        base.update(cls)
    elif objective == "flow":
        flow = copy.deepcopy(FLOW_RECIPES[kind])
        net.update(flow.pop("net"))
        base.update(flow)
    elif overrides.get("loss") == "flow":
        base.update({k: v for k, v in FLOW_RECIPES[kind].items() if k in ADDED_KEYS})
    net.update(overrides.pop("net", None) or {})
    base.update(overrides)
    return TrainConfig(data=data, net=net, **base)


def complete_net_config(cfg: TrainConfig, dataset: Dataset) -> dict[str, Any]:
    """Fill the data-dependent network entries (shape, classes) from the dataset."""
    net = dict(cfg.net)
    name = net.setdefault("name", "unet" if dataset.is_image else "mlp")
    if name == "classifier":
        if not (dataset.is_image and dataset.num_classes):
            raise ValueError(f"net name='classifier' needs labelled image data, but "
                             f"{cfg.data!r} is not")
        net.setdefault("in_channels", dataset.shape[0])
        net.setdefault("image_size", dataset.shape[-1])
        net.setdefault("num_classes", dataset.num_classes)
        return net
    if name == "unet":
        if not dataset.is_image:
            raise ValueError(f"net name='unet' needs image data, but {cfg.data!r} has samples of "
                             f"shape {dataset.shape}: use net name='mlp'")
        net.setdefault("in_channels", dataset.shape[0])
        net.setdefault("image_size", dataset.shape[-1])
    else:
        net.setdefault("data_shape", list(dataset.shape))
    if cfg.class_cond:
        if not dataset.num_classes:
            raise ValueError(f"class_cond=True but dataset {cfg.data!r} has no class labels")
        net.setdefault("num_classes", dataset.num_classes)
    return net


def _describe_diff(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return "; ".join(f"{key}.{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}"
                         for k in keys)
    return f"{key}: checkpoint {old!r} vs now {new!r}"


def _seed_for(*parts: Any) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' is invalid: no CUDA device is available here "
                             "(torch.cuda.is_available() is False): expected 'cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass
class TrainResult:
    step: int
    loss: float                 # mean loss over the last logging window
    checkpoint: Path | None
    elapsed_s: float
    history: list[dict[str, float]]



def lr_at(step: int, lr: float, steps: int, warmup: int, decay: str) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup`` steps, then ``decay``
    ("cosine" to 0 at ``steps``, or "constant")."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay == "cosine":
        return lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))
    return lr * warm


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int) -> None:
    """One EMA update after optimiser step ``step`` (0-based), with the usual warm-up
    ``min(decay, (1 + step) / (10 + step))`` so early steps do not keep the initial weights
    in the average for thousands of steps; buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - d)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


@dataclass(frozen=True)
class FitSettings:
    """The optimisation schedule every training loop shares (see :class:`FitLoop`): the
    learning rate (:func:`lr_at`), gradient clipping, the EMA decay and the checkpoint and
    logging cadence. Invalid values raise a ValueError naming the setting."""

    steps: int
    lr: float
    warmup: int = 0
    lr_decay: str = "cosine"       # "cosine" (to 0 at `steps`) or "constant"
    grad_clip: float = math.inf    # inf: no clipping (the norm is still checked for NaN/inf)
    ema_decay: float = 0.999
    ckpt_every: int = 1000
    log_every: int = 50

    def __post_init__(self) -> None:
        require(isinstance(self.steps, int) and self.steps >= 0, "steps", self.steps,
                "an integer >= 0")
        require(is_real(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0")
        require(self.lr_decay in LR_DECAYS, "lr_decay", self.lr_decay, "'cosine' or 'constant'")
        require(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", self.warmup,
                "an integer >= 0")
        require(isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0, "grad_clip",
                self.grad_clip, "a number > 0 (use inf to disable)")
        require(is_real(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay",
                self.ema_decay, "0 <= ema_decay < 1")
        require(isinstance(self.ckpt_every, int) and self.ckpt_every >= 1, "ckpt_every",
                self.ckpt_every, "an integer >= 1")
        require(isinstance(self.log_every, int) and self.log_every >= 1, "log_every",
                self.log_every, "an integer >= 1")

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.steps, self.warmup, self.lr_decay)


class FitLoop:
    """The optimisation loop of every sdekit trainer (:class:`Trainer`, and the operator
    distillation :func:`sdekit.distill.train_operator`).

    Each step sets the learning rate (:meth:`FitSettings.lr_at`), takes :meth:`loss_at` of the
    step, clips the gradient norm, stops with :class:`TrainingDiverged` before the update if
    the loss or the norm is not finite, steps the optimiser and updates the EMA copy of the
    weights. Every ``ckpt_every`` steps (and at the end) it writes an atomic, verified
    checkpoint (:func:`~sdekit.training.checkpoint.save_checkpoint`); :meth:`resume` continues
    from one exactly, after checking that it was written for the same run
    (:meth:`resume_keys`).

    A subclass supplies :meth:`loss_at` (drawing its batch from a generator seeded by the
    step, so that a resumed run sees the batches an uninterrupted one would),
    :meth:`saved_config` (stored in checkpoints) and :meth:`resume_keys`; it may override the
    hooks :meth:`_on_train_start` and :meth:`_after_save`. ``model`` is what :meth:`loss_at`
    calls: ``net`` itself, or (set by the subclass) a DistributedDataParallel wrapper of it;
    then (``world_size > 1``) the loss and the gradient norm are averaged over ranks and rank 0
    writes checkpoints and logs.
    """

    # how to proceed when a checkpoint belongs to another run (ends the resume error)
    resume_hint = "use another output or the same settings"

    def __init__(self, net: torch.nn.Module, opt: torch.optim.Optimizer, fit: FitSettings, *,
                 checkpoint_path: Path | None, log_path: Path | None = None,
                 progress: bool = False, desc: str = "train",
                 rank: int = 0, world_size: int = 1) -> None:
        self.net, self.opt, self.fit = net, opt, fit
        self.model: torch.nn.Module = net
        self.ema = copy.deepcopy(net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.checkpoint_path, self.log_path = checkpoint_path, log_path
        self.progress, self.desc = progress, desc
        self.rank, self.world_size = rank, world_size
        self.device = next(net.parameters()).device
        self.step = 0

    # ------------------------------------------------------- what a subclass supplies
    def loss_at(self, step: int) -> torch.Tensor:
        """The (scalar) training loss of optimiser step ``step`` (0-based)."""
        raise NotImplementedError

    def saved_config(self) -> dict[str, Any]:
        """The config stored in checkpoints (JSON-serialisable)."""
        raise NotImplementedError

    def resume_keys(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(must_match, may_change)`` of a stored config: the entries that must equal this
        run's for :meth:`resume` to continue it, and those that may change (with a warning:
        the run will no longer match an uninterrupted one). ``steps`` is in neither: a run
        may be extended."""
        raise NotImplementedError

    def _on_train_start(self) -> None:
        """Called by :meth:`train` before the first step (rank 0 writes files here)."""

    def _after_save(self) -> None:
        """Called by :meth:`train` after each checkpoint."""

    def extra_state(self) -> dict[str, Any]:
        """More training state to checkpoint (e.g. a discriminator and its optimiser), given
        back to :meth:`load_extra_state` on resume."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved (``extra``: the checkpoint's extra entries)."""

    # ----------------------------------------------------------------- one step
    def lr_at(self, step: int) -> float:
        return self.fit.lr_at(step)

    def train_step(self) -> tuple[float, float]:
        """One optimisation step; returns ``(loss, grad_norm)`` (averaged over ranks)."""
        k = self.step
        lr = self.lr_at(k)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = self.loss_at(k)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.fit.grad_clip)
        stats = torch.stack([loss.detach().float(), gn.detach().float()]).cpu()
        if self.world_size > 1:
            stats = stats.to(self.device)
            dist.all_reduce(stats)
            stats = stats.cpu() / self.world_size
        loss_v, gn_v = float(stats[0]), float(stats[1])
        self._check_finite(k, loss_v, gn_v)
        self.opt.step()
        update_ema(self.ema, self.net, self.fit.ema_decay, k)
        self.step = k + 1
        return loss_v, gn_v

    def _check_finite(self, k: int, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        path = self.checkpoint_path
        kept = (f"The last good checkpoint {str(path)!r} was kept." if path and path.exists()
                else "No checkpoint had been written yet.")
        raise TrainingDiverged(f"{what} became {value} at step {k + 1}; training stopped before "
                               f"the update. {kept} Try a lower lr, a stronger grad_clip, or "
                               "check the data.")

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """Write the checkpoint atomically (rank 0); checks that ranks hold equal weights."""
        if self.world_size > 1:
            self._check_in_sync()
        path = self.checkpoint_path
        if path is not None and self.rank == 0:
            save_checkpoint(path, config=self.saved_config(), model=self.net.state_dict(),
                            ema=self.ema.state_dict(), optimizer=self.opt.state_dict(),
                            step=self.step,
                            extra={"world_size": self.world_size, **self.extra_state()})
        if self.world_size > 1:
            dist.barrier()
        return path

    def _check_in_sync(self) -> None:
        with torch.no_grad():
            s = torch.stack([p.double().sum() for p in self.net.parameters()]).sum().reshape(1)
            s = s.to(self.device)
            lo, hi = s.clone(), s.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"data-parallel ranks hold different weights at step {self.step} "
                               f"(checksums {lo.item()!r} .. {hi.item()!r})")

    def resume(self) -> None:
        """Continue from the checkpoint at ``checkpoint_path`` if there is one: weights, EMA,
        optimiser state, step and the global RNG state (rank 0). Raises
        :class:`~sdekit.training.checkpoint.CheckpointError` if it was written for another
        run (:meth:`resume_keys`) or is already past ``steps``."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return
        ck = load_checkpoint(path)
        self._check_resume_config(path, ck["config"], int(ck["step"]))
        load_state(self.net, ck["model"], path, "model")
        load_state(self.ema, ck["ema"], path, "EMA")
        try:
            self.opt.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: optimizer state does not fit: "
                                  f"{e}") from None
        self.load_extra_state(ck.get("extra") or {})
        self.step = int(ck["step"])
        rng = ck.get("rng", {}).get("torch")
        if isinstance(rng, torch.Tensor) and self.rank == 0:
            torch.set_rng_state(rng)

    def _check_resume_config(self, path: Path, saved: dict[str, Any], step: int) -> None:
        (must_old, may_old), (must_now, may_now) = (self.resume_keys(saved),
                                                    self.resume_keys(self.saved_config()))
        diff = [k for k in dict.fromkeys([*must_now, *must_old])
                if must_old.get(k) != must_now.get(k)]
        if diff:
            details = "; ".join(_describe_diff(k, must_old.get(k), must_now.get(k)) for k in diff)
            raise CheckpointError(f"checkpoint {str(path)!r} was written for a different "
                                  f"configuration ({details}), and a run of another config "
                                  f"cannot be resumed: {self.resume_hint}")
        require(step <= self.fit.steps, "steps", self.fit.steps,
                f"an integer >= {step}: checkpoint {str(path)!r} is already at step {step}, past "
                "the requested steps (start a new run in another output directory to train for "
                "fewer steps)")
        other = [k for k in may_now if may_old.get(k) != may_now[k]]
        if other and self.rank == 0:
            warnings.warn(f"resuming {path} with changed settings {other}: the run will not "
                          "match an uninterrupted one", stacklevel=3)

    # ---------------------------------------------------------------------- loop
    def train(self, until: int | None = None) -> TrainResult:
        """Train to ``steps`` (or stop early after step ``until``, e.g. to test resume); a
        log row (the means over the window) every ``log_every`` steps and a checkpoint every
        ``ckpt_every`` steps and at the end."""
        from tqdm.auto import tqdm

        end = min(self.fit.steps, until) if until is not None else self.fit.steps
        main = self.rank == 0
        if main:
            self._on_train_start()
        log = _CsvLog(self.log_path, self.step) if self.log_path is not None and main else None
        bar = tqdm(total=self.fit.steps, initial=self.step, dynamic_ncols=True, desc=self.desc,
                   disable=not (self.progress and main))
        window = _Window()
        history: list[dict[str, float]] = []
        path = None
        try:
            while self.step < end:
                window.add(*self.train_step())
                bar.update(1)
                if self.step % self.fit.log_every == 0 or self.step == end:
                    row = window.row(self.step, self.lr_at(self.step - 1))
                    history.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.1e}")
                    if log is not None:
                        log.write(row)
                if self.step % self.fit.ckpt_every == 0 or self.step == end:
                    path = self.save()
                    self._after_save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        last = history[-1]["loss"] if history else float("nan")
        return TrainResult(self.step, last, path, time.perf_counter() - window.t0, history)


class _Window:
    """Means of the loss and gradient norm over the steps since the last log row."""

    def __init__(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.loss = self.grad_norm = 0.0
        self.n = 0

    def add(self, loss: float, grad_norm: float) -> None:
        self.loss += loss
        self.grad_norm += grad_norm
        self.n += 1

    def row(self, step: int, lr: float) -> dict[str, float]:
        """The log row of ``step``; starts a new window."""
        now = time.perf_counter()
        row = {"step": step, "loss": self.loss / self.n, "lr": lr,
               "grad_norm": self.grad_norm / self.n,
               "steps_per_s": self.n / max(now - self.t, 1e-9), "elapsed_s": now - self.t0}
        self.loss = self.grad_norm = 0.0
        self.n, self.t = 0, now
        return row


class _CsvLog:
    """``log.csv`` (:data:`LOG_FIELDS`), keeping the rows up to ``step`` of an existing one
    (those past it were written by an interrupted run after its last checkpoint)."""

    def __init__(self, path: Path, step: int) -> None:
        rows: list[dict[str, str]] = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, row: dict[str, float]) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                              for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Trainer(FitLoop):
    """Train a score network on a bundled dataset (the loop is :class:`FitLoop`'s).

    Args:
        config: a :class:`TrainConfig` (see :func:`recipe` for the defaults per dataset).
        out_dir: where ``checkpoint.pt`` (+ ``.json``), ``log.csv``, ``config.json`` and sample
            grids go; ``None`` keeps everything in memory (no checkpoints).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists (its network, SDE, data,
            loss, seed and batch size must match ``config``).
        progress: show a tqdm progress bar (rank 0 only).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (gloo on CPU, NCCL on
    GPUs), the network is wrapped in DistributedDataParallel, each rank draws
    ``batch_size / world_size`` samples per step, and rank 0 writes checkpoints and logs.
    """

    resume_hint = "use another --out directory or the same settings"
    net: Any   # a ScoreNet, or a NoisyClassifier (loss 'classifier'): their attributes differ

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike | None = None,
                 resume: bool = False, progress: bool = True,
                 dataset: Dataset | None = None) -> None:
        self.cfg = config
        fit = self._validate()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        rank, world_size = self._init_distributed()
        self.device = _resolve_device(config.device, self.local_rank)

        self.sde = get_sde(config.sde, **config.sde_kwargs)
        self.dataset = dataset or load_dataset(config.data, seed=0, image_size=config.image_size)
        config.net = complete_net_config(config, self.dataset)
        with torch.random.fork_rng(devices=[]):     # initial weights depend on the seed only
            torch.manual_seed(_seed_for(config.seed, "init"))
            net: Any = build_network(config.net).to(self.device)   # see `Trainer.net`
        config.net = dict(net.config)           # the complete, explicit network config
        if self.dataset.is_image and self.device.type == "cpu":
            net.to(memory_format=torch.channels_last)   # ~15% faster oneDNN convolutions
        self.is_classifier = config.loss == "classifier"
        self.loss_fn = self._build_loss(net)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, betas=config.betas,
                                weight_decay=config.weight_decay, foreach=True)
        # dropout is the only consumer of the global RNG in a forward pass
        self._stochastic_net = any(isinstance(m, torch.nn.Dropout) and m.p > 0
                                   for m in net.modules())
        out = self.out_dir
        super().__init__(net, opt, fit, progress=progress,
                         checkpoint_path=out / CHECKPOINT_NAME if out is not None else None,
                         log_path=out / LOG_NAME if out is not None else None,
                         desc=f"train {config.data}/{config.sde}", rank=rank,
                         world_size=world_size)
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(net, device_ids=ids)
        self.x = self.dataset.x.to(self.device)
        y = self.dataset.y if config.class_cond or self.is_classifier else None
        self.y = y.to(self.device) if y is not None else None
        if resume:
            self.resume()

    # --------------------------------------------------------------------- set-up
    def _validate(self) -> FitSettings:
        """Check the config; returns its optimisation schedule."""
        c = self.cfg
        require(c.data in DATASETS, "data", c.data, f"one of {list(DATASETS)}")
        require(c.sde in SDES, "sde", c.sde, f"one of {sorted(SDES)}")
        require(c.loss in LOSSES + ("classifier",), "loss", c.loss,
                f"one of {LOSSES + ('classifier',)}")
        is_cls = c.net.get("name") == "classifier"
        if is_cls != (c.loss == "classifier"):
            raise ValueError(f"loss={c.loss!r} with net name={c.net.get('name')!r} is invalid: "
                             "the classifier loss trains net name='classifier' and only it "
                             "(use objective='classifier')")
        if is_cls and c.class_cond:
            raise ValueError("class_cond=True is invalid for a classifier: it is trained on "
                             "the labels, with no null class")
        require(c.t_sampling in T_SAMPLINGS, "t_sampling", c.t_sampling, f"one of {T_SAMPLINGS}")
        require(is_real(c.logit_mean), "logit_mean", c.logit_mean, "a finite number")
        require(is_real(c.logit_std) and c.logit_std > 0, "logit_std", c.logit_std,
                "a finite number > 0")
        require(isinstance(c.steps, int) and c.steps >= 1, "steps", c.steps, "an integer >= 1")
        require(isinstance(c.batch_size, int) and c.batch_size >= 1, "batch_size", c.batch_size,
                "an integer >= 1")
        require(0 <= c.label_dropout < 1, "label_dropout", c.label_dropout, "0 <= p < 1")
        return FitSettings(steps=c.steps, lr=c.lr, warmup=c.warmup, lr_decay=c.lr_decay,
                           grad_clip=c.grad_clip, ema_decay=c.ema_decay,
                           ckpt_every=c.ckpt_every, log_every=c.log_every)

    def _init_distributed(self) -> tuple[int, int]:
        """Join (or start) the process group under ``torchrun``; returns ``(rank,
        world_size)``."""
        self._owns_group = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
            backend = "nccl" if (torch.cuda.is_available() and self.cfg.device != "cpu") else "gloo"
            dist.init_process_group(backend=backend)
            self._owns_group = True
        rank, world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cfg.batch_size % world_size:
            raise ValueError(f"batch_size={self.cfg.batch_size} is invalid: expected a multiple "
                             f"of the number of processes ({world_size})")
        return rank, world_size

    def _build_loss(self, net: Any) -> Any:
        c = self.cfg
        if self.is_classifier:
            return ClassifierLoss(self.sde, time_input=net.time_input)
        return checkpoint_loss(self.sde, net, c)

    def resume_keys(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The network and the training problem (:data:`IDENTITY_KEYS`) must match; the rest
        may change (a key of :data:`ADDED_KEYS` missing from an older checkpoint had its
        default)."""
        full = dict(config)
        for k in ADDED_KEYS:
            full.setdefault(k, TrainConfig.__dataclass_fields__[k].default)
        return ({k: config.get(k) for k in IDENTITY_KEYS},
                {k: v for k, v in full.items()
                 if k not in IDENTITY_KEYS and k not in ("steps", "transform")})

    # ----------------------------------------------------------------- one step
    def _batch(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.cfg.batch_size // self.world_size
        idx = torch.randint(0, self.x.shape[0], (b,), generator=g).to(self.device)
        x0 = self.x[idx]
        if self.y is None:
            return x0, None
        y = self.y[idx]
        if self.is_classifier:   # the labels are the targets: no null class
            return x0, y
        drop = (torch.rand(b, generator=g) < self.cfg.label_dropout).to(self.device)
        return x0, torch.where(drop, torch.full_like(y, self.net.num_classes), y)

    def loss_at(self, step: int) -> torch.Tensor:
        """The loss on step ``step``'s batch; the batch, times, noise and label dropout come
        from a generator seeded by ``(seed, rank, step)``, dropout from a forked global RNG
        seeded the same way."""
        g = torch.Generator().manual_seed(_seed_for(self.cfg.seed, self.rank, step, "batch"))
        x0, y = self._batch(g)
        with torch.random.fork_rng(devices=[], enabled=self._stochastic_net):
            if self._stochastic_net:
                torch.default_generator.manual_seed(
                    _seed_for(self.cfg.seed, self.rank, step, "drop"))
            loss: torch.Tensor = self.loss_fn(self.model, x0, y, generator=g)
        return loss

    # ---------------------------------------------------------------- checkpoints
    def saved_config(self) -> dict[str, Any]:
        """The config stored in checkpoints: the training config plus the data ``transform``."""
        return dict(self.cfg.to_dict(), transform=self.dataset.transform)

    def _on_train_start(self) -> None:
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(
                json.dumps(self.saved_config(), indent=2, sort_keys=True) + "\n")

    def _after_save(self) -> None:
        every = self.cfg.sample_every or self.cfg.ckpt_every
        if self.step % every == 0 or self.step == self.cfg.steps:
            self._sample_grid()

    def draw_samples(self, n: int | None = None) -> torch.Tensor:
        """Samples from the EMA network with the configured solver (class labels cycling 0..9
        for a class-conditional network)."""
        from ..models import ScoreNet
        from .sampling import generate
        if not isinstance(self.ema, ScoreNet):
            raise TypeError(f"draw_samples needs a score network, not a "
                            f"{type(self.ema).__name__} (loss={self.cfg.loss!r})")
        n = n or self.cfg.sample_n
        y = None
        if self.net.num_classes:
            y = torch.arange(n) % self.net.num_classes
        x, _ = generate(self.ema, self.sde, n, solver=self.cfg.sample_solver,
                        steps=self.cfg.sample_steps, seed=self.cfg.seed, y=y)
        return x

    def _sample_grid(self) -> None:
        if self.out_dir is None or self.rank != 0 or self.is_classifier:
            return
        from .images import save_samples_png
        try:
            x = self.draw_samples()
        except ImportError as e:
            if not getattr(self, "_warned_sampler", False):
                warnings.warn(f"sample grids skipped: the solver driver is unavailable ({e})",
                              stacklevel=2)
                self._warned_sampler = True
            return
        nrow = 10 if self.net.num_classes == 10 else None
        save_samples_png(self.out_dir / f"samples_{self.step:07d}.png", x, nrow=nrow)

    def close(self) -> None:
        """Tear down the process group if this trainer created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
