"""Evaluate saved IMSM / PEFT runs (and the untuned model) on the IMSM benchmarks; write predictions, metrics and the
summary + forgetting report.

    python evaluate.py --run runs/imsm_lora_gsm8k --run runs/lora_gsm8k --untuned \
        --tasks gsm8k,mrpc,cola,ropes,webq,freebaseqa,multirc --data_dir /work/shared/data \
        --output_dir eval/gsm8k --labels untuned,IMSM-LoRA,LoRA --target gsm8k --batch_size 16

    torchrun --nproc_per_node 8 evaluate.py --run_dir runs/imsm_lora_gsm8k --run_dir runs/lora_gsm8k ...the rest...
    deepspeed --num_gpus 8 evaluate.py ...the same arguments as the first command...

``--run`` is an alias of ``--run_dir``; under torchrun write ``--run_dir`` (torchrun's own parser rejects ``--run``
as an ambiguous abbreviation of its ``--run-path``, even after the script name).

Each process decodes a strided shard of every task; rank 0 gathers the predictions back in input order and writes
``OUTPUT_DIR/<label>/<task>/{predictions.jsonl,metrics.json}``, ``OUTPUT_DIR/<label>/results.json`` and
``OUTPUT_DIR/{summary,forgetting,comparisons}.md``, ``stats.{json,csv}``, ``tradeoff.{png,csv}``, ``forgetting.png``.
``--score both`` (default) decodes and also scores each gold answer's likelihood teacher-forced (``answer_nll``);
``--score likelihood`` only scores, far cheaper. Runs sharing a label are seeds of one method (one row, mean ± sd):

    python evaluate.py --untuned --run runs/lora/s1 runs/lora/s2 runs/lora/s3 runs/imsm/s1 runs/imsm/s2 runs/imsm/s3 \
        --labels untuned,LoRA,LoRA,LoRA,IMSM-LoRA,IMSM-LoRA,IMSM-LoRA --compare IMSM-LoRA:LoRA ...

Every change against the untuned model, and between the ``--compare`` pairs, is paired per example: an examples-only
bootstrap 95% interval (``--bootstrap_resamples``, ``--bootstrap_seed``) and, where a label has several seeds, a
method-level interval that adds the seed-to-seed variance, each with the p-value of a test of the same quantity
(``imsm/evaluation/stats.py``).
An ``--output_dir`` that holds an earlier evaluation is refused unless ``--overwrite``, which empties only a folder
marked ``imsm_evaluation.json`` (every report is), never a run or another folder; while an evaluation writes, the
folder holds a file ``INCOMPLETE``. Every model's predictions are saved as soon as it is decoded, so a report can
be written again from the folder alone, without decoding (e.g. after a crash, or with other ``--compare`` pairs):

    python evaluate.py --report_only eval/gsm8k [--compare IMSM-LoRA:LoRA] [--target gsm8k] [--bootstrap_seed 1]

It writes the --measures sections too, from each model's saved measures.json (``--frontier`` changes the frontier).
A run decodes with the prompt template it was trained with unless ``--prompt_template`` overrides it (a warning says
so); the untuned model uses ``--prompt_template`` (default raw). Every input (tasks, data files, run folders, gate
shapes, templates) is checked before anything is written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from imsm.evaluation.arguments import DTYPES, EvalArguments, MeasureArguments
from imsm.evaluation.decoding.runner import evaluate_model
from imsm.evaluation.measures.session import MeasureSession
from imsm.evaluation.output_dir import finish_output_dir, prepare_output_dir
from imsm.evaluation.planning import (
    calibration_notes,
    calibration_skips,
    plan_models,
    read_task,
    scoring_notes,
    task_files,
)
from imsm.evaluation.report.measure_tables import measure_sections, saved_measures
from imsm.evaluation.report.tables import parse_pairs
from imsm.evaluation.report.writer import rebuild_report, report_settings, write_report, write_report_inputs


@dataclass
class ReportOnlyArguments:
    report_only: str = field(metadata={
        "help": "An existing evaluate.py output folder: write its report again from the saved predictions, without "
                "decoding. The target, pairs and bootstrap settings it was evaluated with are used unless given."})
    target: str | None = field(default=None, metadata={"help": "Target task of the forgetting report."})
    compare: str | None = field(default=None, metadata={"help": "Pairs of labels to compare: 'A:B,C:D'."})
    bootstrap_resamples: int | None = field(default=None, metadata={"help": "Paired bootstrap resamples."})
    bootstrap_seed: int | None = field(default=None, metadata={"help": "Seed of the bootstrap's resampling."})
    frontier: str | None = field(default=None, metadata={
        "help": "METHODS:LORA of the --measures frontier (A,B:LoRA or all:LoRA; default: the one it was evaluated "
                "with, if any)."})


def report_only(argv: list[str]) -> dict[str, Path]:
    args, rest = HfArgumentParser(ReportOnlyArguments).parse_args_into_dataclasses(args=argv,
                                                                                  return_remaining_strings=True)
    if rest:
        raise ValueError(f"--report_only writes a report from saved predictions without decoding; it takes only "
                         f"--target, --compare, --bootstrap_resamples, --bootstrap_seed and --frontier, not "
                         f"{' '.join(rest)}")
    if args.bootstrap_resamples is not None and args.bootstrap_resamples < 1000:
        raise ValueError(f"--bootstrap_resamples {args.bootstrap_resamples}: use at least 1000")
    pairs = parse_pairs(args.compare)
    settings = report_settings(args.report_only, args.target, pairs, args.bootstrap_resamples, args.bootstrap_seed)
    # the measures are read (and checked) before anything is rewritten, and handed to the one writer of every file
    saved = saved_measures(args.report_only, settings["folders"], args.frontier or settings["frontier"])
    sections = None
    if saved is not None:
        results, margs = saved
        sections = measure_sections(results, settings["target"], margs, settings["resamples"], settings["seed"])
    paths = rebuild_report(args.report_only, settings, sections)
    finish_output_dir(Path(args.report_only))
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path] | None:
    argv = sys.argv[1:] if argv is None else argv
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout,
                        level=logging.INFO if rank == 0 else logging.WARNING)
    if any(a == "--report_only" or a.startswith("--report_only=") for a in argv):
        paths = report_only(argv)
        _print_report(paths, Path(paths["summary_md"]).parent)
        return paths
    args, measure_args = HfArgumentParser((EvalArguments, MeasureArguments)).parse_args_into_dataclasses(args=argv)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    files = task_files(args)
    plans = plan_models(args)
    skips = calibration_skips(plans, files)
    tasks = {task: read_task(task, path, args.max_examples, {i for rows in skips.get(task, {}).values() for i in rows})
             for task, path in files.items()}
    notes = calibration_notes(skips, files)
    for note in notes:
        logging.getLogger("evaluate").warning(note)
    notes += scoring_notes(args)

    measures = MeasureSession(measure_args, args, plans, files, dtype, device) if measure_args.names else None

    if rank == 0:
        prepare_output_dir(Path(args.output_dir), args.overwrite)
        write_report_inputs(args.output_dir, [plan.folder for plan in plans], args.target, args.pairs,
                            args.bootstrap_resamples, args.bootstrap_seed, notes, measure_args.frontier)
    runs, start = [], time.perf_counter()
    for i, plan in enumerate(plans):
        runs.append(evaluate_model(plan, args, tasks, dtype, device, rank, world_size, measures))
        elapsed = time.perf_counter() - start
        logging.getLogger("evaluate").info(
            "model %d/%d (%s) done; %.0f s so far, about %.0f s to go", i + 1, len(plans), plan.folder, elapsed,
            elapsed / (i + 1) * (len(plans) - i - 1))
    paths = None
    if rank == 0:
        try:
            sections = None if measures is None else measure_sections(
                measures.results, args.target, measure_args, args.bootstrap_resamples, args.bootstrap_seed)
            paths = write_report(runs, args.target, args.output_dir, pairs=args.pairs,
                                 resamples=args.bootstrap_resamples, seed=args.bootstrap_seed, notes=notes,
                                 measures=sections)
        except Exception:
            logging.getLogger("evaluate").error("the report failed; every prediction is saved in %s: write the "
                                                "report again with python evaluate.py --report_only %s",
                                                args.output_dir, args.output_dir)
            raise
        finish_output_dir(Path(args.output_dir))
        _print_report(paths, args.output_dir)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return paths


def _print_report(paths: dict[str, Path], out_dir: str | Path) -> None:
    print(paths["summary_md"].read_text(), paths["forgetting_md"].read_text(), paths["comparisons_md"].read_text(),
          sep="\n")
    print(f"Report, predictions and charts (forgetting.png, tradeoff.png): {out_dir}")
    if "frontier_png" in paths:
        print(f"The LoRA frontier: {paths['frontier_png']}; every measure: {paths['measures_md']}")


if __name__ == "__main__":
    main()
