"""The report's tables, as markdown (and CSV for the summary).

Every decoded-metric cell is a metric from ``metrics`` scaled by 100 with one decimal (MCC too, so it lies in
[-100, 100]); answer NLL cells are nats per answer token pooled over the task (``results.DEFINITIONS``) with three
decimals, lower is better; a task a run was not scored on shows ``-``. Runs sharing a label (seeds) form one row: the
mean over its runs, ``±`` their standard deviation.

* ``summary_table``: one row per label, each task's primary metric and answer NLL, and ``yes%`` beside every yes/no
  task so that a model collapsing onto one answer is visible even when its accuracy looks fine.
* ``forgetting_table``: the paper's Table 2 layout for one target task: the target, then the general benchmarks
  (WebQ, MultiRC, MRPC, FreebaseQA, less the target), and ``Avg (general)``, the plain mean of the general cells.
  Rows other than the baseline (the untuned model, with the same prompt template where there is one) show the change
  against it with its headline 95% interval (``imsm.evaluation.stats``): ``41.2±1.0 (-3.1 [-9.0, +2.8])``, the
  method-level interval (seeds and examples) of a label of several seeds, or ``41.2 (-3.1 ex[-5.0, -1.2])``, the
  examples-only interval of a single run (its method-level interval is not estimable from one seed); without
  per-example scores the change of the shown numbers, ``41.2 (-3.1)``.
* ``comparison_table``: named pairs (e.g. IMSM-LoRA vs LoRA): the change per task and on the general average with
  both intervals and the p-value of the test of the same quantity.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import numpy as np

from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.report.comparisons import Comparisons
from imsm.evaluation.report.results import (
    GENERAL,
    NLL,
    PRIMARY,
    RunResult,
    digits,
    find_baseline,
    forgetting_columns,
    forgetting_header,
    group_runs,
    label_values,
    mean_sd,
    scale,
    tasks_present,
)
from imsm.evaluation.stats import NOT_ESTIMABLE, Difference, format_p

logger = logging.getLogger(__name__)

MISSING = "-"
COST_COLUMNS = (("train_runtime_s", "Train s"), ("optimizer_steps", "Steps"), ("tokens_seen", "Tokens"))
INTERVAL_LEGEND = ("[a, b]: method-level 95% interval (training seeds and test examples); ex[a, b]: examples-only "
                   "95% interval (test examples resampled, the runs held fixed), shown where a label has one seed, "
                   f"whose method-level interval is {NOT_ESTIMABLE}")
P_LEGEND = ("p: the method-level t test where there is a method-level interval; McNemar's exact test between two "
            "single models on a 0/1 metric; none otherwise")


def fmt(value: float | None, sd: float | None = None, places: int = 1) -> str:
    if value is None:
        return MISSING
    return f"{value:.{places}f}" + ("" if sd is None else f"±{sd:.{places}f}")


def fmt_change(delta: float, places: int) -> str:
    return f"{round(delta, places) + 0.0:+.{places}f}"  # + 0.0 turns -0.0 into 0.0


def _interval(low: float, high: float, factor: float, places: int) -> str:
    return f"[{fmt_change(factor * low, places)}, {fmt_change(factor * high, places)}]"


def fmt_headline(diff: Difference, factor: float, places: int) -> str:
    """The change with its headline interval: method-level ``[a, b]``, else examples-only ``ex[a, b]``."""
    change = fmt_change(factor * diff.delta, places)
    if diff.method_low is not None:
        return f"{change} {_interval(diff.method_low, diff.method_high, factor, places)}"
    return f"{change} ex{_interval(diff.examples_low, diff.examples_high, factor, places)}"


def fmt_both(diff: Difference, factor: float, places: int) -> str:
    """The change, its method-level interval (or why there is none), its examples-only interval and p."""
    method = _interval(diff.method_low, diff.method_high, factor, places) if diff.method_low is not None \
        else f"[{diff.method_note}]"
    p = "" if diff.p is None else f" p={format_p(diff.p)}"
    examples = _interval(diff.examples_low, diff.examples_high, factor, places)
    return f"{fmt_change(factor * diff.delta, places)} {method} ex{examples}{p}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def summary_table(runs: list[RunResult]) -> tuple[str, str]:
    """Return (markdown, csv) of every label's primary metric per task (and answer NLL per token where scored), with
    ``yes%`` beside each yes/no task; a label of several runs shows mean±sd and a ``Runs`` column says how many."""
    rows = group_runs(runs)
    several = any(len(row.runs) > 1 for row in rows)
    header = ["Run", "Template"] + (["Runs"] if several else [])
    columns: list[tuple[str, str]] = []
    for task in tasks_present(runs):
        spec = get_task(task)
        if any(spec.primary in run.metrics.get(task, {}) for run in runs):
            header.append(f"{spec.display} ({spec.primary})")
            columns.append((task, spec.primary))
        if any(NLL in run.metrics.get(task, {}) for run in runs):
            header.append(f"{spec.display} NLL/token")
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
            line.append(fmt(*mean_sd(row, task, key, scale(measure)), places=digits(measure)))
        for key in costs:  # what training cost, mean over the label's runs (equal compute, visible)
            values = [run.cost.get(key) if run.cost else None for run in row.runs]
            line.append(MISSING if any(v is None for v in values) else f"{np.mean(values):.0f}")
        cells.append(line)
    return markdown(header, cells), to_csv(header, cells)


def forgetting_table(runs: list[RunResult], target: str, baseline_label: str = "untuned", measure: str = PRIMARY,
                     comparisons: Comparisons | None = None) -> str:
    """Markdown table: Run | Template | <target> | WebQ | MultiRC | MRPC | FreebaseQA | Avg (general).

    The target column holds the target's ``measure`` and is not repeated among the general columns. Rows not
    labelled ``baseline_label`` show their change against the baseline row with the same prompt template (or, when
    there is none, the first baseline row); with per-example scores the change carries its headline 95% interval.
    """
    rows = group_runs(runs)
    if not any(row.label == baseline_label for row in rows):
        logger.warning("no run labelled %r: the forgetting table shows no changes", baseline_label)
    comparisons = comparisons or Comparisons(rows, target)
    factor, places = scale(measure), digits(measure)
    columns = forgetting_columns(target) + [GENERAL]
    lines = []
    for row in rows:
        values = label_values(row, target, measure)
        baseline = find_baseline(rows, baseline_label, row.template)
        if row.label == baseline_label or baseline is None:
            lines.append([row.label, row.template] + [fmt(v, sd, places) for v, sd in values])
            continue
        base_values = label_values(baseline, target, measure)
        cells = []
        for (value, sd), (base, _), column in zip(values, base_values, columns, strict=True):
            if value is None:
                cells.append(MISSING)
                continue
            diff = comparisons.difference(row, baseline, measure, column)
            if diff is not None:
                cells.append(f"{fmt(value, sd, places)} ({fmt_headline(diff, factor, places)})")
            elif base is not None:  # no per-example scores: the change of the shown numbers
                delta = round(round(value, places) - round(base, places), places)
                cells.append(f"{fmt(value, sd, places)} ({fmt_change(delta, places)})")
            else:
                cells.append(fmt(value, sd, places))
        lines.append([row.label, row.template] + cells)
    return markdown(["Run", "Template"] + forgetting_header(target), lines)


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
    """Markdown: one line per named pair, the change A − B per column with both intervals and its test's p."""
    rows = {}
    for row in group_runs(runs):
        rows.setdefault(row.label, row)
    for a, b in pairs:
        for label in (a, b):
            if label not in rows:
                raise ValueError(f"--compare names {label!r}, which is not a label of this report ({sorted(rows)})")
    comparisons = comparisons or Comparisons(list(rows.values()), target)
    factor, places = scale(measure), digits(measure)
    lines = []
    for a, b in pairs:
        cells = []
        for column in forgetting_columns(target) + [GENERAL]:
            diff = comparisons.difference(rows[a], rows[b], measure, column)
            cells.append(MISSING if diff is None else fmt_both(diff, factor, places))
        lines.append([f"{a} − {b}"] + cells)
    return markdown(["Comparison"] + forgetting_header(target), lines)
