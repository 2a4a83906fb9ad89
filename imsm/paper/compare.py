"""The paper's tables with our numbers beside them: per cell the paper's value, ours with its 95% interval, and
ours minus the paper's, read from the plan's evaluations (``stats.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imsm.atomic import atomic_write_text
from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.report.comparisons import headline_interval
from imsm.evaluation.report.writer import PRIMARY
from imsm.paper.numbers import LAYOUTS, PAPER, PAPER_ROWS, paper_row
from imsm.paper.plans import PAPER_BACKBONES, Evaluation, Plan

NOT_AVAILABLE = "not available"

# What keeps our numbers from matching the paper's, whatever the GPUs.
CANNOT_MATCH = (
    ("The paper states no seeds and prints one number per cell (no spread), though it reports t-tests; our rows are "
    "the mean over the seeds run here."),
    ("The ROPES training split is not in the files published with the paper's code; `scripts/prepare_data.py` builds "
    "it (and any file it rebuilds, MultiRC included) from the public Hugging Face datasets, which may differ from "
    "the authors' copies in rows and prompt wording."),
    ("Hyperparameters the paper does not state (schedule, warmup, weight decay, gate dropout, max lengths) come from "
    "the authors' published code, as each launcher cites; LoRAMoE runs 'the original paper's configuration'."),
    ("Table 1 prints ChatGLM3's untuned ROPES F1 (22.67) below its EM (58.47), which token F1 cannot be for the same "
    "predictions: at least one of the two printed cells is not what its header says."),
    ("Table 3 uses Llama3.1-8B-Instruct (the paper: DoRA crashed on Llama3); Figure 3 and Figure 4 are bar charts "
    "whose numbers could not be read, so their paper column is 'not available'."),
)


@dataclass(frozen=True)
class Ours:
    value: float  # percent
    low: float | None = None
    high: float | None = None


def our_value(stats: dict, label: str, task: str, metric: str) -> Ours | None:
    """A label's value of ``task``/``metric`` in a report's ``stats.json`` (percent), with its 95% interval.

    The interval is the report's paired bootstrap interval of the label's change against the untuned baseline,
    moved onto the value (baseline value + [low, high]); it exists for each task's primary metric only (other
    metrics, and the untuned row itself, have none). The one place to change when stats.json grows an interval of
    its own per value."""
    label_stats = stats["labels"].get(label, {}).get("tasks", {}).get(task, {}).get(metric)
    if label_stats is None:
        return None
    value = label_stats["value"] * 100
    base = stats["labels"].get(stats["baseline"], {}).get("tasks", {}).get(task, {}).get(metric)
    for rec in stats["comparisons"]:
        if (rec["a"], rec["b"], rec["measure"], rec["column"], rec["metric"]) == \
                (label, stats["baseline"], PRIMARY, task, metric) and base is not None:
            low, high = headline_interval(rec)
            return Ours(value, (base["value"] + low) * 100, (base["value"] + high) * 100)
    return Ours(value)


def _read_stats(evaluation: Evaluation) -> dict | None:
    path = evaluation.output_dir / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt_ours(ours: Ours | None) -> str:
    if ours is None:
        return "—"
    if ours.low is None:
        return f"{ours.value:.2f}"
    return f"{ours.value:.2f} [{ours.low:.1f}, {ours.high:.1f}]"


def _cell(paper: float | None, ours: Ours | None) -> str:
    paper_text = NOT_AVAILABLE if paper is None else f"{paper:.2f}"
    diff = "—" if paper is None or ours is None else f"{ours.value - paper:+.2f}"
    return f"{paper_text} / {_fmt_ours(ours)} / {diff}"


def _table_rows(plan: Plan, table: str) -> list[tuple[str, str, dict[str, Ours | None], list[str], str | None]]:
    """(backbone, label, column key -> ours, the evaluations' notes, the model run in place of the paper's backbone
    or None) for every row the plan evaluates."""
    layout = [key for key, _ in LAYOUTS[table]]
    found: dict[tuple[str, str], dict[str, Ours | None]] = {}
    ran: dict[str, str] = {}  # backbone name -> the model id evaluated, where --model replaced the paper's
    notes: dict[tuple[str, str], list[str]] = {}
    for evaluation in plan.evaluations:
        stats = _read_stats(evaluation)
        if evaluation.backbone.model_id != PAPER_BACKBONES[evaluation.backbone.name].model_id:
            ran[evaluation.backbone.name] = evaluation.backbone.model_id
        labels = ["untuned"] + [run.label for run in evaluation.runs]
        for label in dict.fromkeys(labels):
            row = found.setdefault((evaluation.backbone.name, label), {})
            for key in layout:
                if key == "avg":
                    continue
                task, metric = (evaluation.target, "primary") if key == "target" else key.split("/")
                if task not in evaluation.tasks or (key in row and row[key] is not None):
                    continue
                if metric == "primary":
                    metric = get_task(task).primary
                row[key] = our_value(stats, label, task, metric) if stats else None
            if stats:
                notes.setdefault((evaluation.backbone.name, label), []).extend(stats.get("notes", []))
    return [(backbone, label, values, notes.get((backbone, label), []), ran.get(backbone))
            for (backbone, label), values in found.items()]


def render(plan: Plan) -> str:
    """Markdown: for each of the plan's paper tables, the paper's layout with ``paper / ours [95% interval] /
    ours - paper`` per cell, then the metric rule, the notes of the evaluations and what cannot match."""
    out = [f"# {plan.title}", "",
           (f"Each cell: paper / ours [95% interval] / ours − paper, in percent. Paper: {PAPER}; the source of each "
           "row is given beside it. Ours: mean over our seeds; the interval is the paired bootstrap interval of the "
           "change against the untuned model, placed on the value (primary metrics only). '—': not evaluated yet."),
           ""]
    all_notes: list[str] = []
    for table in plan.tables:
        layout = LAYOUTS[table]
        rows = _table_rows(plan, table)
        order = {(r.backbone, r.label): i for i, r in enumerate(PAPER_ROWS) if r.table == table}
        rows.sort(key=lambda r: (order.get((r[0], r[1]), len(order)), r[0], r[1]))
        out += [f"## {table.replace('table', 'Table ').replace('figure', 'Figure ')}", ""]
        out.append("| Backbone | Method | " + " | ".join(header for _, header in layout) + " | Source |")
        out.append("|---" * (len(layout) + 3) + "|")
        for backbone, label, values, notes, model_id in rows:
            printed = paper_row(table, backbone, label)
            cells = []
            ours_values = [v.value for k, v in values.items() if v is not None]
            complete = len(ours_values) == len([k for k, _ in layout if k != "avg"])
            for key, _ in layout:
                if key == "avg":
                    ours = Ours(sum(ours_values) / len(ours_values)) if complete and ours_values else None
                    cells.append(_cell(printed.average if printed else None, ours))
                else:
                    cells.append(_cell(printed.values.get(key) if printed else None, values.get(key)))
            source = printed.source if printed else NOT_AVAILABLE
            name = backbone if model_id is None else f"{backbone} (ran {model_id})"
            out.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {source} |")
            all_notes += [n for n in notes if n not in all_notes]
        out.append("")
    out += ["## How the metrics were read", "",
            ("Yes/no answers (MRPC, CoLA, MultiRC) are read with `--yes_no_rule anywhere`, the published code's rule "
            "(`metric_evaluation.py`: yes when 'yes' occurs anywhere in the lower-cased response, else no), so the "
            "yes/no columns are comparable with the paper's; WebQ and FreebaseQA are 'contain' (a gold answer inside "
            "the response), as the paper states; decoding is greedy, as the paper's."), ""]
    out += [f"- {note}" for note in all_notes] + ([""] if all_notes else [])
    out += ["## What cannot match", ""] + [f"- {line}" for line in CANNOT_MATCH] + [""]
    return "\n".join(out)


def write_report(plan: Plan, eval_dir: Path) -> Path:
    path = eval_dir / f"{plan.name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render(plan))
    return path
