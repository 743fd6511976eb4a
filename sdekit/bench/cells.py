"""The schema of a sweep's cells: what is planned, what a solve measured, what it scored.

A :class:`Cell` is one solver configuration x time grid x NFE budget (or tolerance). The
planner makes it with ``status='planned'`` (or ``'skipped'`` with the reason); solving it adds
a :class:`Run` (``status`` becomes ``'ok'``, ``'diverged'``, ``'skipped'`` or ``'error'``),
evaluating the output adds :class:`Metrics`, and the side-by-side timing rounds add a
:class:`Timing`. :meth:`Cell.to_dict` gives the flat JSON object of ``bench.json``, the cell
cache and the CSV (the keys below, in this order; a group's keys appear once it is set, the
optional keys ``grid_file``, ``tuned``, ``reason`` and ``timing_error`` only when they hold
something), and :meth:`Cell.from_dict` reads it back.

========================  ==========================================================
identity                  solver, label, options, family, kind, order, adaptive, id,
                          grid, [grid_file, tuned], budget, tol
plan and outcome          status, note, steps, expected_nfe
:class:`Run`              nfe, wall_s, ms_per_sample, macs_per_sample, passes
:class:`Metrics`          rms, fd, fd_method, kl, kl_method, sw, mmd
why not ok                [reason]
:class:`Timing`           [timing_error], ms_min, ms_median, timing_repeats
========================  ==========================================================

(This is the order the sweep has always written a fixed-grid cell in; tolerance and tuned
cells once had ``steps, expected_nfe`` before ``status, note``.)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..solvers.base import Solver

#: the statuses of a cell: planned (not solved yet), ok, skipped (the combination is not
#: possible: budget below the solver's minimum cost, a grid it rejects), diverged (NaN/Inf or an
#: error far above the data's scale) and error (an unexpected exception)
STATUSES = ("planned", "ok", "skipped", "diverged", "error")


@dataclass
class Run:
    """What one solve measured: NFE from the call counter, its wall time, its compute."""

    nfe: int
    wall_s: float | None = None            # None only in a document that leaves it out
    ms_per_sample: float | None = None
    macs_per_sample: float | None = None   # None in results written before MACs were counted
    passes: float | None = None            # None where the model is not a counted network


@dataclass
class Metrics:
    """The quality of one output (None where a metric does not apply; see ``METRIC_DOCS``)."""

    rms: float | None = None
    fd: float | None = None
    fd_method: str | None = None
    kl: float | None = None
    kl_method: str | None = None
    sw: float | None = None
    mmd: float | None = None


@dataclass
class Timing:
    """The side-by-side wall time per sample [ms] over ``timing_repeats`` interleaved solves."""

    ms_min: float
    ms_median: float
    timing_repeats: int


_RUN = tuple(f.name for f in fields(Run))
_METRICS = tuple(f.name for f in fields(Metrics))
_TIMING = tuple(f.name for f in fields(Timing))
#: what :meth:`Cell.from_dict` reads for an identity key a document leaves out (a hand-written
#: or partial one: the reports need only the keys they show)
_ABSENT: dict[str, Any] = {"solver": "", "label": "", "family": None, "kind": None,
                           "order": None, "adaptive": False, "id": "", "grid": None,
                           "budget": None, "tol": None, "steps": None, "expected_nfe": None}
#: the numeric values a report can ask a cell for by name (:meth:`Cell.value`)
VALUES = ("nfe", "wall_s", "ms_per_sample", "macs_per_sample", "passes", "rms", "fd", "kl",
          "sw", "mmd", "ms_min", "ms_median")


@dataclass
class Cell:
    """One cell of a sweep, planned or with its results (see the module docstring)."""

    solver: str                  # registry name
    label: str                   # the solver configuration: name(option=value,...)
    options: dict[str, Any]
    family: str | None
    kind: str | None             # "ODE" or "SDE"
    order: int | None
    adaptive: bool
    id: str                      # label/grid/nfe=budget, label/tol=tol or a tuned grid's id
    grid: str | None             # None for tolerance cells
    budget: int | None           # None for tolerance cells
    tol: float | None            # rtol = atol of a tolerance cell, else None
    steps: int | None            # planned, then measured
    expected_nfe: int | None     # declared by the solver for ``steps`` (None: adaptive)
    status: str = "planned"
    note: str = ""
    reason: str | None = None    # why skipped / diverged / error
    grid_file: str | None = None  # a tuned grid's file
    tuned: bool = False
    run: Run | None = None
    metrics: Metrics | None = None
    timing: Timing | None = None
    timing_error: str | None = None
    #: the configured solver the cell runs (built once, by the planner; not serialised)
    built: Solver | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"cell {self.id!r}: status={self.status!r} is invalid: expected "
                             f"one of {STATUSES}")

    # ------------------------------------------------------------ JSON form
    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object (keys in the order of the module docstring)."""
        d: dict[str, Any] = {"solver": self.solver, "label": self.label,
                             "options": self.options, "family": self.family, "kind": self.kind,
                             "order": self.order, "adaptive": self.adaptive, "id": self.id,
                             "grid": self.grid}
        if self.grid_file is not None:
            d["grid_file"] = self.grid_file
        if self.tuned:
            d["tuned"] = True
        d.update(budget=self.budget, tol=self.tol, status=self.status, note=self.note,
                 steps=self.steps, expected_nfe=self.expected_nfe)
        for part in (self.run, self.metrics):
            if part is not None:
                d.update(asdict(part))
        if self.reason is not None:
            d["reason"] = self.reason
        if self.timing_error is not None:
            d["timing_error"] = self.timing_error
        if self.timing is not None:
            d.update(asdict(self.timing))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Cell) -> Cell:
        """The cell of a JSON object written by :meth:`to_dict` (a ``Cell`` is returned as
        is). Identity keys it leaves out read as in ``_ABSENT`` (None, '' or False), so a
        partial document still reports; a key outside the schema raises a ``ValueError``."""
        if isinstance(d, Cell):
            return d
        groups = _RUN + _METRICS + _TIMING
        known = {f.name for f in fields(cls)} - {"run", "metrics", "timing", "built"}
        unknown = sorted(set(d) - known - set(groups))
        if unknown:
            raise ValueError(f"cell {d.get('id')!r}: unknown key(s) {unknown}: a cell has the "
                             f"keys {sorted(known | set(groups))}")
        core = {**_ABSENT, "options": {}, **{k: d[k] for k in known if k in d}}
        cell = cls(**core)
        if "nfe" in d:
            cell.run = Run(**{k: d[k] for k in _RUN if k in d})
        if any(k in d for k in _METRICS):
            cell.metrics = Metrics(**{k: d[k] for k in _METRICS if k in d})
        if any(k in d for k in _TIMING):
            missing = [k for k in _TIMING if k not in d]
            if missing:
                raise ValueError(f"cell {d.get('id')!r}: timing key(s) {missing} missing: a "
                                 f"timed cell has all of {list(_TIMING)}")
            cell.timing = Timing(**{k: d[k] for k in _TIMING})
        return cell

    # ------------------------------------------------------------ reading by name
    def value(self, name: str) -> Any:
        """The measured value ``name`` (one of :data:`VALUES`), None where it is not set."""
        for part, names in ((self.run, _RUN), (self.metrics, _METRICS),
                            (self.timing, _TIMING)):
            if name in names:
                return None if part is None else getattr(part, name)
        raise KeyError(f"{name!r} is not a measured value of a cell: expected one of {VALUES}")

    def ok(self) -> bool:
        return self.status == "ok"

    def __getitem__(self, key: str) -> Any:
        """Read access by JSON key, for code written against the dict form (``KeyError`` where
        the key is absent from :meth:`to_dict`)."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()


__all__ = ["Cell", "Run", "Metrics", "Timing", "STATUSES", "VALUES"]
