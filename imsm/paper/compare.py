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
from imsm.paper.execute import run_state
from imsm.paper.numbers import LAYOUTS, PAPER, PAPER_ROWS, PARAMS_TABLES, TEST_ROWS, is_k_over_n, paper_row
from imsm.paper.plans import PAPER_BACKBONES, Evaluation, Plan

NOT_AVAILABLE = "not available"
NOT_TRAINED = "not trained"  # ours, for a run the evaluation left out because it failed or has not finished
NOT_K_OVER_N = "†"

# What keeps our numbers from matching the paper's, whatever the GPUs: every known difference between how the paper's
# numbers were made (the paper, its published code github.com/ECNU-Text-Computing/IMSM) and how ours are.
CANNOT_MATCH = (
    ("Seeds: the paper states none and prints one number per cell (no spread), though it reports t-tests; 20 of its "
     "accuracy/EM/contain cells are not k/n over the task's published test file for any k (marked † beside them), "
     "so they are most likely means over several runs. Ours: the mean over `--seeds` (default three) with its "
     "interval."),
    ("Data: the authors publish every split as data/<task>/data_{train,test}.json; runs here train and test on the "
     "files in `--data_dir` (scripts/prepare_data.py), which match the authors' only when converted from their "
     "files; the Hugging Face route may differ in rows and prompt wording."),
    ("Yes/no Acc. (MRPC, MultiRC): the published metric_evaluation.py prints EM (the whole normalized response "
     "equals the gold 'yes'/'no') and Contain (the gold inside the response) as accuracies, and reads 'yes' anywhere "
     "in the response only for MRPC F1 and CoLA MCC; the paper does not say which its Acc. is. Ours reads every "
     "yes/no column with the 'yes' anywhere rule (`--yes_no_rule anywhere`)."),
    ("GSM8K: the published scorer keeps the text after '####' of gold and response, but its published test file has "
     "no '####', so it compares whole worked answers (EM / contain of the normalized text). Ours: accuracy of the "
     "final number (after 'The answer is' or '####') of response against gold."),
    ("Decoding: greedy, up to the runs' training --max_output_length on every task of an evaluation, as the "
     "published model_inference.py decodes (512 for GSM8K runs); the published code decodes one prompt at a time "
     "without a KV cache, ours batched with one (identical greedy tokens up to floating-point ties)."),
    ("Lengths: the published configs state GSM8K's only (512 input, 512 answer tokens, as our launchers); for MRPC, "
     "CoLA and ROPES the launchers' own (512/8, 256/8, 1024/32; a comment in the published baseline/lora/lora.py "
     "runs ROPES at 1024/128), so their training truncation and decoding budget may differ from the authors'."),
    ("Precision: the published code loads both models in fp16 (`.half()`); ours trains and evaluates in bf16."),
    ("Gate initialisation: the published gate's W_A and W_B are PyTorch's default Linear initialisation, so the gate "
     "starts at a random mix; ours starts W_B at zero (g = 0.5 at step 0; imsm/method/gate.py)."),
    ("AdaLoRA: the published code never calls update_and_allocate, so its ranks stay at init_r 12 throughout (its "
     "Params, 12 ranks per module, are what Table 1 prints); ours reallocates the rank budget to target_r 8 as "
     "AdaLoRA does (the orthogonality penalty as well)."),
    ("Settings the paper does not state follow the published code, appended to the launchers' arguments by the "
     "plans (imsm/paper/plans.py PUBLISHED_TRAIN_ARGS): LoRA and AdaLoRA dropout 0.1, no weight decay and the "
     "baselines' schedules for vanilla runs, AdamW for IMSM-(IA)3 (Adafactor for vanilla (IA)3, as published), and "
     "the published target modules (PAPER_TARGETS). Kept ours: DoRA dropout 0.05 for IMSM-DoRA too (the published "
     "IMSM config would give 0.1); LoRAMoE runs its authors' launcher ('the original paper's configuration')."),
    ("Table 1 prints ChatGLM3's untuned ROPES F1 (22.67) below its EM (58.47), which token F1 cannot be for the same "
     "predictions: at least one of the two printed cells is not what its header says."),
    ("Table 3 uses Llama3.1-8B-Instruct (the paper: DoRA crashed on Llama3); Figure 3, Figure 4 and Table 5 were "
     "not readable as numbers (bar charts, a garbled table), so their paper column is 'not available'; Figure 4 "
     "does not say which target its forgetting runs were tuned on (ROPES here, as Table 2)."),
)


@dataclass(frozen=True)
class Ours:
    value: float  # percent
    low: float | None = None
    high: float | None = None
    missing: str | None = None  # why there is no value (NOT_TRAINED), shown in its place


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
    if ours.missing:
        return ours.missing
    if ours.low is None:
        return f"{ours.value:.2f}"
    return f"{ours.value:.2f} [{ours.low:.1f}, {ours.high:.1f}]"


def _cell(paper: float | None, ours: Ours | None, mark: str = "") -> str:
    paper_text = NOT_AVAILABLE if paper is None else f"{paper:.2f}{mark}"
    diff = "—" if paper is None or ours is None or ours.missing else f"{ours.value - paper:+.2f}"
    return f"{paper_text} / {_fmt_ours(ours)} / {diff}"


@dataclass
class Row:
    """One row of one panel of a paper layout: our values per column key, read only from the evaluations that belong
    to this layout (and panel)."""

    panel: str
    backbone: str
    label: str
    values: dict[str, Ours | None]
    notes: list[str]
    model_id: str | None  # the model run in place of the paper's backbone, or None
    params: int | None  # trainable parameters recorded by a finished run of this row


def _trainable_parameters(runs) -> int | None:
    for run in runs:
        stats = run.output_dir / "final" / "train_stats.json"
        if stats.is_file():
            return json.loads(stats.read_text()).get("trainable_parameters")
    return None


def _table_rows(plan: Plan, table: str) -> list[Row]:
    """Every row the plan's evaluations of ``table`` fill, in the order they are first met. A cell comes from the one
    evaluation of its table and panel that scores its task; two would be a plan that cannot be reported (an error)."""
    layout = [key for key, _ in LAYOUTS[table]]
    rows: dict[tuple[str, str, str], Row] = {}
    owner: dict[tuple[str, str, str, str], str] = {}
    for evaluation in plan.evaluations:
        if evaluation.table != table:
            continue
        stats = _read_stats(evaluation)
        model_id = None
        if evaluation.backbone.model_id != PAPER_BACKBONES[evaluation.backbone.name].model_id:
            model_id = evaluation.backbone.model_id
        labels = ["untuned"] + [run.label for run in evaluation.runs]
        unfinished = {run.label for run in evaluation.runs if run_state(run) != "done"}
        for label in dict.fromkeys(labels):
            key = (evaluation.panel, evaluation.backbone.name, label)
            row = rows.setdefault(key, Row(*key, {}, [], model_id, None))
            if row.params is None:
                row.params = _trainable_parameters([r for r in evaluation.runs if r.label == label])
            for column in layout:
                if column == "avg":
                    continue
                task, metric = (evaluation.target, "primary") if column == "target" else column.split("/")
                if task not in evaluation.tasks:
                    continue
                if (*key, column) in owner:
                    raise ValueError(f"{plan.name}: {table} {column} of {evaluation.backbone.name} / {label} is "
                                     f"scored by two evaluations, {owner[(*key, column)]} and {evaluation.name}")
                owner[(*key, column)] = evaluation.name
                if metric == "primary":
                    metric = get_task(task).primary
                row.values[column] = our_value(stats, label, task, metric) if stats else None
                if stats and label not in stats["labels"] and label in unfinished:  # evaluated without its run
                    row.values[column] = Ours(float("nan"), missing=NOT_TRAINED)
            if stats:
                row.notes += [n for n in stats.get("notes", []) if n not in row.notes]
    return list(rows.values())


def _params_cell(printed: str | None, ours: int | None) -> str:
    ours_text = "—" if ours is None else f"{ours / 1e6:.3f}M"
    return f"{printed or NOT_AVAILABLE} / {ours_text}"


def _render_layout(plan: Plan, table: str) -> tuple[list[str], list[str]]:
    """The markdown of one paper layout (one table per panel) and the evaluations' notes."""
    layout = LAYOUTS[table]
    has_params = table in PARAMS_TABLES
    rows = _table_rows(plan, table)
    order = {(r.backbone, r.label): i for i, r in enumerate(PAPER_ROWS) if r.table == table}
    panels = list(dict.fromkeys(row.panel for row in rows)) or [""]
    heading = table.replace("table", "Table ").replace("figure", "Figure ")
    out: list[str] = []
    notes: list[str] = []
    marked = False
    for panel in panels:
        out += [f"## {heading}" + (f" ({panel})" if panel else ""), ""]
        header = "| Backbone | Method | " + " | ".join(h for _, h in layout)
        out.append(header + (" | Params (paper / ours)" if has_params else "") + " | Source |")
        out.append("|---" * (len(layout) + 3 + has_params) + "|")
        in_panel = sorted((r for r in rows if r.panel == panel),
                          key=lambda r: (order.get((r.backbone, r.label), len(order)), r.label != "untuned",
                                        r.backbone, r.label))
        for row in in_panel:
            printed = paper_row(table, row.backbone, row.label)
            ours_values = [v.value for v in row.values.values() if v is not None and not v.missing]
            complete = len(ours_values) == len([k for k, _ in layout if k != "avg"])
            cells = []
            for key, _ in layout:
                if key == "avg":
                    ours = Ours(sum(ours_values) / len(ours_values)) if complete and ours_values else None
                    cells.append(_cell(printed.average if printed else None, ours))
                    continue
                paper = printed.values.get(key) if printed else None
                mark = NOT_K_OVER_N if paper is not None and is_k_over_n(key, paper) is False else ""
                marked = marked or bool(mark)
                cells.append(_cell(paper, row.values.get(key), mark))
            if has_params:
                cells.append(_params_cell(printed.params if printed else None, row.params))
            source = printed.source if printed else NOT_AVAILABLE
            name = row.backbone if row.model_id is None else f"{row.backbone} (ran {row.model_id})"
            out.append(f"| {name} | {row.label} | " + " | ".join(cells) + f" | {source} |")
            notes += [n for n in row.notes if n not in notes]
        out.append("")
    if marked:
        out += [(f"{NOT_K_OVER_N} not k/n over the task's {', '.join(f'{t} {n}' for t, n in TEST_ROWS.items())} "
                "published test rows for any k: not one evaluation of the test file, most likely a mean over runs "
                "(the paper does not say)."), ""]
    if has_params:
        out += [("Params: trainable parameters (adapter + gate), the paper's and what our finished run recorded "
                "(`final/train_stats.json`); tests/paper/test_params.py checks them at full shape."), ""]
    return out, notes


def _render_speed(plan: Plan) -> list[str]:
    """Table 5: bench_decode.py's result per backbone."""
    out = ["## Table 5 (inference speed)", "",
           ("| Backbone | IMSM ÷ vanilla PEFT, decoding (paper / ours) | IMSM tokens/s | vanilla tokens/s | "
           "batched KV cache ÷ the published code's decoding |"), "|---|---|---|---|---|"]
    imsm, vanilla = "IMSM (mixed LoRA batch)", "vanilla PEFT (none gate)"
    for bench in plan.benches:
        result = json.loads(bench.output_file.read_text()) if bench.output_file.is_file() else None
        if result is None:
            out.append(f"| {bench.backbone.name} | {NOT_AVAILABLE} / — | — | — | — |")
            continue
        rate = result["decode_tokens_per_s"]
        out.append(f"| {bench.backbone.name} | {NOT_AVAILABLE} / {result['imsm_over_vanilla_decoding'][imsm]:.3f} | "
                   f"{rate[imsm]:.1f} | {rate[vanilla]:.1f} | {result['cache_speedup']:.1f}× |")
    out += ["", ("bench/bench_decode.py on the backbone, LoRA r 16 and the query-aware gate with random weights, "
                 "GSM8K test prompts, forced answer lengths; the paper's Table 5 could not be read as numbers."), ""]
    return out


def render(plan: Plan) -> str:
    """Markdown: for each of the plan's paper layouts, ``paper / ours [95% interval] / ours - paper`` per cell, each
    cell read from the evaluation it belongs to; then the metric rule, the notes of the evaluations and what cannot
    match."""
    out = [f"# {plan.title}", "",
           (f"Each cell: paper / ours [95% interval] / ours − paper, in percent. Paper: {PAPER}; the source of each "
           "row is given beside it. Ours: mean over our seeds; the interval is the paired bootstrap interval of the "
           "change against the untuned model, placed on the value (primary metrics only). '—': not evaluated yet; "
           f"'{NOT_TRAINED}': the run failed or has not finished."),
           ""]
    all_notes: list[str] = []
    for table in plan.tables:
        if table == "table5":
            out += _render_speed(plan)
            continue
        lines, notes = _render_layout(plan, table)
        out += lines
        all_notes += [n for n in notes if n not in all_notes]
    out += ["## How the metrics were read", "",
            ("Yes/no answers (MRPC, CoLA, MultiRC) are read with `--yes_no_rule anywhere` (yes when 'yes' occurs "
            "anywhere in the lower-cased response, else no: the published code's rule for MRPC F1 and CoLA MCC); "
            "WebQ and FreebaseQA are 'contain' (a gold answer inside the response), as the paper states; decoding is "
            "greedy, as the paper's, up to the runs' training answer length (the published code's)."), ""]
    out += [f"- {note}" for note in all_notes] + ([""] if all_notes else [])
    out += ["## What cannot match", ""] + [f"- {line}" for line in CANNOT_MATCH] + [""]
    return "\n".join(out)


def write_report(plan: Plan, eval_dir: Path) -> Path:
    path = eval_dir / f"{plan.name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render(plan))
    return path
