"""Result tables and the forgetting plot.

Every cell is a metric from ``imsm.metrics.compute_metrics`` scaled by 100 with one decimal (MCC too, so it lies in
[-100, 100]); a task a run was not scored on shows ``-``.

* ``summary_table``: one row per run, each task's primary metric, and ``yes%`` beside every yes/no task so that a model
  collapsing onto one answer is visible even when its accuracy looks fine.
* ``forgetting_table``: the paper's Table 2 layout for one target task: the target's primary metric, then the general
  benchmarks (WebQ, MultiRC, MRPC, FreebaseQA, less the target), and ``Avg (general)``, the plain mean of the general
  cells a run has. Rows other than the baseline (the untuned model, with the same prompt template where there is one)
  show the change against it, ``41.2 (-3.1)``; the change of the average is the difference of the two averages.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imsm.atomic import atomic_write_bytes, atomic_write_text
from imsm.metrics import TASKS, get_task

logger = logging.getLogger(__name__)

GENERAL_TASKS: tuple[str, ...] = ("webq", "multirc", "mrpc", "freebaseqa")
AVG_COLUMN = "Avg (general)"
MISSING = "-"


@dataclass
class RunResult:
    """The scores of one model on some tasks, as produced by evaluation."""

    label: str  # e.g. "untuned", "LoRA", "IMSM-LoRA"
    template: str  # prompt template used: "raw" or "chat"
    metrics: dict[str, dict[str, float]]  # task -> compute_metrics output

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Build from ``{"label", "template", "metrics"}``, e.g. a JSON file written by evaluation."""
        return cls(label=data["label"], template=data["template"], metrics=data["metrics"])


def _value(run: RunResult, task: str, key: str) -> float | None:
    """The metric ``key`` of ``task`` scaled by 100, or ``None`` when the run lacks it."""
    value = run.metrics.get(task, {}).get(key)
    return None if value is None else 100.0 * float(value)


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _fmt_delta(value: float | None, base: float | None) -> str:
    if value is None:
        return MISSING
    if base is None:
        return _fmt(value)
    # The change of the shown (rounded) numbers, so a reader can check it; + 0.0 turns -0.0 into 0.0.
    delta = round(round(value, 1) - round(base, 1), 1) + 0.0
    return f"{value:.1f} ({delta:+.1f})"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _tasks_present(runs: list[RunResult]) -> list[str]:
    """Tasks scored in any run: registered tasks in ``TASKS`` order (an unknown task raises ``ValueError``)."""
    present = {task for run in runs for task in run.metrics}
    for task in present:
        get_task(task)
    return [task for task in TASKS if task in present]


def summary_table(runs: list[RunResult]) -> tuple[str, str]:
    """Return (markdown, csv) of every run's primary metric per task, with ``yes%`` beside each yes/no task."""
    header = ["Run", "Template"]
    columns: list[tuple[str, str]] = []
    for task in _tasks_present(runs):
        spec = get_task(task)
        header.append(f"{spec.display} ({spec.primary})")
        columns.append((task, spec.primary))
        if spec.kind == "yesno":
            header.append(f"{spec.display} yes%")
            columns.append((task, "yes_rate"))
    rows = [[run.label, run.template] + [_fmt(_value(run, task, key)) for task, key in columns] for run in runs]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return _markdown(header, rows), buffer.getvalue()


def _forgetting_columns(target: str) -> list[str]:
    """Task names of the forgetting table's metric columns: the target, then the general benchmarks less it."""
    get_task(target)
    return [target] + [task for task in GENERAL_TASKS if task != target]


def _forgetting_values(run: RunResult, target: str) -> list[float | None]:
    """The run's cells for ``_forgetting_columns(target)`` followed by the average of its general cells."""
    tasks = _forgetting_columns(target)
    values = [_value(run, task, get_task(task).primary) for task in tasks]
    general = [v for v in values[1:] if v is not None]
    return values + [sum(general) / len(general) if general else None]


def _forgetting_header(target: str) -> list[str]:
    return [get_task(task).display for task in _forgetting_columns(target)] + [AVG_COLUMN]


def _find_baseline(runs: list[RunResult], baseline_label: str, template: str) -> RunResult | None:
    """The run labelled ``baseline_label`` with the same prompt template, else the first so labelled, else None."""
    candidates = [run for run in runs if run.label == baseline_label]
    same_template = [run for run in candidates if run.template == template]
    return (same_template or candidates or [None])[0]


def forgetting_table(runs: list[RunResult], target: str, baseline_label: str = "untuned") -> str:
    """Markdown table: Run | Template | <target> | WebQ | MultiRC | MRPC | FreebaseQA | Avg (general).

    The target column holds the target's primary metric and is not repeated among the general columns. Rows not
    labelled ``baseline_label`` show their change against the baseline run with the same prompt template (or, when
    there is none, the first baseline run); without any baseline run the table shows no changes.
    """
    if not any(run.label == baseline_label for run in runs):
        logger.warning("no run labelled %r: the forgetting table shows no changes", baseline_label)
    rows = []
    for run in runs:
        values = _forgetting_values(run, target)
        baseline = _find_baseline(runs, baseline_label, run.template)
        if run.label == baseline_label or baseline is None:
            cells = [_fmt(v) for v in values]
        else:
            base_values = _forgetting_values(baseline, target)
            cells = [_fmt_delta(v, b) for v, b in zip(values, base_values, strict=True)]
        rows.append([run.label, run.template] + cells)
    return _markdown(["Run", "Template"] + _forgetting_header(target), rows)


def plot_forgetting(runs: list[RunResult], target: str, path: str | Path) -> Path:
    """Grouped bar chart of the forgetting table (one group per column, one bar per run), written as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _forgetting_header(target)
    width = 0.8 / max(len(runs), 1)
    fig = Figure(figsize=(max(6.0, 1.4 * len(groups)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        heights = [math.nan if v is None else v for v in _forgetting_values(run, target)]  # NaN draws no bar
        positions = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(positions, heights, width=width, label=f"{run.label} ({run.template})")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("score (x100)")
    ax.set_title(f"Target {get_task(target).display}: target score and general benchmarks")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_report(
    runs: list[RunResult], target: str, out_dir: str | Path, baseline_label: str = "untuned"
) -> dict[str, Path]:
    """Write summary.md, summary.csv, forgetting.md and forgetting.png into ``out_dir``; return their paths by key."""
    out_dir = Path(out_dir)
    summary_md, summary_csv = summary_table(runs)
    paths = {
        "summary_md": out_dir / "summary.md",
        "summary_csv": out_dir / "summary.csv",
        "forgetting_md": out_dir / "forgetting.md",
        "forgetting_png": out_dir / "forgetting.png",
    }
    atomic_write_text(paths["summary_md"], summary_md)
    atomic_write_text(paths["summary_csv"], summary_csv)
    atomic_write_text(paths["forgetting_md"], forgetting_table(runs, target, baseline_label))
    plot_forgetting(runs, target, paths["forgetting_png"])
    logger.info("report written to %s", out_dir)
    return paths
