"""Result tables, paired comparisons and charts.

Every decoded-metric cell is a metric from ``metrics`` scaled by 100 with one decimal (MCC too, so it lies in
[-100, 100]); ``answer_nll`` cells are nats per answer token with three decimals (lower is better); a task a run was
not scored on shows ``-``. Runs sharing a label (seeds) form one row: the mean over its runs, ``±`` their standard
deviation.

* ``summary_table``: one row per label, each task's primary metric and answer NLL, and ``yes%`` beside every yes/no
  task so that a model collapsing onto one answer is visible even when its accuracy looks fine.
* ``forgetting_table``: the paper's Table 2 layout for one target task: the target, then the general benchmarks
  (WebQ, MultiRC, MRPC, FreebaseQA, less the target), and ``Avg (general)``, the plain mean of the general cells.
  Rows other than the baseline (the untuned model, with the same prompt template where there is one) show the change
  against it; where per-example scores exist the change carries its paired bootstrap 95% interval,
  ``41.2 (-3.1 [-5.0, -1.2])`` (``imsm.evaluation.stats``), else the change of the shown numbers, ``41.2 (-3.1)``.
* ``comparison_table``: named pairs (e.g. IMSM-LoRA vs LoRA): the change per task and on the general average with
  its interval, and McNemar's p for accuracy-type metrics.
* ``stats.json`` / ``stats.csv``: every value, spread, per-run value and comparison, unrounded.
* ``tradeoff.png`` / ``tradeoff.csv``: the learning-forgetting chart, x = change on the target, y = change on the
  general average, against the baseline; one small point per run, a large one per label with its 95% intervals.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imsm.atomic import atomic_write_bytes, atomic_write_text
from imsm.evaluation.metrics import BINARY_METRICS, TASKS, ExampleScores, get_task
from imsm.evaluation.stats import CONFIDENCE, Difference, LabelScores, mcnemar, paired_difference, resample_counts

logger = logging.getLogger(__name__)

GENERAL_TASKS: tuple[str, ...] = ("webq", "multirc", "mrpc", "freebaseqa")
AVG_COLUMN = "Avg (general)"
GENERAL = "general"  # the key of the general average in comparisons
MISSING = "-"
NLL = "answer_nll"
PRIMARY = "primary"  # the measure "each task's primary metric"
MEASURES = (PRIMARY, NLL)
COST_COLUMNS = (("train_runtime_s", "Train s"), ("optimizer_steps", "Steps"), ("tokens_seen", "Tokens"))


@dataclass
class RunResult:
    """The scores of one model (one run) on some tasks, as produced by evaluation."""

    label: str  # e.g. "untuned", "LoRA", "IMSM-LoRA"; runs sharing a label are seeds of one method
    template: str  # prompt template used: "raw" or "chat"
    metrics: dict[str, dict[str, float]]  # task -> compute_metrics output (+ answer_nll)
    scores: dict[str, ExampleScores] = field(default_factory=dict, repr=False, compare=False)  # task -> per example
    run: str | None = None  # the run folder (None: the untuned model)
    cost: dict[str, Any] | None = None  # the run's train_stats.json (wall time, optimizer steps, tokens seen)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Build from ``{"label", "template", "metrics"}``, e.g. a JSON file written by evaluation."""
        return cls(label=data["label"], template=data["template"], metrics=data["metrics"], run=data.get("run"),
                   cost=data.get("cost"))

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "template": self.template, "run": self.run, "metrics": self.metrics,
                "cost": self.cost}


@dataclass
class LabelRow:
    """The runs sharing one label, in the order given."""

    label: str
    template: str
    runs: list[RunResult]

    def per_run(self, task: str, key: str) -> list[float] | None:
        """Each run's value of metric ``key`` (unscaled), or None when some run lacks it."""
        values = [run.metrics.get(task, {}).get(key) for run in self.runs]
        return None if any(v is None for v in values) else [float(v) for v in values]

    def scores(self, task: str, key: str) -> LabelScores | None:
        """The per-example components of every run, or None when some run has none."""
        parts = [run.scores.get(task) for run in self.runs]
        if any(p is None or key not in p.components for p in parts):
            return None
        kinds = {p.components[key][0] for p in parts}
        arrays = [p.components[key][1] for p in parts]
        if len(kinds) != 1 or len({a.shape for a in arrays}) != 1:
            raise ValueError(f"{self.label}: runs scored {task} on different examples; they cannot share a label")
        return LabelScores(kinds.pop(), np.stack(arrays))


def group_runs(runs: list[RunResult]) -> list[LabelRow]:
    """One row per (label, prompt template) in order of first appearance: the runs of a row are seeds of one
    method (evaluation refuses a label given to runs that differ in anything else)."""
    rows: dict[tuple[str, str], LabelRow] = {}
    for run in runs:
        rows.setdefault((run.label, run.template), LabelRow(run.label, run.template, [])).runs.append(run)
    return list(rows.values())


def _key(task: str, measure: str) -> str:
    return get_task(task).primary if measure == PRIMARY else measure


def _scale(measure: str) -> float:
    return 1.0 if measure == NLL else 100.0


def _digits(measure: str) -> int:
    return 3 if measure == NLL else 1


def _mean_sd(row: LabelRow, task: str, key: str, scale: float) -> tuple[float | None, float | None]:
    values = row.per_run(task, key)
    if values is None:
        return None, None
    arr = scale * np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


def _fmt(value: float | None, sd: float | None = None, digits: int = 1) -> str:
    if value is None:
        return MISSING
    return f"{value:.{digits}f}" + ("" if sd is None else f"±{sd:.{digits}f}")


def _fmt_change(delta: float, digits: int) -> str:
    return f"{round(delta, digits) + 0.0:+.{digits}f}"  # + 0.0 turns -0.0 into 0.0


def _fmt_difference(diff: Difference, scale: float, digits: int) -> str:
    return (f"{_fmt_change(scale * diff.delta, digits)} [{_fmt_change(scale * diff.low, digits)}, "
            f"{_fmt_change(scale * diff.high, digits)}]")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _tasks_present(runs: list[RunResult]) -> list[str]:
    """Tasks scored in any run: registered tasks in ``TASKS`` order (an unknown task raises ``ValueError``)."""
    present = {task for run in runs for task in run.metrics}
    for task in present:
        get_task(task)
    return [task for task in TASKS if task in present]


# ------------------------------------------------------------------------------------------------------ summary


def summary_table(runs: list[RunResult]) -> tuple[str, str]:
    """Return (markdown, csv) of every label's primary metric per task (and answer NLL where scored), with ``yes%``
    beside each yes/no task; a label of several runs shows mean±sd and a ``Runs`` column says how many."""
    rows = group_runs(runs)
    several = any(len(row.runs) > 1 for row in rows)
    header = ["Run", "Template"] + (["Runs"] if several else [])
    columns: list[tuple[str, str]] = []
    for task in _tasks_present(runs):
        spec = get_task(task)
        if any(spec.primary in run.metrics.get(task, {}) for run in runs):
            header.append(f"{spec.display} ({spec.primary})")
            columns.append((task, spec.primary))
        if any(NLL in run.metrics.get(task, {}) for run in runs):
            header.append(f"{spec.display} NLL")
            columns.append((task, NLL))
        if spec.kind == "yesno" and any("yes_rate" in run.metrics.get(task, {}) for run in runs):
            header.append(f"{spec.display} yes%")
            columns.append((task, "yes_rate"))
    costs = [key for key, _ in COST_COLUMNS if any(run.cost and run.cost.get(key) is not None for run in runs)]
    header += [name for key, name in COST_COLUMNS if key in costs]
    cells = []
    for row in rows:
        line = [row.label, row.template] + ([str(len(row.runs))] if several else [])
        for task, key in columns:
            measure = NLL if key == NLL else PRIMARY
            line.append(_fmt(*_mean_sd(row, task, key, _scale(measure)), digits=_digits(measure)))
        for key in costs:  # what training cost, mean over the label's runs (equal compute, visible)
            values = [run.cost.get(key) if run.cost else None for run in row.runs]
            line.append(MISSING if any(v is None for v in values) else f"{np.mean(values):.0f}")
        cells.append(line)
    return _markdown(header, cells), _csv(header, cells)


# ------------------------------------------------------------------------------------------------- comparisons


def _forgetting_columns(target: str) -> list[str]:
    """Task names of the forgetting table's metric columns: the target, then the general benchmarks less it."""
    get_task(target)
    return [target] + [task for task in GENERAL_TASKS if task != target]


def _forgetting_header(target: str) -> list[str]:
    return [get_task(task).display for task in _forgetting_columns(target)] + [AVG_COLUMN]


def _find_baseline(rows: list[LabelRow], baseline_label: str, template: str) -> LabelRow | None:
    """The row labelled ``baseline_label``, preferring the same prompt template; None when there is none."""
    candidates = [row for row in rows if row.label == baseline_label]
    same_template = [row for row in candidates if row.template == template]
    return (same_template or candidates or [None])[0]


@dataclass
class Comparisons:
    """Paired differences between labels, computed once for a report with shared resamples per task."""

    rows: list[LabelRow]
    target: str
    resamples: int = 2000
    seed: int = 0
    confidence: float = CONFIDENCE
    results: dict[tuple[str, ...], Difference] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError("the number of bootstrap resamples must be at least 1")
        rng = np.random.default_rng(self.seed)
        self._counts: dict[str, np.ndarray] = {}
        for task in _tasks_present([run for row in self.rows for run in row.runs]):
            sizes = {len(next(iter(run.scores[task].components.values()))[1])
                     for row in self.rows for run in row.runs if task in run.scores and run.scores[task].components}
            if len(sizes) > 1:
                raise ValueError(f"{task}: the models were scored on different numbers of examples {sorted(sizes)}; "
                                 "paired comparisons need the same examples")
            if sizes:
                self._counts[task] = resample_counts(sizes.pop(), self.resamples, rng)

    def difference(self, a: LabelRow, b: LabelRow, measure: str, column: str) -> Difference | None:
        """value(a) − value(b) (unscaled) on ``column`` (a task or ``GENERAL``), None without per-example scores."""
        key = (a.label, a.template, b.label, b.template, measure, column)
        if key in self.results:
            return self.results[key]
        tasks = _forgetting_columns(self.target)[1:] if column == GENERAL else [column]
        pairs, counts = [], []
        for task in tasks:
            sa, sb = a.scores(task, _key(task, measure)), b.scores(task, _key(task, measure))
            if sa is None or sb is None:
                if column == GENERAL and sa is None and sb is None and not any(task in r.metrics for r in a.runs):
                    continue  # a general task neither row was scored on
                return None
            pairs.append((sa, sb))
            counts.append(self._counts[task])
        if not pairs:
            return None
        diff = paired_difference(pairs, counts, self.confidence)
        if column != GENERAL and measure == PRIMARY and _key(column, PRIMARY) in BINARY_METRICS:
            diff.p_mcnemar = mcnemar(*pairs[0])
        self.results[key] = diff
        return diff


def _label_values(row: LabelRow, target: str, measure: str) -> list[tuple[float | None, float | None]]:
    """(mean, sd) per forgetting column, then the general average (its sd over runs of each run's average)."""
    scale = _scale(measure)
    tasks = _forgetting_columns(target)
    values = [_mean_sd(row, task, _key(task, measure), scale) for task in tasks]
    per_run = []
    for run in row.runs:
        cells = [run.metrics.get(t, {}).get(_key(t, measure)) for t in tasks[1:]]
        cells = [scale * float(c) for c in cells if c is not None]
        per_run.append(sum(cells) / len(cells) if cells else None)
    if any(v is None for v in per_run):
        return values + [(None, None)]
    arr = np.asarray(per_run)
    return values + [(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None)]


def forgetting_table(runs: list[RunResult], target: str, baseline_label: str = "untuned", measure: str = PRIMARY,
                     comparisons: Comparisons | None = None) -> str:
    """Markdown table: Run | Template | <target> | WebQ | MultiRC | MRPC | FreebaseQA | Avg (general).

    The target column holds the target's ``measure`` and is not repeated among the general columns. Rows not
    labelled ``baseline_label`` show their change against the baseline row with the same prompt template (or, when
    there is none, the first baseline row); with per-example scores the change carries its paired 95% interval.
    """
    rows = group_runs(runs)
    if not any(row.label == baseline_label for row in rows):
        logger.warning("no run labelled %r: the forgetting table shows no changes", baseline_label)
    comparisons = comparisons or Comparisons(rows, target)
    scale, digits = _scale(measure), _digits(measure)
    columns = _forgetting_columns(target) + [GENERAL]
    lines = []
    for row in rows:
        values = _label_values(row, target, measure)
        baseline = _find_baseline(rows, baseline_label, row.template)
        if row.label == baseline_label or baseline is None:
            lines.append([row.label, row.template] + [_fmt(v, sd, digits) for v, sd in values])
            continue
        base_values = _label_values(baseline, target, measure)
        cells = []
        for (value, sd), (base, _), column in zip(values, base_values, columns, strict=True):
            if value is None:
                cells.append(MISSING)
                continue
            diff = comparisons.difference(row, baseline, measure, column)
            if diff is not None:
                cells.append(f"{_fmt(value, sd, digits)} ({_fmt_difference(diff, scale, digits)})")
            elif base is not None:  # no per-example scores: the change of the shown numbers
                delta = round(round(value, digits) - round(base, digits), digits)
                cells.append(f"{_fmt(value, sd, digits)} ({_fmt_change(delta, digits)})")
            else:
                cells.append(_fmt(value, sd, digits))
        lines.append([row.label, row.template] + cells)
    return _markdown(["Run", "Template"] + _forgetting_header(target), lines)


def parse_pairs(spec: str | None) -> list[tuple[str, str]]:
    """``"A:B,C:D"`` -> [(A, B), (C, D)]: compare A against B."""
    pairs = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        a, sep, b = item.partition(":")
        if not sep or not a.strip() or not b.strip() or a.strip() == b.strip():
            raise ValueError(f"--compare {item!r}: expected LABEL_A:LABEL_B with two different labels")
        pairs.append((a.strip(), b.strip()))
    return pairs


def comparison_table(runs: list[RunResult], target: str, pairs: list[tuple[str, str]], measure: str = PRIMARY,
                     comparisons: Comparisons | None = None) -> str:
    """Markdown: one line per named pair, the change A − B per column with its interval (and McNemar's p)."""
    rows = {}
    for row in group_runs(runs):
        rows.setdefault(row.label, row)
    for a, b in pairs:
        for label in (a, b):
            if label not in rows:
                raise ValueError(f"--compare names {label!r}, which is not a label of this report ({sorted(rows)})")
    comparisons = comparisons or Comparisons(list(rows.values()), target)
    scale, digits = _scale(measure), _digits(measure)
    lines = []
    for a, b in pairs:
        cells = []
        for column in _forgetting_columns(target) + [GENERAL]:
            diff = comparisons.difference(rows[a], rows[b], measure, column)
            if diff is None:
                cells.append(MISSING)
                continue
            p = "" if diff.p_mcnemar is None else f" p={diff.p_mcnemar:.3g}"
            cells.append(_fmt_difference(diff, scale, digits) + p)
        lines.append([f"{a} − {b}"] + cells)
    return _markdown(["Comparison"] + _forgetting_header(target), lines)


# --------------------------------------------------------------------------------------------- stats and charts


def stats_records(runs: list[RunResult], target: str, baseline_label: str, pairs: list[tuple[str, str]],
                  comparisons: Comparisons) -> dict[str, Any]:
    """Every number of the report, unrounded: per label, task and metric its value, spread and per-run values; every
    comparison against the baseline and between the named pairs."""
    rows = group_runs(runs)
    by_label: dict[str, LabelRow] = {}
    for row in rows:
        by_label.setdefault(row.label, row)
    labels = {}
    for row in rows:
        tasks = {}
        for task in _tasks_present(row.runs):
            keys = sorted({k for run in row.runs for k in run.metrics.get(task, {}) if k != "n"})
            tasks[task] = {k: {"value": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                               "per_run": v} for k in keys if (v := row.per_run(task, k)) is not None}
        name = row.label if by_label[row.label] is row else f"{row.label} ({row.template})"
        labels[name] = {"template": row.template, "runs": [run.run for run in row.runs], "tasks": tasks}
    compared = [(row, baseline) for row in rows if row.label != baseline_label
                and (baseline := _find_baseline(rows, baseline_label, row.template)) is not None]
    compared += [pair for a, b in pairs if (pair := (by_label[a], by_label[b])) not in compared]
    records = []
    for row_a, row_b in compared:
        a, b = row_a.label, row_b.label
        for measure in MEASURES:
            for column in _forgetting_columns(target) + [GENERAL]:
                diff = comparisons.difference(row_a, row_b, measure, column)
                if diff is None:
                    continue
                metric = "average of " + ",".join(_key(t, measure) for t in _forgetting_columns(target)[1:]) \
                    if column == GENERAL else _key(column, measure)
                records.append({"a": a, "b": b, "measure": measure, "metric": metric, "column": column,
                                "delta": diff.delta, "low": diff.low, "high": diff.high,
                                "p_mcnemar": diff.p_mcnemar})
    return {"target": target, "baseline": baseline_label, "confidence": comparisons.confidence,
            "bootstrap_resamples": comparisons.resamples, "bootstrap_seed": comparisons.seed,
            "labels": labels, "comparisons": records}


def _stats_csv(records: dict[str, Any]) -> str:
    keys = ["a", "b", "measure", "metric", "column", "delta", "low", "high", "p_mcnemar"]
    lines = [[rec[k] if rec[k] is not None else "" for k in keys] for rec in records["comparisons"]]
    return _csv(keys, lines)


def _run_changes(run: RunResult, base: LabelRow, target: str, measure: str) -> tuple[float, float] | None:
    """(change on the target, change on the general average) of one run against the baseline's mean."""
    solo = LabelRow(run.label, run.template, [run])
    mine, theirs = _label_values(solo, target, measure), _label_values(base, target, measure)
    if mine[0][0] is None or theirs[0][0] is None or mine[-1][0] is None or theirs[-1][0] is None:
        return None
    return mine[0][0] - theirs[0][0], mine[-1][0] - theirs[-1][0]


def tradeoff_points(runs: list[RunResult], target: str, baseline_label: str,
                    comparisons: Comparisons) -> list[dict[str, Any]]:
    """The chart's numbers: per label (``run`` = "mean") and per run, the change on the target (x) and on the
    general average (y) against the baseline, for both measures; NLL changes are negated so that up and right is
    better on both panels. Label means carry their 95% intervals."""
    rows = group_runs(runs)
    points = []
    for row in rows:
        baseline = _find_baseline(rows, baseline_label, row.template)
        if row.label == baseline_label or baseline is None:
            continue
        for measure in MEASURES:
            sign = -1.0 if measure == NLL else 1.0
            scale = sign * _scale(measure)
            dx = comparisons.difference(row, baseline, measure, target)
            dy = comparisons.difference(row, baseline, measure, GENERAL)
            if dx is None or dy is None:
                changes = _run_changes(row.runs[0], baseline, target, measure) if len(row.runs) == 1 else None
                if changes is None:
                    continue
                x_mid, y_mid = sign * changes[0], sign * changes[1]
                x_low = x_high = y_low = y_high = None
            else:
                x_mid, y_mid = scale * dx.delta, scale * dy.delta
                x_low, x_high = sorted((scale * dx.low, scale * dx.high))
                y_low, y_high = sorted((scale * dy.low, scale * dy.high))
            points.append({"label": row.label, "run": "mean", "measure": measure, "x": x_mid, "x_low": x_low,
                           "x_high": x_high, "y": y_mid, "y_low": y_low, "y_high": y_high})
            if len(row.runs) > 1:
                for run in row.runs:
                    changes = _run_changes(run, baseline, target, measure)
                    if changes is not None:
                        points.append({"label": row.label, "run": run.run or run.label, "measure": measure,
                                       "x": sign * changes[0], "y": sign * changes[1], "x_low": None,
                                       "x_high": None, "y_low": None, "y_high": None})
    return points


def _save_png(fig, path: str | Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_tradeoff(points: list[dict[str, Any]], target: str, path: str | Path) -> Path:
    """Two panels (decoded metric, answer likelihood): x = change on the target, y = change on the general average,
    small dots per run, a large marker per label with its 95% intervals as bars."""
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
                        color=colors[p["label"]], label=p["label"])
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.axvline(0.0, color="black", linewidth=0.6)
        if measure == NLL:
            ax.set_xlabel(f"− Δ answer NLL on {display} (nats/token; right = learned)")
            ax.set_ylabel("− Δ answer NLL, general average (up = remembers)")
            ax.set_title("Answer likelihood vs untuned")
        else:
            ax.set_xlabel(f"Δ {display} {get_task(target).primary} (x100; right = learned)")
            ax.set_ylabel("Δ general average (x100; up = forgot less)")
            ax.set_title("Decoded metric vs untuned")
        ax.legend(fontsize="small")
    fig.suptitle(f"Learning vs forgetting, target {display} (bars: paired bootstrap {CONFIDENCE:.0%} intervals)",
                 fontsize="medium")
    return _save_png(fig, path)


def plot_forgetting(runs: list[RunResult], target: str, path: str | Path) -> Path:
    """Grouped bar chart of the forgetting table (one group per column, one bar per label), written as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = group_runs(runs)
    groups = _forgetting_header(target)
    width = 0.8 / max(len(rows), 1)
    fig = Figure(figsize=(max(6.0, 1.4 * len(groups)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        values = _label_values(row, target, PRIMARY)
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


def write_report(runs: list[RunResult], target: str, out_dir: str | Path, baseline_label: str = "untuned",
                 pairs: list[tuple[str, str]] | None = None, resamples: int = 2000, seed: int = 0,
                 notes: list[str] | None = None) -> dict[str, Path]:
    """Write summary.{md,csv}, forgetting.{md,png}, comparisons.md, stats.{json,csv} and tradeoff.{png,csv} into
    ``out_dir``; return their paths by key."""
    out_dir = Path(out_dir)
    pairs = pairs or []
    rows = group_runs(runs)
    known = {row.label for row in rows}
    for label in (label for pair in pairs for label in pair):
        if label not in known:
            raise ValueError(f"--compare names {label!r}, which is not a label of this report ({sorted(known)})")
    comparisons = Comparisons(rows, target, resamples, seed)
    summary_md, summary_csv = summary_table(runs)
    has_nll = any(NLL in m for run in runs for m in run.metrics.values())
    has_primary = any(get_task(t).primary in m for run in runs for t, m in run.metrics.items())
    forgetting = []
    for measure, title in ((PRIMARY, "decoded metric"), (NLL, "answer NLL, nats per token, lower is better")):
        if (measure == NLL and has_nll) or (measure == PRIMARY and has_primary):
            forgetting.append(f"### Forgetting: {title}\n\n"
                              + forgetting_table(runs, target, baseline_label, measure, comparisons))
    compared = []
    for measure, title in ((PRIMARY, "decoded metric"), (NLL, "answer NLL")):
        if pairs and ((measure == NLL and has_nll) or (measure == PRIMARY and has_primary)):
            compared.append(f"### Comparisons: {title} (A − B, paired bootstrap {CONFIDENCE:.0%} interval, "
                            "McNemar's exact p)\n\n" + comparison_table(runs, target, pairs, measure, comparisons))
    records = stats_records(runs, target, baseline_label, pairs, comparisons)
    records["notes"] = list(notes or [])
    if notes:
        summary_md += "\n" + "".join(f"Note: {note}.\n" for note in notes)
    points = tradeoff_points(runs, target, baseline_label, comparisons)
    paths = {key: out_dir / name for key, name in (
        ("summary_md", "summary.md"), ("summary_csv", "summary.csv"), ("forgetting_md", "forgetting.md"),
        ("forgetting_png", "forgetting.png"), ("comparisons_md", "comparisons.md"), ("stats_json", "stats.json"),
        ("stats_csv", "stats.csv"), ("tradeoff_png", "tradeoff.png"), ("tradeoff_csv", "tradeoff.csv"))}
    atomic_write_text(paths["summary_md"], summary_md)
    atomic_write_text(paths["summary_csv"], summary_csv)
    atomic_write_text(paths["forgetting_md"], "\n".join(forgetting))
    atomic_write_text(paths["comparisons_md"], "\n".join(compared) or "No pairs named (--compare A:B).\n")
    atomic_write_text(paths["stats_json"], json.dumps(records, indent=1) + "\n")
    atomic_write_text(paths["stats_csv"], _stats_csv(records))
    point_keys = ["label", "run", "measure", "x", "x_low", "x_high", "y", "y_low", "y_high"]
    atomic_write_text(paths["tradeoff_csv"], _csv(point_keys, [[p[k] if p[k] is not None else "" for k in point_keys]
                                                                for p in points]))
    plot_forgetting(runs, target, paths["forgetting_png"])
    plot_tradeoff(points, target, paths["tradeoff_png"])
    logger.info("report written to %s", out_dir)
    return paths
