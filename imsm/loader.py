"""One build/load path for training and evaluation: backbone + tokenizer, the PEFT adapter, the gate, and a saved run.

A saved run folder is a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``; LoRAMoE:
``loramoe_config.json``, ``loramoe_model.safetensors``) plus ``gate.safetensors``, ``imsm_config.json`` (the IMSM
settings, prompt template included) and ``run_args.json``.
"""

from __future__ import annotations

import importlib.util
import json
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
    calibration_record,
    initial_adapter_state,
    mutates_base,
)
from imsm.method.loramoe import LORAMOE_CONFIG, LORAMOE_WEIGHTS, LoRAMoEModel
from imsm.method.model import IMSMModel

logger = logging.getLogger(__name__)

IMSM_CONFIG = "imsm_config.json"
GATE_FILE = "gate.safetensors"
RUN_ARGS = "run_args.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_STATS = "train_stats.json"
# (config, weights) of a run's adapter by method; anything else is a PEFT adapter folder
ADAPTER_FILES: dict[str, tuple[str, str]] = {"loramoe": (LORAMOE_CONFIG, LORAMOE_WEIGHTS)}


def adapter_files(peft: str) -> tuple[str, str]:
    return ADAPTER_FILES.get(peft, (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


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
    for name, p in model.named_parameters():
        p.requires_grad_(model.is_trainable_name(name))
    return model


def imsm_settings(imsm_args, data_args, model_path: str, hidden_size: int) -> dict:
    """What a run folder needs to rebuild the model the way it was trained."""
    return {
        "base_model": model_path,
        "peft": imsm_args.peft,
        "gate": imsm_args.gate,
        "gate_rank": imsm_args.gate_rank,
        "gate_dropout": imsm_args.gate_dropout,
        "hidden_size": hidden_size,
        "prompt_template": data_args.prompt_template,
        "system_prompt": data_args.system_prompt,
        "init_lora_weights": imsm_args.init_lora_weights,
        "calibration": calibration_record(imsm_args),
    }


def resolve_run_dir(run: str | Path) -> Path:
    """A run folder: a checkpoint or final folder holding ``imsm_config.json``, or an output folder with ``final/``."""
    run = Path(run)
    for candidate in (run, run / "final"):
        if (candidate / IMSM_CONFIG).is_file():
            break
    else:
        raise FileNotFoundError(f"{run}: not an IMSM run folder (no {IMSM_CONFIG} here or in {run / 'final'})")
    for needed in (adapter_files(read_settings(candidate).get("peft", ""))[0], GATE_FILE):
        if not (candidate / needed).is_file():
            raise FileNotFoundError(f"{candidate}: incomplete run folder, {needed} is missing")
    return candidate


def read_settings(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IMSM_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir / IMSM_CONFIG}: not valid JSON ({e.msg})") from None


def read_train_stats(run: str | Path) -> dict | None:
    """A run's cost (``train_stats.json``: train_runtime_s, optimizer_steps, tokens_seen, ...); None for runs saved
    before it was recorded."""
    path = resolve_run_dir(run) / TRAIN_STATS
    return json.loads(path.read_text()) if path.is_file() else None


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


def check_run_fits(run_dir: Path, settings: dict, hidden_size: int, model_path: str) -> None:
    """The run's adapter weights exist and its gate fits a base model of ``hidden_size``; loads no model weights,
    so evaluate.py can check every run before it decodes or writes anything."""
    weights = adapter_files(settings.get("peft", ""))[1]
    if not (run_dir / weights).is_file():
        raise FileNotFoundError(f"{run_dir}: incomplete run folder, {weights} is missing")
    if settings.get("hidden_size", hidden_size) != hidden_size:
        raise ValueError(f"{run_dir / IMSM_CONFIG}: the run was trained on hidden size {settings['hidden_size']}, "
                         f"{model_path} has {hidden_size}")
    holder = torch.nn.Module()  # load_gate_into finds the gate under the name imsm_gate, as in IMSMModel
    holder.imsm_gate = build_gate(settings["gate"], hidden_size, settings["gate_rank"], settings["gate_dropout"])
    load_gate_into(holder, run_dir / GATE_FILE)


def load_trained_weights(model: IMSMModel, run_dir: str | Path) -> None:
    """Put a run folder's adapter and gate values into an already built model (the Trainer's non-DeepSpeed resume)."""
    from peft import set_peft_model_state_dict

    run_dir = resolve_run_dir(run_dir)
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
    """(IMSMModel in eval mode, tokenizer, settings) from a saved run; the base model is the recorded one unless
    ``model_name_or_path`` is given."""
    from peft import PeftModel

    run_dir = resolve_run_dir(run)
    settings = read_settings(run_dir)
    backbone, tokenizer, path = load_backbone(model_name_or_path or settings.get("base_model"), dtype,
                                              attn_implementation, trust_remote_code)
    check_run_fits(run_dir, settings, backbone.config.hidden_size, path)
    if settings.get("peft") == "loramoe":
        peft_model = LoRAMoEModel.from_pretrained(backbone, run_dir)
    else:
        peft_model = PeftModel.from_pretrained(backbone, str(run_dir))
    gate = build_gate(settings["gate"], backbone.config.hidden_size, settings["gate_rank"], settings["gate_dropout"])
    model = IMSMModel(peft_model, gate)
    load_gate_into(model, run_dir / GATE_FILE)
    model.eval()
    return model, tokenizer, settings
