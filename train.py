"""Fine-tune a causal LM with IMSM (or its vanilla PEFT baseline, ``--gate none``) under DeepSpeed ZeRO.

    deepspeed train.py --deepspeed ds_configs/zero2.json --model_name_or_path meta-llama/Llama-2-7b-hf \
        --peft lora --gate query_aware --train_file data/gsm8k/train.jsonl --output_dir runs/imsm_lora_gsm8k \
        --bf16 --num_train_epochs 3 --per_device_train_batch_size 2 --gradient_accumulation_steps 1

Without ``--model_name_or_path`` the embedded SmolLM2-135M-Instruct is used. ``--resume_from_checkpoint latest``
continues from the newest complete checkpoint in ``--output_dir``. The final run folder is ``OUTPUT_DIR/final``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from imsm.args import DataArguments, ImsmArguments, ModelArguments
from imsm.data import SupervisedCollator, SupervisedDataset
from imsm.distributed import configure_cpu_deepspeed
from imsm.loader import build_imsm_model, imsm_settings, load_backbone
from imsm.templates import build_template
from imsm.training.trainer import IMSMTrainer

logger = logging.getLogger("train")


def setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(level)


def resolve_resume(training_args: TrainingArguments) -> str | None:
    resume = training_args.resume_from_checkpoint
    if resume != "latest":
        return resume
    last = get_last_checkpoint(training_args.output_dir)
    if last is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh",
                       training_args.output_dir)
    return last


def optimizer_steps(n_examples: int, training_args: TrainingArguments) -> int:
    if training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.per_device_train_batch_size * training_args.world_size
    batches = math.ceil(n_examples / per_step)
    return max(1, batches // training_args.gradient_accumulation_steps) * math.ceil(training_args.num_train_epochs)


def main(argv: list[str] | None = None) -> IMSMTrainer:
    argv = configure_cpu_deepspeed(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, ImsmArguments, TrainingArguments))
    model_args, data_args, imsm_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    setup_logging(training_args)
    if data_args.train_file is None:
        raise ValueError("--train_file is required (JSONL with 'input' and 'output')")
    set_seed(training_args.seed)

    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    backbone, tokenizer, model_path = load_backbone(
        model_args.model_name_or_path, dtype, model_args.attn_implementation, model_args.trust_remote_code
    )
    template = build_template(data_args.prompt_template, tokenizer, data_args.system_prompt)
    dataset = SupervisedDataset(data_args.train_file, template, data_args.max_input_length,
                                data_args.max_output_length, data_args.max_train_examples)

    model = build_imsm_model(backbone, imsm_args, total_steps=optimizer_steps(len(dataset), training_args),
                             template=template, max_input_length=data_args.max_input_length)
    counts = {"adapter": 0, "gate": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts["gate" if name.startswith("imsm_gate.") else "adapter"] += p.ds_numel if hasattr(p, "ds_numel") \
                else p.numel()
    logger.info("trainable parameters: adapter %d, gate %d (%s gate, %s)", counts["adapter"], counts["gate"],
                imsm_args.gate, imsm_args.peft)

    settings = imsm_settings(imsm_args, data_args, model_path, backbone.config.hidden_size)
    run_args = {k: v for a in (model_args, data_args, imsm_args) for k, v in dataclasses.asdict(a).items()}
    run_args |= {"training": training_args.to_dict(), "resolved_model_path": model_path}
    training_args.remove_unused_columns = False  # query_mask is ours, not a backbone forward argument
    trainer = IMSMTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=SupervisedCollator(tokenizer.pad_token_id), imsm_settings=settings, run_args=run_args,
        gate_learning_rate=imsm_args.gate_learning_rate,
    )
    trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    final_dir = f"{training_args.output_dir}/final"
    trainer.save_model(final_dir)
    logger.info("saved the run folder %s", final_dir)
    return trainer


if __name__ == "__main__":
    main()
