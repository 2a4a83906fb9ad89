"""What each measure of ``evaluate.py --measures`` costs per example, next to one decoded answer, in one process.

    python bench/bench_measures.py --data_dir ../shared/data --general_text data/general_text.jsonl

On the embedded SmolLM2-135M with the chat template, for the untuned model, vanilla LoRA (r 16) and IMSM-LoRA
(query-aware gate), it times on the same rows: the yes/no log-odds of MRPC prompts, the general-text NLL of passages,
and KL(untuned ‖ model) on WebQ prompts (the untuned model's greedy answers, built once and timed apart); and, as the
yardstick, greedy decoding of the same MRPC prompts (4 new tokens, what ``--score decode`` does). It prints
milliseconds per example and each cost as a ratio to decoding, so a study can be sized: a measure's cost on a busy
machine moves with decoding's.

IMSM-LoRA is timed twice: computing its own frozen pass, and reading it from the frozen memo the untuned model's row
filled (``scoring.FrozenMemo``, as evaluate.py measures it; its first batch is still computed, to check the memo).
The last line gives IMSM-LoRA's cost as a ratio to LoRA's, with and without the memo.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--general_text", required=True, help="scripts/build_general_text.py's output")
    p.add_argument("--rows", type=int, default=64, help="Examples per measure (batches of 16).")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from imsm.args import ImsmArguments
    from imsm.data import read_jsonl
    from imsm.default_model import resolve_model_path
    from imsm.evaluation.decoding.generation import DecodingConfig, generate
    from imsm.evaluation.decoding.scoring import FrozenMemo
    from imsm.evaluation.measures.measures import (
        continuation_nll,
        general_text_pairs,
        greedy_pairs,
        kl_to_reference,
        read_general_text,
        yes_no_log_odds,
    )
    from imsm.loader import build_imsm_model, load_backbone
    from imsm.templates import build_template

    torch.set_num_threads(args.threads)
    path = resolve_model_path(None)
    untuned, tokenizer, _ = load_backbone(path, torch.float32, "sdpa")
    models = {"untuned": untuned.eval()}
    for label, gate in (("LoRA", "none"), ("IMSM-LoRA", "query_aware")):
        options = {"gate_rank": 8} if gate == "query_aware" else {}
        backbone, _, _ = load_backbone(path, torch.float32, "sdpa")
        imsm_args = ImsmArguments.create(peft="lora", gate=gate, lora_r=16, lora_alpha=16, **options)
        models[label] = build_imsm_model(backbone, imsm_args).eval()
    template = build_template("chat", tokenizer)
    mrpc, webq = (read_jsonl(Path(args.data_dir) / task / "test.jsonl")[: args.rows] for task in ("mrpc", "webq"))
    pairs = general_text_pairs(tokenizer, read_general_text(args.general_text)[: args.rows])
    pad = tokenizer.pad_token_id

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) / args.rows * 1000.0

    start = time.perf_counter()
    kl_pairs = greedy_pairs(untuned, tokenizer, template, webq, 1024, 24, 16)
    greedy_ms = (time.perf_counter() - start) / args.rows * 1000.0
    print(f"{args.rows} rows per measure, {args.threads} thread(s); KL's untuned greedy answers (once per "
          f"evaluation): {greedy_ms:.0f} ms/prompt, {sum(len(y) for _, y in kl_pairs) / len(kl_pairs):.1f} tokens")
    def measure_costs(model, memo: FrozenMemo | None, record: bool) -> list[float | None]:
        """ms/row of the log-odds, the general NLL and KL (None for the untuned model: its KL is 0)."""
        def fresh(fn):
            if memo is not None:
                memo.start_model()  # each measure checks the memo on its first batch again, as evaluate.py's models
            return timed(fn)

        return [fresh(lambda: yes_no_log_odds(model, template, mrpc, 1024, 16, memo=memo, record=record)),
                fresh(lambda: continuation_nll(model, pairs, 16, pad, memo=memo, record=record)),
                None if model is untuned else fresh(lambda: kl_to_reference(untuned, model, kl_pairs, 16, pad,
                                                                            memo=memo))]

    memo = FrozenMemo()
    rows = [("untuned", untuned, memo, True),  # its passes fill the memo the last row reads
            ("LoRA", models["LoRA"], None, False), ("IMSM-LoRA", models["IMSM-LoRA"], None, False),
            ("IMSM-LoRA, frozen memo", models["IMSM-LoRA"], memo, False)]
    prompts = [template.encode_prompt(r["input"]) for r in mrpc]
    print("| model | decode (ms/row) | log-odds | general NLL | KL |\n|---|---|---|---|---|")
    costs = {}
    for label, model, row_memo, record in rows:
        decode = timed(lambda m=model: generate(m, tokenizer, prompts, DecodingConfig(max_new_tokens=4,
                                                                                       batch_size=16)))
        costs[label] = measure_costs(model, row_memo, record)
        print(f"| {label} | {decode:.0f} | " + " | ".join("–" if c is None else f"{c:.0f} ({c / decode:.2f}x)"
                                                         for c in costs[label]) + " |")
    ratios = {label: " / ".join(f"{c / lora:.2f}x" for c, lora in zip(costs[label], costs["LoRA"], strict=True))
              for label in ("IMSM-LoRA", "IMSM-LoRA, frozen memo")}
    print(f"IMSM-LoRA / LoRA (log-odds / general NLL / KL): {ratios['IMSM-LoRA']} computing its frozen pass, "
          f"{ratios['IMSM-LoRA, frozen memo']} reading it from the memo")

if __name__ == "__main__":
    main()
