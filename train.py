"""Fine-tune a causal LM with IMSM (or its vanilla PEFT baseline, ``--gate none``) under DeepSpeed ZeRO.

    deepspeed train.py --deepspeed ds_configs/zero2.json --model_name_or_path meta-llama/Llama-2-7b-hf \
        --peft lora --gate query_aware --train_file data/gsm8k/train.jsonl --output_dir runs/imsm_lora_gsm8k \
        --bf16 --num_train_epochs 3 --per_device_train_batch_size 2 --gradient_accumulation_steps 1

Without ``--model_name_or_path`` the embedded SmolLM2-135M-Instruct is used. ``--resume_from_checkpoint latest``
continues from the newest complete checkpoint in ``--output_dir`` whose files are whole; a run that already reached
its last step is not trained again, only its ``final/`` brought up to that step. ``--eval_file`` (or
``--validation_fraction``) scores held-out examples every ``--eval_steps``. The final run folder is
``OUTPUT_DIR/final`` (its format: ``imsm/run_folder.py``). ``--output_dir`` must be new, empty or an earlier
train.py output (marked ``imsm_output.json``); options and data are checked before the model loads. One train.py
at a time per ``--output_dir``: a second one refuses at once, naming the folder and the first one's PID
(``.imsm_train.lock``, an flock released when the first one ends, however it ends; removed when it ends normally).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path

import torch
import transformers
from transformers import IntervalStrategy, TrainingArguments, set_seed

from imsm import run_folder
from imsm.args import DataArguments, ImsmArguments, ModelArguments, parse_train_args
from imsm.data import (
    WORLD_KNOWLEDGE,
    SupervisedCollator,
    SupervisedDataset,
    examples_by_type,
    read_jsonl,
    split_validation,
)
from imsm.distributed import configure_cpu_deepspeed
from imsm.loader import build_imsm_model, load_backbone, make_run_config
from imsm.locks import holder, release, try_lock
from imsm.templates import build_template
from imsm.training import output_folder
from imsm.training.frozen_cache import (
    FINGERPRINT,
    LOCK_FILE,
    FlushFrozenCache,
    cache_fingerprint,
    check_cache_dir,
    file_sha256,
    open_frozen_cache,
)
from imsm.training.trainer import IMSMTrainer

logger = logging.getLogger("train")
OUTPUT_LOCK = ".imsm_train.lock"  # held by the saving process of the train.py that uses --output_dir


def setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(level)


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: ``latest`` is the newest complete one whose files are whole (a damaged one is
    skipped with a warning; None when there is none yet); a named checkpoint must be complete and whole."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    if resume == "latest":
        last = output_folder.resumable_checkpoint(training_args.output_dir)
        if last is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh",
                           training_args.output_dir)
        return None if last is None else str(last)
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    if not run_folder.is_complete(resume):
        raise ValueError(f"--resume_from_checkpoint {resume}: an interrupted checkpoint (no {run_folder.COMPLETE}); "
                         "resume from an earlier one or from latest")
    if (problem := run_folder.damage(resume)) is not None:
        raise ValueError(f"--resume_from_checkpoint {resume}: a damaged checkpoint ({problem}); resume from an "
                         "earlier one or from latest")
    return resume


def check_before_loading(data_args: DataArguments, imsm_args: ImsmArguments, training_args: TrainingArguments) -> None:
    """What can fail without the model fails before it loads and before anything is written: the options' values,
    the data files parse, the cache folder can be one."""
    if data_args.train_file is None:
        raise ValueError("--train_file is required (JSONL with 'input' and 'output')")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs {training_args.num_train_epochs:g}: nothing would be trained; give a "
                         "positive number of epochs (or --max_steps)")
    for option in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, option) < 1:
            raise ValueError(f"--{option} {getattr(training_args, option)}: must be at least 1")
    for option, value in (("learning_rate", training_args.learning_rate),
                          ("gate_learning_rate", imsm_args.gate_learning_rate)):
        if value < 0:
            raise ValueError(f"--{option} {value:g}: a learning rate cannot be negative")
    if training_args.load_best_model_at_end and data_args.eval_file is None and not data_args.validation_fraction:
        raise ValueError("--load_best_model_at_end needs validation data: --eval_file or --validation_fraction")
    check_cache_dir(imsm_args.frozen_memory_cache, training_args.output_dir)
    read_jsonl(data_args.train_file)
    if data_args.knowledge_file is not None:
        read_jsonl(data_args.knowledge_file, only_type=WORLD_KNOWLEDGE)
    if data_args.eval_file is not None:
        read_jsonl(data_args.eval_file)


def already_finished(resume: str | None, training_args: TrainingArguments) -> bool:
    """A resumed run whose checkpoint reached the last step is not trained again; ``final/`` is brought up to that
    step when it is missing or older (a kill while it was written), and nothing else changes."""
    if resume is None or not output_folder.finished_checkpoint(resume, training_args.max_steps,
                                                            training_args.num_train_epochs):
        return False
    final = Path(training_args.output_dir) / "final"
    if training_args.should_save:
        best = output_folder.best_checkpoint(resume) if training_args.load_best_model_at_end else None
        done = output_folder.bring_final_up_to_date(resume, final, best)
        if done is not None:
            logger.warning("%s already reached the last step: %s", resume, done)
            return True
    logger.info("%s already reached the last step and %s holds it: nothing to train", resume, final)
    return True


def optimizer_steps(n_examples: int, training_args: TrainingArguments) -> int:
    if training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.per_device_train_batch_size * training_args.world_size
    batches = math.ceil(n_examples / per_step)
    return max(1, batches // training_args.gradient_accumulation_steps) * math.ceil(training_args.num_train_epochs)


def configure_validation(training_args: TrainingArguments, n_examples: int) -> None:
    """Score the held-out examples every ``--eval_steps`` (default: every logging step) unless another evaluation
    strategy was asked for; only the loss is computed (no logits are gathered)."""
    if training_args.eval_strategy == IntervalStrategy.NO:
        training_args.eval_strategy = IntervalStrategy.STEPS
        training_args.eval_steps = training_args.eval_steps or training_args.logging_steps
    training_args.prediction_loss_only = True
    logger.info("validation: %d examples, %s every %s", n_examples, training_args.eval_strategy.value,
                training_args.eval_steps if training_args.eval_strategy == IntervalStrategy.STEPS else "epoch")


def knowledge_fingerprint(mix: dict) -> dict:
    """What the knowledge rows add to the frozen-memory cache's key (their examples follow the task file's)."""
    if "knowledge_file" not in mix:
        return {}
    return {"knowledge_file_sha256": file_sha256(mix["knowledge_file"]), "knowledge_rows": mix["knowledge_rows_taken"]}


def main(argv: list[str] | None = None) -> IMSMTrainer | None:
    argv = configure_cpu_deepspeed(sys.argv[1:] if argv is None else argv)
    model_args, data_args, imsm_args, training_args = parse_train_args(argv)
    setup_logging(training_args)
    check_before_loading(data_args, imsm_args, training_args)
    # the processes that save claim the folder and lock it; the others never write into it
    created = output_folder.claim_output_dir(training_args.output_dir) if training_args.should_save else []
    lock = lock_output_dir(training_args.output_dir) if training_args.should_save else None
    try:
        return run_training(model_args, data_args, imsm_args, training_args)
    except BaseException:
        # a start that failed leaves no --output_dir of its own behind that holds nothing (a cache with no shard yet)
        output_folder.remove_if_unused(created, disposable=(FINGERPRINT, LOCK_FILE, OUTPUT_LOCK))
        raise
    finally:
        release(lock, Path(training_args.output_dir) / OUTPUT_LOCK)


def lock_output_dir(output_dir: str) -> int:
    """Hold ``OUTPUT_LOCK`` for this run; another train.py on the same folder (deleting its interrupted checkpoints,
    replacing its final/) is refused at once, with its PID."""
    path = Path(output_dir) / OUTPUT_LOCK
    fd = try_lock(path)
    if fd is None:
        raise RuntimeError(f"--output_dir {output_dir} is in use by another train.py ({holder(path)}); wait for it "
                           "to end or choose another folder")
    return fd


def run_training(model_args: ModelArguments, data_args: DataArguments, imsm_args: ImsmArguments,
                 training_args: TrainingArguments) -> IMSMTrainer | None:
    """Resume or start, build the model and the data, train, save ``final/``."""
    resume = resolve_resume(training_args)
    if already_finished(resume, training_args):
        return None
    set_seed(training_args.seed)

    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    backbone, tokenizer, model_path = load_backbone(
        model_args.model_name_or_path, dtype, model_args.attn_implementation, model_args.trust_remote_code
    )
    template = build_template(data_args.prompt_template, tokenizer, data_args.system_prompt)
    dataset = SupervisedDataset(data_args.train_file, template, data_args.max_input_length,
                                data_args.max_output_length, data_args.max_train_examples, data_args.knowledge_file,
                                data_args.knowledge_examples, data_args.knowledge_share)
    mix = dataset.mix
    eval_dataset = None
    if data_args.eval_file is not None:
        eval_dataset = SupervisedDataset(data_args.eval_file, template, data_args.max_input_length,
                                         data_args.max_output_length)
    elif data_args.validation_fraction:
        dataset, eval_dataset = split_validation(dataset, data_args.validation_fraction, training_args.data_seed
                                                 if training_args.data_seed is not None else training_args.seed)
    if eval_dataset is not None:
        configure_validation(training_args, len(eval_dataset))
    mix["trained_examples_by_type"] = examples_by_type(dataset)  # after any validation split

    cache = open_frozen_cache(imsm_args.frozen_memory_cache, training_args.output_dir, dataset, backbone.config,
                              cache_fingerprint(model_path, backbone.config, dtype, data_args.prompt_template,
                                                data_args.system_prompt, data_args.max_input_length,
                                                data_args.max_output_length, data_args.train_file)
                              | knowledge_fingerprint(mix))
    model = build_imsm_model(backbone, imsm_args, total_steps=optimizer_steps(len(dataset), training_args),
                             template=template, max_input_length=data_args.max_input_length, frozen_cache=cache)
    counts = {group: sum(getattr(p, "ds_numel", p.numel()) for _, p in named)
              for group, named in model.trainable_parameters().items()}
    logger.info("trainable parameters: adapter %d, gate %d (%s gate, %s)", counts["adapter"], counts["gate"],
                imsm_args.gate, imsm_args.peft)

    config = make_run_config(imsm_args, data_args, model_path, backbone.config.hidden_size)
    run_args = {k: v for a in (model_args, data_args, imsm_args, imsm_args.options)
                for k, v in dataclasses.asdict(a).items() if k != "options"}
    run_args |= {"training": training_args.to_dict(), "resolved_model_path": model_path, "training_mix": mix}
    training_args.remove_unused_columns = False  # query_mask is ours, not a backbone forward argument
    trainer = IMSMTrainer(
        model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=SupervisedCollator(tokenizer.pad_token_id), run_config=config, run_args=run_args,
        gate_learning_rate=imsm_args.gate_learning_rate,
        callbacks=None if cache is None else [FlushFrozenCache(cache)],
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if cache is not None:
            cache.release_lock()  # a failure inside this process (the end of the process releases it anyway)
    final_dir = f"{training_args.output_dir}/final"
    trainer.save_model(final_dir)
    logger.info("saved the run folder %s", final_dir)
    return trainer


if __name__ == "__main__":
    main()
