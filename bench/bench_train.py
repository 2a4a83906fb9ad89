"""IMSM training step vs vanilla PEFT on the same model and batch: step-time and peak-memory ratios.

    python bench/bench_train.py                       # embedded SmolLM2-135M, batch 4 x 256 tokens, LoRA r=16
    python bench/bench_train.py --model_name_or_path meta-llama/Llama-2-7b-hf --batch_size 8 --seq_len 512
    python bench/bench_train.py --whole_run --examples 16 --seq_len 128   # 3 epochs, with and without the cache

``--whole_run`` times whole training runs (``--epochs`` over ``--examples`` fixed examples, no gradient
checkpointing) of vanilla LoRA, IMSM, IMSM with the frozen-memory cache filled during epoch 1, and IMSM with the
cache filled first by a separate no-grad pass at ``--fill_batch_size``; the cache's filling and reading are timed.

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
    model = build_imsm_model(backbone, ImsmArguments.create(peft="lora", gate=args.gate, lora_r=16, lora_alpha=16))
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


def _examples(args, vocab: int):
    """``--examples`` fixed sequences of ``--seq_len`` tokens, the second half of each the answer."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (args.examples, args.seq_len), generator=g)
    query = torch.zeros_like(ids)
    query[:, : args.seq_len // 2] = 1
    labels = torch.where(query.bool(), torch.full_like(ids, -100), ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query_mask": query, "labels": labels,
            "example_index": torch.arange(args.examples)}


def _batches(examples: dict, batch_size: int, device):
    n = len(examples["input_ids"])
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size].to(device) for k, v in examples.items()}


def measure_run(args) -> dict:
    """Wall time of a whole training run (``args.variant``), the cache's fill pass included."""
    import tempfile

    import torch

    from imsm.args import ImsmArguments
    from imsm.data import IGNORE_INDEX
    from imsm.loader import build_imsm_model, load_backbone
    from imsm.method.gate import query_mean
    from imsm.training.frozen_cache import FrozenMemoryCache

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone, _, _ = load_backbone(args.model_name_or_path, dtype=dtype)
    gate = "none" if args.variant == "lora" else "query_aware"
    tmp = tempfile.TemporaryDirectory()
    cache = FrozenMemoryCache(tmp.name, {"bench": True}) if args.variant in ("imsm_cache", "imsm_prefill") else None
    model = build_imsm_model(backbone, ImsmArguments.create(peft="lora", gate=gate, lora_r=16, lora_alpha=16),
                             frozen_cache=cache)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    examples = _examples(args, model.config.vocab_size)
    timings = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.variant == "imsm_prefill":
        for batch in _batches(examples, args.fill_batch_size, device):
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            h = model.memory(False, **kwargs).last_hidden_state
            selected = batch["labels"][:, 1:] != IGNORE_INDEX
            model.frozen_cache.store(batch["example_index"], batch["attention_mask"], selected,
                                     query_mean(h, batch["query_mask"]), h[:, :-1][selected])
        model.frozen_cache.flush()
        timings["fill_s"] = time.perf_counter() - t0
    for epoch in range(args.epochs):
        for batch in _batches(examples, args.batch_size, device):
            model(**batch)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if model.frozen_cache is not None:
            model.frozen_cache.flush()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[f"epoch{epoch + 1}_s"] = time.perf_counter() - t0 - sum(timings.values())
    timings["total_s"] = time.perf_counter() - t0
    timings["cpu_s"] = time.process_time() - cpu0
    tmp.cleanup()
    return timings | {"device": device.type}


def whole_run(args) -> None:
    base = [sys.executable, __file__, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
            "--examples", str(args.examples), "--epochs", str(args.epochs), "--fill_batch_size",
            str(args.fill_batch_size)]
    if args.model_name_or_path:
        base += ["--model_name_or_path", args.model_name_or_path]
    variants = {"lora": "vanilla LoRA", "imsm": "IMSM, no cache", "imsm_cache": "IMSM, cache filled in epoch 1",
                "imsm_prefill": f"IMSM, cache filled first (no-grad, batch {args.fill_batch_size})"}
    runs = {v: [] for v in variants}
    # repeats alternate the order (forward, backward, ...) so that a slow spell of a shared machine hits all variants
    for repeat in range(args.repeats):
        for variant in (list(variants) if repeat % 2 == 0 else list(variants)[::-1]):
            out = subprocess.run(base + ["--variant", variant], capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "device"} for v, rs in runs.items()}
    lora, lora_cpu = results["lora"]["total_s"], results["lora"]["cpu_s"]
    print(f"device {runs['lora'][0]['device']}, LoRA r=16, {args.epochs} epochs x {args.examples} examples of "
          f"{args.seq_len} tokens (half answer), batch {args.batch_size}, no gradient checkpointing, median of "
          f"{args.repeats} repeats (wall s; ratio of wall time, and of the process's CPU time)")
    epochs = "".join(f" epoch {e + 1} |" for e in range(args.epochs))
    print(f"| run | fill |{epochs} total | wall ratio to LoRA | CPU-time ratio to LoRA |")
    print("|---|---|" + "---|" * args.epochs + "---|---|---|")
    for variant, label in variants.items():
        r = results[variant]
        cells = "".join(f" {r[f'epoch{e + 1}_s']:.1f} |" for e in range(args.epochs))
        fill = f"{r['fill_s']:.1f}" if "fill_s" in r else "-"
        print(f"| {label} | {fill} |{cells} {r['total_s']:.1f} | {r['total_s'] / lora:.2f}x | "
              f"{r['cpu_s'] / lora_cpu:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--whole_run", action="store_true", help="Time whole runs, with and without the cache.")
    parser.add_argument("--examples", type=int, default=16, help="--whole_run: examples per epoch.")
    parser.add_argument("--epochs", type=int, default=3, help="--whole_run: epochs.")
    parser.add_argument("--fill_batch_size", type=int, default=16, help="--whole_run: batch of the no-grad fill.")
    parser.add_argument("--repeats", type=int, default=1, help="--whole_run: runs of each variant (median).")
    parser.add_argument("--gate", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gradient_checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gate is not None:  # child process: one measurement
        print(json.dumps(measure(args)))
        return
    if args.variant is not None:
        print(json.dumps(measure_run(args)))
        return
    print("command:", " ".join(sys.argv))
    if args.whole_run:
        whole_run(args)
        return
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
