"""The report's charts: ``tradeoff.png`` (learning vs forgetting, its numbers in ``tradeoff.csv``),
``forgetting.png`` (the forgetting table as grouped bars) and, with --measures --frontier, ``frontier.png`` (every
--frontier method against the LoRA curve, ``imsm.evaluation.measures.frontier``, one panel per forgetting measure).

Trade-off: x = change on the target, y = change on the general average, against the baseline; one small point per
run, a large one per label with its headline 95% intervals as bars (method-level for a label of several seeds,
examples-only for a single run; the ``interval`` column of ``tradeoff.csv`` says which).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from imsm.atomic import atomic_write_bytes
from imsm.evaluation.measures.frontier import fit_curve
from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.report.comparisons import Comparisons
from imsm.evaluation.report.measure_tables import FRONTIER_MEASURES as FRONTIER_SHORT
from imsm.evaluation.report.results import (
    GENERAL,
    MEASURES,
    NLL,
    PRIMARY,
    LabelRow,
    RunResult,
    find_baseline,
    forgetting_header,
    group_runs,
    label_values,
    scale,
)
from imsm.evaluation.stats import CONFIDENCE

POINT_KEYS = ["label", "run", "measure", "interval", "x", "x_low", "x_high", "y", "y_low", "y_high"]


def _run_changes(run: RunResult, base: LabelRow, target: str, measure: str) -> tuple[float, float] | None:
    """(change on the target, change on the general average) of one run against the baseline's mean."""
    solo = LabelRow(run.label, run.template, [run])
    mine, theirs = label_values(solo, target, measure), label_values(base, target, measure)
    if mine[0][0] is None or theirs[0][0] is None or mine[-1][0] is None or theirs[-1][0] is None:
        return None
    return mine[0][0] - theirs[0][0], mine[-1][0] - theirs[-1][0]


def tradeoff_points(runs: list[RunResult], target: str, baseline_label: str,
                    comparisons: Comparisons) -> list[dict[str, Any]]:
    """The chart's numbers: per label (``run`` = "mean") and per run, the change on the target (x) and on the
    general average (y) against the baseline, for both measures; NLL changes are negated so that up and right is
    better on both panels. Label means carry their headline 95% intervals (``interval``: "method" or "examples")."""
    rows = group_runs(runs)
    points = []
    for row in rows:
        baseline = find_baseline(rows, baseline_label, row.template)
        if row.label == baseline_label or baseline is None:
            continue
        for measure in MEASURES:
            sign = -1.0 if measure == NLL else 1.0
            factor = sign * scale(measure)
            dx = comparisons.difference(row, baseline, measure, target)
            dy = comparisons.difference(row, baseline, measure, GENERAL)
            if dx is None or dy is None:
                changes = _run_changes(row.runs[0], baseline, target, measure) if len(row.runs) == 1 else None
                if changes is None:
                    continue
                x_mid, y_mid = sign * changes[0], sign * changes[1]
                x_low = x_high = y_low = y_high = kind = None
            else:
                x_mid, y_mid = factor * dx.delta, factor * dy.delta
                x_low, x_high = sorted(factor * v for v in dx.headline)
                y_low, y_high = sorted(factor * v for v in dy.headline)
                kind = "method" if dx.method_low is not None and dy.method_low is not None else "examples"
            points.append({"label": row.label, "run": "mean", "measure": measure, "interval": kind, "x": x_mid,
                           "x_low": x_low, "x_high": x_high, "y": y_mid, "y_low": y_low, "y_high": y_high})
            if len(row.runs) > 1:
                for run in row.runs:
                    changes = _run_changes(run, baseline, target, measure)
                    if changes is not None:
                        points.append({"label": row.label, "run": run.run or run.label, "measure": measure,
                                       "interval": None, "x": sign * changes[0], "y": sign * changes[1],
                                       "x_low": None, "x_high": None, "y_low": None, "y_high": None})
    return points


def _save_png(fig, path: str | Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    fig.tight_layout(rect=rect)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_tradeoff(points: list[dict[str, Any]], target: str, path: str | Path, nll: str = "pooled") -> Path:
    """Two panels (decoded metric, answer likelihood): x = change on the target, y = change on the general average,
    small dots per run, a large marker per label with its headline 95% intervals as bars; ``nll`` names how the
    answer NLL was averaged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measures = [m for m in MEASURES if any(p["measure"] == m for p in points)] or [PRIMARY]
    fig = Figure(figsize=(5.5 * len(measures), 4.6))
    FigureCanvasAgg(fig)
    labels = list(dict.fromkeys(p["label"] for p in points))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    display = get_task(target).display
    for i, measure in enumerate(measures):
        ax = fig.add_subplot(1, len(measures), i + 1)
        for p in (p for p in points if p["measure"] == measure):
            if p["run"] != "mean":
                ax.scatter(p["x"], p["y"], s=14, color=colors[p["label"]], alpha=0.45, linewidths=0)
                continue
            xerr = yerr = None
            if p["x_low"] is not None:
                xerr = [[p["x"] - p["x_low"]], [p["x_high"] - p["x"]]]
                yerr = [[p["y"] - p["y_low"]], [p["y_high"] - p["y"]]]
            ax.errorbar(p["x"], p["y"], xerr=xerr, yerr=yerr, fmt="o", markersize=8, capsize=3,
                        color=colors[p["label"]], label=p["label"] + (" (ex)" if p["interval"] == "examples" else ""))
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.axvline(0.0, color="black", linewidth=0.6)
        if measure == NLL:
            ax.set_xlabel(f"− Δ answer NLL on {display} (nats/token, {nll}; right = learned)")
            ax.set_ylabel("− Δ answer NLL, general average (up = remembers)")
            ax.set_title("Answer likelihood vs untuned")
        else:
            ax.set_xlabel(f"Δ {display} {get_task(target).primary} (x100; right = learned)")
            ax.set_ylabel("Δ general average (x100; up = forgot less)")
            ax.set_title("Decoded metric vs untuned")
        ax.legend(fontsize="small")
    fig.suptitle(f"Learning vs forgetting, target {display} (bars: {CONFIDENCE:.0%} intervals, method-level; "
                 "(ex): examples-only, one seed)", fontsize="medium")
    return _save_png(fig, path)


def plot_forgetting(runs: list[RunResult], target: str, path: str | Path) -> Path:
    """Grouped bar chart of the forgetting table (one group per column, one bar per label), written as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = group_runs(runs)
    groups = forgetting_header(target)
    width = 0.8 / max(len(rows), 1)
    fig = Figure(figsize=(max(6.0, 1.4 * len(groups)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        values = label_values(row, target, PRIMARY)
        heights = [math.nan if v is None else v for v, _ in values]  # NaN draws no bar
        errors = [0.0 if sd is None else sd for _, sd in values]
        positions = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(positions, heights, width=width, yerr=errors if len(row.runs) > 1 else None,
               label=f"{row.label} ({row.template})")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("score (x100)")
    ax.set_title(f"Target {get_task(target).display}: target score and general benchmarks")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


FRONTIER_AXES = {"general_nll": ("general-text NLL change (nats/token)", "General-text NLL"),
                 "kl": ("KL(untuned ‖ model) per token", "KL to the untuned model")}
# every method a colour and a marker of its own (blue is LoRA's curve): ~9 methods stay apart in print and in grey
METHOD_COLORS = ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                 "tab:cyan", "tab:gray", "black")
METHOD_MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X", "h", "<")


def _bars(value: float, interval: dict) -> list[list[float]] | None:
    """Error bar lengths below and above ``value`` to its interval's ends (0 where an end rounds past the value: an
    interval of one value, e.g. a constant per-token KL)."""
    if interval["low"] is None:
        return None
    return [[max(0.0, value - interval["low"])], [max(0.0, interval["high"] - value)]]


def plot_frontier(frontier: dict, rows: list[dict], target: str, path: str | Path) -> Path:
    """One panel per forgetting measure: LoRA's points and its fitted curve (solid over the gains it is read, dotted
    beyond), and every method's point (``frontier``: method -> measure -> ``FrontierGap``) with its headline 95%
    intervals on gain and forgetting (``rows``: ``measure_tables.frontier_rows``; method-level, examples-only for one
    seed); one legend below, each method with its gap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measures = list(next(iter(frontier.values())))
    by_method = {row["method"]: row for row in rows}
    legend_rows = math.ceil((len(frontier) + 1) / 3)  # the methods and LoRA, three to a row
    height = 4.6 + 0.2 * legend_rows
    fig = Figure(figsize=(6.2 * len(measures), height))
    FigureCanvasAgg(fig)
    handles = {}
    for ax, measure in zip(np.atleast_1d(fig.subplots(1, len(measures))), measures, strict=True):
        first = next(iter(frontier.values()))[measure]  # the curve is every method's
        for label, (g, f) in first.points.items():
            ax.scatter([g], [f], color="tab:blue", s=22, zorder=2)
            ax.annotate(label.replace(" (scale 0)", ""), (g, f), fontsize=7, color="tab:blue", xytext=(3, -9),
                        textcoords="offset points")
        a, b = fit_curve(first.curve)
        low, high = first.gain_range
        xs = np.linspace(low, high, 100)
        handles["LoRA"] = ax.plot(xs, a * xs + b * xs * xs, color="tab:blue",
                                  label="LoRA: its points, curve a·g + b·g² fitted to their lower frontier")[0]
        far = max([high] + [by[measure].imsm[0] for by in frontier.values()])
        if far > high:  # where no gap is read: drawn for the eye only
            xs = np.linspace(high, far, 30)
            ax.plot(xs, a * xs + b * xs * xs, color="tab:blue", linestyle=":", linewidth=1)
        for i, (method, by) in enumerate(frontier.items()):
            gap, row = by[measure], by_method[method]
            g, f = gap.imsm
            gain, change = row["gain"], row[measure]["change"]
            xerr, yerr = _bars(g, gain), _bars(f, change)
            color, marker = METHOD_COLORS[i % len(METHOD_COLORS)], METHOD_MARKERS[i % len(METHOD_MARKERS)]
            ax.errorbar([g], [f], xerr=xerr, yerr=yerr, fmt=marker, color=color, markersize=11 if marker == "*" else 7,
                        capsize=2, elinewidth=0.9, zorder=3)
            cells = [f"{FRONTIER_SHORT[m]} gap " + ("out of range" if by[m].gap is None else f"{by[m].gap:+.3g}")
                     for m in measures]
            kind = "ex" if gain["interval"] == "examples" else f"{row['runs']} seeds"
            handles.setdefault(method, ax.errorbar([], [], fmt=marker, color=color,
                                                   label=f"{method} ({kind}): " + ", ".join(cells)))
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.axvline(0.0, color="black", linewidth=0.5)
        ax.set_xlabel(f"target gain: AUROC change on {get_task(target).display}")
        ax.set_ylabel(FRONTIER_AXES[measure][0])
        ax.set_title(FRONTIER_AXES[measure][1])
    bottom = (0.1 + 0.2 * legend_rows) / height
    fig.legend(handles=list(handles.values()), loc="lower center", ncol=min(3, len(handles)), fontsize=7.5,
               frameon=False)
    fig.suptitle(f"Forgetting at equal target gain: every method against LoRA's curve (bars: {CONFIDENCE:.0%} "
                 "intervals, method-level; ex: examples-only, one seed)", fontsize="medium")
    return _save_png(fig, path, rect=(0.0, bottom, 1.0, 1.0))
