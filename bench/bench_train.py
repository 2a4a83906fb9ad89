"""IMSM training step vs vanilla PEFT on the same model and batch: step-time and peak-memory ratios.

    python bench/bench_train.py                       # embedded SmolLM2-135M, batch 4 x 256 tokens, LoRA r=16
    python bench/bench_train.py --model_name_or_path meta-llama/Llama-2-7b-hf --batch_size 8 --seq_len 512

Each (variant, gradient checkpointing) runs in its own process, so peak memory is that process's own: the CUDA
allocator's peak on a GPU, the peak resident set size on CPU. Time is the median of the timed steps. Targets (issue):
time <= 1.5x without gradient checkpointing (one extra forward is the floor), <= 1.35x with it; memory <= 1.1x.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(args) -> dict:
    import torch

    from imsm.args import ImsmArguments
    from imsm.loader import build_imsm_model, load_backbone

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone, _, _ = load_backbone(args.model_name_or_path, dtype=dtype)
    model = build_imsm_model(backbone, ImsmArguments(peft="lora", gate=args.gate, lora_r=16, lora_alpha=16))
    model.to(device).train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab, (args.batch_size, args.seq_len), device=device)
    query = torch.zeros_like(ids)
    query[:, : args.seq_len // 2] = 1
    labels = torch.where(query.bool(), torch.full_like(ids, -100), ids)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query_mask": query, "labels": labels}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"step_s": statistics.median(times), "peak_bytes": peak, "rss_before_steps": rss_before * 1024,
            "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gate", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gradient_checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gate is not None:  # child process: one measurement
        print(json.dumps(measure(args)))
        return
    print("command:", " ".join(sys.argv))
    base = [sys.executable, __file__, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.model_name_or_path:
        base += ["--model_name_or_path", args.model_name_or_path]
    results = {}
    for ckpt in (False, True):
        for gate in ("none", "query_aware"):
            cmd = base + ["--gate", gate] + (["--gradient_checkpointing"] if ckpt else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[(gate, ckpt)] = json.loads(out)
    print(f"device {results[('none', False)]['device']}, LoRA r=16, batch {args.batch_size} x {args.seq_len} tokens")
    print("| gradient checkpointing | vanilla step s | IMSM step s | time ratio | vanilla peak GB | IMSM peak GB "
          "| memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for ckpt in (False, True):
        v, i = results[("none", ckpt)], results[("query_aware", ckpt)]
        print(f"| {'on' if ckpt else 'off'} | {v['step_s']:.3f} | {i['step_s']:.3f} | "
              f"{i['step_s'] / v['step_s']:.2f}x | {v['peak_bytes'] / 1e9:.2f} | {i['peak_bytes'] / 1e9:.2f} | "
              f"{i['peak_bytes'] / v['peak_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
