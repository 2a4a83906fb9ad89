"""What a plan will cost before its first run: GPU-hours from a stated cost model, replaced by measured rates as runs
finish, and the disk its frozen-memory caches and run folders take.

The cost model (training FLOPs of one run; N = the backbone's parameters, T = the tokens of its training file as
the launcher truncates them, E = its epochs):

    tuned pass      6 N T E   forward 2N, the forward again under gradient checkpointing (every launcher turns it
                              on) 2N, backward to the activations 2N (the backbone is frozen: no weight gradient;
                              the adapter's and the gate's FLOPs, r << d, are left out, under 1%)
    frozen pass     2 N T     IMSM only: forward without gradient, in epoch 1 only, and once per (backbone, task)
                              in a plan, because its IMSM runs share one frozen-memory cache (``execute``); with
                              ``--frozen_memory_cache off`` every IMSM run pays 2 N T E

GPU-seconds = FLOPs / (peak x utilisation), the peak a GPU's dense bf16 TFLOP/s (312 for the A100/A800) and the
utilisation assumed (30%, typical of a DeepSpeed ZeRO-2 PEFT run with gradient checkpointing at these lengths) until
a finished run of the same backbone measures it. Attention's FLOPs (4 x layers x length x d per token, ~2% at 600
tokens on an 8B model) are left out. T counts characters at 2.656 per token (measured on GSM8K's training answers:
1,924,422 characters, 724,546 SmolLM2 tokens), capped at the launcher's ``--max_input_length`` and
``--max_output_length``.

Measured rates replace the model: every finished run records its wall time, world size and steps
(``train_stats.json``) and its backbone, data file and method (``run_args.json``). A planned run whose backbone,
task and method (its launcher) have a finished run costs that run's GPU-seconds per example x its examples x its
epochs; any finished run of the same backbone gives the utilisation used for the others.

Disk: one frozen-memory cache per (backbone, task) an IMSM run of the plan trains on: hidden size x (answer tokens +
examples) x 2 bytes (bf16; ``imsm/training/frozen_cache.py``), deleted at the plan's end unless
``--keep_frozen_cache``. Run folders (adapter and optimizer state, one checkpoint per epoch) are taken from the size
of finished run folders of the same launcher and backbone, when there are any.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from imsm import run_folder
from imsm.paper.plans import Plan, TrainRun

CHARS_PER_TOKEN = 1_924_422 / 724_546
CACHE_BYTES_PER_VALUE = 2
TUNED_PASS_FLOPS = 6  # x N per token: forward, recomputed forward, backward to the activations
FROZEN_PASS_FLOPS = 2  # x N per token: one forward without gradient

# Parameters of the paper's backbones (the safetensors totals of their Hub checkpoints).
PARAMETERS = {"ChatGLM3-6B": 6.244e9, "Qwen1.5-4B": 3.950e9, "Llama3-8B": 8.030e9, "Llama3.1-8B-Instruct": 8.030e9,
              "Llama2-7B": 6.738e9}


@dataclass(frozen=True)
class Measured:
    gpu_seconds_per_example: float
    runs: int


@dataclass(frozen=True)
class Schedule:
    """What a run's launcher (and the user's train arguments, which win) say about its length."""

    epochs: float
    max_steps: int | None
    max_input_length: int
    max_output_length: int
    frozen_cache: bool


def _last_option(args: list[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def schedule(run: TrainRun, train_args: list[str] | tuple[str, ...] = ()) -> Schedule:
    from imsm.paper.execute import ROOT, run_arguments

    args = run.command(run_arguments(run, train_args))[2:]  # after "bash LAUNCHER": the plan's, then the user's
    text = "\n".join(line for line in (ROOT / run.launcher).read_text().splitlines()
                     if not line.lstrip().startswith("#"))  # the header's example overrides are comments

    def option(name: str, default: str) -> str:
        found = _last_option(args, name)
        if found is not None:
            return found
        match = re.search(rf"{name}\s+(\S+)", text)
        return match.group(1) if match else default

    max_steps = _last_option(args, "--max_steps")
    return Schedule(float(option("--num_train_epochs", "3")), int(max_steps) if max_steps else None,
                    int(option("--max_input_length", "512")), int(option("--max_output_length", "512")),
                    option("--frozen_memory_cache", "off") != "off")


def _examples(train_file: Path) -> list[dict]:
    with open(train_file, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _answer(output: str | list[str]) -> str:
    return output[0] if isinstance(output, list) else output  # a list trains on its first answer (imsm.data)


def _tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def tokens_per_example(rows: list[dict], max_input: int, max_output: int) -> float:
    """Mean tokens of an example as trained: the prompt up to ``max_input``, the answer up to ``max_output`` - 1, and
    the closing EOS."""
    total = sum(min(_tokens(r["input"]), max_input) + min(_tokens(_answer(r["output"])), max_output - 1) + 1
                for r in rows)
    return total / len(rows)


def run_flops(parameters: float, tokens: float, epochs: float, imsm: bool, pays_frozen_pass: bool,
              cached: bool) -> float:
    """Training FLOPs of one run that sees ``tokens`` per epoch (the module docstring's model)."""
    flops = TUNED_PASS_FLOPS * parameters * tokens * epochs
    if imsm:
        frozen_epochs = (1 if pays_frozen_pass else 0) if cached else epochs
        flops += FROZEN_PASS_FLOPS * parameters * tokens * frozen_epochs
    return flops


def _task_of(train_file: str) -> str:
    return Path(train_file).parent.name


@dataclass(frozen=True)
class FinishedRun:
    model_id: str
    task: str
    peft: str  # the method
    gpu_seconds: float
    examples: int
    imsm: bool


def finished_runs(runs_dir: Path) -> list[FinishedRun]:
    out = []
    for stats_file in sorted(runs_dir.glob("**/final/train_stats.json")):
        final = stats_file.parent
        args_file = final / run_folder.RUN_ARGS
        stats = json.loads(stats_file.read_text())
        if not run_folder.is_complete(final) or not args_file.is_file() or not stats.get("optimizer_steps"):
            continue
        args = json.loads(args_file.read_text())
        world = stats["world_size"]
        examples = (stats["optimizer_steps"] * stats["per_device_train_batch_size"] * world
                    * stats["gradient_accumulation_steps"])
        out.append(FinishedRun(args["model_name_or_path"], _task_of(args["train_file"]), args.get("peft", "lora"),
                               stats["train_runtime_s"] * world, examples, args.get("gate", "none") != "none"))
    return out


def measured_rates(runs_dir: Path) -> dict[tuple[str, str, str, bool], Measured]:
    """(model id, task, method, IMSM or not) -> GPU-seconds per training example, averaged over the finished runs
    found."""
    samples: dict[tuple[str, str, str, bool], list[float]] = {}
    for run in finished_runs(runs_dir):
        samples.setdefault((run.model_id, run.task, run.peft, run.imsm), []).append(run.gpu_seconds / run.examples)
    return {key: Measured(sum(v) / len(v), len(v)) for key, v in samples.items()}


@dataclass
class Estimate:
    gpu_hours_measured: float = 0.0  # runs of a measured (backbone, task, method)
    measured_runs: int = 0
    gpu_hours_model: float = 0.0  # runs costed by the FLOPs model
    modelled_runs: int = 0
    unestimated: list[TrainRun] = field(default_factory=list)  # unknown parameters or training file
    utilisation: dict[str, tuple[float, str]] = field(default_factory=dict)  # backbone -> (share, "assumed"/...)
    peak_tflops: float = 312.0
    shared_caches: int = 0
    cache_bytes: int = 0
    cache_unknown: list[TrainRun] = field(default_factory=list)
    todo: list[TrainRun] = field(default_factory=list)
    missing_files: list[Path] = field(default_factory=list)
    checkpoint_bytes: int = 0
    checkpoint_unmeasured: int = 0

    @property
    def remaining(self) -> int:
        return len(self.todo)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_hours_measured + self.gpu_hours_model


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _parameters(run: TrainRun) -> float | None:
    from imsm.paper.plans import PAPER_BACKBONES

    paper = PAPER_BACKBONES.get(run.backbone.name)
    return PARAMETERS.get(run.backbone.name) if paper and paper.model_id == run.backbone.model_id else None


def measured_utilisation(plan: Plan, data_dir: Path, runs_dir: Path, peak_tflops: float,
                         train_args: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """model id -> the share of the peak its finished runs reached (their model FLOPs over their GPU-seconds)."""
    by_model = {run.backbone.model_id: run for run in plan.runs if _parameters(run) is not None}
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    rows_cache: dict[Path, list[dict]] = {}
    for done in finished_runs(runs_dir):
        planned = by_model.get(done.model_id)
        train_file = data_dir / done.task / "train.jsonl"
        if planned is None or not train_file.is_file():
            continue
        rows = rows_cache.setdefault(train_file, _examples(train_file))
        sched = schedule(planned, train_args)
        tokens = tokens_per_example(rows, sched.max_input_length, sched.max_output_length)
        epochs = done.examples / len(rows)
        flops[done.model_id] = flops.get(done.model_id, 0.0) + run_flops(
            _parameters(planned), tokens * len(rows), epochs, done.imsm, True, True)
        seconds[done.model_id] = seconds.get(done.model_id, 0.0) + done.gpu_seconds
    return {model: flops[model] / (seconds[model] * peak_tflops * 1e12) for model in flops if seconds[model] > 0}


def estimate(plan: Plan, data_dir: Path, runs_dir: Path, train_args: list[str] | tuple[str, ...] = (),
             peak_tflops: float = 312.0, utilisation: float = 0.3) -> Estimate:
    """The cost of the plan's runs that are not finished yet."""
    from imsm.paper.execute import launcher_batch, run_state, shared_cache_dir

    rates = measured_rates(runs_dir)
    measured_util = measured_utilisation(plan, data_dir, runs_dir, peak_tflops, train_args)
    sizes: dict[tuple[str, str], int] = {}  # (model id, launcher) -> bytes of a finished run folder
    cache_paid: set[Path] = set()  # shared caches some IMSM run has filled (finished) or will fill (planned first)
    for run in plan.runs:
        if run_state(run) == "done":
            sizes.setdefault((run.backbone.model_id, run.launcher.name), _folder_bytes(run.output_dir))
            if (cache := shared_cache_dir(run)) is not None and cache.is_dir():
                cache_paid.add(cache)
    todo = [run for run in plan.runs if run_state(run) != "done"]
    est = Estimate(todo=todo, peak_tflops=peak_tflops)
    examples_cache: dict[Path, list[dict]] = {}
    cache_sized: set[Path] = set()
    for run in todo:
        train_file = data_dir / run.task / "train.jsonl"
        rows = examples_cache.setdefault(train_file, _examples(train_file)) if train_file.is_file() else None
        if rows is None and train_file not in est.missing_files:
            est.missing_files.append(train_file)
        sched = schedule(run, train_args)
        imsm = run.label.startswith("IMSM-")
        cache = shared_cache_dir(run) if sched.frozen_cache else None
        pays = cache is not None and cache not in cache_paid
        if cache is not None:
            cache_paid.add(cache)
        epochs = sched.epochs
        if rows and sched.max_steps is not None:
            epochs = sched.max_steps * launcher_batch(run).global_batch / len(rows)
        rate = rates.get((run.backbone.model_id, run.task, run.variant.peft, imsm))
        parameters = _parameters(run)
        if rows is None:
            est.unestimated.append(run)
        elif rate is not None:
            est.gpu_hours_measured += rate.gpu_seconds_per_example * len(rows) * epochs / 3600
            est.measured_runs += 1
        elif parameters is not None:
            util = measured_util.get(run.backbone.model_id)
            est.utilisation[run.backbone.name] = (util, "measured") if util else (utilisation, "assumed")
            tokens = tokens_per_example(rows, sched.max_input_length, sched.max_output_length) * len(rows)
            flops = run_flops(parameters, tokens, epochs, imsm, pays, cache is not None)
            est.gpu_hours_model += flops / (peak_tflops * 1e12 * (util or utilisation)) / 3600
            est.modelled_runs += 1
        else:
            est.unestimated.append(run)
        if imsm and sched.frozen_cache:
            key = cache or run.output_dir
            if run.backbone.hidden_size is None or rows is None:
                est.cache_unknown.append(run)
            elif key not in cache_sized:
                cache_sized.add(key)
                tokens = sum(min(_tokens(_answer(r["output"])), sched.max_output_length - 1) + 1 for r in rows)
                est.cache_bytes += run.backbone.hidden_size * (tokens + len(rows)) * CACHE_BYTES_PER_VALUE
                est.shared_caches += 1
        size = sizes.get((run.backbone.model_id, run.launcher.name))
        if size is None:
            est.checkpoint_unmeasured += 1
        else:
            est.checkpoint_bytes += size
    return est


def describe(est: Estimate, total_runs: int) -> list[str]:
    """The dry run's cost lines."""
    gb = 1e9
    lines = [f"runs to train: {est.remaining} of {total_runs}" + (f" ({total_runs - est.remaining} finished)"
                                                               if est.remaining < total_runs else "")]
    lines += [f"missing training file: {path} (build the task files with scripts/prepare_data.py --out_dir DIR)"
              for path in est.missing_files]
    if est.remaining == 0:
        return lines
    if est.measured_runs or est.modelled_runs:
        lines.append(f"GPU-hours: {est.gpu_hours:.1f} for {est.measured_runs + est.modelled_runs} runs")
    if est.measured_runs:
        lines.append(f"  {est.gpu_hours_measured:.1f} for {est.measured_runs} runs measured on a finished run of the "
                     "same backbone, task and method (GPU-seconds per example x examples x epochs)")
    if est.modelled_runs:
        utils = ", ".join(f"{name} {share:.0%} {how}" for name, (share, how) in sorted(est.utilisation.items()))
        lines.append(f"  {est.gpu_hours_model:.1f} for {est.modelled_runs} runs from the cost model: 6N FLOPs per "
                     "token per epoch for the tuned pass, + 2N per token once per backbone and task for IMSM's "
                     f"frozen pass (shared cache), at {est.peak_tflops:g} TFLOP/s peak x utilisation ({utils}); "
                     "measured rates replace it as runs finish")
    if est.unestimated:
        lines.append(f"GPU-hours: not estimated for {len(est.unestimated)} runs (training file missing, or the "
                     "parameter count of an overridden model unknown; a finished run of the same backbone, task and "
                     "method measures it)")
    if est.shared_caches:
        lines.append(f"disk, frozen-memory caches: {est.cache_bytes / gb:.1f} GB for {est.shared_caches} caches "
                     "(one per backbone and task, shared by its IMSM runs; hidden size x (answer tokens + examples) "
                     "x 2 B; deleted at the plan's end unless --keep_frozen_cache)")
    if est.cache_unknown:
        lines.append(f"disk, frozen-memory caches: unknown for {len(est.cache_unknown)} IMSM runs (training file "
                     "missing, or the hidden size of an overridden model that is not a local folder)")
    if est.checkpoint_bytes:
        lines.append(f"disk, run folders: {est.checkpoint_bytes / gb:.2f} GB for the runs measured on a finished "
                     "run of the same launcher and backbone")
    if est.checkpoint_unmeasured:
        lines.append(f"disk, run folders: not measured for {est.checkpoint_unmeasured} runs (adapter and optimizer "
                     "state per epoch; no finished run of the same launcher and backbone yet)")
    return lines
