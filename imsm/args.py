"""Command-line arguments, split by concern and parsed by ``HfArgumentParser`` together with ``TrainingArguments``
and the chosen PEFT method's own options class (``parse_train_args``).

Training arguments (optimizer, learning rate, schedule, epochs, batch, precision, gradient checkpointing, seed,
DeepSpeed config, resume) are the Hugging Face ``TrainingArguments``; the DeepSpeed JSON says "auto" for each of them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from imsm.method.adapters import METHODS, MethodSpec, get_method, methods_reading
from imsm.method.gate import GATES, LowRankGate
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
        metadata={"help": "Replay, any method: JSONL of general / world-knowledge examples ('input', 'output') mixed "
                          "into training as type 1 (LoRAMoE's sample type); all rows unless --knowledge_examples or "
                          "--knowledge_share."},
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


TRAINED_GATES = tuple(name for name, gate in GATES.items() if issubclass(gate, LowRankGate))  # gates with weights
MIXING_GATES = tuple(name for name in GATES if name != "none")  # gates that run the frozen pass
# Options that only some gates read: option -> the gates that read it. ImsmArguments refuses a value other than the
# default under any other gate. (The PEFT methods' own options are not here: each method parses only its own,
# ``imsm/method/adapters``.) The frozen-memory cache also serves the KL anchor, under any gate.
GATE_OPTIONS: dict[str, tuple[str, ...]] = {
    "gate_rank": TRAINED_GATES,
    "gate_dropout": TRAINED_GATES,
    "gate_learning_rate": TRAINED_GATES,
    "frozen_memory_cache": MIXING_GATES,
}


@dataclass
class ImsmArguments:
    """The method: PEFT adapter and gate. The chosen method's own options are ``options`` (its ``options_class``,
    parsed beside this class by ``parse_train_args``, or given to ``ImsmArguments.create``)."""

    peft: str = field(default="lora", metadata={"help": f"PEFT method: one of {sorted(METHODS)}."})
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
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; default from the method's table keyed by "
                                        "config.model_type."}
    )
    frozen_memory_cache: str = field(
        default="off",
        metadata={"help": "Keep q_M and the answer-position h_M after the first epoch and skip the frozen pass in "
                          "later ones: off, on (OUTPUT_DIR/frozen_memory_cache) or a folder; pays from 2 epochs. "
                          "Needs a mixing gate or --kl_anchor."},
    )
    kl_anchor: float = field(
        default=0.0,
        metadata={"help": "β of the KL anchor: loss += β · mean over answer tokens of KL(frozen ‖ tuned), the frozen "
                          "model's next-token distribution from the frozen pass (any method, any gate; 0 = off; "
                          "ASFT uses 0.1). See docs/training.md."},
    )
    eaft: bool = field(
        default=False,
        metadata={"help": "Entropy-adaptive fine-tuning: weight each answer token's cross-entropy by "
                          "(top-k entropy / ln k)^α of the model's own prediction."},
    )
    eaft_alpha: float = field(default=1.0, metadata={"help": "EAFT: the exponent α of the entropy weight."})
    eaft_topk: int = field(default=20, metadata={"help": "EAFT: the k largest logits the entropy is taken over."})
    options: Any = field(default=None, init=False)  # the method's options (not a command-line argument)

    def __post_init__(self) -> None:
        get_method(self.peft)
        if self.gate not in GATES:
            raise ValueError(f"--gate {self.gate!r}: choose one of {sorted(GATES)}")
        if self.gate_rank < 1:
            raise ValueError("--gate_rank must be at least 1")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError("--gate_dropout must be in [0, 1)")
        if self.kl_anchor < 0:
            raise ValueError(f"--kl_anchor {self.kl_anchor:g}: β must be >= 0 (0 switches the anchor off)")
        if self.eaft_alpha < 0 or self.eaft_topk < 2:
            raise ValueError(f"--eaft_alpha {self.eaft_alpha:g} / --eaft_topk {self.eaft_topk}: α must be >= 0 and "
                             "k at least 2 (the entropy of one logit is 0)")
        if not self.eaft and (self.eaft_alpha, self.eaft_topk) != (1.0, 20):
            raise ValueError("--eaft_alpha and --eaft_topk only apply with --eaft")
        misplaced = []
        for f in fields(self):
            if f.name == "frozen_memory_cache" and self.kl_anchor > 0:
                continue  # the anchor reads h_M under any gate
            if f.name in GATE_OPTIONS and getattr(self, f.name) != f.default and self.gate not in GATE_OPTIONS[f.name]:
                misplaced.append(f"--{f.name} only applies to --gate {'/'.join(GATE_OPTIONS[f.name])}"
                                 + (" or with --kl_anchor" if f.name == "frozen_memory_cache" else ""))
        if misplaced:
            raise ValueError(f"--gate {self.gate} would ignore these options: {'; '.join(misplaced)}. Remove them or "
                             "choose the gate they belong to")

    @property
    def eaft_setting(self) -> tuple[float, int] | None:
        """(α, k) when EAFT is on, for ``IMSMModel(eaft=...)``."""
        return (self.eaft_alpha, self.eaft_topk) if self.eaft else None

    @property
    def method(self) -> MethodSpec:
        return get_method(self.peft)

    def set_options(self, options: Any) -> ImsmArguments:
        """Attach the method's parsed options and check them against the gate."""
        if not isinstance(options, self.method.options_class):
            raise TypeError(f"--peft {self.peft} takes {self.method.options_class.__name__}, not "
                            f"{type(options).__name__}")
        self.method.check(options, self.gate)
        self.options = options
        return self

    @classmethod
    def create(cls, **kwargs: Any) -> ImsmArguments:
        """From keyword arguments as on the command line (``peft="lora", lora_r=8, gate_rank=4``): the method's own
        options go to its options class; an option of another method is refused, naming the method that reads it."""
        own = {f.name for f in fields(cls) if f.init}
        args = cls(**{k: v for k, v in kwargs.items() if k in own})
        rest = {k: v for k, v in kwargs.items() if k not in own}
        refuse_foreign_options([k for k in rest if k not in args.method.option_names()], args.peft)
        return args.set_options(args.method.options_class(**rest))


def refuse_foreign_options(names: list[str], peft: str) -> None:
    """Raise for option names (without ``--``) that ``--peft peft`` does not read, each with the methods that do."""
    if not names:
        return
    reasons = []
    for name in names:
        readers = methods_reading(name)
        reasons.append(f"--{name} is an option of --peft {'/'.join(readers)}" if readers
                       else f"--{name} is not an option")
    raise ValueError(f"--peft {peft} does not read {', '.join('--' + n for n in names)}: {'; '.join(reasons)}. "
                     "Remove them or choose the method they belong to")


def parse_train_args(argv: list[str]):
    """(ModelArguments, DataArguments, ImsmArguments with its method's options, TrainingArguments) from argv.

    Two steps: ``--peft`` first, then the shared dataclasses together with that method's options class, so
    ``--help`` lists the chosen method's options and an option of another method is an error that names it."""
    from transformers import HfArgumentParser, TrainingArguments

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--peft", default=ImsmArguments.peft)
    peft = pre.parse_known_args(argv)[0].peft
    spec = get_method(peft)
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, ImsmArguments, spec.options_class, TrainingArguments),
        epilog=f"The options of --peft {peft} are listed; for another method's: --peft NAME --help "
               f"(methods: {', '.join(sorted(METHODS))}).")
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    model_args, data_args, imsm_args, options, training_args = parsed
    if rest:
        flags = [r[2:].split("=", 1)[0] for r in rest if r.startswith("--")]
        if flags:
            refuse_foreign_options(flags, peft)
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    imsm_args.set_options(options)
    return model_args, data_args, imsm_args, training_args
