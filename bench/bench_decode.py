"""IMSM decoding speed, measured side by side in one process on the same model and prompts.

    python bench/bench_decode.py                                    # embedded SmolLM2-135M, synthetic prompts
    python bench/bench_decode.py --data_file /work/shared/data/gsm8k/test.jsonl --new_tokens 256   # on a GPU
    python bench/bench_decode.py --tiny                             # a random 4-layer Llama, no download

(1) IMSM (query-aware gate, batched, KV cache) tokens/s ÷ vanilla PEFT (the ``none`` gate, same adapter, same code
    path) tokens/s; target >= 0.85. The two-cache IMSM decoder is timed too, to show what the mixed LoRA batch buys.
(2) IMSM batched KV-cache decoding ÷ a batch-1 loop without KV cache that re-runs the whole sequence every token
    (how the paper's published code decodes), at GSM8K-length outputs (256 new tokens; pass fewer on CPU).

The LoRA B matrices and the gate's W_B are random (non-zero), so the two memories and the gate really differ; every
row decodes exactly ``--new_tokens`` tokens (EOS ignored) so tokens/s compare like with like. Each variant is timed
``--repeats`` times in turn (interleaved, so load changes on a shared machine hit all of them) and the median counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_decode")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    p.add_argument("--tiny", action="store_true", help="A random 4-layer Llama (hidden 256) instead.")
    p.add_argument("--data_file", default=None, help="JSONL with 'input' prompts (raw template); else synthetic.")
    p.add_argument("--num_prompts", type=int, default=16, help="Prompts decoded for ratio (1).")
    p.add_argument("--prompt_len", type=int, default=200, help="Synthetic prompt length (GSM8K prompts: ~200).")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64, help="Forced new tokens per prompt for ratio (1).")
    p.add_argument("--baseline_prompts", type=int, default=4, help="Prompts for ratio (2).")
    p.add_argument("--baseline_new_tokens", type=int, default=256, help="New tokens for ratio (2) (GSM8K: 256).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--output_file", default=None, help="Also write the result as JSON here (reproduce.py table5).")
    return p.parse_args(argv)


def build(args):
    """(IMSM model, vanilla-PEFT view of the same adapter, tokenizer, description)."""
    import torch

    from imsm.args import ImsmArguments
    from imsm.loader import build_imsm_model, load_backbone
    from imsm.method.gate import NoGate
    from imsm.method.model import IMSMModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        backbone, tokenizer = tiny_llama(dtype)
        name = "random Llama (4 layers, hidden 256, vocab 4096)"
    else:
        backbone, tokenizer, name = load_backbone(args.model_name_or_path, dtype=dtype, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = build_imsm_model(backbone, ImsmArguments.create(peft="lora", gate="query_aware", lora_r=args.lora_r,
                                                     lora_alpha=args.lora_r, lora_dropout=0.0, gate_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "w_b" in n:
                p.normal_(0.0, 0.02)
    model.to(device).eval()
    vanilla = IMSMModel(model.peft_model, NoGate(backbone.config.hidden_size), model.method).eval()
    return model, vanilla, tokenizer, f"{name} ({device.type}, {dtype})"


def tiny_llama(dtype):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4092)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype), tokenizer


def prompts(args, tokenizer, n: int) -> list[list[int]]:
    import torch

    if args.data_file:
        from imsm.data import read_jsonl
        from imsm.templates import build_template

        template = build_template("raw", tokenizer)
        return [template.encode_prompt(r["input"]) for r in read_jsonl(args.data_file, require_output=False)[:n]]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_len * 3 // 4, args.prompt_len * 5 // 4 + 1, (n,), generator=g)
    return [torch.randint(10, len(tokenizer), (int(k),), generator=g).tolist() for k in lengths]


def timed(fn) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    import torch

    from imsm.evaluation.decoding.generation import DecodingConfig, generate, reference_generate

    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, vanilla, tokenizer, name = build(args)
    bench_prompts = prompts(args, tokenizer, max(args.num_prompts, args.baseline_prompts))
    main_prompts, base_prompts = bench_prompts[: args.num_prompts], bench_prompts[: args.baseline_prompts]
    logger.info("command: %s", shlex.join([sys.executable, *sys.argv]))
    logger.info("model: %s, LoRA r=%d on q_proj,v_proj (B random), query-aware gate (W_B random), greedy",
                name, args.lora_r)
    logger.info("prompts: %s, %d tokens on average; torch threads: %d",
                args.data_file or "synthetic", sum(map(len, bench_prompts)) // len(bench_prompts),
                torch.get_num_threads())

    def cached(m, ps, new, mixed=None):
        config = DecodingConfig(max_new_tokens=new, batch_size=args.batch_size, stop_at_eos=False, mixed_batch=mixed)
        return lambda: generate(m, tokenizer, ps, config)

    imsm_keys = ("IMSM (mixed LoRA batch)", "IMSM (two caches)")
    setups = {imsm_keys[0]: (model, None), imsm_keys[1]: (model, False), "vanilla PEFT (none gate)": (vanilla, None)}
    # each variant with N new tokens and with 1 (prefill + first token): steady decoding is the difference
    runs = {(k, n): cached(m, main_prompts, n, mixed)
            for k, (m, mixed) in setups.items() for n in (args.new_tokens, 1)}
    times = {key: [] for key in runs}
    for (_, n), fn in runs.items():
        if n == 1:
            fn()  # warm-up
    for _ in range(args.repeats):
        for key, fn in runs.items():
            times[key].append(timed(fn))
    t = {key: statistics.median(v) for key, v in times.items()}
    n_prompts = len(main_prompts)
    total = {k: n_prompts * args.new_tokens / t[k, args.new_tokens] for k in setups}
    steady = {k: n_prompts * (args.new_tokens - 1) / (t[k, args.new_tokens] - t[k, 1]) for k in setups}
    logger.info("\n(1) batch %d, %d prompts x %d forced new tokens, median of %d:", args.batch_size, n_prompts,
                args.new_tokens, args.repeats)
    logger.info("    %-26s %14s %18s %12s", "", "decode tok/s", "end-to-end tok/s", "prefill s")
    for k in setups:
        logger.info("    %-26s %14.1f %18.1f %12.3f", k, steady[k], total[k], t[k, 1])
    base = "vanilla PEFT (none gate)"
    ratio_1 = {k: steady[k] / steady[base] for k in imsm_keys}
    ratio_1_total = {k: total[k] / total[base] for k in imsm_keys}
    for k in imsm_keys:
        logger.info("    %s / vanilla PEFT: decoding %.3f (target >= 0.85), end-to-end incl. prefill %.3f", k,
                    ratio_1[k], ratio_1_total[k])

    new = args.baseline_new_tokens
    fast = cached(model, base_prompts, new)
    outputs = {}
    t_fast = timed(lambda: outputs.__setitem__("fast", fast()))
    t_slow = timed(lambda: outputs.__setitem__("slow", [reference_generate(model, p, new) for p in base_prompts]))
    same = sum(g.token_ids == r for g, r in zip(outputs["fast"], outputs["slow"], strict=True))
    speedup = t_slow / t_fast
    logger.info("\n(2) %d prompts x %d forced new tokens, one timing each:", len(base_prompts), new)
    logger.info("    IMSM batched, KV cache       %8.1f tokens/s", len(base_prompts) * new / t_fast)
    logger.info("    IMSM batch 1, no cache       %8.1f tokens/s (whole sequence re-run every token)",
                len(base_prompts) * new / t_slow)
    logger.info("    speedup = %.1fx; identical greedy outputs: %d / %d", speedup, same, len(base_prompts))
    result = {"imsm_over_vanilla_decoding": ratio_1, "imsm_over_vanilla_end_to_end": ratio_1_total,
              "decode_tokens_per_s": steady, "cache_speedup": speedup, "identical_outputs": same}
    logger.info("\n%s", json.dumps(result))
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps({**result, "model": name, "new_tokens": args.new_tokens}) + "\n")
    return result


if __name__ == "__main__":
    main()
