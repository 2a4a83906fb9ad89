"""LoRAMoE (Dou et al., 2024), the paper's mixture-of-LoRA-experts baseline: the layer, its router and its
balancing constraint are in ``imsm/method/loramoe.py``; this file makes it a method.

Not a PEFT library method: it writes its own files, adds its balancing constraint to the loss, and cannot be scaled
(its router makes the update depend on the input, so there is no single weight update). Default targets: the
feed-forward projections, as its paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from imsm.method.adapters.base import Adapter, ExtraLoss, MethodSpec, check_target_modules, lookup_targets
from imsm.method.adapters.registry import register_method
from imsm.method.loramoe import LORAMOE_CONFIG, LORAMOE_WEIGHTS, LoRAMoEConfig, LoRAMoEModel

LORAMOE_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "chatglm": ["dense_h_to_4h", "dense_4h_to_h"],
}


@dataclass
class LoRAMoEOptions:
    # Defaults: the authors' public launcher (Ablustrund/LoRAMoE run_loramoe.sh, its variable named per line)
    loramoe_num_experts: int = field(
        default=8, metadata={"help": "Experts per adapted layer (run_loramoe.sh: lora_nums=8)."}
    )
    loramoe_r: int = field(default=4, metadata={"help": "Rank of each expert (run_loramoe.sh: lora_rank=4)."})
    loramoe_alpha: float = field(
        default=32.0, metadata={"help": "Scale numerator, scaling alpha / r (run_loramoe.sh: lora_alpha=32)."}
    )
    loramoe_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the experts' input, one mask per expert (run_loramoe.sh: lora_dropout=0.05)."},
    )
    loramoe_knowledge_experts: int | None = field(
        default=None,
        metadata={"help": "Experts in the world-knowledge group (the first ones); default: half, as the public code."},
    )
    loramoe_balance_weight: float = field(
        default=0.0,
        metadata={"help": "Weight β of the localized balancing constraint; 0 turns it off "
                          "(run_loramoe.sh: blc_weight=0.0)."},
    )
    loramoe_balance_delta: float = field(
        default=0.0,
        metadata={"help": "Imbalance δ of the constraint: a sample's router weight counts 1+δ on the expert group "
                          "of its type, 1−δ on the other (run_loramoe.sh: blc_alpha=0.0)."},
    )

    def __post_init__(self) -> None:
        self.layer_config(["*"])  # checks the values; the target modules come later, from the model

    def layer_config(self, target_modules: list[str]) -> LoRAMoEConfig:
        return LoRAMoEConfig(
            target_modules=target_modules, num_experts=self.loramoe_num_experts, r=self.loramoe_r,
            alpha=self.loramoe_alpha, dropout=self.loramoe_dropout, knowledge_experts=self.loramoe_knowledge_experts,
            balance_weight=self.loramoe_balance_weight, balance_delta=self.loramoe_balance_delta,
        )


class LoRAMoEMethod(MethodSpec):
    name = "loramoe"
    display_name = "LoRAMoE"
    options_class = LoRAMoEOptions
    files = (LORAMOE_CONFIG, LORAMOE_WEIGHTS)
    logged_losses = ("balance_loss",)

    def adapter_config(self, options: LoRAMoEOptions, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> LoRAMoEConfig:
        return options.layer_config(
            target_modules or lookup_targets(LORAMOE_TARGET_MODULES, model_type, "LoRAMoE target modules"))

    def attach(self, backbone: torch.nn.Module, options: LoRAMoEOptions, target_modules: list[str] | None,
               total_steps: int | None = None, template=None, max_input_length: int = 1024) -> Adapter:
        config = self.adapter_config(options, target_modules, backbone.config.model_type, total_steps)
        check_target_modules(backbone, config.target_modules, torch.nn.Linear, "linear layer")
        return Adapter(LoRAMoEModel(backbone, config))

    def load(self, backbone: torch.nn.Module, run_dir: Path) -> LoRAMoEModel:
        return LoRAMoEModel.from_pretrained(backbone, run_dir)

    def load_weights(self, peft_model: LoRAMoEModel, run_dir: Path, initial_state: dict | None = None) -> None:
        peft_model.load_adapter_weights(run_dir / LORAMOE_WEIGHTS)

    def extra_loss(self, peft_model: LoRAMoEModel, attention_mask: torch.Tensor, training: bool,
                   task_types: torch.Tensor | None = None) -> ExtraLoss | None:
        if not training:
            return None
        return ExtraLoss(peft_model.balancing_loss(attention_mask, task_types), log_as="balance_loss",
                         per_answer_token=True)


register_method(LoRAMoEMethod())
