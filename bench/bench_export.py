"""Speed of an exported IMSM folder's ``generate()`` against the project's own decoder, side by side in one process.

    python bench/bench_export.py                     # embedded SmolLM2-135M, a random LoRA + query-aware gate run
    python bench/bench_export.py --threads 2 --new_tokens 32 --repeats 3

One ratio: exported ``AutoModelForCausalLM.generate()`` tokens/s ÷
``imsm.evaluation.decoding.generation.generate`` tokens/s, both greedy on the same left-padded batch, both forced to
exactly ``--new_tokens`` per row (EOS suppressed), both
decoding one doubled batch (the exported SiameseLinear; the project's PEFT mixed-adapter batch). The run's LoRA B and
gate W_B are random, so the memories and the gate differ. Variants are timed in turn ``--repeats`` times (interleaved,
so load changes on a shared machine hit both) and the medians count.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_export")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=64, help="Longest synthetic prompt; the others are shorter.")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    return p.parse_args(argv)


def random_run(model_name_or_path: str | None, out: Path) -> Path:
    """A LoRA (r=16) + query-aware gate run folder with random non-zero weights, as train.py writes it."""
    import torch

    from imsm.args import DataArguments, ImsmArguments
    from imsm.loader import build_imsm_model, load_backbone, make_run_config, save_run_files

    backbone, _, path = load_backbone(model_name_or_path, attn_implementation="sdpa")
    args = ImsmArguments.create(peft="lora", gate="query_aware", lora_dropout=0.0, gate_dropout=0.0)
    model = build_imsm_model(backbone, args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    config = make_run_config(args, DataArguments(), path, backbone.config.hidden_size)
    save_run_files(model, out, config, None, True)
    return out


def main(argv=None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from imsm.evaluation.decoding.generation import DecodingConfig, generate
    from imsm.export.folder import export_run
    from imsm.loader import load_run

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    run = random_run(args.model_name_or_path, tmp / "run")
    folder = export_run(run, tmp / "exported")
    ours, tokenizer, _ = load_run(run, attn_implementation="sdpa")
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa").eval()

    g = torch.Generator().manual_seed(0)
    lengths = [max(2, args.prompt_len - 7 * i) for i in range(args.num_prompts)]
    prompts = [[tokenizer.bos_token_id or 0] + torch.randint(100, len(tokenizer), (n - 1,), generator=g).tolist()
               for n in lengths]
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt", padding_side="left")
    config = DecodingConfig(max_new_tokens=args.new_tokens, batch_size=len(prompts), stop_at_eos=False)
    tokens = args.new_tokens * len(prompts)

    def project() -> None:
        generate(ours, tokenizer, prompts, config)

    def hf() -> None:
        with torch.inference_mode():
            out = exported.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + args.new_tokens

    times: dict[str, list[float]] = {"project": [], "exported": []}
    project()
    hf()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("project", project), ("exported", hf)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"model {args.model_name_or_path or 'SmolLM2-135M-Instruct'}, {len(prompts)} prompts "
          f"({min(lengths)}-{max(lengths)} tokens), {args.new_tokens} new tokens each, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}")
    print(f"project decoder {rate['project']:.1f} tokens/s, exported generate() {rate['exported']:.1f} tokens/s")
    print(f"exported generate() / project decoder: {rate['exported'] / rate['project']:.2f}")


if __name__ == "__main__":
    main()
