"""Writing a run folder: the adapter in PEFT's own format, the gate in safetensors, the IMSM settings and the run's
resolved arguments as JSON. Nothing is pickled.

Under ZeRO-3 the adapter and gate are partitioned across ranks; they are gathered (all ranks take part) before rank 0
writes, so the files hold the trained values, not empty shards. Only the trainable parameters are gathered: the
Trainer's own DeepSpeed save would consolidate the whole 16-bit backbone on rank 0 just to keep a few MB of it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from imsm.atomic import atomic_write_json
from imsm.loader import GATE_FILE, IMSM_CONFIG, RUN_ARGS
from imsm.method.gate import GATE_PARAM_PREFIX
from imsm.method.lora_init import convert_saved_adapter
from imsm.method.model import IMSMModel


def _gathered(params: list[torch.nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_run_files(model: IMSMModel, out_dir: str | Path, settings: dict, run_args: dict | None,
                   is_main: bool) -> None:
    """Write the run folder's files into ``out_dir``; every rank must call this (ZeRO-3 gathers collectively)."""
    out_dir = Path(out_dir)
    named = [(n, p) for n, p in model.named_parameters() if model.is_trainable_name(n) or "ranknum" in n]
    with _gathered([p for _, p in named]):
        if not is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        full = {n[len("peft_model."):]: p.detach().cpu().clone() for n, p in named if n.startswith("peft_model.")}
        # save_pretrained picks the adapter's entries out of this (AdaLoRA: cut to the allocated ranks)
        model.peft_model.save_pretrained(str(out_dir), state_dict=full, safe_serialization=True)
        if model.lora_initial_state is not None:
            convert_saved_adapter(out_dir, model.lora_initial_state)
        gate = {n[len(GATE_PARAM_PREFIX):]: p.detach().cpu().float().contiguous().clone()
                for n, p in named if n.startswith(GATE_PARAM_PREFIX)}
        save_file(gate, str(out_dir / GATE_FILE), metadata={"format": "pt", "variant": settings["gate"]})
    atomic_write_json(out_dir / IMSM_CONFIG, settings)
    if run_args is not None:
        atomic_write_json(out_dir / RUN_ARGS, json.loads(json.dumps(run_args, default=str)))
