"""Step time of the forgetting options against vanilla LoRA on the same model and batch (printed ratios).

    python bench/bench_forgetting_options.py                    # embedded SmolLM2-135M, batch 4 x 128, LoRA r=16
    python bench/bench_forgetting_options.py --model_name_or_path meta-llama/Llama-2-7b-hf --seq_len 512

Variants: LoRA (``--gate none``); + ``--kl_anchor 0.1`` (the frozen pass and the frozen LM head run every step);
+ ``--kl_anchor 0.1`` reading the frozen-memory cache (epochs after the first: no frozen pass, the frozen LM head
still runs); + ``--eaft``; MLP-only LoRA (``--target_modules mlp``); MiCA; OSF; IMSM (query_aware). All in one
process, round-robin (one step of each variant per round, so a change in a shared machine's load hits all alike),
the median of ``--steps`` timed steps after ``--warmup``; the ratio is to LoRA's median.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "lora": {"gate": "none"},
    "lora+kl_anchor": {"gate": "none", "kl_anchor": 0.1},
    "lora+kl_anchor (cached)": {"gate": "none", "kl_anchor": 0.1, "_cached": True},
    "lora+eaft": {"gate": "none", "eaft": True},
    "lora mlp-only": {"gate": "none", "target_modules": ["mlp"]},
    "lora mica": {"gate": "none", "init_lora_weights": "mica"},
    "osf": {"gate": "none", "peft": "osf", "osf_effective_rank": 0.97},
    "imsm (query_aware)": {"gate": "query_aware"},
}


def build(backbone_loader, options: dict, args):
    """(model, optimizer, batch) for one variant; the cached variant's cache is filled before timing."""
    import torch

    from imsm.args import ImsmArguments
    from imsm.loader import build_imsm_model
    from imsm.training.frozen_cache import FrozenMemoryCache

    torch.manual_seed(0)
    cached = options.pop("_cached", False)
    peft = options.pop("peft", "lora")
    lora = {"lora_r": 16, "lora_alpha": 16} if peft == "lora" else {}
    model = build_imsm_model(backbone_loader(), ImsmArguments.create(peft=peft, **lora, **options)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(10, model.config.vocab_size, (args.batch_size, args.seq_len))
    query = torch.zeros_like(ids)
    query[:, : args.seq_len // 2] = 1
    labels = torch.where(query.bool(), torch.full_like(ids, -100), ids)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query_mask": query, "labels": labels,
             "example_index": torch.arange(args.batch_size)}
    if cached:
        model.frozen_cache = FrozenMemoryCache(tempfile.mkdtemp(), {"bench": True})
        model(**batch)  # fills the cache: every timed step reads it
        model.frozen_cache.flush()
    return model, opt, batch


def timed_step(model, opt, batch) -> float:
    t0 = time.perf_counter()
    model(**batch)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a shared machine: 1).")
    args = parser.parse_args()

    import torch

    from imsm.loader import load_backbone

    torch.set_num_threads(args.threads)
    backbone, _, _ = load_backbone(args.model_name_or_path)

    def fresh():  # every variant wraps its own copy of the one loaded backbone (no reload per variant)
        return copy.deepcopy(backbone)

    # round-robin: one step of every variant per round, so a change in the machine's load hits them all alike
    built = {name: build(fresh, dict(options), args) for name, options in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(args.warmup + args.steps):
        for name, (model, opt, batch) in built.items():
            elapsed = timed_step(model, opt, batch)
            if step >= args.warmup:
                times[name].append(elapsed)
        print(f"round {step}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items() if t), file=sys.stderr,
              flush=True)
    results = {name: statistics.median(t) for name, t in times.items()}
    base = results["lora"]
    print(json.dumps({name: {"step_s": round(t, 4), "vs_lora": round(t / base, 3)} for name, t in results.items()},
                     indent=1))


if __name__ == "__main__":
    main()
