"""Command-line arguments, split by concern and parsed by ``HfArgumentParser`` together with ``TrainingArguments``.

Training arguments (optimizer, learning rate, schedule, epochs, batch, precision, gradient checkpointing, seed,
DeepSpeed config, resume) are the Hugging Face ``TrainingArguments``; the DeepSpeed JSON says "auto" for each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imsm.adapters import PEFT_METHODS
from imsm.gate import GATES
from imsm.templates import TEMPLATES


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub name or local folder; default: the embedded SmolLM2-135M-Instruct."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own code."})
    attn_implementation: str = field(
        default="auto", metadata={"help": "auto (flash_attention_2 on GPU when installed, else sdpa), sdpa, eager."}
    )


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "JSONL with 'input' and 'output' per line."})
    max_input_length: int = field(default=1024, metadata={"help": "Prompt tokens kept (cut from the left)."})
    max_output_length: int = field(default=512, metadata={"help": "Answer tokens kept, closing EOS included."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    prompt_template: str = field(default="raw", metadata={"help": f"One of {sorted(TEMPLATES)}."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn for the chat template."})

    def __post_init__(self) -> None:
        if self.prompt_template not in TEMPLATES:
            raise ValueError(f"--prompt_template {self.prompt_template!r}: choose one of {sorted(TEMPLATES)}")
        if self.system_prompt and self.prompt_template != "chat":
            raise ValueError("--system_prompt only applies to --prompt_template chat")
        if self.max_input_length < 1 or self.max_output_length < 1:
            raise ValueError("--max_input_length and --max_output_length must be at least 1")


@dataclass
class ImsmArguments:
    peft: str = field(default="lora", metadata={"help": f"PEFT method: one of {sorted(PEFT_METHODS)}."})
    gate: str = field(
        default="query_aware",
        metadata={"help": "query_aware (IMSM), token, equal (0.5/0.5) or none (vanilla PEFT)."},
    )
    gate_rank: int = field(default=8, metadata={"help": "Rank r of the gate's W_A (k·d×r) and W_B (r×d)."})
    gate_dropout: float = field(default=0.1, metadata={"help": "Dropout on the gate's two layers."})
    gate_learning_rate: float = field(
        default=1e-3, metadata={"help": "Learning rate of the gate (the reference code's effective value)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA/DoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA/DoRA/AdaLoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; default from the table keyed by config.model_type."}
    )
    feedforward_modules: list[str] | None = field(default=None, metadata={"help": "(IA)3 feed-forward modules."})
    adalora_init_r: int = field(default=12, metadata={"help": "AdaLoRA initial rank per module."})
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA average target rank."})
    adalora_tinit: int = field(default=0, metadata={"help": "AdaLoRA steps before pruning starts."})
    adalora_tfinal: int = field(default=0, metadata={"help": "AdaLoRA final fine-tuning steps."})
    adalora_delta_t: int = field(default=1, metadata={"help": "AdaLoRA steps between budget allocations."})
    adalora_orth_reg_weight: float = field(default=0.5, metadata={"help": "AdaLoRA orthogonality penalty."})

    def __post_init__(self) -> None:
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"--peft {self.peft!r}: choose one of {sorted(PEFT_METHODS)}")
        if self.gate not in GATES:
            raise ValueError(f"--gate {self.gate!r}: choose one of {sorted(GATES)}")
        if self.gate_rank < 1:
            raise ValueError("--gate_rank must be at least 1")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError("--gate_dropout must be in [0, 1)")
