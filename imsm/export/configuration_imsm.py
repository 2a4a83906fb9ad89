"""Configuration of an exported IMSM model (``export.py``): the base model's config nested as ``text_config``, plus
the gate and the names of the modules whose tuned copies the model holds.

This file travels inside the exported folder and is loaded with ``trust_remote_code=True``; it imports only
``transformers``.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

GATE_VARIANTS = ("query_aware", "token", "equal")


class IMSMConfig(PreTrainedConfig):
    """``text_config``: the base causal LM's config (any architecture ``AutoModel`` builds); ``gate``: one of
    ``GATE_VARIANTS`` with its ``gate_rank``; ``tuned_modules``: the decoder's linear layers (names relative to the
    decoder) that have a tuned copy of their weight; ``peft``: the method the run was trained with (information only:
    the tuned copies are already merged)."""

    model_type = "imsm"
    sub_configs_defaults: ClassVar[dict] = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    gate: str = "query_aware"
    gate_rank: int = 8
    tuned_modules: list[str] | None = None
    peft: str = "lora"
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.gate not in GATE_VARIANTS:
            raise ValueError(f"IMSMConfig: gate {self.gate!r} is not one of {GATE_VARIANTS}")
        self.tuned_modules = list(self.tuned_modules or [])
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        # read by tools that size contexts from the top-level config (lm-evaluation-harness's hf model)
        self.max_position_embeddings = getattr(self.text_config, "max_position_embeddings", None)


__all__ = ["IMSMConfig"]
