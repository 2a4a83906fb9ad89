"""OSF, orthogonal subspace fine-tuning (peft's ``OSFConfig``): each target weight W = U Σ Vᵀ keeps its top
``effective_rank`` singular directions frozen, and only the remaining low singular components (U_low, Σ_low, V_low)
train, with their gradients projected orthogonal to the frozen high subspace, so the directions the pretrained model
relies on most are not written over. The base layer stays W (the update is added beside it), so "adapter off" is the
pretrained model and OSF works with the IMSM gate and the KL anchor.

Trainable rank per module = min(W.shape) − effective_rank; ``--osf_effective_rank`` is a fraction of min(W.shape)
when at most 1 (peft's default 0.5), else a count. Targets: LoRA's table and presets (``--target_modules mlp``),
ChatGLM3's fused query_key_value as its three native projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import OSFConfig

from imsm.method.adapters.base import MethodSpec
from imsm.method.adapters.lora import LORA_TARGET_MODULES, resolve_targets
from imsm.method.adapters.registry import register_method
from imsm.models.chatglm3 import split_fused_targets


@dataclass
class OSFOptions:
    osf_effective_rank: float = field(
        default=0.5,
        metadata={"help": "Frozen (preserved) SVD rank per target: a fraction of min(W.shape) when <= 1, else a "
                          "count; the rest of the spectrum trains."},
    )

    def __post_init__(self) -> None:
        if self.osf_effective_rank <= 0 or (self.osf_effective_rank > 1 and not self.osf_effective_rank.is_integer()):
            raise ValueError(f"--osf_effective_rank {self.osf_effective_rank:g}: give a fraction in (0, 1] or a whole "
                             "number of directions")


class OSFMethod(MethodSpec):
    name = "osf"
    display_name = "OSF"
    options_class = OSFOptions

    def adapter_config(self, options: OSFOptions, target_modules, model_type, total_steps) -> OSFConfig:
        rank = options.osf_effective_rank
        targets = resolve_targets(target_modules, model_type, LORA_TARGET_MODULES, "OSF target modules")
        # a native glm model has ChatGLM's fused query_key_value as q/k/v_proj: OSF decomposes each of them
        return OSFConfig(target_modules=split_fused_targets(model_type, targets)[0],
                         effective_rank=int(rank) if rank > 1 else rank)

    def rebuilds_state(self, key: str) -> bool:
        """The frozen high subspace and the low part's initial value (``_osf_*`` buffers) come from the SVD of the
        pretrained weight, which building the adapter again repeats: only the trained low part is saved."""
        return "._osf_" in key


register_method(OSFMethod())
