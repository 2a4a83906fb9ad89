"""Say up front how long a CPU demo or study will take on THIS machine, measured, not assumed.

It loads the model once, times a few training steps of vanilla LoRA and of IMSM-LoRA at the study's batch size and
lengths (with the thread count each training job will get), and times decoding and answer-likelihood scoring of a
few examples of every task, then extrapolates to the whole plan and prints it. It takes about a minute on an idle
machine and longer on a loaded one, so every phase prints a progress line to stderr as it starts
(``estimate [3/9] timing decoding: mrpc, single-pass model (41 s so far)``); machines differ 2-3x (the CPU demo took
16 min on one 2-core machine and 49 on another), which is why a constant won't do. The figures are measured under
the machine's load of the moment: a machine busy during the estimate gives a pessimistic one.

    python scripts/estimate_time.py --data_dir ../shared/data --target mrpc --tasks mrpc,webq,freebaseqa,multirc \
        --runs LoRA:1 IMSM-LoRA:1 --steps 60 --batch 8 --eval_examples 200 --score both

With ``--measure_models PLAIN,IMSM`` it also times ``evaluate.py --measures`` (the target's yes/no log-odds, the
general-text NLL, KL on ``--kl_tasks`` with the untuned model's greedy answers), the IMSM models reading their frozen
memory from the untuned model's passes as evaluate.py does (``scoring.FrozenMemo``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imsm.args import ImsmArguments
from imsm.data import SupervisedCollator, SupervisedDataset, encode_prompt, read_jsonl
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.evaluation.decoding.scoring import answer_nll
from imsm.evaluation.measures.metrics import get_task
from imsm.loader import build_imsm_model, load_backbone
from imsm.method.gate import build_gate
from imsm.method.model import IMSMModel
from imsm.templates import build_template

SAMPLE = 8  # examples per task timed for evaluation
PROCESS_START_SECONDS = 20.0  # a fresh train.py process: imports, model and data loading (10-25 s seen on SmolLM2)
# the gate of each method of run_scripts/cpu_study.sh, which decides its cost: "none" runs one pass, the others two
# (LoRAMoE's experts cost ~15% over a LoRA step, PiSSA/CorDA a one-off SVD: timed as LoRA)
METHOD_GATES = {"LoRA": "none", "IMSM-LoRA": "query_aware", "IMSM-equal-LoRA": "equal", "IMSM-token-LoRA": "token",
                "LoRAMoE": "none", "CorDA-LoRA": "none", "PiSSA-LoRA": "none",
                # the KL anchor runs the frozen pass beside the tuned one: timed as two passes (the `equal` gate)
                "KL0.1-LoRA": "equal", "KL1-LoRA": "equal", "EAFT-LoRA": "none", "Replay-LoRA": "none",
                "MLP-LoRA": "none", "MiCA-LoRA": "none", "OSF": "none"}
SCALED_METHODS = ("LoRA", "CorDA-LoRA", "PiSSA-LoRA")  # evaluated once per --adapter_scale


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--tasks", required=True, help="comma-separated evaluation tasks")
    p.add_argument("--template", default="chat")
    p.add_argument("--model_name_or_path", default=None, help="the backbone (default: the embedded SmolLM2)")
    p.add_argument("--train_examples", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval_examples", type=int, default=200)
    p.add_argument("--score", default="both", choices=["both", "decode", "likelihood"])
    p.add_argument("--runs", nargs="*", default=[],
                   help=f"METHOD:SEED per training run, e.g. LoRA:1 IMSM-LoRA:1; methods: {sorted(METHOD_GATES)}")
    p.add_argument("--scales", default="", help="adapter scales each vanilla LoRA-family run is evaluated at")
    p.add_argument("--jobs", type=int, default=1, help="training runs side by side")
    p.add_argument("--untuned", type=int, default=1, help="1 when the untuned model is evaluated too")
    p.add_argument("--skip_done_in", default=None, help="runs already finished under this folder are not counted")
    p.add_argument("--label", default="cpu run", help="name printed with the estimate")
    p.add_argument("--decoded", type=int, default=1, help="0: no decoded/likelihood evaluation (measures only)")
    p.add_argument("--measure_models", default="",
                   help="PLAIN,IMSM: models of an evaluate.py --measures run besides the untuned one (none: not run)")
    p.add_argument("--measure_rows", default="",
                   help="TASK=N,...: rows of each yes/no task scored by log-odds (test and threshold rows)")
    p.add_argument("--measure_likelihood_tasks", default="", help="tasks of that run, likelihood-scored")
    p.add_argument("--general_text", default=None, help="the passages of the general-text NLL")
    p.add_argument("--general_examples", type=int, default=500)
    p.add_argument("--kl_tasks", default="", help="comma-separated tasks KL is read on")
    p.add_argument("--kl_examples", type=int, default=200, help="prompts per KL task")
    return p.parse_args()


class Progress:
    """One line per phase on stderr as it starts: its number, what it times, the seconds spent so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        print(f"estimate [{self.done}/{self.total}] {what} ({time.perf_counter() - self.start:.0f} s so far)",
              file=sys.stderr, flush=True)


def _time_steps(model: IMSMModel, batch: dict, steps: int = 2) -> float:
    """Seconds per training step (forward + backward; the optimizer step of an adapter is negligible)."""
    model.train()
    loss = model(**batch)["loss"]  # warm-up
    loss.backward()
    start = time.perf_counter()
    for _ in range(steps):
        model(**batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def _time_eval(model, tokenizer, template, rows, task: str, score: str) -> float:
    """Seconds to decode and/or likelihood-score ``rows`` of ``task`` with ``model``."""
    start = time.perf_counter()
    if score in ("both", "decode"):
        decoding = DecodingConfig(max_new_tokens=get_task(task).max_new_tokens, batch_size=16)
        generate(model, tokenizer, [encode_prompt(template, r["input"], 1024) for r in rows], decoding)
    if score in ("both", "likelihood"):
        answer_nll(model, template, rows, 1024, 16)
    return time.perf_counter() - start


def _time_measures(untuned, vanilla, model, tokenizer, template, args, progress: Progress) -> dict[str, float]:
    """Seconds of one --measures run per model kind: {"untuned", "plain", "imsm"} (module docstring)."""
    from imsm.evaluation.decoding.scoring import FrozenMemo
    from imsm.evaluation.measures.measures import (
        continuation_nll,
        general_text_pairs,
        greedy_pairs,
        kl_to_reference,
        read_general_text,
        yes_no_log_odds,
    )
    from imsm.evaluation.measures.metrics import get_task

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    passages = general_text_pairs(tokenizer, read_general_text(args.general_text)[:SAMPLE], 32, 1024)
    yes_no = {task: int(n) for task, _, n in (item.partition("=") for item in args.measure_rows.split(",") if item)}
    kl_rows = {t: read_jsonl(Path(args.data_dir) / t / "test.jsonl")[:SAMPLE] for t in args.kl_tasks.split(",") if t}
    memo = FrozenMemo()
    cost = {"untuned": 0.0, "plain": 0.0, "imsm": 0.0}
    pairs = {}
    start = time.perf_counter()
    for task, task_rows in kl_rows.items():  # the untuned model's greedy answers, once per evaluation
        length = min(get_task(task).max_new_tokens, 32)
        pairs[task] = greedy_pairs(untuned, tokenizer, template, task_rows, 1024, length, 16)
    cost["untuned"] += (time.perf_counter() - start) * args.kl_examples / SAMPLE
    for kind, m in (("untuned", untuned), ("plain", vanilla), ("imsm", model)):
        progress(f"timing the measures: {kind} model")
        record = kind == "untuned"
        memo.start_model()
        for task, n in yes_no.items():
            rows = read_jsonl(Path(args.data_dir) / task / "test.jsonl")[:SAMPLE]
            start = time.perf_counter()
            yes_no_log_odds(m, template, rows, 1024, 16, None, memo, record)
            cost[kind] += (time.perf_counter() - start) * n / len(rows)
        start = time.perf_counter()
        continuation_nll(m, passages, 16, pad, memo, record)
        cost[kind] += (time.perf_counter() - start) * args.general_examples / len(passages)
        if kind != "untuned":
            start = time.perf_counter()
            for task_pairs in pairs.values():
                kl_to_reference(untuned, m, task_pairs, 16, pad, memo)
            cost[kind] += (time.perf_counter() - start) * args.kl_examples / SAMPLE
    return cost


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.WARNING)
    runs, evaluated = [], []  # (gate, done) per training run; gate per evaluated model
    n_scales = len([s for s in args.scales.split(",") if s.strip()])
    for item in args.runs:
        method, _, seed = item.partition(":")
        if method not in METHOD_GATES:
            raise SystemExit(f"--runs {item}: unknown method {method!r} (known: {sorted(METHOD_GATES)})")
        gate = METHOD_GATES[method]
        done = args.skip_done_in and (Path(args.skip_done_in) / method / f"seed{seed}" / "final" /
                                      "imsm_config.json").is_file()
        runs.append((gate, bool(done)))
        evaluated += [gate] * (n_scales if n_scales and method in SCALED_METHODS else 1)
    cores = os.cpu_count() or 1
    train_threads = max(1, cores // max(1, args.jobs))

    # the decoded evaluation is timed only when the study runs it (EVALUATE=measures skips minutes of decoding here)
    tasks = [t for t in dict.fromkeys(args.tasks.split(",")) if t] if args.decoded else []
    likelihood_tasks = [t for t in args.measure_likelihood_tasks.split(",") if t] if args.measure_models else []
    to_train = not all(done for _, done in runs)
    progress = Progress(1 + 2 * to_train + 2 * len(tasks) + (4 + 2 * len(likelihood_tasks) if args.measure_models
                                                             else 0))
    t0 = time.perf_counter()
    progress("loading the model")
    backbone, tokenizer, _ = load_backbone(args.model_name_or_path)
    template = build_template(args.template, tokenizer)
    load_seconds = time.perf_counter() - t0
    model = build_imsm_model(backbone, ImsmArguments.create(peft="lora", gate="query_aware"))
    vanilla = IMSMModel(model.peft_model, build_gate("none", backbone.config.hidden_size), model.method)
    dataset = SupervisedDataset(Path(args.data_dir) / args.target / "train.jsonl", template, 256, 8,
                                max(args.batch, 1))
    batch = SupervisedCollator(tokenizer.pad_token_id)([dataset[i] for i in range(min(args.batch, len(dataset)))])

    step = {"none": 0.0, "query_aware": 0.0}  # nothing left to train (a resumed study): nothing to time
    if to_train:
        threads = torch.get_num_threads()
        torch.set_num_threads(train_threads)
        progress(f"timing training steps: LoRA, batch {len(batch['input_ids'])}")
        step["none"] = _time_steps(vanilla, batch)
        progress(f"timing training steps: IMSM-LoRA, batch {len(batch['input_ids'])}")
        step["query_aware"] = _time_steps(model, batch)
        torch.set_num_threads(threads)
    step["equal"] = step["token"] = step["query_aware"]
    per_run = {gate: args.steps * s + PROCESS_START_SECONDS for gate, s in step.items()}
    todo = [per_run.get(gate, per_run["query_aware"]) for gate, done in runs if not done]
    train_total = sum(todo) / max(1, min(args.jobs, len(todo))) if todo else 0.0

    eval_per_model = {"plain": 0.0, "siamese": 0.0}
    for task in tasks:
        all_rows = read_jsonl(Path(args.data_dir) / task / "test.jsonl")
        n = min(args.eval_examples, len(all_rows))
        rows = all_rows[: min(SAMPLE, n)]
        progress(f"timing evaluation ({args.score}): {task}, single-pass model")
        eval_per_model["plain"] += _time_eval(vanilla, tokenizer, template, rows, task, args.score) * n / len(rows)
        progress(f"timing evaluation ({args.score}): {task}, IMSM model")
        eval_per_model["siamese"] += _time_eval(model, tokenizer, template, rows, task, args.score) * n / len(rows)
    n_plain = args.untuned + sum(gate == "none" for gate in evaluated)
    n_siamese = sum(gate != "none" for gate in evaluated)
    eval_total = n_plain * (eval_per_model["plain"] + load_seconds) + n_siamese * (eval_per_model["siamese"]
                                                                                   + load_seconds)
    eval_total *= args.decoded
    measure_total, measure_line = 0.0, None
    if args.measure_models:
        plain, imsm = (int(x) for x in args.measure_models.split(","))
        progress("loading the untuned model for the measures")
        untuned = load_backbone(args.model_name_or_path)[0]
        cost = _time_measures(untuned, vanilla, model, tokenizer, template, args, progress)
        likelihood = {"plain": 0.0, "imsm": 0.0}  # the measures run also scores --eval_examples rows' answers
        for task in likelihood_tasks:
            rows = read_jsonl(Path(args.data_dir) / task / "test.jsonl")
            share = min(args.eval_examples, len(rows)) / SAMPLE
            for kind, m in (("plain", vanilla), ("imsm", model)):
                progress(f"timing the measures' answer likelihood: {task}, {kind} model")
                likelihood[kind] += _time_eval(m, tokenizer, template, rows[:SAMPLE], task, "likelihood") * share
        per = {"untuned": cost["untuned"] + likelihood["plain"], "plain": cost["plain"] + likelihood["plain"],
               "imsm": cost["imsm"] + likelihood["imsm"]}
        measure_total = per["untuned"] + plain * per["plain"] + imsm * per["imsm"] + (1 + plain + imsm) * load_seconds
        measure_line = (f"  measures: the untuned model, {plain} vanilla and {imsm} IMSM models: "
                        f"~{_fmt(per['untuned'])} untuned (its greedy KL answers included), ~{_fmt(per['plain'])} "
                        "per vanilla model, "
                        f"~{_fmt(per['imsm'])} per IMSM model -> ~{_fmt(measure_total)}")
    total = train_total + eval_total + measure_total
    finish = datetime.datetime.now() + datetime.timedelta(seconds=total)
    done = sum(d for _, d in runs)
    print(f"{args.label}: expected duration on this machine ({cores} cores), measured just now:")
    if todo:
        print(f"  training: {len(todo)} run(s) of {args.steps} steps to go ({done} done before), {args.jobs} side by "
              f"side on {train_threads} thread(s) each: LoRA ~{_fmt(per_run['none'])}, IMSM-LoRA "
              f"~{_fmt(per_run['query_aware'])} per run -> ~{_fmt(train_total)}")
    else:
        print(f"  training: all {done} run(s) done before")
    if args.decoded:
        print(f"  evaluation ({args.score}): {n_plain + n_siamese} models x {len(tasks)} tasks x up to "
              f"{args.eval_examples} examples: ~{_fmt(eval_per_model['plain'])} per single-pass model, "
              f"~{_fmt(eval_per_model['siamese'])} per IMSM model -> ~{_fmt(eval_total)}")
    if measure_line:
        print(measure_line)
    print(f"  total: ~{_fmt(total)}, done around {finish:%H:%M} if nothing else loads the machine "
          f"(this estimate took {time.perf_counter() - t0:.0f} s)", flush=True)
    if not math.isfinite(total):
        raise SystemExit("the estimate is not finite")


if __name__ == "__main__":
    main()
