"""Operator distillation (DSNO, Zheng et al. 2023): teacher trajectories on disk, then a
one-pass :class:`~sdekit.models.fno.TrajectoryOperator` trained to reproduce them.

1. :func:`generate_trajectories` solves the probability-flow ODE from prior draws with any
   registered solver and stores the states at K output times, in shards written atomically;
   ``meta.json`` records the teacher's settings (and, for a checkpoint teacher, its weights'
   content hash), and a rerun resumes at the first missing shard (and refuses a directory made
   with other settings or another teacher); a shard that fails its content hash is regenerated.
2. :func:`train_operator` regresses the trajectories with the weighted L2 loss
   ``sum_k w_k |pred_k - target_k|^2``, ``w_k = clamp(sqrt(SNR_k), 1, 1e4)`` (the paper's weights;
   L2 instead of LPIPS; for digits, ``feature_loss`` adds a feature-space term on the last slot
   in the features of a network that is not the FD-digits one), Adam, EMA, atomic checkpoints
   and exact resume. The backbone runs
   either once per output time (``backbone_at="slots"``, beside a least-squares linear path:
   exact for a linear teacher) or once at ``x_T``'s own noise level (``"start"``, each slot
   starting from its one-step DDIM estimate: a teacher-initialised operator begins as the
   teacher's 1-NFE DDIM and costs one backbone evaluation per sample). With ``adversarial``
   (:class:`AdversarialSettings`) a second stage adds a GAN loss on fresh prior draws against
   the teacher's endpoints; with :class:`DistributionMatchingSettings` it adds DMD's
   distribution-matching loss instead, the teacher's score against a fake score trained on the
   operator's samples (both in :mod:`sdekit.training.adversarial`).

The operator checkpoint records the teacher's ``weights_sha256``; the ``fno`` solver refuses a
teacher model whose loaded weights carry another one (:func:`check_teacher`).
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._io import IntegrityError, atomic_write_bytes, content_hash, load_verified, save_verified
from ._utils import is_real, require
from .dynamics.parameterization import DiffusionModel
from .grids import make_grid
from .integrate import sample
from .noise import sample_seeds
from .sde.base import ForwardSDE
from .training.adversarial import AdversarialTerm, DistributionMatchingTerm
from .training.checkpoint import CheckpointError, load_state
from .training.trainer import FitLoop, FitSettings

if TYPE_CHECKING:
    from .models.fno import TrajectoryOperator

SPACINGS = ("quadratic", "logsnr", "uniform")


def weights_sha256_of(model: Any) -> str | None:
    """The ``weights_sha256`` identity of the network inside ``model`` (set by
    :func:`sdekit.training.checkpoint.load_model`), found through the wrappers (the call
    counter, a conditioning wrapper); None for a network not loaded from a checkpoint."""
    seen: list[Any] = [model]
    for _ in range(6):
        nxt = []
        for obj in seen:
            h = getattr(obj, "weights_sha256", None)
            if isinstance(h, str):
                return h
            nxt += [getattr(obj, a) for a in ("net", "fn", "model") if hasattr(obj, a)]
        seen = nxt
    return None


def check_teacher(config: dict[str, Any], model: Any, operator: str = "the operator") -> None:
    """Raise a ValueError when ``model``'s weights are known and are not the teacher's the
    operator was distilled from (nothing to check for a model not loaded from a checkpoint, or
    an operator from an older sdekit)."""
    want, have = config.get("teacher_sha256"), weights_sha256_of(model)
    if want and have and want != have:
        raise ValueError(f"{operator} was distilled from a teacher with weights sha256 "
                         f"{want[:16]}..., but the model's weights have sha256 {have[:16]}...: "
                         f"use the operator distilled from this checkpoint (teacher: "
                         f"{config.get('teacher') or '?'})")


def output_times(sde: ForwardSDE, slots: int = 4, spacing: str = "quadratic",
                 t_end: float | None = None) -> Tensor:
    """K decreasing output times after ``sde.T``, the last one ``t_end`` (default ``t_min``)."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r} is invalid: expected one of {SPACINGS}")
    if not (isinstance(slots, int) and slots >= 1):
        raise ValueError(f"slots={slots!r} is invalid: expected an integer >= 1")
    return make_grid(sde, spacing, slots, t_end=t_end)[1:]


def teacher_grid(sde: ForwardSDE, times_out: Tensor, steps_per_segment: int) -> Tensor:
    """A grid from T through every output time, ``steps_per_segment`` logSNR-uniform steps
    between consecutive ones (so the output times are grid points)."""
    knots = torch.cat([torch.tensor([sde.T], dtype=torch.float64), times_out.double()])
    parts = [make_grid(sde, "logsnr", steps_per_segment, t_start=float(a), t_end=float(b))[:-1]
             for a, b in zip(knots[:-1], knots[1:])]
    return torch.cat(parts + [knots[-1:]])


#: The teacher where the forward process starts at alpha = 0 (flow matching at t = 1, where Heun
#: cannot start: it steps with the SDE's f and g, infinite there): a data-prediction multistep
#: solver of order 3, whose first step from alpha = 0 is in closed form (one NFE per step: on the
#: same teacher grid, half Heun's NFE; on the Gaussian flow its error at 8 and 16 steps per
#: segment is about Heun's on VP, tests/test_distill_flow.py).
ALPHA_ZERO_TEACHER: tuple[str, dict[str, Any]] = ("unipc_bh2", {"order": 3})


def teacher_solver(sde: ForwardSDE, solver: str | None = None,
                   solver_options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` of the teacher solver: ``solver`` with ``solver_options`` as given,
    or (``solver=None``) Heun, or :data:`ALPHA_ZERO_TEACHER` where the process starts at
    alpha = 0. A given solver that is unknown, runs its own loop, is stochastic or cannot
    start there is refused (a ValueError naming what would be valid), before any work."""
    from .solvers import get_solver
    from .solvers.base import FixedGridSolver
    from .solvers.registry import alpha_zero_starters
    options = dict(solver_options or {})
    at_zero = sde.alpha_zero_at_T
    if solver is None:
        if not at_zero:
            return "heun", options
        name, auto = ALPHA_ZERO_TEACHER
        return name, {**auto, **options}
    slv = get_solver(solver, **options)   # an unknown name or option: refused here
    if not isinstance(slv, FixedGridSolver):
        raise ValueError(f"solver={solver!r} is invalid for the teacher: it runs its own loop "
                         "(adaptive, external or learned), but the trajectories are read at "
                         "grid times: expected a fixed-grid solver such as 'heun', 'dpmpp_3m' "
                         "or 'unipc_bh2'")
    if slv.stochastic:
        raise ValueError(f"solver={solver!r} is invalid for the teacher: it is stochastic, so "
                         "its trajectory is not a function of x_T and the operator would learn "
                         "the average of its draws: expected a deterministic solver such as "
                         "'heun', 'dpmpp_3m' or 'unipc_bh2'")
    if at_zero and not slv.starts_at_alpha_zero:
        raise ValueError(f"solver={solver!r} cannot start the teacher trajectories at "
                         f"T={sde.T:g}, where alpha = 0 ({sde!r}): use one of "
                         f"{alpha_zero_starters()}, or leave "
                         f"the solver unset ({ALPHA_ZERO_TEACHER[0]} of order 3 there)")
    return solver, options


def generate_trajectories(path: str | Path, sde: ForwardSDE, model: DiffusionModel,
                          state_shape: Sequence[int], n: int, *, solver: str | None = None,
                          steps_per_segment: int = 16, slots: int = 4,
                          spacing: str = "quadratic", shard_size: int = 256, seed: int = 0,
                          teacher: str = "", teacher_sha256: str | None = None,
                          progress: bool = False, **solver_options: Any) -> Path:
    """Write (or finish writing) a teacher-trajectory dataset in directory ``path``.

    ``x_T`` are prior draws (per-sample seeds from ``seed``); the states at the K output times
    come from ``solver`` on :func:`teacher_grid` (default: Heun, or where the process starts at
    alpha = 0 the data-prediction solver :data:`ALPHA_ZERO_TEACHER`, recorded in ``meta.json``:
    :func:`teacher_solver`). ``teacher`` is a free-text description of the
    model, recorded in ``meta.json`` and in the operator's checkpoint; ``teacher_sha256`` its
    weights' identity (default: :func:`weights_sha256_of` the model). A rerun resumes when the
    settings and the teacher's identity (its weights' hash where known, else the description)
    are the same; existing shards that fail to load are regenerated with a warning."""
    path = Path(path)
    solver, solver_options = teacher_solver(sde, solver, solver_options)
    times_out = output_times(sde, slots, spacing)
    grid = teacher_grid(sde, times_out, steps_per_segment)
    teacher_sha256 = teacher_sha256 or weights_sha256_of(model)
    meta: dict[str, Any] = {
            "teacher": teacher, "teacher_sha256": teacher_sha256, "sde": repr(sde),
            "solver": solver, "solver_options": solver_options,
            "steps_per_segment": steps_per_segment, "spacing": spacing,
            "times_out": [float(t) for t in times_out], "t_start": sde.T, "n": int(n),
            "shard_size": int(shard_size), "seed": int(seed),
            "state_shape": [int(s) for s in state_shape], "teacher_nfe": None}
    path.mkdir(parents=True, exist_ok=True)
    mfile = path / "meta.json"
    if mfile.exists():
        _check_resumed_meta(mfile, meta)
    else:  # settings first, so an interrupted run is only ever resumed with the same ones
        atomic_write_bytes(mfile, json.dumps(meta, indent=1).encode())
    seeds = sample_seeds(seed, n)
    shards = range(math.ceil(n / shard_size))
    if progress:
        from tqdm.auto import tqdm
        shards = tqdm(shards, desc="teacher trajectories")
    for j in shards:
        f = path / f"shard_{j:05d}.pt"
        if f.exists():
            try:
                _load_shard(f)
                continue
            except ValueError as e:
                warnings.warn(f"{e}; regenerating it", stacklevel=2)
        s = seeds[j * shard_size:(j + 1) * shard_size]
        with torch.no_grad():
            sol = sample(sde, model, shape=(len(s),) + tuple(state_shape), solver=solver,
                         grid=grid, seeds=s, save_at=[sde.T] + meta["times_out"],
                         **solver_options)
        traj = torch.stack([sol.trajectory[t] for t in meta["times_out"]], 1)
        save_verified(f, {"x_T": sol.trajectory[sde.T].float(), "traj": traj.float()})
        meta["teacher_nfe"] = sol.nfe
    atomic_write_bytes(mfile, json.dumps(meta, indent=1).encode())
    return path


def _check_resumed_meta(mfile: Path, meta: dict[str, Any]) -> None:
    """Refuse to resume the dataset of ``mfile`` with other settings than ``meta``'s; takes
    its ``teacher_nfe`` into ``meta``. The teacher is identified by its weights where both
    know them, not by the description (a path as typed)."""
    old = _read_meta(mfile)
    skip = {"teacher_nfe", "teacher" if meta["teacher_sha256"] and old.get("teacher_sha256")
            else "teacher_sha256"}
    for k in meta:
        if k not in skip and old.get(k) != meta[k]:
            raise ValueError(f"{mfile} was made with {k}={old.get(k)!r}, not {meta[k]!r}: "
                             "use another directory or the same settings")
    meta["teacher_nfe"] = old.get("teacher_nfe")


def _read_meta(mfile: Path) -> dict[str, Any]:
    try:
        meta = json.loads(mfile.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{mfile} is unreadable ({type(e).__name__}: {e}): the dataset's "
                         "settings are unknown, so remove the directory to start over") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{mfile} does not hold a JSON object: remove the directory to start "
                         "over")
    return meta


def _load_shard(f: Path) -> dict[str, Tensor]:
    """One shard, its content hash checked; a ValueError naming the file otherwise."""
    try:
        part = load_verified(f, "trajectory shard")
    except IntegrityError as e:
        raise ValueError(str(e)) from None
    if not all(isinstance(part.get(k), Tensor) for k in ("x_T", "traj")):
        raise ValueError(f"trajectory shard {str(f)!r} lacks the tensors 'x_T' and 'traj'")
    return part


def load_trajectories(path: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``(x_T (N, *shape), traj (N, K, *shape), meta)`` from a finished dataset directory.
    A shard that fails to load (or its content hash) is named in the error; rerunning
    :func:`generate_trajectories` (or ``sdekit distill``) with the same settings regenerates
    it."""
    path = Path(path)
    mfile = path / "meta.json"
    if not mfile.exists():
        raise FileNotFoundError(f"{path} is not a trajectory dataset (no meta.json)")
    meta = _read_meta(mfile)
    k = math.ceil(meta["n"] / meta["shard_size"])
    files = [path / f"shard_{j:05d}.pt" for j in range(k)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(f"trajectory dataset {path} is incomplete ({len(missing)} of {k} shards "
                         "missing): rerun generate_trajectories with the same settings to resume")
    parts = []
    for f in files:
        try:
            parts.append(_load_shard(f))
        except ValueError as e:
            raise ValueError(f"{e}: rerun generate_trajectories (or `sdekit distill`) with the "
                             "same settings to regenerate it") from None
    return (torch.cat([p["x_T"] for p in parts]), torch.cat([p["traj"] for p in parts]), meta)


def default_backbone(state_shape: Sequence[int]) -> dict[str, Any]:
    """A small MLP for vectors, a small U-Net for square images."""
    shape = [int(s) for s in state_shape]
    if len(shape) == 1:
        return {"name": "mlp", "data_shape": shape, "width": 256, "depth": 3}
    return {"name": "unet", "in_channels": shape[0], "image_size": shape[-1],
            "base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
            "attn_resolutions": []}


def build_operator(config: dict[str, Any], init_backbone: dict | None = None,
                   source: str | Path = "") -> TrajectoryOperator:
    """The operator of ``config``; ``init_backbone`` (a state dict of the backbone's network,
    named by ``source`` in errors) is loaded into the backbone before any folding of its
    noise-level input (``fold_time``)."""
    from .models import build_network
    from .models.fno import TrajectoryOperator
    o = config["operator"]
    net = build_network(config["backbone"])
    if init_backbone is not None:
        load_state(net, init_backbone, source, "backbone initialisation")
    return TrajectoryOperator(net, config["state_shape"],
                              config["lambdas"], width=o["width"], layers=o["layers"],
                              modes=o["modes"], skip=o["skip"], experts=o.get("experts", 1),
                              start=o.get("start"), coeffs=o.get("coeffs"),
                              fold_time=o.get("fold_time", False))


def _operator_config(data: str | Path, sde: ForwardSDE, meta: dict[str, Any],
                     backbone: dict | None, *, width: int, layers: int, modes: int,
                     experts: int, backbone_at: str, train: dict[str, Any],
                     fold_time: bool = False) -> dict[str, Any]:
    """The operator checkpoint's config: the operator (backbone, output times and their
    lambdas, ``backbone_at='start'``'s coefficients), the teacher's description and weights
    hash, the SDE's repr and the training settings ``train`` (with the dataset's path and
    content hash)."""
    shape = tuple(meta["state_shape"])
    operator: dict[str, Any] = {"width": width, "layers": layers, "modes": modes,
                                "experts": experts, "skip": "full" if len(shape) == 1 else "scalar"}
    if backbone_at == "start":
        t_out = torch.tensor(meta["times_out"], dtype=torch.float64)
        t0 = torch.tensor(float(meta["t_start"]), dtype=torch.float64)
        operator.update(start=[float(sde.alpha(t0)), float(sde.sigma(t0))],
                        coeffs=[sde.alpha(t_out).tolist(), sde.sigma(t_out).tolist()])
    if fold_time:   # recorded only when used, so older checkpoints still resume
        operator["fold_time"] = True
    data_id = content_hash({k: v for k, v in meta.items() if k not in ("teacher", "teacher_nfe")})
    # the teacher solver is recorded where it is not Heun by default (alpha = 0 at T: no
    # operator checkpoint from an older sdekit exists there, so every other one still resumes)
    solver = ({"teacher_solver": {"name": meta["solver"], "options": meta["solver_options"]}}
              if sde.alpha_zero_at_T else {})
    return {"kind": "operator", **solver, "teacher": meta.get("teacher", ""),
            "teacher_sha256": meta.get("teacher_sha256"), "sde_repr": repr(sde),
            "state_shape": list(shape), "times_out": meta["times_out"],
            "t_start": meta["t_start"],
            "lambdas": [float(sde.lambda_(t)) for t in meta["times_out"]],
            "backbone": backbone or default_backbone(shape), "operator": operator,
            "train": {**train, "data": str(data), "data_sha256": data_id}}


class _OperatorFit(FitLoop):
    """:class:`~sdekit.training.trainer.FitLoop` on a trajectory dataset: the weighted L2 loss
    ``sum_k w_k |pred_k - target_k|^2`` (plus the feature-space term: :func:`_objective`) on a
    batch of ``batch`` trajectories drawn with a
    generator seeded by ``(seed, step)``."""

    resume_hint = "remove it or use the same settings to resume"
    adam_betas = (0.9, 0.999)    # torch's defaults
    desc = "operator"

    def __init__(self, op: torch.nn.Module, x_T: Tensor, traj: Tensor, config: dict[str, Any],
                 out: Path, fit: FitSettings, *, batch: int, seed: int,
                 progress: bool) -> None:
        super().__init__(op, torch.optim.Adam(op.parameters(), lr=fit.lr, betas=self.adam_betas),
                         fit, checkpoint_path=out, progress=progress, desc=self.desc)
        self.x_T, self.traj, self.config, self.batch, self.seed = x_T, traj, config, batch, seed
        w = torch.tensor(config["lambdas"]).exp().clamp(1, 1e4)   # clamp(sqrt(SNR_k), 1, 1e4)
        w = (w / w.mean()).reshape((1, -1) + (1,) * (traj.dim() - 2))
        self.objective = _objective(w, config["train"].get("feature_loss", 0.0),
                                    tuple(config["state_shape"]))

    def batch_generator(self, step: int) -> torch.Generator:
        """The generator of step ``step``'s draws (counter-based: a resumed run draws the
        batches an uninterrupted one would)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def draw(self, g: torch.Generator) -> Tensor:
        """``batch`` trajectory indices."""
        return torch.randint(0, self.x_T.shape[0], (self.batch,), generator=g)

    def loss_at(self, step: int) -> Tensor:
        idx = self.draw(self.batch_generator(step))
        return self.objective(self.net(self.x_T[idx]), self.traj[idx])

    def saved_config(self) -> dict[str, Any]:
        return self.config

    def resume_keys(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Everything must match but the step target (resuming may extend a run) and the
        paths as typed (the data is identified by ``data_sha256``, a hashed teacher by
        ``teacher_sha256``)."""
        must = {k: v for k, v in config.items() if k != "train"
                and (k != "teacher" or not config.get("teacher_sha256"))}
        must.update({f"train.{k}": v for k, v in config["train"].items()
                     if k not in ("steps", "data")})
        return must, {}


@dataclass(frozen=True)
class AdversarialSettings:
    """The adversarial stage of :func:`train_operator`: ``steps`` more steps from the L2-trained
    operator, adding ``weight`` times the non-saturating GAN loss of the last slot on fresh prior
    draws against the teacher's endpoints (:mod:`sdekit.training.adversarial`); Adam with betas
    (0.5, 0.99) at the constant rate ``lr`` for the operator and ``disc_lr`` for the
    discriminator, EMA decay ``ema_decay``. Invalid values raise a ValueError naming them."""

    weight: float
    steps: int = 2500
    lr: float = 2e-4
    disc_lr: float = 1e-3
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        _check_stage(self, "adversarial", ("lr", "disc_lr"))


@dataclass(frozen=True)
class DistributionMatchingSettings:
    """The distribution-matching stage of :func:`train_operator` (DMD, Yin et al. 2024;
    :class:`~sdekit.training.adversarial.DistributionMatchingTerm`): ``steps`` more steps from
    the L2-trained operator, adding ``weight`` times the DMD loss of the last slot on fresh prior
    draws, the teacher's score against a fake score (a copy of the teacher's network) trained
    ``fake_steps`` times per step at the rate ``fake_lr``; Adam with betas (0, 0.99) at the
    constant rate ``lr`` for the operator, EMA decay ``ema_decay``. Needs the teacher's
    checkpoint (``train_operator(teacher=...)``). The default weight, 30, is the best of 2.5,
    10, 30 and 100 on the bundled digits model (benchmarks/results/operator/digits/dmd/).
    Invalid values raise a ValueError naming them."""

    weight: float = 30.0
    steps: int = 1500
    lr: float = 5e-5
    fake_lr: float = 2e-4
    fake_steps: int = 4
    ema_decay: float = 0.995

    def __post_init__(self) -> None:
        _check_stage(self, "distribution matching", ("lr", "fake_lr"))
        require(isinstance(self.fake_steps, int) and self.fake_steps >= 1,
                "distribution matching fake_steps", self.fake_steps, "an integer >= 1")


def _check_stage(stage: Any, what: str, rates: tuple[str, ...]) -> None:
    """Check a second stage's weight, steps, learning rates ``rates`` and EMA decay, naming
    a bad one as ``'<what> <field>'``."""
    require(is_real(stage.weight) and stage.weight > 0, f"{what} weight", stage.weight,
            "a finite number > 0")
    require(isinstance(stage.steps, int) and stage.steps >= 1, f"{what} steps", stage.steps,
            "an integer >= 1")
    for name in rates:
        v = getattr(stage, name)
        require(is_real(v) and v > 0, f"{what} {name}", v, "a finite number > 0")
    require(is_real(stage.ema_decay) and 0 <= stage.ema_decay < 1, f"{what} ema_decay",
            stage.ema_decay, "0 <= ema_decay < 1")


Stage = AdversarialSettings | DistributionMatchingSettings


class _AdversarialFit(_OperatorFit):
    """The second stage (:class:`AdversarialSettings` or :class:`DistributionMatchingSettings`):
    the L2 loss of :class:`_OperatorFit` on a batch of trajectories plus ``weight`` times the
    stage's term on the last slot from ``batch`` fresh prior draws. The GAN term first takes one
    discriminator step on teacher endpoints (another batch) against those samples; the DMD term
    (``matching``: the teacher's network ``net`` and its training ``loss``) updates its fake
    score on them. The batches and draws come from a generator seeded by ``(seed, step)``; the
    term's networks and optimiser are checkpointed (:meth:`extra_state`), so a resumed run
    continues exactly."""

    desc = "operator (adversarial)"

    def __init__(self, op: torch.nn.Module, x_T: Tensor, traj: Tensor, config: dict[str, Any],
                 out: Path, fit: FitSettings, *, batch: int, seed: int, progress: bool,
                 sde: ForwardSDE, stage: Stage, matching: tuple[Any, Any] | None) -> None:
        self.matching = isinstance(stage, DistributionMatchingSettings)
        self.adam_betas = (0.0, 0.99) if self.matching else (0.5, 0.99)   # as usual for GANs
        if self.matching:
            self.desc = "operator (distribution matching)"
        super().__init__(op, x_T, traj, config, out, fit, batch=batch, seed=seed,
                         progress=progress)
        self.prior_std, self.weight = sde.prior_std, stage.weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            if isinstance(stage, DistributionMatchingSettings):
                assert matching is not None
                self.adv: Any = DistributionMatchingTerm(
                    matching[0], sde, matching[1], lr=stage.fake_lr, fake_steps=stage.fake_steps)
            else:
                self.adv = AdversarialTerm(tuple(config["state_shape"]), lr=stage.disc_lr)

    def loss_at(self, step: int) -> Tensor:
        g = self.batch_generator(step)
        idx, ridx = self.draw(g), self.draw(g)
        l2 = self.objective(self.net(self.x_T[idx]), self.traj[idx])
        z = self.prior_std * torch.randn((self.batch,) + tuple(self.x_T.shape[1:]), generator=g)
        fake = self.net(z)[:, -1]
        term = (self.adv.step(fake, g) if self.matching
                else self.adv.step(self.traj[ridx, -1], fake))
        return l2 + self.weight * term

    def extra_state(self) -> dict[str, Any]:
        return {"adversarial": self.adv.full_state()}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        if "adversarial" not in extra:
            what = "fake score" if self.matching else "discriminator"
            raise CheckpointError(f"checkpoint {str(self.checkpoint_path)!r} holds no "
                                  f"{what} state, so its second stage cannot resume: "
                                  "remove it to restart that stage")
        self.adv.load_full_state(extra["adversarial"])


def train_operator(data: str | Path, out: str | Path, sde: ForwardSDE, *,
                   backbone: dict | None = None, init_backbone: dict | None = None,
                   width: int = 64, layers: int = 2, modes: int = 2, experts: int = 1,
                   backbone_at: str = "slots", fold_time: bool = False, steps: int = 2000,
                   batch: int = 128, lr: float = 2e-4, warmup: int = 100,
                   lr_decay: str = "cosine", grad_clip: float = 1.0, ema_decay: float = 0.999,
                   seed: int = 0, checkpoint_every: int = 500, until: int | None = None,
                   feature_loss: float = 0.0,
                   adversarial: Stage | None = None, teacher: str | Path | None = None,
                   progress: bool = False) -> torch.nn.Module:
    """Train (or resume training) an operator on a trajectory dataset; returns the EMA operator.

    ``backbone_at``: ``"slots"`` runs the backbone on ``x_T`` once per output time (conditioned
    on it) beside a least-squares-fitted linear path; ``"start"`` runs it once, at ``x_T``'s own
    noise level as the teacher does, and starts every slot from the one-step DDIM estimate
    (with ``init_backbone`` the untrained operator is the teacher's 1-NFE DDIM).
    ``fold_time`` (``"start"`` only) folds the backbone's noise-level input, constant there, into
    per-block constants after ``init_backbone`` is loaded: a smaller network computing the same
    function (:meth:`~sdekit.models.embedding.ScoreNet.fix_noise_level`).

    The checkpoint at ``out`` stores the operator config (backbone, output times and their
    lambdas, the teacher's description and weights hash, the SDE's repr), weights, EMA,
    optimiser and step. Resuming is keyed on content (the teacher's hash, the dataset's
    settings), not on how the paths were spelled.
    The loop is :class:`~sdekit.training.trainer.FitLoop`'s (Adam): the learning rate warms up
    over ``warmup`` steps, then follows ``lr_decay`` ("cosine" to 0 at ``steps``, or
    "constant"); gradients are clipped to norm ``grad_clip`` (0: no clipping); a NaN or
    infinite loss stops with :class:`~sdekit.training.trainer.TrainingDiverged`, keeping the
    last checkpoint. ``until`` stops (with a checkpoint) before ``steps``: a later call resumes
    exactly where it stopped.
    ``feature_loss`` > 0 adds that multiple of a feature-space loss on the last slot (digits
    states only: :func:`sdekit.training.feature_loss.digits_feature_loss`, a network that is
    not the FD-digits evaluation network) to the L2 loss.
    ``adversarial`` (:class:`AdversarialSettings`) adds a second stage: the L2-trained operator
    is checkpointed at ``out``'s name with ``_l2`` added (``operator_l2.pt``), then trained
    ``adversarial.steps`` more steps with a GAN loss on fresh prior draws (the teacher's
    endpoints as the real samples) into ``out``; its config records the first stage's weights
    hash, and both stages resume. ``until`` counts the steps of both stages.
    :class:`DistributionMatchingSettings` as ``adversarial`` makes that second stage DMD's
    instead; it needs ``teacher``, the teacher's training checkpoint (its weights must be those
    that made the trajectories, where they recorded them).
    """
    require(isinstance(batch, int) and batch >= 1, "batch", batch, "an integer >= 1")
    require(isinstance(checkpoint_every, int) and checkpoint_every >= 1, "checkpoint_every",
            checkpoint_every, "an integer >= 1")
    require(isinstance(grad_clip, (int, float)) and grad_clip >= 0, "grad_clip", grad_clip,
            "a number >= 0 (0 or inf: no clipping)")
    check_backbone_at(sde, backbone_at)
    check_fold_time(fold_time, backbone_at, backbone)
    require(is_real(feature_loss) and feature_loss >= 0, "feature_loss", feature_loss,
            "a number >= 0")
    fit = FitSettings(steps=steps, lr=lr, warmup=warmup, lr_decay=lr_decay,
                      grad_clip=grad_clip or math.inf, ema_decay=ema_decay,
                      ckpt_every=checkpoint_every)
    matching = _matching_teacher(teacher, adversarial)
    x_T, traj, meta = load_trajectories(data)
    if meta["sde"] != repr(sde):
        raise ValueError(f"the trajectories were made with {meta['sde']}, not {sde!r}")
    check_feature_loss(feature_loss, meta["state_shape"])
    train = {"steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "lr_decay": lr_decay,
             "grad_clip": grad_clip, "ema_decay": ema_decay, "seed": seed,
             "init_backbone": init_backbone is not None}
    if feature_loss:  # recorded only when used, so older checkpoints still resume
        train["feature_loss"] = feature_loss
    config = _operator_config(data, sde, meta, backbone, width=width, layers=layers,
                              modes=modes, experts=experts, backbone_at=backbone_at, train=train,
                              fold_time=fold_time)
    want = config.get("teacher_sha256")
    have = weights_sha256_of(matching[0]) if matching is not None else None
    if want and have and want != have:
        raise ValueError(f"teacher {str(teacher)!r} has weights sha256 "
                         f"{have[:16]}..., but the trajectories "
                         f"{str(data)!r} were made by weights {want[:16]}...: give the "
                         "checkpoint that made them")
    torch.manual_seed(seed)
    out = Path(out)
    first = out.with_name(f"{out.stem}_l2{out.suffix}") if adversarial else out
    fresh = not first.exists()   # a resumed run takes every weight from its checkpoint
    op = build_operator(config, init_backbone if fresh else None, data)
    if fresh and backbone_at == "slots":
        op.fit_linear_path(x_T, traj, seed=seed)
    loop = _OperatorFit(op, x_T, traj, config, first, fit, batch=batch, seed=seed,
                        progress=progress)
    loop.resume()
    loop.train(until)
    if steps == 0:   # the untrained operator (e.g. the teacher's 1-NFE DDIM)
        loop.save()
    if adversarial is None or (until is not None and until <= steps):
        return loop.ema
    return _adversarial_stage(loop, out, sde, adversarial, matching,
                              None if until is None else until - steps)


def _matching_teacher(teacher: str | Path | None, stage: Stage | None) -> tuple[Any, Any] | None:
    """``(network, training loss)`` of the teacher checkpoint for a distribution-matching
    stage (None for the others); a missing or superfluous ``teacher`` is refused."""
    if not isinstance(stage, DistributionMatchingSettings):
        require(teacher is None, "teacher", teacher, "None: only the distribution-matching stage "
                "uses the teacher's checkpoint")
        return None
    if teacher is None:
        raise ValueError("teacher=None is invalid with DistributionMatchingSettings: the stage "
                         "trains a copy of the teacher's network, so give its training "
                         "checkpoint (teacher=PATH)")
    from .training.checkpoint import load_model
    from .training.losses import LOSSES, checkpoint_loss
    net, sde, cfg = load_model(teacher)
    if cfg.get("loss") not in LOSSES:
        raise CheckpointError(f"teacher {str(teacher)!r} is not a denoising model (loss "
                              f"{cfg.get('loss')!r}): the distribution-matching stage needs one")
    return net, checkpoint_loss(sde, net, cfg)


def _adversarial_stage(first: _OperatorFit, out: Path, sde: ForwardSDE, adversarial: Stage,
                       matching: tuple[Any, Any] | None, until: int | None
                       ) -> torch.nn.Module:
    """Stage 2 of :func:`train_operator`: from the L2 stage ``first``'s EMA weights, train
    ``adversarial.steps`` steps of :class:`_AdversarialFit` into ``out`` (resuming it there);
    returns its EMA operator."""
    config = first.config
    key = ("distribution_matching" if isinstance(adversarial, DistributionMatchingSettings)
           else "adversarial")
    train = {**config["train"], key: {
        **asdict(adversarial), "init_sha256": content_hash(first.ema.state_dict())}}
    op = build_operator(config)
    op.load_state_dict(first.ema.state_dict())
    fit = FitSettings(steps=adversarial.steps, lr=adversarial.lr, lr_decay="constant",
                      grad_clip=first.fit.grad_clip, ema_decay=adversarial.ema_decay,
                      ckpt_every=first.fit.ckpt_every)
    loop = _AdversarialFit(op, first.x_T, first.traj, {**config, "train": train}, out, fit,
                           batch=first.batch, seed=first.seed, progress=first.progress,
                           sde=sde, stage=adversarial, matching=matching)
    loop.resume()
    loop.train(until)
    return loop.ema


def check_fold_time(fold_time: Any, backbone_at: str, backbone: dict | None) -> None:
    """Raise a ValueError unless ``fold_time`` is a bool, and True only with
    ``backbone_at='start'`` and a backbone without class conditioning."""
    require(fold_time in (False, True), "fold_time", fold_time, "True or False")
    require(not fold_time or backbone_at == "start", "fold_time", fold_time,
            "False with backbone_at='slots' (each slot runs at its own time; fold only with "
            "backbone_at='start')")
    require(not (fold_time and (backbone or {}).get("num_classes")), "fold_time", fold_time,
            "False for a class-conditional backbone (its embedding depends on the label)")


def check_backbone_at(sde: ForwardSDE, backbone_at: str) -> None:
    """Raise a ValueError unless ``backbone_at`` is 'slots' or 'start', and 'start' only where
    the process does not start at alpha = 0 (there x_T's noise level is lambda = -inf, which
    the backbone's time input cannot take, and the one-step DDIM estimate needs a data
    prediction at x_T)."""
    require(backbone_at in ("slots", "start"), "backbone_at", backbone_at, "'slots' or 'start'")
    if backbone_at == "start" and sde.alpha_zero_at_T:
        raise ValueError(f"backbone_at='start' runs the backbone at x_T's noise level, lambda = "
                         f"-inf at T={sde.T:g} where alpha = 0 ({sde!r}): use "
                         "backbone_at='slots' (one pass per output time)")


def check_feature_loss(feature_loss: float, shape: Sequence[int]) -> None:
    """Raise a ValueError unless a feature-space loss of weight ``feature_loss`` applies to
    states of ``shape`` (digit images ``(1, S, S)``; any shape when the weight is 0)."""
    shape = tuple(int(s) for s in shape)
    if feature_loss and (len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]):
        raise ValueError(f"feature_loss={feature_loss} needs digit images (1, S, S), but the "
                         f"states have shape {shape}")


def _objective(w: Tensor, feature_loss: float, shape: tuple[int, ...]
               ) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss ``(pred, target) -> scalar``: the slot-weighted L2 loss, plus
    ``feature_loss`` times the feature-space loss of the last slot."""
    if not feature_loss:
        return lambda pred, target: (w * (pred - target) ** 2).mean()
    check_feature_loss(feature_loss, shape)
    from .training.data import to_source_resolution
    from .training.feature_loss import digits_feature_loss
    feat = digits_feature_loss()

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        a, b = (to_source_resolution(x[:, -1], {"source_size": 8}) for x in (pred, target))
        return (w * (pred - target) ** 2).mean() + feature_loss * feat(a, b)
    return loss


def load_operator(path: str | Path) -> tuple[TrajectoryOperator, dict[str, Any]]:
    """``(operator, config)`` from an operator checkpoint (EMA weights)."""
    from .training.checkpoint import CheckpointError, load_checkpoint, load_state
    ck = load_checkpoint(path)
    cfg = ck["config"]
    if cfg.get("kind") != "operator":
        made = ("a training checkpoint (made by `sdekit train`)" if "net" in cfg
                else "not an operator checkpoint")
        raise CheckpointError(f"{str(path)!r} is {made}, but an operator checkpoint (made by "
                              "`sdekit distill`) is expected here; a training checkpoint is the "
                              "teacher (--checkpoint)")
    op = build_operator(cfg)
    load_state(op, ck["ema"], path, "EMA")
    op.eval()
    return op, cfg
