"""Evaluating one model: loading it, decoding and likelihood-scoring it on every task (rank 0 writes; other ranks
work on their shard, ``sharding``) and writing its records. The arguments are ``evaluation/arguments.py``, the plans
``planning.py``, the output folder's life ``output_dir.py``, the report ``report/writer.py``.

Prompts are encoded with ``imsm.data.encode_prompt``, the function training uses, so the query the model sees at test
time is token for token the one it was trained on; answer likelihoods (``scoring.answer_nll``) score the gold
answer tokens training puts its loss on.

Runs may share a label (``--labels untuned,LoRA,LoRA,LoRA,IMSM-LoRA,...``): they are seeds of one method, reported
as one row (mean ± standard deviation over the runs, method-level intervals over seeds and examples). A
label's runs must share the base model, prompt template, system prompt, PEFT method and gate; each run's files go to
``OUTPUT_DIR/<label>/run<k>/`` (a label of one run keeps ``OUTPUT_DIR/<label>/``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from imsm.atomic import atomic_write_json, atomic_write_jsonl
from imsm.data import Truncation, encode_prompt
from imsm.evaluation.decoding.generation import generate
from imsm.evaluation.decoding.scaling import load_scaled_run
from imsm.evaluation.decoding.scoring import answer_nll, best_answer, gold_answers
from imsm.evaluation.decoding.sharding import gather_shards, shard
from imsm.evaluation.measures.metrics import get_task
from imsm.evaluation.report.results import RunResult, score_records
from imsm.loader import load_backbone, load_run
from imsm.run_folder import read_train_stats
from imsm.templates import build_template

logger = logging.getLogger(__name__)
from imsm.evaluation.arguments import EvalArguments
from imsm.evaluation.planning import ModelPlan


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


def _decoded_fields(g) -> dict:
    """What a prediction record holds of one decoded answer."""
    fields = {"prediction": g.text, "num_tokens": g.num_tokens, "finish_reason": g.finish_reason}
    return fields if g.gate_mean is None else fields | {"gate_mean": g.gate_mean}


def _scored_fields(nll_mean: float, nll_sum: float, num_tokens: int, gate_mean: float | None) -> dict:
    """What a prediction record holds of one gold answer's likelihood."""
    fields = {"answer_nll": nll_mean, "answer_nll_sum": nll_sum, "answer_tokens": num_tokens}
    return fields if gate_mean is None else fields | {"answer_gate_mean": gate_mean}


def _decode(model, tokenizer, template, rows, args, task, rank, world_size, likelihood: bool):
    """Decode this rank's shard; with ``likelihood`` also score its golds on the same prefill (one KV cache).
    Returns, on rank 0, the decoded and the scored record fields of every row (None on other ranks)."""
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
            score = _scored_fields(best.nll_mean, best.nll_sum, best.num_tokens, best.gate_mean)
        out.append((_decoded_fields(g), score))
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
    local = [_scored_fields(s.nll_mean, s.nll_sum, s.num_tokens, s.gate_mean) for s in local]
    return gather_shards(local, len(rows), rank, world_size)


def evaluate_model(plan, args, tasks, dtype, device, rank, world_size, measures=None) -> RunResult | None:
    """Decode and/or likelihood-score every task with one model; rank 0 scores and writes its files and returns its
    result (with the per-example scores the report's paired statistics need). ``measures``: a
    ``measures.session.MeasureSession`` that also measures the model while it is loaded (``--measures``)."""
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
        for fields in (decoded, scored):
            for record, extra in zip(predictions, fields or [{}] * len(predictions), strict=True):
                record |= extra
        atomic_write_jsonl(out_dir / task / "predictions.jsonl", predictions)  # saved before anything can fail
        scores, task_metrics = score_records(task, predictions, args.yes_no_rule)  # as a rebuilt report reads them
        gates = [d["gate_mean"] for d in decoded or () if "gate_mean" in d]
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
    if measures is not None:
        measures.measure(plan, model, tokenizer, template, rank, world_size)
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
