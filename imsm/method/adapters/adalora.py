"""AdaLoRA (Zhang et al., 2023) through PEFT: SVD-form adapters whose rank budget is reallocated during training.

IMSM calls the backbone's decoder directly (it needs the hidden state, not the logits), which bypasses
``AdaLoraModel.forward``; so the orthogonality regulariser is added here (``extra_loss``) with PEFT's weight and
formula, and the rank allocation runs from a Trainer callback (``AdaLoraAllocator``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import AdaLoraConfig, PeftModel, TaskType
from transformers import TrainerCallback

from imsm.method.adapters.base import ExtraLoss, MethodSpec, lookup_targets
from imsm.method.adapters.lora import LORA_TARGET_MODULES
from imsm.method.adapters.registry import register_method
from imsm.models.chatglm3 import split_fused_targets

logger = logging.getLogger(__name__)


@dataclass
class AdaLoraOptions:
    lora_alpha: int = field(default=16, metadata={"help": "Alpha: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input."})
    adalora_init_r: int = field(default=12, metadata={"help": "Initial rank per module."})
    adalora_target_r: int = field(default=8, metadata={"help": "Average target rank."})
    adalora_tinit: int = field(default=0, metadata={"help": "Steps before pruning starts."})
    adalora_tfinal: int = field(default=0, metadata={"help": "Final fine-tuning steps."})
    adalora_delta_t: int = field(default=1, metadata={"help": "Steps between budget allocations."})
    adalora_orth_reg_weight: float = field(default=0.5, metadata={"help": "Orthogonality penalty."})

    def __post_init__(self) -> None:
        if self.adalora_init_r < 1 or self.adalora_target_r < 1:
            raise ValueError("--adalora_init_r and --adalora_target_r must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")


class AdaLoraMethod(MethodSpec):
    name = "adalora"
    display_name = "AdaLoRA"
    options_class = AdaLoraOptions
    scalable = True

    def rebuilds_state(self, key: str) -> bool:
        # each layer's rank count, a parameter that does not train: PEFT sets it to the initial rank when it builds
        # the layer and leaves it out of the saved adapter (peft/tuners/adalora/model.py: "ranknum is deterministic")
        return ".ranknum." in key

    def adapter_config(self, options: AdaLoraOptions, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> AdaLoraConfig:
        if not total_steps:
            raise ValueError("adalora needs the total number of optimizer steps for its rank budget schedule")
        targets = target_modules or lookup_targets(LORA_TARGET_MODULES, model_type, "AdaLoRA target modules")
        targets, fused = split_fused_targets(model_type, targets)
        if fused:
            # sharing P and Λ across q, k, v would need the rank allocator to score the three as one module
            logger.warning("AdaLoRA on query_key_value of a converted ChatGLM3: q_proj, k_proj, v_proj get separate "
                           "adapters (more parameters than one adapter on the fused layer: docs/training.md)")
        return AdaLoraConfig(
            task_type=TaskType.CAUSAL_LM, init_r=options.adalora_init_r, target_r=options.adalora_target_r,
            lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout, tinit=options.adalora_tinit,
            tfinal=options.adalora_tfinal, deltaT=options.adalora_delta_t,
            orth_reg_weight=options.adalora_orth_reg_weight, total_step=total_steps, target_modules=targets,
        )

    def extra_loss(self, peft_model: PeftModel, attention_mask: torch.Tensor, training: bool,
                   task_types: torch.Tensor | None = None) -> ExtraLoss | None:
        reg = orth_regularizer(peft_model)
        return None if reg is None else ExtraLoss(reg)

    def callbacks(self, trainer: Any) -> list:
        return [AdaLoraAllocator(trainer)]


def orth_regularizer(peft_model) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty on P and Q, as ``AdaLoraModel.forward`` adds it to the loss."""
    config = peft_model.peft_config[peft_model.active_adapter]
    if config.orth_reg_weight == 0:
        return None
    terms = []
    for name, p in peft_model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and peft_model.active_adapter in name and p.numel() > 0:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro"))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()


class AdaLoraAllocator(TrainerCallback):
    """Runs AdaLoRA's ``update_and_allocate`` after every optimizer step, while the gradients still exist.

    Without DeepSpeed that is the Trainer's ``on_optimizer_step``. Under DeepSpeed the engine steps (and clears the
    gradients) inside ``backward``, and ZeRO keeps gradients and fp32 weights partitioned, so the engine's ``step``
    is wrapped: gather the adapter's full gradients, step, allocate on full tensors, write the masked weights back to
    the fp32 master copy.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.wrapped = False

    def _peft(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model).peft_model

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled and not self.wrapped:
            self._wrap_engine(self.trainer.model_wrapped)
            self.wrapped = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer.is_deepspeed_enabled:
            self._peft().base_model.update_and_allocate(state.global_step)

    def _wrap_engine(self, engine) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param

        if engine.zero_optimization_stage() == 3:
            raise ValueError("AdaLoRA's rank allocation needs full adapter weights each step; use ZeRO-0/1/2")
        params = [(n, p) for n, p in self._peft().named_parameters() if "lora_" in n and p.requires_grad]
        real_step = engine.step
        trainer = self.trainer

        def step(*a, **kw):
            boundary = engine.is_gradient_accumulation_boundary()
            grads = [safe_get_full_grad(p) for _, p in params] if boundary else None
            result = real_step(*a, **kw)
            if boundary:
                for (_, p), g in zip(params, grads, strict=True):
                    p.grad = g.to(p.dtype)  # DeepSpeed hands back fp32 gradients for bf16/fp16 weights
                self._peft().base_model.update_and_allocate(trainer.state.global_step)
                for _, p in params:
                    p.grad = None
                    safe_set_full_fp32_param(p, p.data.float())
            return result

        engine.step = step


register_method(AdaLoraMethod())
