"""Plots: Pass@k curves comparing runs/checkpoints, and training curves from ``metrics.jsonl``.

Figures are drawn with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``)
rather than ``pyplot``: nothing touches the global backend or pyplot's figure registry, so the
functions are safe on headless machines, in threads and inside notebooks. The PNG size in pixels is
``(panel_width * ncols * dpi, panel_height * nrows * dpi)``; no tight bounding box is used, so the
size is predictable.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from oapl.evaluation.passk import OVERALL, load_report

__all__ = ["MEAN_PANEL", "PANEL_HEIGHT", "PANEL_WIDTH", "grid_shape", "load_metrics", "plot_passk", "plot_training"]

#: Name of the panel with the unweighted mean over benchmarks.
MEAN_PANEL = "mean"
#: Size of one subplot in inches.
PANEL_WIDTH = 4.8
PANEL_HEIGHT = 3.6
_MAX_COLS = 3


def grid_shape(num_panels: int) -> tuple[int, int]:
    """``(nrows, ncols)`` of the subplot grid used for ``num_panels`` panels (at most 3 columns)."""
    ncols = max(1, min(_MAX_COLS, num_panels))
    nrows = max(1, math.ceil(num_panels / ncols))
    return nrows, ncols


def _new_figure(num_panels: int, dpi: int) -> tuple[Figure, list[Any]]:
    nrows, ncols = grid_shape(num_panels)
    fig = Figure(figsize=(PANEL_WIDTH * ncols, PANEL_HEIGHT * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(num_panels)]
    return fig, axes


def _save(fig: Figure, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=fig.dpi)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# Pass@k
# --------------------------------------------------------------------------------------------


def _mean_over(result: Mapping[str, Any], names: Sequence[str]) -> tuple[list[int], list[float]]:
    """Per k, the unweighted mean of the benchmark means over ``names`` (ks where all finite)."""
    per_bench = [{r["k"]: r["mean"] for r in result["benchmarks"][name]["pass_at_k"]} for name in names]
    ks = sorted(set.intersection(*(set(d) for d in per_bench))) if per_bench else []
    ks = [k for k in ks if all(_finite(d[k]) for d in per_bench)]
    return ks, [math.fsum(d[k] for d in per_bench) / len(per_bench) for k in ks]


def _passk_series(
    result: Mapping[str, Any], panel: str, mean_over: Sequence[str] | None = None
) -> tuple[list[int], list[float], list[float]] | None:
    """(ks, means, stderrs) of one run in one panel, or None when the run lacks that panel.

    The ``"mean"`` panel averages the benchmarks in ``mean_over`` (the benchmarks common to all
    runs, so that runs are compared on the same set) or, when it is None, uses the run's own
    ``macro_mean``.
    """
    if panel == MEAN_PANEL:
        if mean_over is not None:
            ks, ys = _mean_over(result, mean_over)
        else:
            rows = result[OVERALL]["pass_at_k"]
            ks = [r["k"] for r in rows]
            ys = [r.get("macro_mean", r["mean"]) for r in rows]
        errs = [math.nan] * len(ks)  # no meaningful band for a mean of means
    else:
        summary = result[OVERALL] if panel == OVERALL else result["benchmarks"].get(panel)
        if summary is None:
            return None
        rows = summary["pass_at_k"]
        ks = [r["k"] for r in rows]
        ys = [r["mean"] for r in rows]
        errs = [r.get("stderr", math.nan) for r in rows]
    keep = [i for i, y in enumerate(ys) if _finite(y)]
    return (
        [ks[i] for i in keep],
        [float(ys[i]) for i in keep],
        [float(errs[i]) if _finite(errs[i]) else 0.0 for i in keep],
    )


def plot_passk(
    results: Mapping[str, Mapping[str, Any] | str | os.PathLike[str]],
    out_png: str | os.PathLike[str],
    benchmark: str | None = None,
    *,
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Pass@k curves (log2 k axis) of several runs/checkpoints; return the PNG path.

    ``results`` maps a legend label (run or checkpoint name) to an :func:`evaluate_groups` result
    or to the path of a JSON report written by :func:`write_report`. With ``benchmark=None`` there
    is one subplot per benchmark (union over runs) plus, when there are several benchmarks, a
    ``"mean"`` subplot with the unweighted mean over benchmarks (over the benchmarks common to all
    runs when the runs cover different sets, so that the curves stay comparable). ``benchmark``
    selects a single panel: a benchmark name, ``"overall"`` (pooled over prompts) or ``"mean"``.

    Shaded bands are +-1 standard error over prompts. A run that lacks a benchmark is left out of
    that panel and named in its title.
    """
    if not results:
        raise ValueError("plot_passk needs at least one result")
    loaded = {label: load_report(res) if isinstance(res, (str, os.PathLike)) else res for label, res in results.items()}
    names: list[str] = []
    for res in loaded.values():
        for name in res["benchmarks"]:
            if name not in names:
                names.append(name)
    panels = _passk_panels(names, benchmark)
    # runs are compared on the benchmarks they all have; a run's own macro mean when they agree
    common = [name for name in names if all(name in res["benchmarks"] for res in loaded.values())]
    mean_over = None if len(common) == len(names) or not common else common

    fig, axes = _new_figure(len(panels), dpi)
    for ax, panel in zip(axes, panels):
        _draw_passk_panel(ax, panel, loaded, mean_over)
    fig.suptitle(title or "Pass@k", fontsize=12)
    return _save(fig, out_png)


def _passk_panels(names: list[str], benchmark: str | None) -> list[str]:
    """One panel per benchmark (and their mean when there are several), or the one asked for."""
    if benchmark is None:
        return names + ([MEAN_PANEL] if len(names) > 1 else [])
    if benchmark not in names and benchmark not in (OVERALL, MEAN_PANEL):
        raise ValueError(
            f"benchmark {benchmark!r} is in none of the results; available: {names + [OVERALL, MEAN_PANEL]}"
        )
    return [benchmark]


def _draw_passk_panel(ax, panel: str, loaded: Mapping[str, Mapping[str, Any]], mean_over: list[str] | None) -> None:
    """The curves of every run on one panel, titled with the runs that have no data there."""
    all_ks: set[int] = set()
    missing = []
    colors = [f"C{i % 10}" for i in range(len(loaded))]
    for color, (label, res) in zip(colors, loaded.items()):
        series = _passk_series(res, panel, mean_over)
        if series is None or not series[0]:
            missing.append(label)
            continue
        ks, ys, errs = series
        all_ks.update(ks)
        ax.plot(ks, ys, marker="o", markersize=3.5, linewidth=1.6, color=color, label=label)
        if any(errs):
            ax.fill_between(
                ks,
                [y - e for y, e in zip(ys, errs)],
                [y + e for y, e in zip(ys, errs)],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
    heading = {MEAN_PANEL: "mean over benchmarks", OVERALL: "all prompts (pooled)"}.get(panel, panel)
    if panel == MEAN_PANEL and mean_over is not None:
        heading += f"\n(common to all runs: {', '.join(mean_over)})"
    elif missing:
        heading += f"\n(no data: {', '.join(missing)})"
    ax.set_title(heading, fontsize=10)
    ax.set_xscale("log", base=2)
    if all_ks:
        ticks = sorted(all_ks)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v))}"))
        ax.xaxis.set_minor_locator(NullLocator())
        lo, hi = ticks[0], ticks[-1]
        ax.set_xlim(lo / 1.25, hi * 1.25)
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    ax.grid(True, which="major", alpha=0.3)


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def load_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (one JSON object per line).

    Blank lines are ignored; lines that are not a JSON object (e.g. a line truncated by a kill)
    are skipped with a :class:`RuntimeWarning` naming the file and line; a file where no line is a
    JSON object is a :class:`~oapl.errors.UserError` naming it. ``NaN``/``Infinity`` literals are
    accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows = []
    bad = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.append(lineno)
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad.append(lineno)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        if not rows:  # nothing to plot: not a metrics file, or one garbled throughout
            from oapl.errors import UserError

            raise UserError(f"{path}: not a metrics.jsonl file: no line is a JSON object (line(s) {shown} are not)")
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s): {shown}", RuntimeWarning, stacklevel=2)
    return rows


def _series(rows: Sequence[Mapping[str, Any]], x: str, key: str) -> tuple[list[float], list[float], int, int]:
    """(xs, ys, rows_with_key, non_finite_skipped), sorted by x."""
    pts = []
    present = 0
    skipped = 0
    for row in rows:
        if key not in row:
            continue
        present += 1
        xv, yv = row.get(x), row[key]
        if xv is not None and _finite(xv) and _finite(yv):
            pts.append((float(xv), float(yv)))
        else:
            skipped += 1
    pts.sort(key=lambda p: p[0])
    return [p[0] for p in pts], [p[1] for p in pts], present, skipped


def plot_training(
    metrics_files: Mapping[str, str | os.PathLike[str]],
    out_png: str | os.PathLike[str],
    keys: Sequence[str] = ("reward_mean", "entropy", "kl", "lag", "eval/pass@1"),
    *,
    x: str = "step",
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Training curves, one subplot per metric key and one line per run; return the PNG path.

    ``metrics_files`` maps a legend label to a ``metrics.jsonl`` path. Rows without a key are
    skipped for that key (evaluation metrics appear on few rows; those series get markers). ``x``
    is the x-axis column, ``"step"`` or ``"samples_seen"``. A key that no run logs gives an empty
    panel titled ``"<key> (not logged)"``; runs that lack a key are named in the title; NaN, inf,
    ``null`` and non-numeric values are skipped and counted in the title. Never raises on data
    content; raises :class:`FileNotFoundError` for a missing file.
    """
    if not metrics_files:
        raise ValueError("plot_training needs at least one metrics file")
    if not keys:
        raise ValueError("plot_training needs at least one metric key")
    runs = {label: load_metrics(path) for label, path in metrics_files.items()}
    fig, axes = _new_figure(len(keys), dpi)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, keys):
        missing: list[str] = []
        skipped_total = 0
        plotted = 0
        for color, (label, rows) in zip(colors, runs.items()):
            xs, ys, present, skipped = _series(rows, x, key)
            skipped_total += skipped
            if present == 0:
                missing.append(label)
                continue
            if not xs:
                continue
            sparse = len(xs) < 50 or present < 0.5 * len(rows)
            ax.plot(xs, ys, color=color, linewidth=1.4, label=label, marker="o" if sparse else None, markersize=3)
            plotted += 1
        notes = []
        if len(missing) == len(runs):
            notes.append("not logged")
        elif missing:
            notes.append(f"missing in: {', '.join(missing)}")
        if skipped_total:
            notes.append(f"{skipped_total} non-finite skipped")
        ax.set_title(key + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=10)
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or f"Training curves (x = {x})", fontsize=12)
    return _save(fig, out_png)


def plot_bands(
    series: Mapping[str, tuple[Sequence[float], Sequence[Any]]],
    out_png: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    dpi: int = 100,
) -> Path:
    """One panel: a line per label with its interval as a band.

    ``series`` maps a label to ``(xs, intervals)``, each interval with ``mean``, ``lo`` and ``hi``
    (e.g. :class:`oapl.evaluation.intervals.Interval`); a non-finite ``lo``/``hi`` draws no band.
    """
    if not series:
        raise ValueError("plot_bands needs at least one series")
    fig, axes = _new_figure(1, dpi)
    ax = axes[0]
    ticks: set[float] = set()
    for i, (label, (xs, ivs)) in enumerate(series.items()):
        color = f"C{i % 10}"
        ys = [iv.mean for iv in ivs]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, color=color, label=label)
        band = [(x, iv.lo, iv.hi) for x, iv in zip(xs, ivs) if _finite(iv.lo) and _finite(iv.hi)]
        if band:
            ax.fill_between(
                [b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=color, alpha=0.15, linewidth=0
            )
        ticks.update(xs)
    if logx:
        ax.set_xscale("log", base=2)
        shown = sorted(t for t in ticks if t >= 1 and math.log2(t).is_integer()) or sorted(ticks)
        ax.xaxis.set_major_locator(FixedLocator(shown))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v))}"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, out_png)
