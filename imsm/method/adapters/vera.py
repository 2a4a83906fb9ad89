"""VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation") through PEFT's ``VeraConfig``.

One pair of frozen random matrices A (r × d_in) and B (d_out × r) is shared by every adapted layer, each layer
slicing out the part its shape needs; a layer trains only two vectors, d (r) and b (d_out):

    y = W0 x + Λ_b B Λ_d A x          Λ_b = diag(b), Λ_d = diag(d)

so the update merges into one weight change (adapter scaling and export apply). A and B are buffers, not
parameters: PEFT writes them into the adapter file (``save_projection=True``, always on here, so a run reloads on any
machine rather than relying on re-drawing them from ``projection_prng_key``) and refuses to save without them, so
the method declares them as saved state (``saves_state``). Default targets per ``config.model_type``: PEFT's VeRA
table (q_proj, v_proj for Llama, Mistral and Qwen2; ChatGLM's fused query_key_value).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import TaskType, VeraConfig

from imsm.method.adapters.base import MethodSpec, lookup_targets
from imsm.method.adapters.registry import register_method

VERA_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
}
PROJECTIONS = ("base_model.vera_A.", "base_model.vera_B.")  # the shared A and B, by their PeftModel state-dict names


@dataclass
class VeraOptions:
    vera_r: int = field(default=256, metadata={
        "help": "Rank of the shared random projections (PEFT's default, 256); a layer trains r + d_out values."})
    vera_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    vera_d_initial: float = field(default=0.1, metadata={"help": "Initial value of the d vector (the paper: <= 0.1)."})
    vera_projection_prng_key: int = field(default=0, metadata={"help": "Seed of the shared random projections."})

    def __post_init__(self) -> None:
        if self.vera_r < 1:
            raise ValueError(f"--vera_r {self.vera_r}: the rank must be at least 1")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ValueError(f"--vera_dropout {self.vera_dropout}: must be in [0, 1)")


class VeraMethod(MethodSpec):
    name = "vera"
    display_name = "VeRA"
    options_class = VeraOptions
    scalable = True

    def saves_state(self, key: str) -> bool:
        return key.startswith(PROJECTIONS)

    def adapter_config(self, options: VeraOptions, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> VeraConfig:
        return VeraConfig(
            task_type=TaskType.CAUSAL_LM, r=options.vera_r, vera_dropout=options.vera_dropout,
            d_initial=options.vera_d_initial, projection_prng_key=options.vera_projection_prng_key,
            save_projection=True,
            target_modules=target_modules or lookup_targets(VERA_TARGET_MODULES, model_type, "VeRA target modules"),
        )


register_method(VeraMethod())
