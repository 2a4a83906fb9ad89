"""Command-line arguments, split by concern and parsed by ``HfArgumentParser`` together with ``TrainingArguments``.

Training arguments (optimizer, learning rate, schedule, epochs, batch, precision, gradient checkpointing, seed,
DeepSpeed config, resume) are the Hugging Face ``TrainingArguments``; the DeepSpeed JSON says "auto" for each of them.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from imsm.method.adapters import LORA_INITS, PEFT_METHODS
from imsm.method.gate import GATES, LowRankGate
from imsm.method.loramoe import LoRAMoEConfig
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
    max_input_length: int = field(
        default=1024, metadata={"help": "Prompt tokens kept: the user's text is cut from the left, the template kept."}
    )
    max_output_length: int = field(
        default=512, metadata={"help": "Answer tokens kept, closing EOS included (a cut answer keeps its EOS)."}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    prompt_template: str = field(default="raw", metadata={"help": f"One of {sorted(TEMPLATES)}."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn for the chat template."})
    eval_file: str | None = field(
        default=None, metadata={"help": "JSONL of validation examples: answer loss and mean gate while training."}
    )
    validation_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this fraction of the training examples (seeded) as validation data."}
    )
    knowledge_file: str | None = field(
        default=None,
        metadata={"help": "JSONL of world-knowledge examples ('input', 'output') mixed into training as type 1 "
                          "(LoRAMoE's sample type); all rows unless --knowledge_examples or --knowledge_share."},
    )
    knowledge_examples: int | None = field(
        default=None, metadata={"help": "Mix in the first N rows of --knowledge_file."}
    )
    knowledge_share: float | None = field(
        default=None,
        metadata={"help": "Mix in the first rows of --knowledge_file that make this fraction of the training set."},
    )

    def __post_init__(self) -> None:
        if self.prompt_template not in TEMPLATES:
            raise ValueError(f"--prompt_template {self.prompt_template!r}: choose one of {sorted(TEMPLATES)}")
        if self.system_prompt and self.prompt_template != "chat":
            raise ValueError("--system_prompt only applies to --prompt_template chat")
        if self.max_input_length < 1 or self.max_output_length < 1:
            raise ValueError("--max_input_length and --max_output_length must be at least 1")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("--validation_fraction must be in [0, 1)")
        if self.validation_fraction and self.eval_file is not None:
            raise ValueError("give --eval_file or --validation_fraction, not both")
        if self.max_output_length < 2:
            raise ValueError(f"--max_output_length {self.max_output_length}: an answer needs one token and its "
                             "closing EOS; use at least 2")
        if (self.knowledge_examples is not None or self.knowledge_share is not None) and self.knowledge_file is None:
            raise ValueError("--knowledge_examples and --knowledge_share need --knowledge_file")
        if self.knowledge_examples is not None and self.knowledge_share is not None:
            raise ValueError("give --knowledge_examples or --knowledge_share, not both")
        if self.knowledge_examples is not None and self.knowledge_examples < 1:
            raise ValueError(f"--knowledge_examples {self.knowledge_examples}: must be at least 1")
        if self.knowledge_share is not None and not 0 < self.knowledge_share < 1:
            raise ValueError(f"--knowledge_share {self.knowledge_share}: must be in (0, 1)")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise ValueError(f"--max_train_examples {self.max_train_examples}: must be at least 1 "
                             "(omit it for every example)")


LORA_FAMILY = ("lora", "dora", "adalora")
TRAINED_GATES = tuple(name for name, gate in GATES.items() if issubclass(gate, LowRankGate))  # gates with weights
MIXING_GATES = tuple(name for name in GATES if name != "none")  # gates that run the frozen pass


# The options that only some methods read: option -> (--peft or --gate, the values that read it). ImsmArguments
# refuses a value other than the default under any other method, so no option is silently ignored. (A table beside
# the dataclass rather than a key in each field's metadata: HfArgumentParser hands the metadata to argparse's
# add_argument, which refuses unknown keys.)
_ADALORA, _LORAMOE, _LORA = ("adalora",), ("loramoe",), ("lora",)
OPTION_APPLIES_TO: dict[str, tuple[str, tuple[str, ...]]] = {
    "gate_rank": ("gate", TRAINED_GATES),
    "gate_dropout": ("gate", TRAINED_GATES),
    "gate_learning_rate": ("gate", TRAINED_GATES),
    "frozen_memory_cache": ("gate", MIXING_GATES),
    "lora_r": ("peft", ("lora", "dora")),
    "lora_alpha": ("peft", LORA_FAMILY),
    "lora_dropout": ("peft", LORA_FAMILY),
    "feedforward_modules": ("peft", ("ia3",)),
    **{f"adalora_{name}": ("peft", _ADALORA)
       for name in ("init_r", "target_r", "tinit", "tfinal", "delta_t", "orth_reg_weight")},
    **{f"loramoe_{name}": ("peft", _LORAMOE) for name in ("num_experts", "r", "alpha", "dropout", "knowledge_experts",
                                                          "balance_weight", "balance_delta")},
    **{name: ("peft", _LORA) for name in ("init_lora_weights", "pissa_niter", "corda_calibration_file",
                                          "corda_calibration_examples", "corda_calibration_skip")},
}


@dataclass
class ImsmArguments:
    """The method: PEFT adapter and gate. Options that only some methods read are listed in ``OPTION_APPLIES_TO``."""

    peft: str = field(default="lora", metadata={"help": f"PEFT method: one of {sorted(PEFT_METHODS)}."})
    gate: str = field(
        default="query_aware",
        metadata={"help": "query_aware (IMSM), token, equal (0.5/0.5) or none (vanilla PEFT)."},
    )
    gate_rank: int = field(
        default=8, metadata={"help": "Rank r of the gate's W_A (k·d×r) and W_B (r×d)."}
    )
    gate_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the output of each of the gate's two layers."}
    )
    gate_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the gate (the reference code's effective value)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA/DoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA/DoRA/AdaLoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; default from the table keyed by config.model_type."}
    )
    feedforward_modules: list[str] | None = field(
        default=None, metadata={"help": "(IA)3 feed-forward modules."}
    )
    adalora_init_r: int = field(default=12, metadata={"help": "AdaLoRA initial rank per module."})
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA average target rank."})
    adalora_tinit: int = field(
        default=0, metadata={"help": "AdaLoRA steps before pruning starts."}
    )
    adalora_tfinal: int = field(default=0, metadata={"help": "AdaLoRA final fine-tuning steps."})
    adalora_delta_t: int = field(
        default=1, metadata={"help": "AdaLoRA steps between budget allocations."}
    )
    adalora_orth_reg_weight: float = field(
        default=0.5, metadata={"help": "AdaLoRA orthogonality penalty."}
    )
    # LoRAMoE defaults: the authors' public launcher (Ablustrund/LoRAMoE run_loramoe.sh, variable named per line)
    loramoe_num_experts: int = field(
        default=8, metadata={"help": "LoRAMoE experts per adapted layer (run_loramoe.sh: lora_nums=8)."}
    )
    loramoe_r: int = field(default=4, metadata={"help": "LoRAMoE rank of each expert (run_loramoe.sh: lora_rank=4)."})
    loramoe_alpha: float = field(
        default=32.0, metadata={"help": "LoRAMoE scale numerator, scaling alpha / r (run_loramoe.sh: lora_alpha=32)."}
    )
    loramoe_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the LoRAMoE experts' input, one mask per expert "
                          "(run_loramoe.sh: lora_dropout=0.05)."},
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
    init_lora_weights: str = field(
        default="default",
        metadata={"help": f"LoRA initialisation: one of {sorted(LORA_INITS)}; pissa and corda rewrite the base "
                          "weights, so they need --gate none."},
    )
    pissa_niter: int | None = field(
        default=None,
        metadata={"help": "PiSSA: randomized SVD with this many subspace iterations (default: exact)."},
    )
    corda_calibration_file: str | None = field(
        default=None,
        metadata={"help": "CorDA: JSONL of general-domain prompts ('input') for the calibration pass."},
    )
    corda_calibration_examples: int = field(
        default=256, metadata={"help": "CorDA: calibration prompts used."}
    )
    corda_calibration_skip: int = field(
        default=0,
        metadata={"help": "CorDA: rows of the calibration file skipped before the ones used."},
    )
    frozen_memory_cache: str = field(
        default="off",
        metadata={"help": "Keep q_M and the answer-position h_M after the first epoch and skip the frozen pass in "
                          "later ones: off, on (OUTPUT_DIR/frozen_memory_cache) or a folder; pays from 2 epochs."},
    )

    def __post_init__(self) -> None:
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"--peft {self.peft!r}: choose one of {sorted(PEFT_METHODS)}")
        if self.gate not in GATES:
            raise ValueError(f"--gate {self.gate!r}: choose one of {sorted(GATES)}")
        if self.gate_rank < 1:
            raise ValueError("--gate_rank must be at least 1")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError("--gate_dropout must be in [0, 1)")
        self._check_options_apply()
        if self.peft == "loramoe":
            LoRAMoEConfig(  # checks the LoRAMoE options; the target modules come later, from the model
                target_modules=["*"], num_experts=self.loramoe_num_experts, r=self.loramoe_r,
                alpha=self.loramoe_alpha, dropout=self.loramoe_dropout,
                knowledge_experts=self.loramoe_knowledge_experts, balance_weight=self.loramoe_balance_weight,
                balance_delta=self.loramoe_balance_delta,
            )
        self._check_lora_init()

    def _check_options_apply(self) -> None:
        """Refuse a non-default value of an option that the chosen --peft or --gate does not read
        (``OPTION_APPLIES_TO``), naming every such option at once."""
        misplaced = []
        for f in fields(self):
            if f.name not in OPTION_APPLIES_TO:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            kind, readers = OPTION_APPLIES_TO[f.name]
            if getattr(self, f.name) != default and getattr(self, kind) not in readers:
                misplaced.append(f"--{f.name} only applies to --{kind} {'/'.join(readers)}")
        if misplaced:
            raise ValueError(f"--peft {self.peft} --gate {self.gate} would ignore these options: "
                             f"{'; '.join(misplaced)}. Remove them or choose the method they belong to")

    def _check_lora_init(self) -> None:
        if self.init_lora_weights not in LORA_INITS:
            raise ValueError(f"--init_lora_weights {self.init_lora_weights!r}: choose one of {sorted(LORA_INITS)}")
        if self.init_lora_weights != "default" and self.gate != "none":  # (--peft lora: OPTION_APPLIES_TO)
            raise ValueError(
                f"--init_lora_weights {self.init_lora_weights} cannot be combined with the IMSM gate "
                f"(--gate {self.gate}): it moves the top singular directions of each target weight into the "
                "adapter and leaves the residual in the base layer, so the model with the adapter disabled is "
                "no longer the pretrained model and the frozen memory would be wrong; use --gate none"
            )
        if (self.init_lora_weights == "corda") != (self.corda_calibration_file is not None):
            raise ValueError("--init_lora_weights corda needs --corda_calibration_file, and that file is only used "
                             "by corda")
        if self.corda_calibration_examples < 1 or self.corda_calibration_skip < 0:
            raise ValueError("--corda_calibration_examples must be at least 1 and --corda_calibration_skip >= 0")
        if self.pissa_niter is not None and (self.init_lora_weights != "pissa" or self.pissa_niter < 1):
            raise ValueError("--pissa_niter (at least 1) only applies to --init_lora_weights pissa")
