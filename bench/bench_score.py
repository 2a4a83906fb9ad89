"""What answer-likelihood scoring costs next to decoding, measured side by side in one process.

    python bench/bench_score.py --data_dir ../shared/data          # embedded SmolLM2-135M, real task prompts
    python bench/bench_score.py --data_dir ../shared/data --tasks gsm8k --num_prompts 16   # long answers

For the same prompts and the same IMSM model (query-aware gate, random non-zero LoRA B and gate W_B), with the chat
template and each task's own answer length, it times:

(a) decoding alone (``generate``),
(b) decoding with the gold answers scored on the decoder's prefill (``generate(..., answers=...)``, what
    ``evaluate.py --score both`` runs), and
(c) likelihood alone from scratch (``answer_nll``, what ``--score likelihood`` runs),

and prints (b − a) / a, the extra cost of the likelihood when decoding anyway (target: a small fraction), and c / a.
Each variant is timed ``--repeats`` times in turn (interleaved, so load changes hit all of them); medians count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="Holds <task>/test.jsonl.")
    p.add_argument("--tasks", default="mrpc,webq,multirc", help="Comma-separated tasks; prompts come in this order.")
    p.add_argument("--model_name_or_path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    p.add_argument("--num_prompts", type=int, default=32, help="Prompts per task.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    import torch

    from imsm.args import ImsmArguments
    from imsm.data import encode_prompt, read_jsonl
    from imsm.evaluation.decoding.generation import DecodingConfig, generate
    from imsm.evaluation.decoding.scoring import answer_nll, gold_answers
    from imsm.evaluation.measures.metrics import get_task
    from imsm.loader import build_imsm_model, load_backbone
    from imsm.templates import build_template

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, tokenizer, path = load_backbone(args.model_name_or_path)
    model = build_imsm_model(backbone, ImsmArguments.create(peft="lora", gate="query_aware", gate_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "w_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    template = build_template("chat", tokenizer)
    work = []
    for task in [t for t in args.tasks.split(",") if t]:
        rows = read_jsonl(Path(args.data_dir) / task / "test.jsonl")[: args.num_prompts]
        prompts = [encode_prompt(template, r["input"], 1024) for r in rows]
        answers = [[ids for _, ids in gold_answers(template, r)] for r in rows]
        config = DecodingConfig(max_new_tokens=get_task(task).max_new_tokens, batch_size=args.batch_size)
        work.append((rows, prompts, answers, config))

    def decode():
        for _, prompts, _, config in work:
            generate(model, tokenizer, prompts, config)

    def decode_and_score():
        for _, prompts, answers, config in work:
            generate(model, tokenizer, prompts, config, answers=answers)

    def score_only():
        for rows, *_ in work:
            answer_nll(model, template, rows, 1024, args.batch_size)

    variants = {"decode": decode, "decode+likelihood": decode_and_score, "likelihood": score_only}
    times: dict[str, list[float]] = {k: [] for k in variants}
    decode()  # warm-up
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    n = sum(len(p) for _, p, _, _ in work)
    print(f"model {path}, {n} prompts ({args.tasks}), batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, seconds in median.items():
        print(f"  {name:18s} {seconds:7.2f} s")
    extra = (median["decode+likelihood"] - median["decode"]) / median["decode"]
    alone = median["likelihood"] / median["decode"]
    print(f"extra cost of the likelihood when decoding anyway (b - a) / a: {extra:.3f}")
    print(f"likelihood alone / decoding (c / a): {alone:.3f}")
    return {"extra": extra, "alone": alone, **median}


if __name__ == "__main__":
    main()
