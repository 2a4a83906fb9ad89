"""The arguments of evaluate.py (``EvalArguments``; ``MeasureArguments``, those of --measures), with the checks that
need no model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imsm.evaluation.decoding.generation import DecodingConfig
from imsm.evaluation.decoding.scaling import parse_scales
from imsm.evaluation.measures.metrics import YES_NO_RULES, get_task, get_yes_no_rule
from imsm.evaluation.report.tables import parse_pairs
from imsm.templates import TEMPLATES

ALL_TASKS = "gsm8k,mrpc,cola,ropes,webq,freebaseqa,multirc"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORE_MODES = ("both", "decode", "likelihood")
MEASURES = ("auroc", "general_nll", "kl")  # --measures (imsm.evaluation.measures)
FRONTIER_ALL = "all"  # --frontier all:LORA: every label but the curve's and the untuned model


def in_family(label: str, name: str) -> bool:
    """``label`` is ``name`` or one of its variants ``name@...`` (an adapter scale, a checkpoint): how a name given on
    the command line (``--frontier IMSM-LoRA:LoRA``, merge_measures' ``--labels LoRA``) selects evaluated labels."""
    return label == name or label.startswith(name + "@")


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
                "IMSM-LoRA,IMSM-LoRA,IMSM-LoRA: one row each, mean ± sd over its runs, method-level intervals "
                "over seeds and examples (same base model, template, PEFT method and gate required)."})
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
                "IMSM-LoRA:LoRA. Every comparison is paired per example: an examples-only bootstrap 95%% interval, "
                "a method-level one (seed variance added) where the labels have several seeds, and the p of a "
                "test of the same quantity (imsm/evaluation/stats.py)."})
    adapter_scale: str | None = field(default=None, metadata={
        "help": "Evaluate every vanilla PEFT run (--gate none) at these scales of its learned update, e.g. "
                "0.25,0.5,0.75,1: weights W0 + a*(W1 - W0) (LoRA/AdaLoRA/DoRA: the update scaled; (IA)3: l -> "
                "1 + a(l - 1)); each scale is a row labelled LABEL@a. IMSM runs are evaluated as they are."})
    full_scale_labels: str | None = field(default=None, metadata={
        "help": "Comma-separated labels of vanilla PEFT runs that --adapter_scale leaves at their full learned "
                "update, one row each (e.g. LoRA@step30: a checkpoint on the frontier curve beside the scaled runs)."})
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
        if self.target is not None and self.target not in self.task_names:
            raise ValueError(f"--target {self.target} is not one of --tasks ({','.join(self.task_names)}); the "
                             "forgetting report compares the target task with the others, so add it to --tasks")
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
        self.full_scale = {label.strip() for label in (self.full_scale_labels or "").split(",") if label.strip()}
        if self.full_scale and not self.scales:
            raise ValueError("--full_scale_labels names runs that --adapter_scale leaves unscaled; without "
                             "--adapter_scale every run is evaluated at full scale already")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose auto or one of {sorted(DTYPES)}")
        self.decoding(self.target)  # checks the sampling settings

    def decoding(self, task: str) -> DecodingConfig:
        new_tokens = get_task(task).max_new_tokens if self.max_new_tokens is None else self.max_new_tokens
        return DecodingConfig(max_new_tokens=new_tokens, batch_size=self.batch_size, do_sample=self.do_sample,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass
class MeasureArguments:
    measures: str | None = field(default=None, metadata={
        "help": f"Comma-separated measures beside the task metrics: {', '.join(MEASURES)} (see docs/measures.md)."})
    general_text: str | None = field(default=None, metadata={
        "help": "JSONL passages for general_nll (build it with scripts/build_general_text.py)."})
    general_examples: int | None = field(default=None, metadata={"help": "Only the first N passages."})
    general_prefix_tokens: int = field(default=32, metadata={
        "help": "A passage's first tokens, the query IMSM's gate reads; the rest is scored."})
    threshold_file: list[str] = field(default_factory=list, metadata={
        "help": "TASK=TRAIN.jsonl: choose the yes/no threshold on rows of this training file that no run trained "
                "on (repeatable).", "action": "extend"})
    threshold_examples: int = field(default=500, metadata={"help": "Held-out training rows a threshold is chosen on."})
    measure_max_examples: int | None = field(default=None, metadata={
        "help": "Rows of each yes/no task scored by auroc (default: all; --max_examples limits decoding only)."})
    kl_examples: int = field(default=200, metadata={"help": "Prompts per non-target task for kl."})
    kl_max_new_tokens: int = field(default=32, metadata={"help": "Longest untuned greedy answer kl is read over."})
    frontier: str | None = field(default=None, metadata={
        "help": "METHOD[,METHOD...]:LORA labels, or all:LORA: each method's forgetting minus the curve of LORA's "
                "scales/checkpoints at the method's own gain (all: every label but the curve's and untuned), e.g. "
                "IMSM-LoRA:LoRA or IMSM-LoRA,KL1-LoRA,OSF:LoRA."})

    def __post_init__(self) -> None:
        self.names = [m.strip() for m in (self.measures or "").split(",") if m.strip()]
        unknown = sorted(set(self.names) - set(MEASURES))
        if unknown:
            raise ValueError(f"--measures {self.measures!r}: unknown {unknown}; choose from {list(MEASURES)}")
        if "general_nll" in self.names and not self.general_text:
            raise ValueError("--measures general_nll needs --general_text FILE (scripts/build_general_text.py)")
        self.thresholds = {}
        for item in self.threshold_file:
            task, sep, path = item.partition("=")
            if not sep or not path or get_task(task).kind != "yesno":
                raise ValueError(f"--threshold_file {item!r}: expected TASK=FILE for a yes/no task")
            self.thresholds[task] = Path(path)
        if self.thresholds and "auroc" not in self.names:
            raise ValueError("--threshold_file applies to --measures auroc")
        if self.frontier is not None:
            methods, sep, lora = self.frontier.partition(":")
            self.frontier_methods = [m.strip() for m in methods.split(",")]
            if not sep or not lora or not all(self.frontier_methods):
                raise ValueError(f"--frontier {self.frontier!r}: expected METHOD[,METHOD...]:LORA_LABEL (or "
                                 "all:LORA_LABEL), e.g. IMSM-LoRA,KL1-LoRA:LoRA")
            if FRONTIER_ALL in self.frontier_methods and len(self.frontier_methods) > 1:
                raise ValueError(f"--frontier {self.frontier!r}: '{FRONTIER_ALL}' stands for every method; name "
                                 "methods or write all, not both")
            if "auroc" not in self.names or not {"general_nll", "kl"} & set(self.names):
                raise ValueError("--frontier needs --measures auroc and general_nll and/or kl")
            self.frontier_labels = (methods, lora)
        for name in ("threshold_examples", "kl_examples", "kl_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")

    def frontier_groups(self, labels: Iterable[str]) -> tuple[list[str], list[str]]:
        """(the --frontier methods, the labels of LORA's curve: LORA and LORA@...) among an evaluation's ``labels``,
        in their order; a named label that is not among them, on the curve, or the untuned model is refused."""
        labels = list(dict.fromkeys(labels))
        lora = self.frontier_labels[1]
        curve = [label for label in labels if in_family(label, lora)]
        if not curve:
            raise ValueError(f"--frontier {self.frontier}: no label {lora!r} or {lora}@... to draw the curve from; "
                             f"the labels present: {labels}")
        if self.frontier_methods == [FRONTIER_ALL]:
            methods = [label for label in labels if label not in curve and label != "untuned"]
            if not methods:
                raise ValueError(f"--frontier {self.frontier}: every label is on the curve or untuned; nothing to "
                                 f"read against it (the labels present: {labels})")
            return methods, curve
        unknown = [m for m in self.frontier_methods if m not in labels]
        if unknown:
            raise ValueError(f"--frontier {self.frontier}: unknown label{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; the labels present: {labels}")
        wrong = [m for m in self.frontier_methods if m in curve or m == "untuned"]
        if wrong:
            raise ValueError(f"--frontier {self.frontier}: {', '.join(map(repr, wrong))} is the untuned model or on "
                             f"{lora}'s curve itself; name the methods to read against it")
        return list(dict.fromkeys(self.frontier_methods)), curve
