"""Reports of a sweep: terminal and Markdown tables, JSON, CSV and a log-log PNG plot.

Every function takes the results document of :func:`sdekit.bench.runner.run_sweep` (or the
same JSON read back from ``bench.json``) and reads its cells as
:class:`~sdekit.bench.cells.Cell` objects (the schema is there).

The compact tables are *pivots*: one row per solver configuration with its best grid (the grid
with values at the most budgets and the lowest mean log metric over them), one column per NFE
budget. An entry shows the metric, with the measured NFE in parentheses where it differs from
the budget. Adaptive solvers, swept over tolerances, are listed below with their measured NFE.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from .._io import atomic_write_bytes
from .cells import Cell
from .runner import DIVERGENCE_RULE, ConfigError, atomic_write_json, describe_reference

METRICS = ("rms", "fd", "kl", "sw", "mmd", "ms_per_sample", "passes", "ms_median")
#: compute columns: shown in the cost tables and the full table, not as quality pivots
COST = ("macs_per_sample", "passes", "ms_min", "ms_median")
TITLES = {"rms": "RMS error vs the reference PF-ODE solution",
          "fd": "Frechet distance to the target law",
          "kl": "KL(output || target) [nats]",
          "sw": "sliced Wasserstein distance to held-out samples",
          "mmd": "MMD to held-out samples",
          "ms_per_sample": "wall time per sample [ms]",
          "passes": "compute per sample in teacher passes",
          "ms_median": "wall time per sample, side by side, median [ms]"}
CSV_COLUMNS = ("id", "solver", "label", "options", "family", "kind", "order", "adaptive", "grid",
               "budget", "tol", "steps", "expected_nfe", "nfe", "status", "rms", "fd",
               "fd_method", "kl", "kl_method", "sw", "mmd", "wall_s", "ms_per_sample",
               "macs_per_sample", "passes", "ms_min", "ms_median", "timing_repeats", "reason",
               "note")
FORMATS = ("json", "csv", "md", "png")


def check_metrics(metrics: Iterable[str]) -> None:
    """Raise a :class:`~sdekit.bench.runner.ConfigError` on ``metrics`` naming unknown ones."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ConfigError("metrics", f": unknown metric(s) {bad}: expected any of "
                          f"{list(METRICS)}")


def check_formats(formats: Iterable[str]) -> None:
    """Raise a :class:`~sdekit.bench.runner.ConfigError` on ``formats`` naming unknown ones."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError("formats", f": unknown format(s) {bad}: expected any of "
                          f"{list(FORMATS)}")


class PivotRow(TypedDict):
    """One row of a pivot table: a solver configuration on its best grid."""

    label: str
    grid: str
    kind: str | None
    values: dict[int, Cell]   # budget -> the cell


def cells_of(results: Mapping[str, Any]) -> list[Cell]:
    """The cells of a results document, typed."""
    return [Cell.from_dict(c) for c in results["cells"]]


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}e}" if v != 0 else "0"
    return str(v)


def _log(v: float) -> float:
    return math.log10(max(v, 1e-300))


def _has(c: Cell, metric: str) -> bool:
    """An ok cell with a value of ``metric``."""
    return c.ok() and c.value(metric) is not None


def budgets(results: Mapping[str, Any]) -> list[int]:
    return sorted({c.budget for c in cells_of(results) if c.budget is not None})


def best_grids(results: Mapping[str, Any], metric: str) -> dict[str, str]:
    """label -> the grid with values at the most budgets, then the lowest mean log metric."""
    per: dict[str, dict[str, list[float]]] = {}
    for c in cells_of(results):
        if c.budget is None or c.grid is None or not _has(c, metric):
            continue
        per.setdefault(c.label, {}).setdefault(c.grid, []).append(_log(c.value(metric)))
    return {lab: min(g.items(), key=lambda kv: (-len(kv[1]), sum(kv[1]) / len(kv[1])))[0]
            for lab, g in per.items()}


def pivot(results: Mapping[str, Any], metric: str) -> list[PivotRow]:
    """Rows ``{label, grid, kind, values: {budget: cell}}`` sorted best first (mean log metric
    over the budgets present, rows with more budgets first)."""
    best = best_grids(results, metric)
    rows: dict[str, PivotRow] = {}
    for c in cells_of(results):
        if c.budget is None or c.grid is None or best.get(c.label) != c.grid:
            continue
        row = rows.setdefault(c.label, {"label": c.label, "grid": c.grid, "kind": c.kind,
                                        "values": {}})
        row["values"][c.budget] = c

    def key(r: PivotRow) -> tuple[int, float]:
        vals = [_log(c.value(metric)) for c in r["values"].values() if _has(c, metric)]
        return (-len(vals), sum(vals) / len(vals) if vals else 0.0)

    return sorted(rows.values(), key=key)


def adaptive_rows(results: Mapping[str, Any]) -> list[Cell]:
    return [c for c in cells_of(results) if c.tol is not None]


def _entry(c: Cell | None, metric: str, budget: int) -> str:
    if c is None:
        return ""
    if not c.ok():
        return c.status
    v = c.value(metric)
    s = fmt(v)
    if v is not None and c.run is not None and c.run.nfe != budget:
        s += f" ({c.run.nfe})"
    return s


def metrics_present(results: Mapping[str, Any]) -> list[str]:
    cells = cells_of(results)
    return [m for m in METRICS if any(c.value(m) is not None for c in cells)]


def _nfe(c: Cell) -> str:
    return "-" if c.run is None else str(c.run.nfe)


# ------------------------------------------------------------------ text tables
def _table(header: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool) -> str:
    rows = [list(map(str, r)) for r in rows]
    if markdown:
        out = ["| " + " | ".join(header) + " |",
               "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(s.ljust(w[i]) if i < 2 else s.rjust(w[i])  # noqa: E731
                               for i, s in enumerate(r))
    return "\n".join([line(header), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def pivot_table(results: Mapping[str, Any], metric: str, markdown: bool = False) -> str:
    bs = budgets(results)
    rows = [[r["label"], r["grid"]] + [_entry(r["values"].get(b), metric, b) for b in bs]
            for r in pivot(results, metric)]
    return _table(["solver", "grid"] + [f"NFE {b}" for b in bs], rows, markdown)


def adaptive_table(results: Mapping[str, Any], metrics: Sequence[str], markdown: bool = False
                   ) -> str:
    rows = [[c.label, fmt(c.tol, 0), _nfe(c)]
            + [fmt(c.value(m)) if c.ok() else c.status for m in metrics]
            for c in adaptive_rows(results)]
    return _table(["solver", "tol", "NFE"] + list(metrics), rows, markdown)


def _cost_entry(c: Cell | None, what: str) -> str:
    if c is None:
        return ""
    if not c.ok():
        return c.status
    if what == "passes":
        passes, macs = c.value("passes"), c.value("macs_per_sample")
        if passes is not None:
            return f"{passes:.3g}"
        return "-" if macs is None else f"{macs:.3g} MACs"
    if c.timing is None:
        return "-"
    return f"{c.timing.ms_median:.3g} ({c.timing.ms_min:.3g})"


def _primary(results: Mapping[str, Any]) -> str | None:
    present = metrics_present(results)
    return next((m for m in ("rms", "fd", "kl", "sw", "mmd") if m in present), None)


def cost_table(results: Mapping[str, Any], what: str = "passes", markdown: bool = False) -> str:
    """The compute of the cells of the primary metric's pivot (its rows and grids), per budget:
    ``what='passes'`` (teacher passes per sample, or raw MACs where the model is not a counted
    network) or ``'time'`` (side-by-side wall time per sample, median (min), ms)."""
    primary = _primary(results)
    if primary is None:
        return ""
    bs = budgets(results)
    rows = [[r["label"], r["grid"]] + [_cost_entry(r["values"].get(b), what) for b in bs]
            for r in pivot(results, primary)]
    rows += [[c.label, f"tol={c.tol:g}"] + [_cost_entry(c, what)] + [""] * (len(bs) - 1)
             for c in adaptive_rows(results)]
    return _table(["solver", "grid"] + [f"NFE {b}" for b in bs], rows, markdown)


def _cost_line(results: Mapping[str, Any]) -> str:
    cost = results.get("cost") or {}
    t = cost.get("teacher_macs_per_sample")
    unit = (f"1 teacher pass = {t:.4g} MACs per sample" if t else
            "the problem's model is not a counted torch network, so costs are raw MACs")
    return (f"Rows and grids as in the {_primary(results)} table; {unit}; wall time from "
            f"{cost.get('timing_repeats', 0)} interleaved "
            "rounds of every ok cell (median (min) ms per sample; adaptive rows: one entry)")


def full_table(results: Mapping[str, Any], markdown: bool = True) -> str:
    cells = cells_of(results)
    ms = [m for m in metrics_present(results) if m not in COST] + \
        [m for m in COST if any(c.value(m) is not None for c in cells)]
    rows = []
    for c in cells:
        where = c.grid if c.tol is None else f"tol={c.tol:g}"
        rows.append([c.label, str(where), str(c.budget or "-"), str(c.steps or "-"), _nfe(c),
                     c.status] + [fmt(c.value(m)) for m in ms]
                    + [(c.reason or c.note or "").replace("|", "/")])
    return _table(["solver", "grid", "budget", "steps", "NFE", "status"] + ms + ["notes"], rows,
                  markdown)


def _floors_line(results: Mapping[str, Any]) -> str:
    ref = results.get("reference", {})
    rm = ref.get("metrics", {})
    parts = [f"{k} {fmt(rm.get(k))}" for k in ("fd", "kl", "sw", "mmd") if rm.get(k) is not None]
    parts += [f"{k} {fmt(v)}" for k, v in ref.get("fit_floors", {}).items() if v is not None]
    s = describe_reference(ref)
    if parts:
        s += ("; the reference's own metrics (" + ("the Monte-Carlo floors"
              if ref.get("exact_model") else "what a converged solve of this model reaches")
              + "): " + ", ".join(parts))
    warn = reference_warning(results)
    return s + ("\n" + warn if warn else "")


def reference_warning(results: Mapping[str, Any]) -> str | None:
    """A warning when the reference's estimated error exceeds an RMS error it is used to
    rank (those solvers are then closer to the truth than the reference can tell)."""
    est = results.get("reference", {}).get("error_estimate")
    ranked = [(c.value("rms"), c) for c in cells_of(results) if _has(c, "rms")]
    if est is None or not ranked:
        return None
    low = [(rms, c) for rms, c in ranked if rms < est]
    if not low:
        return None
    rms, best = min(low, key=lambda rc: rc[0])
    return (f"warning: the reference's estimated RMS error {fmt(est)} exceeds {len(low)} of the "
            f"{len(ranked)} RMS errors it ranks (smallest {fmt(rms)}, {best.label} at "
            f"NFE {best.value('nfe')}): those are below what the reference resolves; rerun with "
            "a tighter --reference-tol")


def _summary_line(results: Mapping[str, Any]) -> str:
    s = results["summary"]
    p = results["problem"]
    return (f"{p['name']}: {p['description']}; n={p['n']} samples, held-out n={p['n_ref']}. "
            f"{s['cells']} cells: {s['ok']} ok, {s['skipped']} skipped, {s['diverged']} "
            f"diverged ({DIVERGENCE_RULE}), {s['error']} errors; {s['wall_s']:.1f} s")


def terminal_report(results: Mapping[str, Any], metrics: Sequence[str] = ("rms", "fd")) -> str:
    present = metrics_present(results)
    out = [_summary_line(results)]
    for m in metrics:
        if m in COST and m in present:
            what = "passes" if m == "passes" else "time"
            out += ["", f"{TITLES[m]} ({_cost_line(results)})", cost_table(results, what)]
        elif m in present:
            out += ["", f"{TITLES[m]} (best grid per solver; (k) = measured NFE where it differs "
                        "from the budget)", pivot_table(results, m)]
    if adaptive_rows(results):
        out += ["", "adaptive solvers (swept over tolerance)",
                adaptive_table(results, [m for m in metrics if m in present])]
    out += ["", _floors_line(results)]
    skipped = [c for c in cells_of(results) if c.status in ("skipped", "error", "diverged")]
    if skipped:
        reasons: dict[str, int] = {}
        for c in skipped:
            r = f"{c.status}: {c.solver}: {(c.reason or '')[:100]}"
            reasons[r] = reasons.get(r, 0) + 1
        out += ["", f"{len(skipped)} cells not measured:"]
        out += [f"  {n} x {r}" for r, n in sorted(reasons.items())]
    return "\n".join(out)


def markdown_report(results: Mapping[str, Any], full: bool = True) -> str:
    p = results["problem"]
    cells = cells_of(results)
    out = [f"## sdekit bench: {p['name']}", "", _summary_line(results), "",
           _floors_line(results), ""]
    present = [m for m in metrics_present(results) if m not in COST]
    for m in present:
        out += [f"### {TITLES[m]}", "", pivot_table(results, m, markdown=True), ""]
    if adaptive_rows(results):
        out += ["### Adaptive solvers", "", adaptive_table(results, present, markdown=True), ""]
    if any(c.value("macs_per_sample") is not None for c in cells):
        out += ["### Compute per sample [teacher passes]", "", _cost_line(results), "",
                cost_table(results, "passes", markdown=True), ""]
    if any(c.timing is not None for c in cells):
        out += ["### Wall time per sample, side by side [ms, median (min)]", "",
                cost_table(results, "time", markdown=True), ""]
    out += ["### Metrics", ""] + [f"- **{k}**: {v}" for k, v in results["metrics"].items()] + [""]
    if full:
        out += ["### All cells", "", full_table(results), ""]
    return "\n".join(out)


def write_csv(results: Mapping[str, Any], path: Path | str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for c in cells_of(results):
        row = c.to_dict()
        row["options"] = ";".join(f"{k}={v}" for k, v in c.options.items())
        w.writerow(row)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


# ------------------------------------------------------------------ plot
FAMILY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#b8860b")


def _positive(cs: Iterable[Cell], m: str) -> list[tuple[int, float]]:
    """(measured NFE, value) of the cells with a positive value of ``m`` (log axes)."""
    return [(c.run.nfe, v) for c in cs if c.run is not None
            and (v := c.value(m)) is not None and v > 0]


def _line_score(cs: Sequence[Cell], order: Sequence[str]) -> tuple[int, int, float]:
    """Rank of one plotted line for 'best in its family': the first metric of ``order`` it has,
    more budgets first, then the lowest mean log value."""
    for i, m in enumerate(order):
        vals = [_log(v) for _, v in _positive(cs, m)]
        if vals:
            return (i, -len(vals), sum(vals) / len(vals))
    return (len(order), 0, 0.0)


def _pack_columns(blocks: Sequence[Sequence[Any]], ncol: int, blank: Callable[[], Any]
                  ) -> tuple[list[Any], int]:
    """Legend entries (filled column by column) with blanks so that no block of entries (a
    family) is split across columns unless it is longer than a column; returns the entries and
    the number of rows."""
    total = sum(len(b) for b in blocks)
    rows = max(1, math.ceil(total / ncol))
    while True:
        out: list[Any] = []
        for b in blocks:
            pos = len(out) % rows
            if pos and pos + len(b) > rows:
                out += [blank() for _ in range(rows - pos)]
            out += list(b)
        if math.ceil(len(out) / rows) <= ncol:
            return out, rows
        rows += 1




def _plot_lines(results: Mapping[str, Any], primary: str, configs: str) -> dict[str, list[Cell]]:
    """The plotted lines, ``'<label> [<grid>]'`` (or ``'[adaptive, tol]'``) -> their ok cells:
    each solver on its best grid (``configs='best'``) or on every grid."""
    best = best_grids(results, primary)
    best_fd = best_grids(results, "fd")
    lines: dict[str, list[Cell]] = {}
    for c in cells_of(results):
        if not c.ok() or c.run is None:
            continue
        if c.tol is not None:
            key = f"{c.label} [adaptive, tol]"
        else:
            b = best.get(c.label) or best_fd.get(c.label)
            if configs == "best" and c.grid != b:
                continue
            key = f"{c.label} [{c.grid}]"
        lines.setdefault(key, []).append(c)
    return lines


def _families(lines: Mapping[str, Sequence[Cell]], order: Sequence[str]) -> dict[str, list[str]]:
    """family -> its lines' keys, the family's best line first."""
    families: dict[str, list[str]] = {}
    for key, cs in lines.items():
        families.setdefault(str(cs[0].family or "other"), []).append(key)
    for keys in families.values():
        keys.sort(key=lambda k: (_line_score(lines[k], order), k))
    return families


def _floors(results: Mapping[str, Any]) -> dict[str, tuple[float | None, str]]:
    """metric -> (the level of exact samples or of the converged reference solve, its name)."""
    ref = results.get("reference", {})
    rm, ff = ref.get("metrics", {}), ref.get("fit_floors", {})
    exact = bool(ref.get("exact_model"))
    floors: dict[str, tuple[float | None, str]] = {
        m: (rm.get(m), "exact-sample floor" if exact else "converged reference solve")
        for m in ("sw", "mmd")}
    for m in ("fd", "kl"):
        if ff.get(f"{m}_fit"):
            floors[m] = (ff[f"{m}_fit"], "exact-sample floor (fitted)")
        elif not exact and rm.get(m):
            floors[m] = (rm[m], "converged reference solve")
    return floors


def _draw_lines(axes: Any, ms: Sequence[str], lines: Mapping[str, Sequence[Cell]],
                families: Mapping[str, Sequence[str]]) -> tuple[list[list[Any]], set[int]]:
    """Draw every line on every metric's panel, coloured by family (its best line bold, the
    others faint; dashed for SDE solvers); returns the legend blocks (a header per family,
    then its lines) and the NFEs drawn."""
    from matplotlib.lines import Line2D
    markers = "osD^v<>ph*X"
    blocks: list[list[Any]] = []
    nfes: set[int] = set()
    for fi, fam in enumerate(sorted(families)):
        colour = FAMILY_COLOURS[fi % len(FAMILY_COLOURS)]
        handles = [Line2D([], [], color="none", label=fam)]   # the family's header
        blocks.append(handles)
        for j, key in enumerate(families[fam]):
            cs = sorted(lines[key], key=lambda c: c.run.nfe if c.run else 0)
            lead = j == 0
            style: dict[str, Any] = dict(
                color=colour, ls="--" if cs[0].kind == "SDE" else "-",
                marker=markers[j % len(markers)], ms=3.5 if lead else 2,
                lw=1.9 if lead else 0.8, alpha=1.0 if lead else 0.35, zorder=3 if lead else 2)
            for ax, m in zip(axes.flat, ms):
                pts = _positive(cs, m)
                if pts:
                    nfes.update(p[0] for p in pts)
                    ax.plot(*zip(*pts), **style)
            handles.append(Line2D([], [], label=("  " + key + (" (best)" if lead and
                                                                len(families[fam]) > 1 else "")),
                                  **style))
    return blocks, nfes


def _style_panel(ax: Any, m: str, ticks: Sequence[int],
                 floor: tuple[float | None, str]) -> None:
    """Log-log axes with the NFE ticks, the title and the floor level as a dotted line."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter
    level, what = floor
    if level:
        ax.axhline(level, color="0.35", ls=":", lw=1.2, zorder=1)
        ax.annotate(f"{what} {level:.2g}", (0.99, level), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=6.5, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("measured NFE", fontsize=8)
    ax.set_title(TITLES[m], fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)


def plot(results: Mapping[str, Any], path: Path | str, configs: str = "best") -> bool:
    """Each metric against measured NFE (log-log), one line per solver configuration (with
    ``configs='best'``: each solver on its best grid; ``'all'``: every grid), labelled with the
    grid it used. Lines are coloured by solver family: the family's best line (by the RMS
    error, else the Frechet distance) is drawn bold, its other solvers faint in the same colour.
    The sample-based panels show the level of exact samples (or of the converged reference
    solve, for a trained model) as a dotted line. Returns False when matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    ms = [m for m in metrics_present(results) if m not in COST]
    if not ms:
        return False
    primary = "rms" if "rms" in ms else ms[0]
    lines = _plot_lines(results, primary, configs)
    families = _families(lines, [primary] + [m for m in ("fd", "sw", "mmd", "kl") if m != primary])
    ncol = 3 if len(ms) > 4 else min(len(ms), 2)
    nrow = math.ceil(len(ms) / ncol)
    leg_cols = 5
    _, leg_rows = _pack_columns([[None] * (len(k) + 1) for k in families.values()], leg_cols,
                                lambda: None)
    leg_h = 0.155 * leg_rows + 0.35
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.5 * nrow + leg_h),
                             squeeze=False)
    blocks, nfes = _draw_lines(axes, ms, lines, families)
    ticks = [b for b in budgets(results) if b in nfes] or sorted(nfes)[:: max(1, len(nfes) // 6)]
    floors = _floors(results)
    for ax, m in zip(axes.flat, ms):
        _style_panel(ax, m, ticks, floors.get(m, (None, "")))
    for ax in list(axes.flat)[len(ms):]:
        ax.axis("off")
    H = 3.5 * nrow + leg_h
    handles, _ = _pack_columns(blocks, leg_cols, lambda: Line2D([], [], color="none", label=" "))
    leg = fig.legend(handles=handles, loc="lower center", ncol=leg_cols, fontsize=6.5,
                     frameon=False, handlelength=2.2, columnspacing=1.2)
    for h, t in zip(handles, leg.get_texts()):
        if h.get_color() == "none":
            t.set_fontweight("bold")
    fig.suptitle(f"sdekit bench: {results['problem']['description']}\none colour per solver "
                 "family, its best line bold; [grid] each line's time grid; dashed: SDE solvers",
                 fontsize=8)
    fig.tight_layout(rect=(0, leg_h / H, 1, 1 - 0.45 / H))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return True


def write_reports(results: Mapping[str, Any], out_dir: Path | str,
                  formats: Sequence[str] = FORMATS, plot_configs: str = "best") -> list[str]:
    """Write ``bench.{json,csv,md,png}`` into ``out_dir``; returns the paths written."""
    check_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "json" in formats:
        atomic_write_json(out / "bench.json", results)
        written.append(str(out / "bench.json"))
    if "csv" in formats:
        write_csv(results, out / "bench.csv")
        written.append(str(out / "bench.csv"))
    if "md" in formats:
        atomic_write_bytes(out / "bench.md", markdown_report(results).encode())
        written.append(str(out / "bench.md"))
    if "png" in formats:
        if plot(results, out / "bench.png", plot_configs):
            written.append(str(out / "bench.png"))
        else:
            written.append("(no PNG: matplotlib is not installed; pip install matplotlib)")
    return written


__all__ = ["terminal_report", "markdown_report", "pivot", "pivot_table", "adaptive_table",
           "full_table", "cost_table", "write_csv", "plot", "write_reports", "best_grids",
           "FORMATS", "METRICS", "reference_warning", "check_formats", "check_metrics",
           "cells_of", "PivotRow"]
