"""One command that measures IMSM on a GPU: correctness, training at the paper's shape, decoding, export, DeepSpeed.

    bash scripts/gpu_check.sh OUT                              # a bare GPU machine: installs .whl/ first, then this
    python bench/gpu_check.py --out OUT                        # where the packages are installed already
    python bench/gpu_check.py --out OUT --device cpu --tiny    # CI: the same code paths on tiny models, < 1 min

Each step runs in its own process (its own CUDA context: an out-of-memory error or a hang stays in its step) under
its own time budget, cut to what is left of ``--budget_s``; a step past its budget is killed and what it measured so
far is kept. A step appends its measurements to ``OUT/steps/STEP.jsonl`` as it goes and prints them; after each step
this process rewrites ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (written aside and renamed, never half). What
each figure means and the floors it is read against: docs/benchmarks.md ("The GPU check").

Steps: ``correctness`` (bf16 on the device against float32 on CPU, the SDPA kernel that ran, the gate's dtype),
``training`` (Llama-3-8B shape, random bf16 weights, LoRA r 16 on q,v, 2 x 512 tokens: IMSM / LoRA step time with and
without gradient checkpointing and with the frozen-memory cache, peak memory, tokens/s, MFU), ``decoding`` (IMSM /
vanilla PEFT tokens/s at batch 1 and 16, prompt 256, 128 new tokens), ``export`` (the exported folder's
``generate()`` against ours), ``deepspeed`` (one ZeRO-2 and one ZeRO-3 run of train.py, one rank).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Llama configurations by name. "llama3_8b" is Meta-Llama-3-8B's (the paper's backbone), with random weights.
SHAPES = {
    "llama3_8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "llama_0.5b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "vocab_size": 32000},
    "small": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 512},  # head dim 128, as the 8B's
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}

# Dense bf16 peak (no sparsity) by device name, TFLOPS: the vendors' data sheets. Matched as a substring of
# torch.cuda.get_device_name(); a device not listed gets no MFU (--peak_tflops sets one).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A800": 312.0, "A100": 312.0,
                    "L40S": 362.0, "A6000": 155.0, "4090": 165.0, "B200": 2250.0, "GH200": 989.0}

STEPS = ("correctness", "training", "decoding", "export", "deepspeed")


@dataclass
class Plan:
    """The sizes of one check: the paper's on a GPU, tiny ones (same code paths) with ``--tiny``."""

    train_shape: str = "llama3_8b"
    batch_size: int = 2  # the launchers' micro-batch
    seq_len: int = 512
    lora_r: int = 16
    steps: int = 5
    warmup: int = 2
    decode_shape: str = "llama3_8b"
    decode_batches: tuple[int, ...] = (1, 16)
    prompt_len: int = 256
    new_tokens: int = 128
    repeats: int = 2
    export_shape: str = "llama_0.5b"
    export_prompts: int = 8
    export_new_tokens: int = 32
    deepspeed_shape: str = "tiny"
    deepspeed_configs: tuple[str, ...] = ("zero2.json", "zero3.json")
    total_s: float = 450.0  # all steps together (--budget_s): the wheels' install and this fit in 8 min
    budgets_s: dict = field(default_factory=lambda: {"correctness": 60, "training": 150, "decoding": 120,
                                                     "export": 90, "deepspeed": 150})


TINY = Plan(train_shape="tiny", seq_len=32, steps=2, warmup=1, decode_shape="tiny", decode_batches=(1, 4),
            prompt_len=16, new_tokens=6, repeats=1, export_shape="tiny", export_prompts=3, export_new_tokens=4,
            total_s=1800.0, budgets_s={"correctness": 300, "training": 300, "decoding": 300, "export": 300,
                                       "deepspeed": 900})  # generous: CI machines are shared


# ---- shared helpers (run inside a step's process) ------------------------------------------------------------------
def _imports():
    """Everything the check takes from the package, in one place (modules may move; one line to fix here)."""
    from imsm.args import DataArguments, ImsmArguments
    from imsm.evaluation.decoding.generation import DecodingConfig, generate
    from imsm.export.folder import export_run
    from imsm.loader import build_imsm_model, load_run, make_run_config, save_run_files
    from imsm.method.gate import NoGate
    from imsm.method.model import IMSMModel
    from imsm.training.frozen_cache import FrozenMemoryCache

    return argparse.Namespace(
        DataArguments=DataArguments, ImsmArguments=ImsmArguments, DecodingConfig=DecodingConfig, generate=generate,
        export_run=export_run, build_imsm_model=build_imsm_model, load_run=load_run, make_run_config=make_run_config,
        save_run_files=save_run_files, NoGate=NoGate, IMSMModel=IMSMModel, FrozenMemoryCache=FrozenMemoryCache)


class Recorder:
    """Appends one JSON line per measurement to OUT/steps/STEP.jsonl (flushed: a killed step keeps its lines)."""

    def __init__(self, out: Path, step: str) -> None:
        self.path = out / "steps" / f"{step}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in record.items()), flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _device_dtype(device: str):
    import torch

    return torch.device(device), (torch.bfloat16 if device == "cuda" else torch.float32)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def random_llama(shape: str, device, dtype, seed: int = 0):
    """A Llama of ``SHAPES[shape]`` with random weights made on ``device`` in ``dtype`` (no download), frozen as
    ``imsm.loader.load_backbone`` leaves a backbone."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` tokens (<pad> <s> </s> <unk> t4 t5 ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def imsm_model(pkg, backbone, r: int, random_b: bool):
    """IMSM-LoRA (query-aware gate) on ``backbone``, and the vanilla-PEFT view of the same adapter (``none`` gate).
    ``random_b``: LoRA B and the gate's W_B random, so the two memories and the gate really differ."""
    import torch

    model = pkg.build_imsm_model(backbone, pkg.ImsmArguments.create(peft="lora", gate="query_aware", lora_r=r,
                                                                    lora_alpha=r))
    if random_b:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n or "w_b" in n:
                    p.normal_(0.0, 0.02)
    model.to(backbone.device)
    vanilla = pkg.IMSMModel(model.peft_model, pkg.NoGate(backbone.config.hidden_size), model.method)
    return model, vanilla


def train_batch(vocab: int, batch: int, seq: int, device, first_index: int = 0) -> dict:
    """Random ids, the first half of each row the prompt, the second the answer (bench/bench_train.py's batch)."""
    import torch

    g = torch.Generator().manual_seed(first_index)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    query = torch.zeros_like(ids)
    query[:, : seq // 2] = 1
    labels = torch.where(query.bool(), torch.full_like(ids, -100), ids)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query_mask": query, "labels": labels,
           "example_index": torch.arange(first_index, first_index + batch)}
    return {k: v.to(device) for k, v in out.items()}


# ---- correctness -----------------------------------------------------------------------------------------------
def step_correctness(args, plan: Plan, record: Recorder) -> None:
    import torch

    pkg = _imports()
    device, dtype = _device_dtype(args.device)
    ids = torch.randint(10, SHAPES["small"]["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    query = torch.zeros_like(ids)
    query[:, :12] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query_mask": query,
             "labels": torch.where(query.bool(), torch.full_like(ids, -100), ids)}
    losses, grads, gate_dtypes = {}, {}, {}
    for where, dt in (("cpu", torch.float32), (args.device, torch.bfloat16)):  # bf16 on CPU too in --device cpu
        key = f"{where}/{str(dt).removeprefix('torch.')}"
        backbone = random_llama("small", torch.device("cpu"), torch.float32).to(dt)
        model = pkg.build_imsm_model(backbone, pkg.ImsmArguments.create(peft="lora", gate="query_aware", lora_r=4,
                                                                        lora_alpha=4, lora_dropout=0.0,
                                                                        gate_dropout=0.0, gate_rank=4))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape) * 0.1)
        model.to(where).train()
        hook = model.imsm_gate.register_forward_hook(lambda m, i, o, k=key: gate_dtypes.__setitem__(k, str(o.dtype)))
        loss = model(**{k: v.to(where) for k, v in batch.items()})["loss"]
        loss.backward()
        hook.remove()
        losses[key] = float(loss.detach())
        grads[key] = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad])
    ref, test = list(losses)
    cosine = float(torch.nn.functional.cosine_similarity(grads[ref], grads[test], dim=0))
    rel = abs(losses[test] - losses[ref]) / abs(losses[ref])
    record(what="loss and gradients vs float32 on CPU", model=f"{test}", loss_ref=losses[ref], loss=losses[test],
           loss_rel_diff=rel, grad_cosine=cosine, ok=rel < 2e-2 and cosine > 0.99)
    record(what="gate dtype in the forward", model=test, gate_dtype=gate_dtypes[test],
           ok=gate_dtypes[test] == "torch.float32")
    # which SDPA kernel runs: an unpadded batch (causal, no mask) and a right-padded one (explicit mask)
    backbone = random_llama("small", device, dtype)
    model, _ = imsm_model(pkg, backbone, 4, random_b=True)
    model.eval()
    for padded in (False, True):
        mask = torch.ones_like(ids)
        if padded:
            mask[1, -5:] = 0
        kernels = sdpa_kernels(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                                       "query_mask": query.to(device)}, device)
        record(what="SDPA kernel", batch="right-padded" if padded else "unpadded", kernels=kernels,
               flash=any("flash" in k for k in kernels))
    if device.type == "cuda":
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/training/test_gpu.py"],
                              cwd=ROOT, capture_output=True, text=True, check=False)
        record(what="pytest tests/training/test_gpu.py", result=proc.stdout.strip().splitlines()[-1:],
               ok=proc.returncode == 0)


def sdpa_kernels(model, inputs: dict, device) -> list[str]:
    """The aten SDPA variants one forward ran (…_flash_attention, …_efficient_attention, …_cudnn_attention, or the
    math fallback), read from the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        model(**inputs)
        _sync(device)
    names = {e.key for e in prof.key_averages()}
    prefixes = ("aten::_scaled_dot_product", "aten::_flash", "aten::_efficient_attention")
    return sorted(n for n in names if n.startswith(prefixes) or "attention_math" in n)


# ---- training --------------------------------------------------------------------------------------------------
def non_embedding_params(backbone) -> int:
    """N of the 6·N·tokens rule: every backbone weight but the input embedding (the LM head counts)."""
    embed = backbone.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in backbone.parameters()) - embed


def peak_tflops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def step_training(args, plan: Plan, record: Recorder) -> None:
    import torch

    pkg = _imports()
    device, dtype = _device_dtype(args.device)
    t0 = time.perf_counter()
    backbone = random_llama(plan.train_shape, device, dtype)
    n_params = non_embedding_params(backbone)  # before the adapter joins it
    model, vanilla = imsm_model(pkg, backbone, plan.lora_r, random_b=False)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(args, device_name)
    record(what="model", shape=plan.train_shape, dtype=str(dtype), non_embedding_params=n_params,
           batch=f"{plan.batch_size}x{plan.seq_len}", build_s=time.perf_counter() - t0, peak_tflops=peak)
    tokens = plan.batch_size * plan.seq_len
    vocab = backbone.config.vocab_size
    cache_dir = tempfile.TemporaryDirectory(prefix="gpu_check_cache_")
    lora_s = {}
    for ckpt in (False, True):
        if ckpt:
            model.activation_checkpointing_enable()
        else:
            backbone.activation_checkpointing_disable()
        cache = pkg.FrozenMemoryCache(Path(cache_dir.name) / f"ckpt{int(ckpt)}", {"gpu_check": ckpt})
        cached = pkg.IMSMModel(model.peft_model, model.imsm_gate, model.method, frozen_cache=cache)
        for name, m, extra_forward in (("LoRA", vanilla, 0), ("IMSM", model, 2), ("IMSM, cache epoch 2", cached, 0)):
            m.train()
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            n_batches = plan.warmup + plan.steps
            batches = [train_batch(vocab, plan.batch_size, plan.seq_len, device, i * plan.batch_size)
                       for i in range(n_batches)]

            def run(batch, m=m, opt=opt) -> float:
                _sync(device)
                start = time.perf_counter()
                m(**batch)["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                return time.perf_counter() - start

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if m is cached:  # epoch 1 fills the cache (these steps are the warm-up); epoch 2 reads it
                for b in batches:
                    run(b)
                cache.flush()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()  # epoch 2's own peak
                times = [run(b) for b in batches][plan.warmup:]
                hits = cache.hits
            else:
                times = [run(b) for b in batches][plan.warmup:]
                hits = None
            step_s = statistics.median(times)
            flops = (6 + extra_forward) * n_params * tokens  # attention's own FLOPs excluded
            row = {"what": "train step", "checkpointing": ckpt, "run": name, "step_s": step_s,
                   "tokens_per_s": tokens / step_s,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                   "mfu": flops / step_s / (peak * 1e12) if peak else None,
                   "flops_per_token": f"{6 + extra_forward}N"}
            if name == "LoRA":
                lora_s[ckpt] = step_s
            else:
                row["time_vs_lora"] = step_s / lora_s[ckpt]
            if hits is not None:
                row["cache_hits"] = hits
            record(**row)
            del opt
    cache_dir.cleanup()


# ---- decoding --------------------------------------------------------------------------------------------------
def step_decoding(args, plan: Plan, record: Recorder) -> None:
    import torch

    pkg = _imports()
    device, dtype = _device_dtype(args.device)
    backbone = random_llama(plan.decode_shape, device, dtype)
    model, vanilla = imsm_model(pkg, backbone, plan.lora_r, random_b=True)
    model.eval()
    tokenizer = word_tokenizer(backbone.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    for batch in plan.decode_batches:
        prompts = torch.randint(10, backbone.config.vocab_size, (batch, plan.prompt_len), generator=g).tolist()

        def timed(m, new: int, prompts=prompts, batch=batch) -> float:
            config = pkg.DecodingConfig(max_new_tokens=new, batch_size=batch, stop_at_eos=False)
            _sync(device)
            start = time.perf_counter()
            out = pkg.generate(m, tokenizer, prompts, config)
            _sync(device)
            assert all(len(o.token_ids) == new for o in out)
            return time.perf_counter() - start

        runs = {(name, new): [] for name in ("IMSM", "vanilla PEFT") for new in (plan.new_tokens, 1)}
        for name, m in (("IMSM", model), ("vanilla PEFT", vanilla)):
            timed(m, 2)  # warm-up
        for _ in range(plan.repeats):  # interleaved, so a slow spell hits both
            for (name, new), times in runs.items():
                times.append(timed(model if name == "IMSM" else vanilla, new))
        t = {k: statistics.median(v) for k, v in runs.items()}
        rate = {}
        for name in ("vanilla PEFT", "IMSM"):
            full, first = t[name, plan.new_tokens], t[name, 1]
            rate[name] = batch * (plan.new_tokens - 1) / (full - first)
            row = {"what": "decoding", "batch": batch, "run": name, "decode_tokens_per_s": rate[name],
                   "end_to_end_tokens_per_s": batch * plan.new_tokens / full, "prefill_s": first}
            if name == "IMSM":
                row["decode_vs_vanilla"] = rate["IMSM"] / rate["vanilla PEFT"]
                row["end_to_end_vs_vanilla"] = (t["vanilla PEFT", plan.new_tokens] / full)
            record(**row)


# ---- export ----------------------------------------------------------------------------------------------------
def step_export(args, plan: Plan, record: Recorder) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    pkg = _imports()
    device, dtype = _device_dtype(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_export_"))
    atexit.register(shutil.rmtree, tmp, True)  # a model folder or two: gigabytes at the paper's sizes
    t0 = time.perf_counter()
    backbone = random_llama(plan.export_shape, torch.device("cpu"), torch.float32)
    tokenizer = word_tokenizer(backbone.config.vocab_size)
    backbone.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    model, _ = imsm_model(pkg, backbone, plan.lora_r, random_b=True)
    config = pkg.make_run_config(pkg.ImsmArguments.create(peft="lora", gate="query_aware", lora_r=plan.lora_r,
                                                          lora_alpha=plan.lora_r),
                                 pkg.DataArguments(), str(tmp / "model"), backbone.config.hidden_size)
    pkg.save_run_files(model, tmp / "run", config, None, True)
    del model, backbone
    folder = pkg.export_run(tmp / "run", tmp / "exported")
    record(what="export", shape=plan.export_shape, export_s=time.perf_counter() - t0)
    ours, tokenizer, _ = pkg.load_run(tmp / "run", dtype=dtype, attn_implementation="sdpa")
    ours.to(device)
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype,
                                                    attn_implementation="sdpa").to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(10, len(tokenizer), (plan.prompt_len - 3 * i - 1,), generator=g).tolist()
               for i in range(plan.export_prompts)]
    padded = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt", padding_side="left")
    padded = {k: v.to(device) for k, v in padded.items()}
    new = plan.export_new_tokens
    config = pkg.DecodingConfig(max_new_tokens=new, batch_size=len(prompts), stop_at_eos=False)
    outputs = {}

    def project():
        outputs["project"] = [o.token_ids for o in pkg.generate(ours, tokenizer, prompts, config)]

    def hf():
        with torch.inference_mode():
            out = exported.generate(**padded, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        outputs["exported"] = out[:, padded["input_ids"].shape[1]:].tolist()

    times = {"project": [], "exported": []}
    project(), hf()  # warm-up
    for _ in range(plan.repeats):
        for name, fn in (("project", project), ("exported", hf)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(outputs["project"], outputs["exported"], strict=True))
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
             for a, b in zip(outputs["project"], outputs["exported"], strict=True)]
    rate = {k: len(prompts) * new / statistics.median(v) for k, v in times.items()}
    record(what="exported generate() vs ours", dtype=str(dtype), prompts=len(prompts), new_tokens=new,
           identical_rows=f"{same}/{len(prompts)}", first_difference=[f for f in first if f is not None],
           ours_tokens_per_s=rate["project"], exported_tokens_per_s=rate["exported"],
           exported_vs_ours=rate["exported"] / rate["project"])


# ---- deepspeed -------------------------------------------------------------------------------------------------
def step_deepspeed(args, plan: Plan, record: Recorder) -> None:
    import random

    import torch

    pkg = _imports()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_ds_"))
    atexit.register(shutil.rmtree, tmp, True)  # a model folder or two: gigabytes at the paper's sizes
    backbone = random_llama(plan.deepspeed_shape, torch.device("cpu"), torch.float32)
    tokenizer = word_tokenizer(backbone.config.vocab_size)
    backbone.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    rows = [{"input": f"t{10 + i} t{20 + i % 7} t{30 + i % 3}", "output": f"t{40 + i % 2}"} for i in range(16)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for config in plan.deepspeed_configs:
        out = tmp / config.removesuffix(".json")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
               str(random.randint(20000, 40000)), str(ROOT / "train.py"), "--deepspeed",
               str(ROOT / "ds_configs" / config), "--model_name_or_path", str(tmp / "model"), "--train_file",
               str(tmp / "train.jsonl"), "--output_dir", str(out), "--per_device_train_batch_size", "2",
               "--max_steps", "2", "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none",
               "--disable_tqdm", "true", "--bf16", "true" if args.device == "cuda" else "false"]
        # a private folder for the ops DeepSpeed compiles at run time: what it compiled shows there, and a launch
        # killed mid-compile cannot leave a lock in the shared ~/.cache/torch_extensions that stalls later launches
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions")}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
        ok = proc.returncode == 0
        row = {"what": "train.py under deepspeed", "config": config, "rc": proc.returncode, "wall_s": wall}
        extensions = Path(env["TORCH_EXTENSIONS_DIR"])  # so far in this step: both launches share the folder
        row["ops_compiled"] = sorted({p.parent.name for p in extensions.rglob("build.ninja")})
        if ok:
            pkg.load_run(out / "final")
            row["final_reloads"] = True
            stats = out / "train_stats.json"
            if stats.is_file():
                row["train_stats"] = json.loads(stats.read_text())
        else:
            row["log_tail"] = (proc.stdout + proc.stderr)[-1500:]
        record(**row, ok=ok)


# ---- the driver ------------------------------------------------------------------------------------------------
def environment(args) -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    for pkg in ("transformers", "peft", "accelerate", "deepspeed", "safetensors", "tokenizers"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if args.device == "cuda":
        total = torch.cuda.mem_get_info()[1]
        env["gpu_memory_gib"] = round(total / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def read_records(out: Path, step: str) -> list[dict]:
    path = out / "steps" / f"{step}.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed step may be cut
            pass
    return rows


def write_report(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, each written aside and renamed."""
    from imsm.atomic import atomic_write_text

    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    lines = [f"# GPU check ({report['started']})", "", f"`{report['command']}`", "",
             "| " + " | ".join(report["environment"]) + " |", "|" + "---|" * len(report["environment"]),
             "| " + " | ".join(str(v) for v in report["environment"].values()) + " |", ""]
    for step, result in report["steps"].items():
        lines += [f"## {step}: {result['status']} ({result['wall_s']:.0f} s of {result['budget_s']:.0f})", ""]
        if result.get("log_tail"):
            lines += ["```", *result["log_tail"], "```", ""]
        groups: dict[str, list[dict]] = {}
        for row in result["records"]:
            groups.setdefault(row.get("what", ""), []).append(row)
        for what, rows in groups.items():  # one table per kind of measurement, columns in order of appearance
            keys = list(dict.fromkeys(k for r in rows for k in r if k != "what"))
            lines += [f"{what}:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r.get(k, "")).replace("|", "/") for k in keys) + " |" for r in rows]
            lines.append("")
    atomic_write_text(out / "gpu_check.md", "\n".join(lines))


def run_step(args, step: str, budget: float) -> tuple[str, float, list[str]]:
    """Run one step in its own process group, its output printed and kept in OUT/logs/STEP.log; kill the group
    past ``budget``. (status, wall seconds, the log's last lines when the step did not finish well)."""
    cmd = [sys.executable, __file__, "--step", step, "--out", str(args.out), "--device", args.device]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else []
    log_path = args.out / "logs" / f"{step}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)

        def copy() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=budget)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "stopped at its time budget"
        reader.join(timeout=10)
    tail = [] if status == "ok" else log_path.read_text(errors="replace").splitlines()[-25:]
    return status, time.perf_counter() - start, tail


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="Folder for gpu_check.md/.json (e.g. the caller's $OUT).")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="Tiny models and sizes: the same code paths in < 1 min.")
    p.add_argument("--steps", default=",".join(STEPS), help=f"Comma-separated, in order; of {', '.join(STEPS)}.")
    p.add_argument("--budget_s", type=float, default=None,
                   help="Wall-clock budget of all steps together (default 450 s; --tiny: 1800 s).")
    p.add_argument("--peak_tflops", type=float, default=None, help="The device's dense bf16 peak, if not listed.")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a step's own process
    args = p.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.error(f"--steps: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    args.steps = steps
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = TINY if args.tiny else Plan()
    if args.step is not None:
        print(f"[{args.step}]", flush=True)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        globals()[f"step_{args.step}"](args, plan, Recorder(args.out, args.step))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu --tiny on CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    for step in args.steps:
        (args.out / "steps" / f"{step}.jsonl").unlink(missing_ok=True)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment(args),
              "plan": asdict(plan), "steps": {}}
    print("environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()), flush=True)
    write_report(args.out, report)
    deadline = time.monotonic() + (args.budget_s or plan.total_s)
    for step in args.steps:
        left = deadline - time.monotonic()
        budget = min(plan.budgets_s[step], left)
        if budget < 5:
            report["steps"][step] = {"status": "not run: the total budget was spent", "wall_s": 0.0,
                                     "budget_s": 0.0, "records": []}
            continue
        status, wall, tail = run_step(args, step, budget)
        report["steps"][step] = {"status": status, "wall_s": wall, "budget_s": budget,
                                 "records": read_records(args.out, step), "log_tail": tail}
        print(f"[{step}] {status} in {wall:.0f} s", flush=True)
        write_report(args.out, report)
    failed = [s for s, r in report["steps"].items() if r["status"] != "ok"
              or any(row.get("ok") is False for row in r["records"])]
    print(f"wrote {args.out / 'gpu_check.md'}" + (f"; not ok: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
