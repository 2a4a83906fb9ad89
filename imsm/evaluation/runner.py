"""Evaluation: the arguments of evaluate.py, resolving and checking every model before anything is written, and
decoding + likelihood-scoring one model on every task (rank 0 writes; other ranks work on their shard).

Prompts are encoded with ``imsm.data.encode_prompt``, the function training uses, so the query the model sees at test
time is token for token the one it was trained on; answer likelihoods (``scoring.answer_nll``) score the gold
answer tokens training puts its loss on.

Runs may share a label (``--labels untuned,LoRA,LoRA,LoRA,IMSM-LoRA,...``): they are seeds of one method, reported
as one row (mean ± standard deviation over the runs, paired intervals on the seed-averaged per-example scores). A
label's runs must share the base model, prompt template, system prompt, PEFT method and gate; each run's files go to
``OUTPUT_DIR/<label>/run<k>/`` (a label of one run keeps ``OUTPUT_DIR/<label>/``).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig

from imsm.atomic import atomic_write_json, atomic_write_jsonl, atomic_write_text
from imsm.data import Truncation, encode_prompt, read_jsonl
from imsm.default_model import resolve_model_path
from imsm.evaluation.generation import DecodingConfig, gather_shards, generate, shard
from imsm.evaluation.metrics import (
    YES_NO_RULES,
    ExampleScores,
    compute_metrics,
    example_scores,
    get_task,
    get_yes_no_rule,
)
from imsm.evaluation.report import RunResult, parse_pairs
from imsm.evaluation.scoring import answer_nll, best_answer, gold_answers
from imsm.evaluation.scaling import load_scaled_run, parse_scales
from imsm.loader import check_run, load_backbone, load_run, load_tokenizer
from imsm.method.adapters import METHODS, get_method
from imsm.run_folder import RunConfig, check_hidden_size, read_train_stats, resolve
from imsm.templates import TEMPLATES, build_template

logger = logging.getLogger(__name__)

ALL_TASKS = "gsm8k,mrpc,cola,ropes,webq,freebaseqa,multirc"
GATE_PREFIX = {"query_aware": "IMSM-", "token": "IMSM-token-", "equal": "IMSM-equal-", "none": ""}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORE_MODES = ("both", "decode", "likelihood")
REPORT_FILES = ("summary.md", "summary.csv", "forgetting.md", "forgetting.png", "comparisons.md", "stats.json",
                "stats.csv", "tradeoff.png", "tradeoff.csv")
INCOMPLETE = "INCOMPLETE"  # present while an evaluation writes its folder; removed once the report is complete


@dataclass
class EvalArguments:
    output_dir: str = field(metadata={"help": "Where predictions, metrics and the report go."})
    run_dir: list[str] = field(default_factory=list, metadata={
        "help": "A run folder (OUTPUT_DIR of train.py, its final/ or a checkpoint); repeat for several. "
                "Alias --run (not under torchrun, whose parser takes --run for its own --run-path).",
        "action": "extend", "aliases": ["--run"]})
    untuned: bool = field(default=False, metadata={"help": "Also evaluate the base model without any adapter."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model; default: each run's recorded base_model (the embedded SmolLM2 for --untuned)."})
    tasks: str = field(default=ALL_TASKS, metadata={"help": "Comma-separated task names."})
    data_dir: str | None = field(default=None, metadata={"help": "Holds <task>/test.jsonl for every task."})
    task_file: list[str] = field(default_factory=list, metadata={
        "help": "task=path overriding DATA_DIR/<task>/test.jsonl; repeatable.", "action": "extend"})
    labels: str | None = field(default=None, metadata={
        "help": "Comma-separated names: untuned first (with --untuned), then the runs in order. Runs given the same "
                "label are seeds of one method, e.g. --run a1 a2 a3 b1 b2 b3 --labels untuned,LoRA,LoRA,LoRA,"
                "IMSM-LoRA,IMSM-LoRA,IMSM-LoRA: one row each, mean ± sd over its runs, paired intervals on the "
                "seed-averaged per-example scores (same base model, template, PEFT method and gate required)."})
    target: str | None = field(default=None, metadata={"help": "Target task of the forgetting report (first task)."})
    max_examples: int | None = field(default=None, metadata={"help": "Only the first N examples of each task."})
    score: str = field(default="both", metadata={
        "help": "What to compute: 'decode' (generate and score the task metrics), 'likelihood' (teacher-forced "
                "answer NLL of the gold answer + EOS through the exact model, far cheaper), or 'both'."})
    yes_no_rule: str = field(default="first_word", metadata={
        "help": f"How a yes/no task (MRPC, CoLA, MultiRC) reads a prediction: one of {list(YES_NO_RULES)}. "
                "first_word: its first word must be yes or no (else invalid, counted wrong); anywhere: the published "
                "code's rule, yes when 'yes' occurs anywhere in it, else no - to reproduce the paper's numbers."})
    compare: str | None = field(default=None, metadata={
        "help": "Pairs of labels to compare besides each row vs the untuned baseline: 'A:B,C:D' (A − B), e.g. "
                "IMSM-LoRA:LoRA. Every comparison is paired per example, with a bootstrap 95%% interval and, for "
                "accuracy-type metrics, McNemar's exact p."})
    adapter_scale: str | None = field(default=None, metadata={
        "help": "Evaluate every vanilla PEFT run (--gate none) at these scales of its learned update, e.g. "
                "0.25,0.5,0.75,1: weights W0 + a*(W1 - W0) (LoRA/AdaLoRA/DoRA: the update scaled; (IA)3: l -> "
                "1 + a(l - 1)); each scale is a row labelled LABEL@a. IMSM runs are evaluated as they are."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Paired bootstrap resamples (at least 1000)."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap's resampling."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace the results of an earlier evaluation in --output_dir (otherwise such a folder is refused)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts decoded together per process."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Override every task's answer length."})
    max_input_length: int = field(
        default=1024, metadata={"help": "Prompt tokens kept: the user's text is cut from the left, the template kept."}
    )
    prompt_template: str | None = field(default=None, metadata={
        "help": f"One of {sorted(TEMPLATES)}; overrides the runs' recorded template (untuned default: raw)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn with --prompt_template chat."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=42, metadata={"help": "Sampling seed."})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, else float32) or a dtype name."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, eager, flash_attention_2."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own code."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; LOCAL_RANK is used."})

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t.strip() for t in self.tasks.split(",") if t.strip()))  # order kept, no repeats

    def __post_init__(self) -> None:
        if not self.task_names:
            raise ValueError(f"--tasks is empty; choose from {ALL_TASKS}")
        for task in self.task_names + ([self.target] if self.target else []):
            get_task(task)
        self.target = self.target or self.task_names[0]
        if not self.run_dir and not self.untuned:
            raise ValueError("nothing to evaluate: give --run RUN_DIR (repeatable) and/or --untuned")
        if self.prompt_template is not None and self.prompt_template not in TEMPLATES:
            raise ValueError(f"--prompt_template {self.prompt_template!r}: choose one of {sorted(TEMPLATES)}")
        if self.system_prompt and self.prompt_template != "chat":
            raise ValueError("--system_prompt only applies with --prompt_template chat")
        if self.score not in SCORE_MODES:
            raise ValueError(f"--score {self.score!r}: choose one of {list(SCORE_MODES)}")
        get_yes_no_rule(self.yes_no_rule)
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"--max_examples {self.max_examples}: must be at least 1 (omit it for every example)")
        if self.bootstrap_resamples < 1000:
            raise ValueError(f"--bootstrap_resamples {self.bootstrap_resamples}: use at least 1000")
        self.pairs = parse_pairs(self.compare)
        self.scales = parse_scales(self.adapter_scale)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose auto or one of {sorted(DTYPES)}")
        self.decoding(self.target)  # checks the sampling settings

    def decoding(self, task: str) -> DecodingConfig:
        new_tokens = get_task(task).max_new_tokens if self.max_new_tokens is None else self.max_new_tokens
        return DecodingConfig(max_new_tokens=new_tokens, batch_size=self.batch_size, do_sample=self.do_sample,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed)


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
    record = RunConfig.read(resolve(run_dir)).calibration
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
        plans.append(ModelPlan("untuned", resolve_model_path(args.model_name_or_path), args.prompt_template or "raw",
                               args.system_prompt))
    for run in args.run_dir:
        run_dir = resolve(run)
        config = check_run(run_dir)  # every file, before any model loads
        recorded = (config.prompt_template, config.system_prompt)
        template, system = recorded
        if args.prompt_template is not None:
            template, system = args.prompt_template, args.system_prompt
            if (template, system) != recorded:
                logger.warning("%s was trained with prompt template %r (system prompt %r); decoding with %r (%r) "
                               "as --prompt_template asks", run_dir, recorded[0], recorded[1], template, system)
        model_path = args.model_name_or_path or resolve_model_path(config.base_model)
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
        plans = expand_scales(plans, args.scales)
    check_label_groups(plans)
    known = {p.label for p in plans}
    for label in (label for pair in args.pairs for label in pair):
        if label not in known:
            raise ValueError(f"--compare names {label!r}, which is not a label of this evaluation ({sorted(known)})")
    for plan in plans:
        build_template(plan.template, load_tokenizer(plan.model_path, args.trust_remote_code), plan.system_prompt)
    return plans


def expand_scales(plans: list[ModelPlan], scales: list[float]) -> list[ModelPlan]:
    """Every vanilla PEFT run becomes one plan per scale, labelled ``label@scale``; IMSM runs, LoRAMoE runs (their
    router makes the update depend on the input: no single weight update either) and the untuned model stay."""
    out = []
    for plan in plans:
        if plan.method is None or plan.method.gate != "none" or not get_method(plan.method.peft).scalable:
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
        if not name or "/" in name or name.startswith(".") or name in REPORT_FILES or name == INCOMPLETE:
            raise ValueError(f"model label {name!r} cannot be a folder name of the report; set names with --labels")
        groups.setdefault(name, []).append(plan)
    for label, group in groups.items():
        if len(group) == 1:
            group[0].folder = label
            continue
        if any(p.run_dir is None for p in group):
            raise ValueError(f"label {label!r} is given to the untuned model and to runs; give it a label of its own")
        first = group[0]
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


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier evaluation unless ``overwrite``; then empty it and mark it incomplete."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {out} is a file")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
            raise FileExistsError(f"--output_dir {out} already holds results ({held}); pass --overwrite to replace "
                                  "them or choose another folder")
        logger.warning("--overwrite: removing the earlier results in %s", out)
        for path in out.iterdir():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / INCOMPLETE, "evaluation under way or interrupted: " + " ".join(sys.argv) + "\n")


def scoring_notes(args: EvalArguments) -> list[str]:
    """Report notes on how predictions were read, where that departs from the default."""
    yes_no = [task for task in args.task_names if get_task(task).kind == "yesno"]
    if args.yes_no_rule == "first_word" or not yes_no or args.score == "likelihood":
        return []
    note = (f"{', '.join(yes_no)} scored with --yes_no_rule {args.yes_no_rule} ('yes' anywhere in the prediction "
            "reads as yes, else no, as the published code; the default reads the first word)")
    return [note]


def finish_output_dir(out: Path) -> None:
    (out / INCOMPLETE).unlink(missing_ok=True)


def load_model(plan: ModelPlan, args: EvalArguments, dtype: torch.dtype, device: torch.device):
    if plan.scale is not None:
        model, tokenizer, _ = load_scaled_run(plan.run_dir, plan.scale, plan.model_path, dtype,
                                              args.attn_implementation, args.trust_remote_code)
    elif plan.run_dir is None:
        model, tokenizer, _ = load_backbone(plan.model_path, dtype, args.attn_implementation, args.trust_remote_code)
    else:
        model, tokenizer, _ = load_run(plan.run_dir, plan.model_path, dtype, args.attn_implementation,
                                       args.trust_remote_code)
    return model.to(device).eval(), tokenizer


def _decode(model, tokenizer, template, rows, args, task, rank, world_size, likelihood: bool):
    """Decode this rank's shard; with ``likelihood`` also score its golds on the same prefill (one KV cache)."""
    mine = shard(rows, rank, world_size)
    truncation = _truncation(task, rank, world_size)
    prompts = [encode_prompt(template, r["input"], args.max_input_length, truncation) for r in mine]
    truncation.warn()
    golds = [gold_answers(template, r) for r in mine] if likelihood else None
    local = generate(model, tokenizer, prompts, args.decoding(task),
                     answers=None if golds is None else [[ids for _, ids in g] for g in golds])
    out = []
    for i, g in enumerate(local):
        score = None
        if golds is not None:
            best = best_answer(mine[i], [(j, s) for (j, _), s in zip(golds[i], g.answer_scores, strict=True)])
            score = (best.nll_mean, best.nll_sum, best.num_tokens, best.gate_mean)
        out.append(((g.text, g.num_tokens, g.finish_reason, g.gate_mean), score))
    gathered = gather_shards(out, len(rows), rank, world_size)
    if gathered is None:
        return None, None
    return [d for d, _ in gathered], [s for _, s in gathered] if likelihood else None


def _truncation(task: str, rank: int, world_size: int) -> Truncation:
    """The counter of what --max_input_length cuts from a task's prompts (this rank's shard when several)."""
    return Truncation(f"task {task}" + (f" (rank {rank}'s shard)" if world_size > 1 else ""))


def _likelihood(model, template, rows, args, task, rank, world_size):
    truncation = _truncation(task, rank, world_size)
    local = answer_nll(model, template, shard(rows, rank, world_size), args.max_input_length, args.batch_size,
                       truncation)
    truncation.warn()
    local = [(s.nll_mean, s.nll_sum, s.num_tokens, s.gate_mean) for s in local]
    return gather_shards(local, len(rows), rank, world_size)


def evaluate_model(plan, args, tasks, dtype, device, rank, world_size) -> RunResult | None:
    """Decode and/or likelihood-score every task with one model; rank 0 scores and writes its files and returns its
    result (with the per-example scores the report's paired statistics need)."""
    model, tokenizer = load_model(plan, args, dtype, device)
    template = build_template(plan.template, tokenizer, plan.system_prompt)
    out_dir = Path(args.output_dir) / plan.folder
    decode, likelihood = args.score in ("both", "decode"), args.score in ("both", "likelihood")
    metrics, per_example = {}, {}
    for task, rows in tasks.items():
        seconds = {}
        decoded = scored = None
        if decode:  # with --score both the likelihood rides on the decoder's prefill
            start = time.perf_counter()
            decoded, scored = _decode(model, tokenizer, template, rows, args, task, rank, world_size, likelihood)
            seconds["decode" + ("+likelihood" if likelihood else "")] = time.perf_counter() - start
        else:
            start = time.perf_counter()
            scored = _likelihood(model, template, rows, args, task, rank, world_size)
            seconds["likelihood"] = time.perf_counter() - start
        if rank != 0:
            continue
        predictions = [{"input": row["input"], "gold": row["output"]} for row in rows]
        scores = ExampleScores({})
        if decoded is not None:
            for record, (text, n, reason, gate) in zip(predictions, decoded, strict=True):
                record |= {"prediction": text, "num_tokens": n, "finish_reason": reason}
                record |= {} if gate is None else {"gate_mean": gate}
            scores = example_scores(task, [p["prediction"] for p in predictions], [p["gold"] for p in predictions],
                                    args.yes_no_rule)
        if scored is not None:
            for record, (nll, nll_sum, n_tokens, gate) in zip(predictions, scored, strict=True):
                record |= {"answer_nll": nll, "answer_nll_sum": nll_sum, "answer_tokens": n_tokens}
                record |= {} if gate is None else {"answer_gate_mean": gate}
            scores.components["answer_nll"] = ("mean", torch.tensor([s[0] for s in scored]).double().numpy()[:, None])
        task_metrics = {name: scores.value(name) for name in scores.components} | {"n": len(rows)}
        if scored is not None:
            task_metrics["answer_nll_per_token"] = sum(s[1] for s in scored) / sum(s[2] for s in scored)
        gates = [g for *_, g in decoded if g is not None] if decoded is not None else []
        atomic_write_jsonl(out_dir / task / "predictions.jsonl", predictions)
        atomic_write_json(out_dir / task / "metrics.json", {
            "label": plan.label, "task": task, "template": plan.template, "system_prompt": plan.system_prompt,
            "run": None if plan.run_dir is None else str(plan.run_dir), "model": plan.model_path,
            "score": args.score, "decoding": vars(args.decoding(task)) if decode else None, "metrics": task_metrics,
            "gate_mean": sum(gates) / len(gates) if gates else None, "seconds": seconds,
        } | ({"yes_no_rule": args.yes_no_rule} if get_task(task).kind == "yesno" and decode else {}))
        metrics[task], per_example[task] = task_metrics, scores
        shown = [f"{get_task(task).primary} = {task_metrics[get_task(task).primary]:.4f}"] if decode else []
        shown += [f"answer_nll = {task_metrics['answer_nll']:.4f}"] if likelihood else []
        logger.info("%s / %s: %d examples, %s (%s)", plan.folder, task, len(rows), ", ".join(shown),
                    ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if rank != 0:
        return None
    result = RunResult(plan.label, plan.template, metrics, per_example,
                       None if plan.run_dir is None else str(plan.run_dir),
                       None if plan.run_dir is None else read_train_stats(plan.run_dir))
    atomic_write_json(out_dir / "results.json", result.to_dict())
    return result
