"""Evaluation: the arguments of evaluate.py, resolving and checking every model before anything is written, and
decoding + scoring one model on every task (rank 0 writes; other ranks decode their shard).

Prompts are encoded with ``imsm.data.encode_prompt``, the function training uses, so the query the model sees at test
time is token for token the one it was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from imsm.atomic import atomic_write_json, atomic_write_jsonl
from imsm.data import encode_prompt, read_jsonl
from imsm.default_model import resolve_model_path
from imsm.generation import DecodingConfig, gather_shards, generate, shard
from imsm.loader import (
    check_run_fits,
    load_backbone,
    load_run,
    load_tokenizer,
    read_settings,
    resolve_run_dir,
)
from imsm.metrics import compute_metrics, get_task
from imsm.report import RunResult
from imsm.templates import TEMPLATES, build_template

logger = logging.getLogger(__name__)

ALL_TASKS = "gsm8k,mrpc,cola,ropes,webq,freebaseqa,multirc"
PEFT_DISPLAY = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "ia3": "IA3"}
GATE_PREFIX = {"query_aware": "IMSM-", "token": "IMSM-token-", "equal": "IMSM-equal-", "none": ""}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        "help": "Comma-separated names: untuned first (with --untuned), then the runs in order."})
    target: str | None = field(default=None, metadata={"help": "Target task of the forgetting report (first task)."})
    max_examples: int | None = field(default=None, metadata={"help": "Only the first N examples of each task."})
    batch_size: int = field(default=16, metadata={"help": "Prompts decoded together per process."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Override every task's answer length."})
    max_input_length: int = field(default=1024, metadata={"help": "Prompt tokens kept (cut from the left)."})
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
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose auto or one of {sorted(DTYPES)}")
        self.decoding(self.target)  # checks the sampling settings

    def decoding(self, task: str) -> DecodingConfig:
        new_tokens = get_task(task).max_new_tokens if self.max_new_tokens is None else self.max_new_tokens
        return DecodingConfig(max_new_tokens=new_tokens, batch_size=self.batch_size, do_sample=self.do_sample,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass
class ModelPlan:
    """One model to evaluate, fully resolved before any decoding starts."""

    label: str
    model_path: str
    template: str
    system_prompt: str | None
    run_dir: Path | None = None  # None: the untuned backbone


def default_label(settings: dict) -> str:
    return GATE_PREFIX.get(settings["gate"], settings["gate"] + "-") + PEFT_DISPLAY.get(settings["peft"],
                                                                                        settings["peft"])


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


def read_task(task: str, path: Path, max_examples: int | None) -> list[dict]:
    """The task's rows, their golds checked by scoring empty predictions (a yes/no task needs yes/no golds)."""
    rows = read_jsonl(path, require_output=True)[:max_examples]
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
        run_dir = resolve_run_dir(run)
        settings = read_settings(run_dir)
        recorded = (settings.get("prompt_template", "raw"), settings.get("system_prompt"))
        template, system = recorded
        if args.prompt_template is not None:
            template, system = args.prompt_template, args.system_prompt
            if (template, system) != recorded:
                logger.warning("%s was trained with prompt template %r (system prompt %r); decoding with %r (%r) "
                               "as --prompt_template asks", run_dir, recorded[0], recorded[1], template, system)
        model_path = args.model_name_or_path or resolve_model_path(settings.get("base_model"))
        hidden = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code).hidden_size
        check_run_fits(run_dir, settings, hidden, model_path)
        plans.append(ModelPlan(default_label(settings), model_path, template, system, run_dir))
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(plans):
            raise ValueError(f"--labels has {len(labels)} names for {len(plans)} models (untuned first, then runs)")
        for plan, label in zip(plans, labels, strict=True):
            plan.label = label
    names = [p.label for p in plans]
    if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise ValueError(f"model labels {names} must be unique folder names; set them with --labels")
    for plan in plans:
        build_template(plan.template, load_tokenizer(plan.model_path, args.trust_remote_code), plan.system_prompt)
    return plans


def load_model(plan: ModelPlan, args: EvalArguments, dtype: torch.dtype, device: torch.device):
    if plan.run_dir is None:
        model, tokenizer, _ = load_backbone(plan.model_path, dtype, args.attn_implementation, args.trust_remote_code)
    else:
        model, tokenizer, _ = load_run(plan.run_dir, plan.model_path, dtype, args.attn_implementation,
                                       args.trust_remote_code)
    return model.to(device).eval(), tokenizer


def evaluate_model(plan, args, tasks, dtype, device, rank, world_size) -> RunResult | None:
    """Decode every task with one model; rank 0 scores and writes its files and returns its result."""
    model, tokenizer = load_model(plan, args, dtype, device)
    template = build_template(plan.template, tokenizer, plan.system_prompt)
    out_dir = Path(args.output_dir) / plan.label
    metrics = {}
    for task, rows in tasks.items():
        prompts = [encode_prompt(template, r["input"], args.max_input_length) for r in rows]
        decoding = args.decoding(task)
        local = generate(model, tokenizer, shard(prompts, rank, world_size), decoding)
        local = [(g.text, g.num_tokens, g.finish_reason, g.gate_mean) for g in local]
        gathered = gather_shards(local, len(prompts), rank, world_size)
        if rank != 0:
            continue
        predictions = []
        for row, (text, n, reason, gate) in zip(rows, gathered, strict=True):
            record = {"input": row["input"], "gold": row["output"], "prediction": text, "num_tokens": n,
                      "finish_reason": reason}
            predictions.append(record | ({} if gate is None else {"gate_mean": gate}))
        scores = compute_metrics(task, [p["prediction"] for p in predictions], [p["gold"] for p in predictions])
        gates = [g for *_, g in gathered if g is not None]
        atomic_write_jsonl(out_dir / task / "predictions.jsonl", predictions)
        atomic_write_json(out_dir / task / "metrics.json", {
            "label": plan.label, "task": task, "template": plan.template, "system_prompt": plan.system_prompt,
            "run": None if plan.run_dir is None else str(plan.run_dir), "model": plan.model_path,
            "decoding": vars(decoding), "metrics": scores, "gate_mean": sum(gates) / len(gates) if gates else None,
        })
        metrics[task] = scores
        logger.info("%s / %s: %d examples, %s = %.4f", plan.label, task, len(rows), get_task(task).primary,
                    scores[get_task(task).primary])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if rank != 0:
        return None
    result = RunResult(plan.label, plan.template, metrics)
    atomic_write_json(out_dir / "results.json", vars(result))
    return result
