"""What a plan will cost: GPU-hours from a throughput measured on finished runs (never assumed), and the disk its
frozen-memory caches and checkpoints take.

GPU time: every finished run records its wall time, world size and optimizer steps (``train_stats.json``), and its
backbone, data file and gate (``run_args.json``). That gives GPU-seconds per training example for a (backbone, task,
one or two passes) triple; a planned run of a measured triple costs that times its examples times its epochs. A
triple with no finished run is reported as not measured: lengths differ too much between tasks (GSM8K's worked
answers, MRPC's "yes") and the frozen pass too much between backbones to carry a rate over.

Disk: an IMSM launcher fills the frozen-memory cache (``--frozen_memory_cache on``): hidden size x (answer tokens +
examples) x 2 bytes (bf16; ``imsm/training/frozen_cache.py``). Answer tokens are estimated from the answers'
characters at 2.656 characters per token, measured on GSM8K's training answers (1,924,422 characters, 724,546
SmolLM2 tokens). Checkpoints (adapter and optimizer state, one per epoch) are taken from the size of finished run
folders of the same launcher and backbone, when there are any.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from imsm import run_folder
from imsm.paper.plans import Plan, TrainRun

LAUNCHER_EPOCHS = 3  # every launcher trains 3 epochs (tests/test_run_scripts.py checks it)
CHARS_PER_TOKEN = 1_924_422 / 724_546
CACHE_BYTES_PER_VALUE = 2


@dataclass(frozen=True)
class Measured:
    gpu_seconds_per_example: float
    runs: int


def _task_of(train_file: str) -> str:
    return Path(train_file).parent.name


def measured_rates(runs_dir: Path) -> dict[tuple[str, str, bool], Measured]:
    """(model id, task, two passes) -> GPU-seconds per training example, averaged over the finished runs found."""
    samples: dict[tuple[str, str, bool], list[float]] = {}
    for stats_file in sorted(runs_dir.glob("**/final/train_stats.json")):
        final = stats_file.parent
        stats = json.loads(stats_file.read_text())
        args_file = final / run_folder.RUN_ARGS
        if not run_folder.is_complete(final) or not args_file.is_file() or not stats.get("optimizer_steps"):
            continue
        args = json.loads(args_file.read_text())
        world = stats["world_size"]
        examples = (stats["optimizer_steps"] * stats["per_device_train_batch_size"] * world
                    * stats["gradient_accumulation_steps"])
        key = (args["model_name_or_path"], _task_of(args["train_file"]), args["gate"] != "none")
        samples.setdefault(key, []).append(stats["train_runtime_s"] * world / examples)
    return {key: Measured(sum(v) / len(v), len(v)) for key, v in samples.items()}


def _examples(train_file: Path) -> list[dict]:
    with open(train_file, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _answer(output: str | list[str]) -> str:
    return output[0] if isinstance(output, list) else output  # a list trains on its first answer (imsm.data)


@dataclass
class Estimate:
    gpu_hours: float  # over the runs with a measured rate
    measured_runs: int  # planned runs with a measured rate
    unmeasured: list[TrainRun]
    cache_bytes: int
    cache_unknown: list[TrainRun]  # IMSM runs whose hidden size (an overridden model) or data file is unknown
    todo: list[TrainRun]
    missing_files: list[Path]  # training files not found in the data folder
    checkpoint_bytes: int
    checkpoint_unmeasured: int
    remaining: int  # runs not finished yet (what the estimate covers)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def estimate(plan: Plan, data_dir: Path, runs_dir: Path) -> Estimate:
    """The cost of the plan's runs that are not finished yet."""
    from imsm.paper.execute import run_state

    rates = measured_rates(runs_dir)
    sizes: dict[tuple[str, str], int] = {}  # (model id, launcher) -> bytes of a finished run folder
    for run in plan.runs:
        if run_state(run) == "done":
            sizes.setdefault((run.backbone.model_id, run.launcher.name), _folder_bytes(run.output_dir))
    todo = [run for run in plan.runs if run_state(run) != "done"]
    est = Estimate(0.0, 0, [], 0, [], todo, [], 0, 0, len(todo))
    examples_cache: dict[Path, list[dict]] = {}
    for run in todo:
        train_file = data_dir / run.task / "train.jsonl"
        rows = examples_cache.setdefault(train_file, _examples(train_file)) if train_file.is_file() else None
        if rows is None and train_file not in est.missing_files:
            est.missing_files.append(train_file)
        two_pass = run.label.startswith("IMSM-")
        rate = rates.get((run.backbone.model_id, run.task, two_pass))
        if rate is None or rows is None:
            est.unmeasured.append(run)
        else:
            est.gpu_hours += rate.gpu_seconds_per_example * len(rows) * LAUNCHER_EPOCHS / 3600
            est.measured_runs += 1
        if two_pass:  # every IMSM launcher turns the frozen-memory cache on
            if run.backbone.hidden_size is None or rows is None:
                est.cache_unknown.append(run)
            else:
                tokens = sum(math.ceil(len(_answer(r["output"])) / CHARS_PER_TOKEN) + 1 for r in rows)  # + EOS
                est.cache_bytes += run.backbone.hidden_size * (tokens + len(rows)) * CACHE_BYTES_PER_VALUE
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
    if est.measured_runs:
        lines.append(f"GPU-hours: {est.gpu_hours:.1f} for the {est.measured_runs} runs whose backbone, task and "
                     "gate kind have a finished run to measure (GPU-seconds per example x examples x 3 epochs)")
    if est.unmeasured:
        lines.append(f"GPU-hours: not measured for {len(est.unmeasured)} runs (no finished run of the same backbone, "
                     "task and gate kind yet; the estimate appears once one has finished)")
    cached = sum(run.label.startswith("IMSM-") for run in est.todo) - len(est.cache_unknown)
    if cached:
        lines.append(f"disk, frozen-memory caches: {est.cache_bytes / gb:.1f} GB for {cached} IMSM runs (hidden size "
                     "x (answer tokens + examples) x 2 B each; delete OUTPUT_DIR/frozen_memory_cache after training)")
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
