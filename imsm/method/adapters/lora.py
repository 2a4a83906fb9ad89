"""LoRA (Hu et al., 2022) and DoRA (Liu et al., 2024) through PEFT, with LoRA's PiSSA and CorDA initialisations.

Default targets per ``config.model_type`` are the paper's: Llama q_proj,v_proj; Qwen2 q_proj; ChatGLM
query_key_value (ChatGLM3 runs converted to the native ``glm`` layout, where the fused query_key_value is q_proj,
k_proj, v_proj with one shared A: ``imsm/models/chatglm3.py``). ``--target_modules`` overrides the table;
``--target_modules mlp`` is the named preset of the feed-forward projections (``TARGET_PRESETS``: peft's MLP-only
LoRA, which forgot less than default LoRA at similar accuracy in peft's MetaMathQA comparison). PiSSA and CorDA
rewrite the base weights (``imsm/method/lora_init.py``), so they need ``--gate none`` and their runs are saved
converted; MiCA (``--init_lora_weights mica``) leaves them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType
from peft.tuners.lora.config import CordaConfig

from imsm.method.adapters.base import Adapter, MethodSpec, check_target_modules, json_ready, lookup_targets
from imsm.method.adapters.registry import register_method
from imsm.method.lora_init import (
    LORA_INITS,
    RESIDUAL_ADAPTER,
    calibrate_corda,
    calibration_record,
    convert_saved_adapter,
    initial_adapter_state,
    mutates_base,
)
from imsm.models.chatglm3 import split_fused_targets, tie_fused_lora, untied_state_dict

LORA_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj"],
    "chatglm": ["query_key_value"],
    "glm": ["query_key_value"],
}
# --target_modules NAME -> the modules per config.model_type
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "mlp": {
        "llama": ["gate_proj", "up_proj", "down_proj"],
        "mistral": ["gate_proj", "up_proj", "down_proj"],
        "qwen2": ["gate_proj", "up_proj", "down_proj"],
        "chatglm": ["dense_h_to_4h", "dense_4h_to_h"],
        "glm": ["gate_up_proj", "down_proj"],
    },
}


def resolve_targets(target_modules: list[str] | None, model_type: str, default: dict[str, list[str]],
                     what: str) -> list[str]:
    """``--target_modules`` as given, a preset (``mlp``) resolved for ``model_type``, or the default table's."""
    if target_modules is not None and len(target_modules) == 1 and target_modules[0] in TARGET_PRESETS:
        return lookup_targets(TARGET_PRESETS[target_modules[0]], model_type, f"--target_modules {target_modules[0]}")
    return target_modules or lookup_targets(default, model_type, what)


@dataclass
class DoraOptions:
    lora_r: int = field(default=16, metadata={"help": "Rank of the adapter."})
    lora_alpha: int = field(default=16, metadata={"help": "Alpha: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input."})

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"--lora_r {self.lora_r}: the rank must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")


@dataclass
class LoraOptions(DoraOptions):
    init_lora_weights: str = field(
        default="default",
        metadata={"help": f"LoRA initialisation: one of {sorted(LORA_INITS)}; pissa and corda rewrite the base "
                          "weights, so they need --gate none; mica trains A only, B fixed to W's minor singular "
                          "vectors."},
    )
    pissa_niter: int | None = field(
        default=None,
        metadata={"help": "PiSSA: randomized SVD with this many subspace iterations (default: exact)."},
    )
    corda_calibration_file: str | None = field(
        default=None,
        metadata={"help": "CorDA: JSONL of general-domain prompts ('input') for the calibration pass."},
    )
    corda_calibration_examples: int = field(default=256, metadata={"help": "CorDA: calibration prompts used."})
    corda_calibration_skip: int = field(
        default=0, metadata={"help": "CorDA: rows of the calibration file skipped before the ones used."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_lora_weights not in LORA_INITS:
            raise ValueError(f"--init_lora_weights {self.init_lora_weights!r}: choose one of {sorted(LORA_INITS)}")
        if (self.init_lora_weights == "corda") != (self.corda_calibration_file is not None):
            raise ValueError("--init_lora_weights corda needs --corda_calibration_file, and that file is only used "
                             "by corda")
        if self.corda_calibration_examples < 1 or self.corda_calibration_skip < 0:
            raise ValueError("--corda_calibration_examples must be at least 1 and --corda_calibration_skip >= 0")
        if self.pissa_niter is not None and (self.init_lora_weights != "pissa" or self.pissa_niter < 1):
            raise ValueError("--pissa_niter (at least 1) only applies to --init_lora_weights pissa")


class LoraMethod(MethodSpec):
    name = "lora"
    display_name = "LoRA"
    options_class = LoraOptions
    scalable = True
    mixed_batch = True

    def check(self, options: LoraOptions, gate: str) -> None:
        if mutates_base(options.init_lora_weights) and gate != "none":
            raise ValueError(
                f"--init_lora_weights {options.init_lora_weights} cannot be combined with the IMSM gate "
                f"(--gate {gate}): it moves the top singular directions of each target weight into the "
                "adapter and leaves the residual in the base layer, so the model with the adapter disabled is "
                "no longer the pretrained model and the frozen memory would be wrong; use --gate none"
            )

    def adapter_config(self, options: DoraOptions, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> LoraConfig:
        init = getattr(options, "init_lora_weights", "default")
        targets, _ = split_fused_targets(model_type, self.targets(target_modules, model_type))
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=options.lora_r, lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout, target_modules=targets,
            init_lora_weights=LORA_INITS[init](options),
            corda_config=CordaConfig(corda_method="kpm") if init == "corda" else None,
        )

    def targets(self, target_modules: list[str] | None, model_type: str) -> list[str]:
        return resolve_targets(target_modules, model_type, LORA_TARGET_MODULES, f"{self.display_name} target modules")

    def attach(self, backbone: torch.nn.Module, options: DoraOptions, target_modules: list[str] | None,
               total_steps: int | None = None, template=None, max_input_length: int = 1024) -> Adapter:
        from peft import get_peft_model

        model_type = backbone.config.model_type
        config = self.adapter_config(options, target_modules, model_type, total_steps)
        init = getattr(options, "init_lora_weights", "default")
        fused = split_fused_targets(model_type, self.targets(target_modules, model_type))[1]
        if fused and init != "default":
            raise ValueError(f"--init_lora_weights {init} decomposes each target weight, and query_key_value on this "
                             "model is three weights (q_proj, k_proj, v_proj); pass them as --target_modules instead")
        check_target_modules(backbone, config.target_modules)
        if init == "corda":
            calibrate_corda(backbone, config, options, template, max_input_length)
        peft_model = get_peft_model(backbone, config)
        if fused:
            tie_fused_lora(peft_model)  # the fused query_key_value LoRA: one A shared by q, k, v
        return Adapter(peft_model, initial_adapter_state(peft_model) if mutates_base(init) else None)

    def load_weights(self, peft_model: PeftModel, run_dir: Path, initial_state: dict | None = None) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        # a PiSSA/CorDA run's adapter file is converted to the pretrained weights; resume from the unconverted one
        weights = RESIDUAL_ADAPTER if initial_state is not None else self.files[1]
        result = set_peft_model_state_dict(peft_model, load_file(str(run_dir / weights)))
        missing = [k for k in result.missing_keys if peft_model.base_model.prefix in k]
        if missing:
            raise ValueError(f"{run_dir}: the saved adapter lacks {missing[:3]}")

    def save(self, peft_model: PeftModel, state_dict: dict[str, torch.Tensor], out_dir: Path,
             initial_state: dict | None = None) -> None:
        super().save(peft_model, untied_state_dict(peft_model, state_dict), out_dir)
        if initial_state is not None:
            convert_saved_adapter(out_dir, initial_state, *self.files)

    def record(self, options: LoraOptions) -> dict:
        return json_ready({**super().record(options), "calibration": calibration_record(options)})

    def describe(self, method_options: dict) -> dict[str, str]:
        settings = super().describe(method_options)
        if (calibration := method_options.get("calibration")) is not None:
            settings["calibration"] = f"{len(calibration['rows'])} rows of {calibration['file']}"
        return settings

    def calibration_rows(self, method_options: dict) -> dict | None:
        return method_options.get("calibration")


class DoraMethod(LoraMethod):
    """DoRA: LoRA's options without its initialisations; PEFT's ``use_dora``. Not run as a mixed-adapter batch (its
    magnitude step is a LoRA variant that PEFT's ``adapter_names`` path does not take)."""

    name = "dora"
    display_name = "DoRA"
    options_class = DoraOptions
    mixed_batch = False

    def check(self, options: DoraOptions, gate: str) -> None:
        pass

    def adapter_config(self, options: DoraOptions, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> LoraConfig:
        config = super().adapter_config(options, target_modules, model_type, total_steps)
        config.use_dora = True
        return config

    def record(self, options: DoraOptions) -> dict:
        return MethodSpec.record(self, options)

    def describe(self, method_options: dict) -> dict[str, str]:
        return MethodSpec.describe(self, method_options)

    def calibration_rows(self, method_options: dict) -> dict | None:
        return None


register_method(LoraMethod())
register_method(DoraMethod())
