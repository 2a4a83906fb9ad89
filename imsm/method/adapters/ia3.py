"""(IA)3 (Liu et al., 2022) through PEFT: learned vectors rescaling keys, values and the feed-forward input.

Default targets per ``config.model_type`` are the paper's: Llama k_proj,v_proj,down_proj with down_proj as the
feed-forward module. ``--target_modules`` / ``--feedforward_modules`` override the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import IA3Config, TaskType

from imsm.method.adapters.base import MethodSpec, lookup_targets
from imsm.method.adapters.registry import register_method

IA3_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"],
    "chatglm": ["query_key_value", "dense_4h_to_h"],
    # ChatGLM3 converted to the native glm layout: query_key_value's output scaling is q's, k's and v's together
    "glm": ["q_proj", "k_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "chatglm": ["dense_4h_to_h"],
    "glm": ["down_proj"],
}


@dataclass
class IA3Options:
    feedforward_modules: list[str] | None = field(
        default=None, metadata={"help": "Feed-forward modules (scaled on their input); default from the table."}
    )


class IA3Method(MethodSpec):
    name = "ia3"
    display_name = "IA3"
    options_class = IA3Options
    scalable = True

    def adapter_config(self, options: IA3Options, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> IA3Config:
        targets = target_modules or lookup_targets(IA3_TARGET_MODULES, model_type, "(IA)3 target modules")
        ff = options.feedforward_modules or [
            m for m in lookup_targets(IA3_FEEDFORWARD_MODULES, model_type, "(IA)3 feed-forward modules")
            if m in targets
        ]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)


register_method(IA3Method())
