"""What a report is made of: each run's scores (``RunResult``), the runs grouped by label (``LabelRow``), the columns
of the forgetting layout, and how a task's metrics and per-example scores follow from its saved prediction records.

``score_records`` is the one place where a task's records (``predictions.jsonl``) become metrics: evaluation calls it
while it writes, and ``load_output_dir`` calls it to rebuild a report from a finished (or interrupted) output folder
without decoding again, so both give the same numbers.

**Answer NLL** (``answer_nll``, what the tables show as "NLL/token"): nats per answer token, *pooled* over the task,
Σ_i NLL_i / Σ_i T_i, with NLL_i the summed negative log-likelihood of example i's gold answer tokens (closing EOS
included, teacher-forced, as training puts its loss on them) and T_i their count. Pooled because it is the per-token
cross-entropy that the training loss averages and that lm-evaluation-harness reports for perplexities, so a 1-token
yes/no answer does not weigh as much as a 100-token GSM8K solution. With several golds an example is scored on the gold
of lowest mean NLL per token: the likeliest correct answer, crediting any gold as the decoded metrics (contain, EM)
do. ``answer_nll_example_mean`` (saved, not shown) is the mean over examples of each example's per-token mean.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imsm.evaluation.measures.metrics import TASKS, ExampleScores, example_scores, get_task
from imsm.evaluation.stats import LabelScores

logger = logging.getLogger(__name__)

GENERAL_TASKS: tuple[str, ...] = ("webq", "multirc", "mrpc", "freebaseqa")
AVG_COLUMN = "Avg (general)"
GENERAL = "general"  # the key of the general average in comparisons
NLL = "answer_nll"
PRIMARY = "primary"  # the measure "each task's primary metric"
MEASURES = (PRIMARY, NLL)
DEFINITIONS = {
    "answer_nll": "nats per answer token, pooled over the task: sum of the gold answer tokens' NLL (closing EOS "
                  "included, teacher-forced) / their count; per example the gold of lowest mean NLL per token",
    "answer_nll_example_mean": "mean over examples of each example's mean NLL per answer token (same gold choice)",
}


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

    @property
    def seeded(self) -> bool:
        """Whether the runs are trained (seeds vary them); the untuned model (no run folder) is deterministic."""
        return any(run.run is not None for run in self.runs)

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
        return LabelScores(kinds.pop(), np.stack(arrays), self.seeded)


def group_runs(runs: list[RunResult]) -> list[LabelRow]:
    """One row per (label, prompt template) in order of first appearance: the runs of a row are seeds of one
    method (evaluation refuses a label given to runs that differ in anything else)."""
    rows: dict[tuple[str, str], LabelRow] = {}
    for run in runs:
        rows.setdefault((run.label, run.template), LabelRow(run.label, run.template, [])).runs.append(run)
    return list(rows.values())


def metric_key(task: str, measure: str) -> str:
    return get_task(task).primary if measure == PRIMARY else measure


def scale(measure: str) -> float:
    return 1.0 if measure == NLL else 100.0


def digits(measure: str) -> int:
    return 3 if measure == NLL else 1


def tasks_present(runs: list[RunResult]) -> list[str]:
    """Tasks scored in any run: registered tasks in ``TASKS`` order (an unknown task raises ``ValueError``)."""
    present = {task for run in runs for task in run.metrics}
    for task in present:
        get_task(task)
    return [task for task in TASKS if task in present]


def forgetting_columns(target: str) -> list[str]:
    """Task names of the forgetting table's metric columns: the target, then the general benchmarks less it."""
    get_task(target)
    return [target] + [task for task in GENERAL_TASKS if task != target]


def forgetting_header(target: str) -> list[str]:
    return [get_task(task).display for task in forgetting_columns(target)] + [AVG_COLUMN]


def find_baseline(rows: list[LabelRow], baseline_label: str, template: str) -> LabelRow | None:
    """The row labelled ``baseline_label``, preferring the same prompt template; None when there is none."""
    candidates = [row for row in rows if row.label == baseline_label]
    same_template = [row for row in candidates if row.template == template]
    return (same_template or candidates or [None])[0]


def mean_sd(row: LabelRow, task: str, key: str, factor: float) -> tuple[float | None, float | None]:
    values = row.per_run(task, key)
    if values is None:
        return None, None
    arr = factor * np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


def label_values(row: LabelRow, target: str, measure: str) -> list[tuple[float | None, float | None]]:
    """(mean, sd) per forgetting column, then the general average (its sd over runs of each run's average)."""
    factor = scale(measure)
    tasks = forgetting_columns(target)
    values = [mean_sd(row, task, metric_key(task, measure), factor) for task in tasks]
    per_run = []
    for run in row.runs:
        cells = [run.metrics.get(t, {}).get(metric_key(t, measure)) for t in tasks[1:]]
        cells = [factor * float(c) for c in cells if c is not None]
        per_run.append(sum(cells) / len(cells) if cells else None)
    if any(v is None for v in per_run):
        return values + [(None, None)]
    arr = np.asarray(per_run)
    return values + [(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None)]


# ------------------------------------------------------------------------------------------ from saved records


def score_records(task: str, records: list[dict], yes_no_rule: str = "first_word") -> tuple[ExampleScores,
                                                                                             dict[str, float]]:
    """A task's per-example scores and metrics from its prediction records: the decoded metrics where records hold
    a ``prediction``, the answer NLL (see the module docstring) where they hold ``answer_nll_sum``."""
    scores = ExampleScores({})
    if records and all("prediction" in r for r in records):
        scores = example_scores(task, [r["prediction"] for r in records], [r["gold"] for r in records], yes_no_rule)
    likelihood = bool(records) and all("answer_nll_sum" in r for r in records)
    if likelihood:
        scores.components[NLL] = ("ratio", np.array([[r["answer_nll_sum"], r["answer_tokens"]] for r in records],
                                                    dtype=float))
    metrics = {name: scores.value(name) for name in scores.components} | {"n": len(records)}
    if likelihood:
        metrics["answer_nll_example_mean"] = float(np.mean([r["answer_nll"] for r in records]))
    return scores, metrics


def read_json(path: Path) -> Any:
    """A JSON file an evaluation saved; a damaged one (cut short, garbled) is an error naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged: not JSON ({e.msg}, line {e.lineno} column {e.colno}); evaluate that "
                         "model again (or restore the file)") from None


def _read_jsonl(path: Path) -> list[dict]:
    """A predictions.jsonl; a line that is not JSON (a file cut mid-line) is an error naming file and line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not JSON ({e.msg}); the file is damaged (cut mid-line?), so "
                             "evaluate that model again") from None
    return rows


REPORT_INPUTS = "report_inputs.json"  # written before decoding: what the report needs besides the records


def saved_folders(out_dir: Path) -> list[str]:
    """The model folders of an output folder in the order evaluation ran them (``report_inputs.json``); for a
    folder written before that file existed, every folder holding a results.json, the untuned model first."""
    inputs = out_dir / REPORT_INPUTS
    if inputs.is_file():
        return read_json(inputs)["folders"]
    found = sorted(str(p.parent.relative_to(out_dir)) for p in out_dir.glob("*/results.json"))
    found += sorted(str(p.parent.relative_to(out_dir)) for p in out_dir.glob("*/run*/results.json"))
    if not found:
        raise FileNotFoundError(f"{out_dir} holds no results.json: it is not an evaluate.py output folder")
    logger.warning("%s has no %s (written before reports could be rebuilt): rows in folder order", out_dir,
                   REPORT_INPUTS)
    return sorted(found, key=lambda folder: folder != "untuned")


def load_output_dir(out_dir: str | Path) -> list[RunResult]:
    """Every model's result in an evaluation's output folder, its metrics and per-example scores rebuilt from the
    saved prediction records (no decoding)."""
    out_dir = Path(out_dir)
    runs = []
    for folder in saved_folders(out_dir):
        result_file = out_dir / folder / "results.json"
        if not result_file.is_file():
            raise FileNotFoundError(f"{result_file} is missing: the evaluation stopped before model {folder!r} was "
                                    "done; evaluate again")
        result = RunResult.from_dict(read_json(result_file))
        for task in result.metrics:
            meta = read_json(out_dir / folder / task / "metrics.json")
            predictions = out_dir / folder / task / "predictions.jsonl"
            records = _read_jsonl(predictions)
            expected = (meta.get("metrics") or {}).get("n") if isinstance(meta, dict) else None
            if not records or (expected is not None and len(records) != expected):
                raise ValueError(f"{predictions} holds {len(records)} prediction rows, but the evaluation scored "
                                 f"{expected if expected is not None else 'some'} (metrics.json): the file was "
                                 "emptied or cut short; evaluate that model again")
            scores, metrics = score_records(task, records, meta.get("yes_no_rule", "first_word"))
            result.scores[task], result.metrics[task] = scores, metrics
        runs.append(result)
    return runs


MEASURES_FILE = "measures.json"  # a model folder's --measures values (written by measures.session)
MEASURE_KEYS = {"auroc": "yes_no", "general_nll": "general_nll", "kl": "kl"}  # --measures name -> measures.json key


def read_measures(out_dir: str | Path, folders: list[str] | None = None) -> dict[str, list[dict]]:
    """label -> its runs' saved measures (each model folder's ``measures.json``), in the order of ``folders`` (the
    report inputs' model folders) or else by label and run number; {} for a report evaluated without --measures."""
    out_dir = Path(out_dir)
    if folders is None:
        def order(path: Path) -> tuple:
            parts = path.relative_to(out_dir).parts
            return parts[0], int(parts[1].removeprefix("run")) if len(parts) == 3 else 0

        files = sorted([*out_dir.glob(f"*/{MEASURES_FILE}"), *out_dir.glob(f"*/run*/{MEASURES_FILE}")], key=order)
    else:
        files = [out_dir / folder / MEASURES_FILE for folder in folders]
        found = [path.is_file() for path in files]
        if any(found) and not all(found):
            missing = ", ".join(str(path) for path, ok in zip(files, found, strict=True) if not ok)
            raise FileNotFoundError(f"{out_dir}: the measures of some models are missing ({missing}); was the "
                                    "evaluation interrupted? Evaluate those models again")
        files = [path for path, ok in zip(files, found, strict=True) if ok]
    results: dict[str, list[dict]] = {}
    for path in files:
        record = read_json(path)
        results.setdefault(record["label"], []).append(record)
    return results


def measured_names(record: dict) -> list[str]:
    """The --measures a saved measures.json holds."""
    return [name for name, key in MEASURE_KEYS.items() if key in record]
