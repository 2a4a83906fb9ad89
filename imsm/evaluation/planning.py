"""Resolving and checking every model before anything is written: the plans (one per model, named by label; runs
sharing a label are seeds of one method), the task files and rows (CorDA's calibration rows left out), the adapter
scales, and the report's notes on how predictions were read."""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from transformers import AutoConfig

from imsm.data import read_jsonl
from imsm.evaluation.measures.metrics import compute_metrics, get_task
from imsm.loader import backbone_path, check_run, load_tokenizer
from imsm.method.adapters import METHODS, get_method
from imsm.run_folder import RunConfig, check_hidden_size, resolve, resolve_for_evaluation
from imsm.templates import build_template

GATE_PREFIX = {"query_aware": "IMSM-", "token": "IMSM-token-", "equal": "IMSM-equal-", "none": ""}
from imsm.evaluation.arguments import EvalArguments
from imsm.evaluation.output_dir import EVALUATION_MARKER, INCOMPLETE, REPORT_FILES

logger = logging.getLogger(__name__)


class MethodKey(NamedTuple):
    """What makes two runs seeds of one method."""

    peft: str
    gate: str
    gate_rank: int


@dataclass
class ModelPlan:
    """One model to evaluate, fully resolved before any decoding starts."""

    label: str
    model_path: str
    template: str
    system_prompt: str | None
    run_dir: Path | None = None  # None: the untuned backbone
    method: MethodKey | None = None  # what runs sharing a label must have in common (None: the untuned backbone)
    folder: str = ""  # the output sub-folder: the label, or label/run<k> for a label shared by several runs
    scale: float | None = None  # --adapter_scale: the run's weight update times this (a plain causal LM)


def default_label(config: RunConfig) -> str:
    return GATE_PREFIX.get(config.gate, config.gate + "-") + get_method(config.peft).display_name


def task_files(args: EvalArguments) -> dict[str, Path]:
    overrides = {}
    for item in args.task_file:
        task, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--task_file {item!r}: expected task=path")
        overrides[get_task(task).name] = Path(path)
    missing = [t for t in args.task_names if t not in overrides and args.data_dir is None]
    if missing:
        raise ValueError(f"--data_dir is required for {missing} (or give --task_file task=path)")
    return {t: overrides.get(t) or Path(args.data_dir) / t / "test.jsonl" for t in args.task_names}


def calibration_rows(run_dir: str | Path) -> set[tuple[str, int]]:
    """(resolved file path, 0-based row index) of every row a run calibrated on (CorDA); empty for other runs.

    Evaluation skips these rows of those files so the model is not scored on its calibration data. A row index
    counts the file's non-empty lines, as ``imsm.data.read_jsonl`` reads them.
    """
    config = RunConfig.read(resolve(run_dir))
    record = get_method(config.peft, f"{run_dir}: peft").calibration_rows(config.method_options)
    if not record:
        return set()
    return {(record["file"], int(i)) for i in record["rows"]}


def calibration_skips(plans: list[ModelPlan], files: dict[str, Path]) -> dict[str, dict[str, list[int]]]:
    """task -> {run folder: row indices of the task's file that the run calibrated on (CorDA)}: never score a model
    on what it calibrated on, and skip those rows for every model so the comparisons stay paired."""
    skips: dict[str, dict[str, list[int]]] = {}
    for plan in plans:
        if plan.run_dir is None:
            continue
        rows = calibration_rows(plan.run_dir)
        for task, path in files.items():
            hit = sorted(i for f, i in rows if Path(f).resolve() == Path(path).resolve())
            if hit:
                skips.setdefault(task, {})[str(plan.run_dir)] = hit
    return skips


def _ranges(rows: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    spans, start = [], None
    for prev, cur in zip([None, *rows], [*rows, None], strict=True):
        if start is None:
            start = cur
        elif cur is None or cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)


def calibration_notes(skips: dict[str, dict[str, list[int]]], files: dict[str, Path]) -> list[str]:
    """One line per task and set of skipped rows, naming every run calibrated on them (seeds share the rows)."""
    notes = []
    for task, by_run in skips.items():
        by_rows: dict[tuple[int, ...], list[str]] = {}
        for run, rows in by_run.items():
            by_rows.setdefault(tuple(rows), []).append(str(run))
        notes += [f"{task}: rows {_ranges(list(rows))} of {files[task]} not scored for any model (CorDA calibration "
                  f"rows of {', '.join(runs)})" for rows, runs in by_rows.items()]
    return notes


def read_task(task: str, path: Path, max_examples: int | None, skip: set[int] | None = None) -> list[dict]:
    """The task's rows less ``skip`` (row indices), the first ``max_examples`` of them, their golds checked by
    scoring empty predictions (a yes/no task needs yes/no golds)."""
    rows = [r for i, r in enumerate(read_jsonl(path, require_output=True)) if not skip or i not in skip]
    rows = rows[:max_examples]
    try:
        compute_metrics(task, [""] * len(rows), [r["output"] for r in rows])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return rows


def plan_models(args: EvalArguments) -> list[ModelPlan]:
    """Resolve and check every model; raises naming the offending file before anything is written."""
    plans = []
    if args.untuned:
        plans.append(ModelPlan("untuned", backbone_path(args.model_name_or_path), args.prompt_template or "raw",
                               args.system_prompt))
    for run in args.run_dir:
        run_dir = resolve_for_evaluation(run)  # no interrupted save, no final/ older than the run's last checkpoint
        config = check_run(run_dir)  # every file, before any model loads
        recorded = (config.prompt_template, config.system_prompt)
        template, system = recorded
        if args.prompt_template is not None:
            template, system = args.prompt_template, args.system_prompt
            if (template, system) != recorded:
                logger.warning("%s was trained with prompt template %r (system prompt %r); decoding with %r (%r) "
                               "as --prompt_template asks", run_dir, recorded[0], recorded[1], template, system)
        model_path = backbone_path(args.model_name_or_path or config.base_model)
        hidden = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code).hidden_size
        check_hidden_size(config, run_dir, hidden, model_path)
        plans.append(ModelPlan(default_label(config), model_path, template, system, run_dir,
                               MethodKey(config.peft, config.gate, config.gate_rank)))
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(plans):
            raise ValueError(f"--labels has {len(labels)} names for {len(plans)} models (untuned first, then runs)")
        for plan, label in zip(plans, labels, strict=True):
            plan.label = label
    if args.scales:
        unknown = sorted(args.full_scale - {p.label for p in plans})
        if unknown:
            raise ValueError(f"--full_scale_labels names {unknown}, not labels of this evaluation "
                             f"({sorted({p.label for p in plans})})")
        plans = expand_scales(plans, args.scales, args.full_scale)
    check_label_groups(plans)
    known = {p.label for p in plans}
    for label in (label for pair in args.pairs for label in pair):
        if label not in known:
            raise ValueError(f"--compare names {label!r}, which is not a label of this evaluation ({sorted(known)})")
    for plan in plans:
        build_template(plan.template, load_tokenizer(plan.model_path, args.trust_remote_code), plan.system_prompt)
    return plans


def expand_scales(plans: list[ModelPlan], scales: list[float], full_scale: set[str] = frozenset()) -> list[ModelPlan]:
    """Every vanilla PEFT run becomes one plan per scale, labelled ``label@scale``; IMSM runs, LoRAMoE runs (their
    router makes the update depend on the input: no single weight update either), the untuned model and the runs
    labelled in ``full_scale`` (--full_scale_labels) stay."""
    out = []
    for plan in plans:
        if (plan.method is None or plan.method.gate != "none" or not get_method(plan.method.peft).scalable
                or plan.label in full_scale):
            out.append(plan)
            continue
        out += [replace(plan, label=f"{plan.label}@{scale:g}", scale=scale) for scale in scales]
    if not any(p.scale is not None for p in out):
        scalable = ", ".join(sorted(name for name, spec in METHODS.items() if spec.scalable))
        raise ValueError(f"--adapter_scale scales vanilla PEFT runs ({scalable} trained with --gate "
                         "none), and none is given: an IMSM run mixes two passes through a gate and a LoRAMoE run "
                         "routes per token, so neither has a single weight update to scale")
    return out


def check_label_groups(plans: list[ModelPlan]) -> None:
    """Labels are folder names; runs sharing one must be seeds of one method (else a clear error); sets folders."""
    groups: dict[str, list[ModelPlan]] = {}
    for plan in plans:
        name = plan.label
        if not name or "/" in name or name.startswith(".") or name in (*REPORT_FILES, INCOMPLETE, EVALUATION_MARKER):
            raise ValueError(f"model label {name!r} cannot be a folder name of the report; set names with --labels")
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise ValueError(f"model label {name!r} holds a control character (a newline, tab, ...); it names a "
                             "folder and a table row, so set printable names with --labels")
        groups.setdefault(name, []).append(plan)
    for label, group in groups.items():
        if len(group) == 1:
            group[0].folder = label
            continue
        if any(p.run_dir is None for p in group):
            raise ValueError(f"label {label!r} is given to the untuned model and to runs; give it a label of its own")
        first = group[0]
        seen: dict[tuple, ModelPlan] = {}
        for plan in group:
            twin = seen.setdefault((Path(plan.run_dir).resolve(), plan.scale), plan)
            if twin is not plan:
                raise ValueError(f"label {label!r} holds the run {plan.run_dir} twice: one run would count as two "
                                 "seeds (sd 0, intervals too narrow); give each run once")
        for plan in group[1:]:
            for what, mine, theirs in (("base model", plan.model_path, first.model_path),
                                       ("prompt template", plan.template, first.template),
                                       ("system prompt", plan.system_prompt, first.system_prompt),
                                       ("method (peft, gate, gate rank)", plan.method, first.method)):
                if mine != theirs:
                    raise ValueError(f"label {label!r} is shared by runs that are not seeds of one method: "
                                     f"{first.run_dir} has {what} {theirs!r}, {plan.run_dir} has {mine!r}")
        for k, plan in enumerate(group, 1):
            plan.folder = f"{label}/run{k}"


def scoring_notes(args: EvalArguments) -> list[str]:
    """Report notes on how predictions were read, where that departs from the default."""
    yes_no = [task for task in args.task_names if get_task(task).kind == "yesno"]
    if args.yes_no_rule == "first_word" or not yes_no or args.score == "likelihood":
        return []
    note = (f"{', '.join(yes_no)} scored with --yes_no_rule {args.yes_no_rule} ('yes' anywhere in the prediction "
            "reads as yes, else no, as the published code; the default reads the first word)")
    return [note]
