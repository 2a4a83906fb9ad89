"""``evaluate.py --measures``: the measures of ``imsm.evaluation.measures.measures`` taken on every evaluated model
while it is loaded (``MeasureSession``); their arguments are ``imsm.evaluation.arguments.MeasureArguments``.

    python evaluate.py --untuned --run lora/s1 lora/s2 imsm/s1 imsm/s2 --labels untuned,LoRA,LoRA,IMSM-LoRA,IMSM-LoRA \
        --adapter_scale 0.25,0.5,0.75,1 --tasks mrpc,webq,freebaseqa,multirc --target mrpc ... \
        --measures auroc,general_nll,kl --general_text data/general_text.jsonl \
        --threshold_file mrpc=DATA/mrpc/train.jsonl --frontier IMSM-LoRA,KL1-LoRA:LoRA   # or all:LoRA

* ``auroc``: every yes/no task's rows (``--measure_max_examples`` of them, default all) scored by their log-odds;
  AUROC, and with ``--threshold_file TASK=FILE`` MCC and balanced accuracy at the threshold each run chooses on
  ``--threshold_examples`` rows of FILE that no evaluated run trained on (the rows after the most any run's
  ``run_args.json`` says it took from that file); FILE may not be the task's test file.
* ``general_nll``: the passages of ``--general_text`` (``scripts/build_general_text.py``), NLL per token.
* ``kl``: KL(untuned ‖ model) over the untuned model's greedy answers (at most ``--kl_max_new_tokens`` tokens) to the
  first ``--kl_examples`` prompts of every task but the target. The untuned model stays loaded beside each model.

Each model's per-example values go to ``OUTPUT_DIR/<label>[/run<k>]/measures.json`` (a trained model's with its run's
``train_stats.json`` under ``cost``). Their report (``imsm.evaluation.report.measure_tables``, written by
``report.writer``: ``measures.md``, a section of ``summary.md`` and ``forgetting.md``, the key ``measures`` of
``stats.json``) gives each label's value (mean ± sd over its runs) and its change against the untuned model with both
intervals of ``imsm.evaluation.stats``: examples-only (paired bootstrap, runs fixed) and method-level (plus the seed
variance, Welch t). With ``--frontier METHOD[,METHOD...]:LORA`` (or ``all:LORA``) and a yes/no target, the gap table
and ``frontier.png`` give each method's forgetting minus the LoRA curve at the method's own target gain
(``imsm.evaluation.measures.frontier``); the curve's points are the untuned model (LoRA at scale 0) and every label
LORA or LORA@... (``--adapter_scale`` rows, checkpoints labelled e.g. LoRA@step30). The labels are checked here, before
any model is measured.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from imsm.atomic import atomic_write_json
from imsm.data import Truncation, read_jsonl
from imsm.evaluation.arguments import MeasureArguments
from imsm.evaluation.decoding.scoring import FrozenMemo
from imsm.evaluation.decoding.sharding import gather_shards, shard
from imsm.evaluation.measures.measures import (
    continuation_nll,
    general_text_pairs,
    gold_yes,
    greedy_pairs,
    kl_to_reference,
    read_general_text,
    yes_no_log_odds,
)
from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.planning import read_task
from imsm.evaluation.report.results import MEASURES_FILE
from imsm.loader import load_backbone
from imsm.run_folder import RUN_ARGS, read_train_stats, resolve
from imsm.templates import build_template

logger = logging.getLogger(__name__)


def trained_rows(run_dir: Path, path: Path) -> int:
    """How many leading rows of ``path`` the run trained on (0 when it trained on another file)."""
    args_file = resolve(run_dir) / RUN_ARGS
    if not args_file.is_file():
        raise ValueError(f"--threshold_file: {run_dir} has no {RUN_ARGS}, so which rows it trained on is unknown")
    args = json.loads(args_file.read_text())
    if not args.get("train_file") or Path(args["train_file"]).resolve() != path.resolve():
        return 0
    return args["max_train_examples"] if args.get("max_train_examples") is not None else -1


class MeasureSession:
    """Reads and checks the measures' inputs before anything is evaluated, and measures each model while it is loaded
    (``measure``, called by ``runner.evaluate_model``); ``results`` holds every label's runs for the report."""

    def __init__(self, margs: MeasureArguments, eval_args, plans, files: dict[str, Path], dtype, device) -> None:
        self.margs, self.eval_args, self.dtype, self.device = margs, eval_args, dtype, device
        if not any(p.run_dir is None for p in plans):
            raise ValueError("--measures reports each change against the untuned model: add --untuned")
        self.target = eval_args.target
        if margs.frontier is not None:  # checked now, not after hours of measuring
            if get_task(self.target).kind != "yesno":
                raise ValueError(f"--frontier measures the target's gain by AUROC: the target {self.target} must be "
                                 "a yes/no task")
            margs.frontier_groups(p.label for p in plans)
        names = margs.names
        yes_no = [t for t in eval_args.task_names if get_task(t).kind == "yesno"]
        self.rows = {t: read_task(t, files[t], margs.measure_max_examples) for t in yes_no} if "auroc" in names else {}
        self.threshold_rows: dict[str, list[dict]] = {}
        for task, path in margs.thresholds.items():
            if task not in self.rows:
                raise ValueError(f"--threshold_file {task}=...: {task} is not an evaluated yes/no task")
            if path.resolve() == files[task].resolve():
                raise ValueError(f"--threshold_file {task}={path} is the task's test file; give a training file")
            used = [trained_rows(p.run_dir, path) for p in plans if p.run_dir is not None]
            if -1 in used:
                raise ValueError(f"--threshold_file {task}={path}: a run trained on all of it; no row is held out")
            start = max(used, default=0)
            held = read_jsonl(path)[start : start + margs.threshold_examples]
            if not held:
                raise ValueError(f"--threshold_file {task}={path}: no rows after the first {start} (trained on)")
            gold_yes(held, str(path))
            self.threshold_rows[task] = held
            logger.info("%s: threshold chosen on rows %d-%d of %s (no run trained on them)", task, start + 1,
                        start + len(held), path)
        self.passages = None
        if "general_nll" in names:
            self.passages = read_general_text(margs.general_text)[: margs.general_examples]
        self.kl_rows = {t: read_task(t, files[t], margs.kl_examples) for t in eval_args.task_names
                        if t != self.target} if "kl" in names else {}
        self.reference_path = next((p.model_path for p in plans if p.run_dir is None), plans[0].model_path)
        self.reference_template = eval_args.prompt_template or "raw"
        self._reference = None
        self._kl_pairs: dict[str, list] | None = None
        self.results: dict[str, list[dict]] = {}  # label -> each run's measures (rank 0)
        # the untuned backbone's hidden states: IMSM models read their frozen memory from it (scoring.FrozenMemo)
        self.memo = FrozenMemo()

    def _untuned(self, rank: int, world_size: int):
        """The untuned model and this rank's greedy pairs of every KL task, built once."""
        if self._reference is None:
            model, tokenizer, _ = load_backbone(self.reference_path, self.dtype, self.eval_args.attn_implementation,
                                                self.eval_args.trust_remote_code)
            self._reference = (model.to(self.device).eval(), tokenizer)
            template = build_template(self.reference_template, tokenizer, self.eval_args.system_prompt)
            self._kl_pairs = {}
            for task, rows in self.kl_rows.items():
                length = min(get_task(task).max_new_tokens, self.margs.kl_max_new_tokens)
                self._kl_pairs[task] = greedy_pairs(self._reference[0], tokenizer, template,
                                                    shard(rows, rank, world_size), self.eval_args.max_input_length,
                                                    length, self.eval_args.batch_size)
        return self._reference[0], self._kl_pairs

    def measure(self, plan, model, tokenizer, template, rank: int, world_size: int) -> None:
        """Every measure of one loaded model on this rank's shard; rank 0 gathers and writes its measures.json."""
        args, batch = self.eval_args, self.eval_args.batch_size
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out: dict = {"label": plan.label, "folder": plan.folder, "untuned": plan.run_dir is None}
        if plan.run_dir is not None:  # what training it cost (the frontier table's cost column)
            out["cost"] = read_train_stats(plan.run_dir)

        def gathered(values: np.ndarray, total: int) -> list | None:
            return gather_shards(np.asarray(values).tolist(), total, rank, world_size)

        started = time.perf_counter()
        memo, record = self.memo, plan.run_dir is None  # the untuned model fills the memo, IMSM models read it
        memo.start_model()

        def progress(what: str, n: int) -> None:  # a line per measure: the long part of a study shows it is moving
            if rank == 0:
                logger.info("%s: %s on %d rows done (%.0f s for this model so far)", plan.folder, what, n,
                            time.perf_counter() - started)

        if self.rows:
            out["yes_no"] = {}
            for task, rows in self.rows.items():
                truncation = Truncation(f"task {task} (measures)")
                scores = yes_no_log_odds(model, template, shard(rows, rank, world_size), args.max_input_length, batch,
                                         truncation, memo, record)
                truncation.warn()
                entry = {"log_odds": gathered(scores, len(rows)), "gold_yes": gold_yes(rows).tolist()}
                if task in self.threshold_rows:
                    held = self.threshold_rows[task]
                    entry["train_log_odds"] = gathered(yes_no_log_odds(
                        model, template, shard(held, rank, world_size), args.max_input_length, batch, None, memo,
                        record), len(held))
                    entry["train_gold_yes"] = gold_yes(held).tolist()
                out["yes_no"][task] = entry
                progress(f"{task} yes/no log-odds", len(rows) + len(self.threshold_rows.get(task, ())))
        if self.passages is not None:
            pairs = general_text_pairs(tokenizer, shard(self.passages, rank, world_size),
                                       self.margs.general_prefix_tokens, args.max_input_length)
            out["general_nll"] = gathered(continuation_nll(model, pairs, batch, pad_id, memo, record),
                                          len(self.passages))
            progress("general-text NLL", len(self.passages))
        if self.kl_rows:
            reference, kl_pairs = self._untuned(rank, world_size)
            if plan.run_dir is None:  # the untuned model against itself: 0 at every position
                out["kl"] = {t: gathered(np.c_[np.zeros(len(p)), [len(y) for _, y in p]], len(self.kl_rows[t]))
                             for t, p in kl_pairs.items()}
            else:
                out["kl"] = {t: gathered(kl_to_reference(reference, model, p, batch, pad_id, memo),
                                         len(self.kl_rows[t])) for t, p in kl_pairs.items()}
            progress("KL to the untuned model", sum(len(rows) for rows in self.kl_rows.values()))
        if memo.reads:
            logger.info("%s: %d batches read their frozen memory from the untuned model's pass (rank %d)", plan.folder,
                        memo.reads, rank)
        if rank == 0:
            atomic_write_json(Path(args.output_dir) / plan.folder / MEASURES_FILE, out)
            self.results.setdefault(plan.label, []).append(out)


def free_reference(session: MeasureSession | None) -> None:
    """Drop the untuned model kept for KL."""
    if session is not None and session._reference is not None:
        session._reference = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
