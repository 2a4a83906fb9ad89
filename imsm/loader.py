"""One build/load path for training and evaluation: backbone + tokenizer, the PEFT adapter, the gate, and a saved run
(its format: ``imsm/run_folder.py``)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from imsm.default_model import resolve_model_path
from imsm.method.adapters import attach_adapter, build_peft_config
from imsm.method.gate import GATE_PARAM_PREFIX, build_gate
from imsm.method.lora_init import (
    RESIDUAL_ADAPTER,
    calibrate_corda,
    initial_adapter_state,
    mutates_base,
)
from imsm.method.loramoe import LORAMOE_WEIGHTS, LoRAMoEModel
from imsm.method.model import IMSMModel
from imsm.run_folder import ADAPTER_WEIGHTS, GATE_FILE, check_hidden_size, resolve, validate

logger = logging.getLogger(__name__)

def pick_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(model_name_or_path: str | None, dtype: torch.dtype = torch.float32, attn_implementation="auto",
                  trust_remote_code: bool = False):
    """(causal LM with frozen weights, tokenizer, resolved path)."""
    path = resolve_model_path(model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=pick_attn_implementation(attn_implementation),
        trust_remote_code=trust_remote_code,
    )
    model.requires_grad_(False)
    return model, load_tokenizer(path, trust_remote_code), path


def build_imsm_model(backbone, imsm_args, total_steps: int | None = None, template=None,
                     max_input_length: int = 1024) -> IMSMModel:
    """Attach a fresh adapter and gate; only they require grad. CorDA calibrates on ``imsm_args``' calibration
    file first, encoding its prompts with ``template``."""
    peft_config = build_peft_config(imsm_args, backbone.config.model_type, total_steps)
    if imsm_args.init_lora_weights == "corda":
        calibrate_corda(backbone, peft_config, imsm_args, template, max_input_length)
    peft_model = attach_adapter(backbone, peft_config)
    gate = build_gate(imsm_args.gate, backbone.config.hidden_size, imsm_args.gate_rank, imsm_args.gate_dropout)
    model = IMSMModel(peft_model, gate)
    if mutates_base(imsm_args.init_lora_weights):
        model.lora_initial_state = initial_adapter_state(peft_model)
    model.requires_grad_(False)
    for group in model.trainable_parameters().values():
        for _, p in group:
            p.requires_grad_(True)
    return model


def load_gate_into(model: IMSMModel, gate_path: Path) -> None:
    expected = {n[len(GATE_PARAM_PREFIX):]: p for n, p in model.named_parameters() if n.startswith(GATE_PARAM_PREFIX)}
    saved = load_file(str(gate_path))
    if set(saved) != set(expected):
        raise ValueError(f"{gate_path}: gate tensors {sorted(saved)} do not match the model's {sorted(expected)}")
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{gate_path}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[name].shape)} "
                "(wrong base model or gate rank?)"
            )
    with torch.no_grad():
        for name, tensor in saved.items():
            expected[name].copy_(tensor)


def load_trained_weights(model: IMSMModel, run_dir: str | Path) -> None:
    """Put a run folder's adapter and gate values into an already built model (the Trainer's non-DeepSpeed resume)."""
    from peft import set_peft_model_state_dict

    run_dir = resolve(run_dir)
    if isinstance(model.peft_model, LoRAMoEModel):
        model.peft_model.load_adapter_weights(run_dir / LORAMOE_WEIGHTS)
        load_gate_into(model, run_dir / GATE_FILE)
        return
    # a PiSSA/CorDA run's adapter file is converted to the pretrained weights; resume from the unconverted one
    weights = RESIDUAL_ADAPTER if model.lora_initial_state is not None else ADAPTER_WEIGHTS
    result = set_peft_model_state_dict(model.peft_model, load_file(str(run_dir / weights)))
    missing = [k for k in result.missing_keys if model.adapter_prefix() in k]
    if missing:
        raise ValueError(f"{run_dir}: the saved adapter lacks {missing[:3]}")
    load_gate_into(model, run_dir / GATE_FILE)


def load_run(run: str | Path, model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
             attn_implementation: str = "auto", trust_remote_code: bool = False):
    """(IMSMModel in eval mode, tokenizer, RunConfig) from a saved run; the base model is the recorded one unless
    ``model_name_or_path`` is given. The folder is validated (``run_folder.validate``) before the backbone loads."""
    from peft import PeftModel

    run_dir = resolve(run)
    config = validate(run_dir)
    backbone, tokenizer, path = load_backbone(model_name_or_path or config.base_model, dtype,
                                              attn_implementation, trust_remote_code)
    check_hidden_size(config, run_dir, backbone.config.hidden_size, path)
    if config.peft == "loramoe":
        peft_model = LoRAMoEModel.from_pretrained(backbone, run_dir)
    else:
        peft_model = PeftModel.from_pretrained(backbone, str(run_dir))
    gate = build_gate(config.gate, backbone.config.hidden_size, config.gate_rank, config.gate_dropout)
    model = IMSMModel(peft_model, gate)
    load_gate_into(model, run_dir / GATE_FILE)
    model.eval()
    return model, tokenizer, config
