"""Adapters by name (lora, adalora, dora, ia3, loramoe) and their default target modules per ``config.model_type``.

The defaults are the paper's choices: Llama q_proj,v_proj for LoRA/AdaLoRA/DoRA and k_proj,v_proj,down_proj for
(IA)3 with down_proj as the feed-forward module; Qwen2 q_proj; ChatGLM query_key_value. LoRAMoE (``loramoe.py``,
not a PEFT method) puts its experts on the feed-forward projections, as its paper. ``--target_modules`` (and
``--feedforward_modules`` for (IA)3) on the command line override the table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig, TaskType, get_peft_model
from peft.tuners.lora.config import CordaConfig

from imsm.method.lora_init import LORA_INITS
from imsm.method.loramoe import LoRAMoEConfig, LoRAMoEModel

LORA_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj"],
    "chatglm": ["query_key_value"],
}
IA3_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"],
    "chatglm": ["query_key_value", "dense_4h_to_h"],
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "chatglm": ["dense_4h_to_h"],
}
LORAMOE_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "chatglm": ["dense_h_to_4h", "dense_4h_to_h"],
}


def _lookup(table: dict[str, list[str]], model_type: str, what: str) -> list[str]:
    if model_type not in table:
        raise ValueError(
            f"no default {what} for model_type {model_type!r} (known: {sorted(table)}); "
            "pass --target_modules (and --feedforward_modules for ia3) explicitly"
        )
    return list(table[model_type])


def _lora(args, model_type: str, total_steps: int | None) -> PeftConfig:
    init = args.init_lora_weights
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules or _lookup(LORA_TARGET_MODULES, model_type, "LoRA target modules"),
        init_lora_weights=LORA_INITS[init](args),
        corda_config=CordaConfig(corda_method="kpm") if init == "corda" else None,
    )


def _dora(args, model_type: str, total_steps: int | None) -> PeftConfig:
    config = _lora(args, model_type, total_steps)
    config.use_dora = True
    return config


def _adalora(args, model_type: str, total_steps: int | None) -> PeftConfig:
    if not total_steps:
        raise ValueError("adalora needs the total number of optimizer steps for its rank budget schedule")
    return AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM, init_r=args.adalora_init_r, target_r=args.adalora_target_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, tinit=args.adalora_tinit,
        tfinal=args.adalora_tfinal, deltaT=args.adalora_delta_t, orth_reg_weight=args.adalora_orth_reg_weight,
        total_step=total_steps,
        target_modules=args.target_modules or _lookup(LORA_TARGET_MODULES, model_type, "AdaLoRA target modules"),
    )


def _ia3(args, model_type: str, total_steps: int | None) -> PeftConfig:
    targets = args.target_modules or _lookup(IA3_TARGET_MODULES, model_type, "(IA)3 target modules")
    ff = args.feedforward_modules or [
        m for m in _lookup(IA3_FEEDFORWARD_MODULES, model_type, "(IA)3 feed-forward modules") if m in targets
    ]
    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)


def _loramoe(args, model_type: str, total_steps: int | None) -> LoRAMoEConfig:
    return LoRAMoEConfig(
        target_modules=args.target_modules or _lookup(LORAMOE_TARGET_MODULES, model_type, "LoRAMoE target modules"),
        num_experts=args.loramoe_num_experts, r=args.loramoe_r, alpha=args.loramoe_alpha,
        dropout=args.loramoe_dropout, knowledge_experts=args.loramoe_knowledge_experts,
        balance_weight=args.loramoe_balance_weight, balance_delta=args.loramoe_balance_delta,
    )


PEFT_METHODS: dict[str, Callable[..., PeftConfig | LoRAMoEConfig]] = {
    "lora": _lora, "dora": _dora, "adalora": _adalora, "ia3": _ia3, "loramoe": _loramoe,
}


def build_peft_config(args, model_type: str, total_steps: int | None = None) -> PeftConfig | LoRAMoEConfig:
    """The adapter config for ``args.peft`` with the hyperparameters in ``args`` (an ``ImsmArguments``)."""
    if args.peft not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {args.peft!r}; choose one of {sorted(PEFT_METHODS)}")
    return PEFT_METHODS[args.peft](args, model_type, total_steps)


def check_target_modules(backbone: torch.nn.Module, targets: list[str] | str | None,
                         layer_type: type[torch.nn.Module] = torch.nn.Module, what: str = "module") -> None:
    """Every name in ``targets`` must match at least one module of ``layer_type``: a module whose path is the name or
    ends with ``.name`` (PEFT's rule for a list). PEFT adapts the names that match and silently skips the others, so
    a typo would train fewer layers than asked; the error names the unmatched ones and the leaf names there are."""
    if not isinstance(targets, list | tuple | set):
        return  # PEFT's regex form or "all-linear": PEFT itself refuses one that matches nothing
    paths = [name for name, module in backbone.named_modules() if name and isinstance(module, layer_type)]
    unmatched = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                         if name and isinstance(module, layer_type) and not list(module.children())
                         and not name.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"--target_modules {unmatched} match no {what} of the model; available: {leaves}")


def attach_adapter(backbone: torch.nn.Module, peft_config: PeftConfig | LoRAMoEConfig):
    """Wrap the backbone in place: the base weights stay where they are and only the adapter is trainable.

    Every target module name must match a layer (``check_target_modules``), for LoRAMoE a linear one."""
    if isinstance(peft_config, LoRAMoEConfig):
        check_target_modules(backbone, peft_config.target_modules, torch.nn.Linear, "linear layer")
        return LoRAMoEModel(backbone, peft_config)
    check_target_modules(backbone, peft_config.target_modules)
    return get_peft_model(backbone, peft_config)


def adalora_orth_regularizer(peft_model) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty on P and Q, as ``AdaLoraModel.forward`` adds it to the loss.

    IMSM calls the backbone's decoder directly (it needs the hidden state, not the logits), which bypasses that
    forward, so the term is added here with the same weight and formula.
    """
    if isinstance(peft_model, LoRAMoEModel):
        return None
    config = peft_model.peft_config[peft_model.active_adapter]
    if config.peft_type.value != "ADALORA" or config.orth_reg_weight == 0:
        return None
    terms = []
    for name, p in peft_model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and peft_model.active_adapter in name and p.numel() > 0:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro"))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()
