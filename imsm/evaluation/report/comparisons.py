"""The statistics of a report: paired differences between labels (``imsm.evaluation.stats``) computed once with
shared resamples, and every number of the report unrounded for ``stats.json`` / ``stats.csv``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imsm.evaluation.measures.metrics import BINARY_METRICS
from imsm.evaluation.report.results import (
    DEFINITIONS,
    GENERAL,
    MEASURES,
    LabelRow,
    RunResult,
    find_baseline,
    forgetting_columns,
    group_runs,
    metric_key,
    tasks_present,
)
from imsm.evaluation.stats import (
    CONFIDENCE,
    MCNEMAR,
    Difference,
    mcnemar,
    paired_difference,
    reported_p,
    resample_counts,
)

INTERVALS = {
    "examples": "examples-only: test examples resampled, each label's runs held fixed (no seed-to-seed variance)",
    "method": "method-level: seed variance (between runs of a label) added to the examples-only variance, "
              "Welch-Satterthwaite t interval; not estimable from one seed",
    "p": "the test of the same quantity as the headline interval: the method-level t test where that interval "
         "exists, else McNemar's exact test between two single models on a 0/1 metric, else none; below 1e-4 "
         "written \"<1e-4\" (there the digits are the tail approximation's, not the data's)",
}
RECORD_KEYS = ["a", "b", "measure", "metric", "column", "delta", "examples_low", "examples_high", "method_low",
               "method_high", "method_note", "p", "test"]


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
        for task in tasks_present([run for row in self.rows for run in row.runs]):
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
        tasks = forgetting_columns(self.target)[1:] if column == GENERAL else [column]
        pairs, counts = [], []
        for task in tasks:
            sa, sb = a.scores(task, metric_key(task, measure)), b.scores(task, metric_key(task, measure))
            if sa is None or sb is None:
                if column == GENERAL and sa is None and sb is None and not any(task in r.metrics for r in a.runs):
                    continue  # a general task neither row was scored on
                return None
            pairs.append((sa, sb))
            counts.append(self._counts[task])
        if not pairs:
            return None
        diff = paired_difference(pairs, counts, self.confidence)
        single = len(a.runs) == 1 and len(b.runs) == 1
        if diff.test is None and single and column != GENERAL and metric_key(column, measure) in BINARY_METRICS:
            diff.p, diff.test = mcnemar(*pairs[0]), MCNEMAR
        self.results[key] = diff
        return diff


def headline_interval(record: dict[str, Any]) -> tuple[float, float]:
    """The interval to quote from a ``stats.json`` comparison record: method-level where estimable, else the
    examples-only one (a record written before both kinds existed has one interval, ``low``/``high``)."""
    if record.get("method_low") is not None:
        return record["method_low"], record["method_high"]
    if "examples_low" in record:
        return record["examples_low"], record["examples_high"]
    return record["low"], record["high"]


def compared_pairs(rows: list[LabelRow], baseline_label: str,
                   pairs: list[tuple[str, str]]) -> list[tuple[LabelRow, LabelRow]]:
    """Every row against its baseline, then the named pairs not already among them."""
    by_label: dict[str, LabelRow] = {}
    for row in rows:
        by_label.setdefault(row.label, row)
    compared = [(row, baseline) for row in rows if row.label != baseline_label
                and (baseline := find_baseline(rows, baseline_label, row.template)) is not None]
    return compared + [pair for a, b in pairs if (pair := (by_label[a], by_label[b])) not in compared]


def stats_records(runs: list[RunResult], target: str, baseline_label: str, pairs: list[tuple[str, str]],
                  comparisons: Comparisons) -> dict[str, Any]:
    """Every number of the report, unrounded: per label, task and metric its value, spread and per-run values; every
    comparison against the baseline and between the named pairs, with both intervals and its test."""
    rows = group_runs(runs)
    first: dict[str, LabelRow] = {}
    for row in rows:
        first.setdefault(row.label, row)
    labels = {}
    for row in rows:
        tasks = {}
        for task in tasks_present(row.runs):
            keys = sorted({k for run in row.runs for k in run.metrics.get(task, {}) if k != "n"})
            tasks[task] = {k: {"value": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                               "per_run": v} for k in keys if (v := row.per_run(task, k)) is not None}
        name = row.label if first[row.label] is row else f"{row.label} ({row.template})"
        labels[name] = {"template": row.template, "runs": [run.run for run in row.runs], "tasks": tasks}
    records = []
    for row_a, row_b in compared_pairs(rows, baseline_label, pairs):
        for measure in MEASURES:
            for column in forgetting_columns(target) + [GENERAL]:
                diff = comparisons.difference(row_a, row_b, measure, column)
                if diff is None:
                    continue
                metric = "average of " + ",".join(metric_key(t, measure) for t in forgetting_columns(target)[1:]) \
                    if column == GENERAL else metric_key(column, measure)
                records.append({"a": row_a.label, "b": row_b.label, "measure": measure, "metric": metric,
                                "column": column, "delta": diff.delta, "examples_low": diff.examples_low,
                                "examples_high": diff.examples_high, "method_low": diff.method_low,
                                "method_high": diff.method_high, "method_note": diff.method_note,
                                "p": reported_p(diff.p), "test": diff.test})
    return {"target": target, "baseline": baseline_label, "confidence": comparisons.confidence,
            "bootstrap_resamples": comparisons.resamples, "bootstrap_seed": comparisons.seed,
            "intervals": INTERVALS, "definitions": DEFINITIONS, "labels": labels, "comparisons": records}
