"""The Hugging Face Trainer with what IMSM needs on top; DeepSpeed, "auto" config values, schedulers, accumulation,
resume and logging stay the Trainer's.

Written by hand, and why:
- the optimizer: two parameter groups, because the gate has its own learning rate;
- saving: the run folder format (``imsm/run_folder.py``), gathering only trainable weights under ZeRO-3;
- complete checkpoints by construction: the Trainer writes ``checkpoint-N`` in place, and ``COMPLETE`` is written
  into it last (``CheckpointCompletion``, a callback run after the Trainer's whole save), so an interrupted save is
  never resumed from (``output_folder.resumable_checkpoint``) and is removed when training starts again (one whose
  files were damaged after ``COMPLETE`` is skipped too, and moved aside). Rotation (``--save_total_limit``) also
  moves here and counts complete checkpoints only, keeping the best one;
- the final folder built beside ``final/`` and swapped in whole;
- validation (``eval_dataset``): the answer loss and the mean gate, logged as ``eval_loss`` / ``eval_gate_mean``;
- DeepSpeed checkpoints without the frozen backbone (the Trainer only does that for a bare PeftModel) and loading
  a run folder's weights on resume and for ``--load_best_model_at_end`` (the Trainer expects a full model file):
  the only private Trainer methods overridden; ``tests/training/test_train.py`` pins what they rely on;
- the method's own callbacks (``MethodSpec.callbacks``, e.g. AdaLoRA's rank allocation);
- the mean gate value (and the method's logged loss terms, e.g. LoRAMoE's balancing constraint) in the logs;
- what the run cost, written as ``train_stats.json`` into every checkpoint and the final folder: training wall time
  (summed over resumed sessions), optimizer steps, non-padding input tokens seen over all ranks (the Trainer's own
  count), trainable parameters.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from imsm import run_folder
from imsm.atomic import atomic_write_json
from imsm.loader import load_trained_weights, save_run_files
from imsm.run_folder import TRAIN_STATS, RunConfig
from imsm.training import output_folder

logger = logging.getLogger(__name__)


class IMSMTrainer(Trainer):
    def __init__(self, *args, run_config: RunConfig, run_args: dict, gate_learning_rate: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_config, self.run_args, self.gate_learning_rate = run_config, run_args, gate_learning_rate
        # this rank's micro-batch values since the last log, averaged into it: the share of the frozen memory in the
        # mix (training and validation) and the method's logged loss terms (LoRAMoE's balancing constraint)
        self._logged_losses = self.model.method.logged_losses + self.model.logged_terms
        self._since_log: dict[str, list[float]] = {"gate_mean": [], "eval_gate_mean": [],
                                                   **{name: [] for name in self._logged_losses}}
        # rotation counts complete checkpoints only, so it runs after COMPLETE is written (CheckpointCompletion)
        self.keep_checkpoints, self.args.save_total_limit = self.args.save_total_limit, None
        self.add_callback(CheckpointCompletion(self))
        self._seconds_before = 0.0  # wall time of earlier sessions of a resumed run
        self._started: float | None = None
        self._ended: float | None = None
        self._trainable = sum(getattr(p, "ds_numel", p.numel()) for group in
                              self.model.trainable_parameters().values() for _, p in group)
        if self.args.include_num_input_tokens_seen in ("no", False):
            self.args.include_num_input_tokens_seen = "non_padding"
        for callback in self.model.method.callbacks(self):
            self.add_callback(callback)

    # ---- optimisation -------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        trainable = self.accelerator.unwrap_model(model).trainable_parameters()
        adapter, gate = ([p for _, p in trainable[group]] for group in ("adapter", "gate"))
        groups = [{"params": adapter, "weight_decay": self.args.weight_decay}]
        if gate:
            groups.append({"params": gate, "weight_decay": self.args.weight_decay, "lr": self.gate_learning_rate})
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        if self._offloads_optimizer() and optimizer_cls.__name__ == "AdamW":
            # ZeRO-Offload steps on the CPU and asks for DeepSpeed's vectorised CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(groups, lr=kwargs["lr"], betas=kwargs.get("betas", (0.9, 0.999)),
                                              eps=kwargs.get("eps", 1e-8), adamw_mode=True)
        else:
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _offloads_optimizer(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            return False
        device = plugin.hf_ds_config.config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
        return device in ("cpu", "nvme")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._since_log["gate_mean" if model.training else "eval_gate_mean"].append(float(outputs["gate_mean"]))
        for name in self._logged_losses if model.training else ():
            if name in outputs:
                self._since_log[name].append(float(outputs[name].detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for key, values in self._since_log.items():
            if values and ("eval_loss" if key.startswith("eval_") else "loss") in logs:
                logs[key] = round(sum(values) / len(values), 6 if key in self._logged_losses else 4)
                values.clear()
        super().log(logs, *args, **kwargs)

    # ---- cost ---------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str) and (Path(resume_from_checkpoint) / TRAIN_STATS).is_file():
            previous = json.loads((Path(resume_from_checkpoint) / TRAIN_STATS).read_text())
            self._seconds_before = float(previous.get("train_runtime_s", 0.0))
        self._started, self._ended = time.monotonic(), None
        if self.args.should_save:
            output_folder.remove_incomplete_checkpoints(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._ended = time.monotonic()

    def train_stats(self) -> dict:
        """What the run cost so far (see the module docstring)."""
        now = self._ended if self._ended is not None else time.monotonic()
        session = now - self._started if self._started is not None else 0.0
        return {
            "train_runtime_s": round(self._seconds_before + session, 3),
            "optimizer_steps": self.state.global_step,
            "tokens_seen": int(self.state.num_input_tokens_seen),
            "tokens_counted": self.args.include_num_input_tokens_seen,
            "trainable_parameters": int(self._trainable),
            "world_size": self.args.world_size,
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
        }

    # ---- saving -------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the run folder. A checkpoint's is written in place (``COMPLETE`` follows once the Trainer has saved
        the rest); any other folder is built beside ``output_dir``, marked complete and swapped in whole."""
        output_dir = Path(output_dir or self.args.output_dir)
        is_main = self.args.should_save
        unwrapped = self.accelerator.unwrap_model(self.model)
        target = output_dir if _internal_call else run_folder.staging_dir(output_dir)
        if not _internal_call:
            if is_main and target.exists():  # an interrupted save's leftover must not lend stale files
                shutil.rmtree(target)
            self.accelerator.wait_for_everyone()
        save_run_files(unwrapped, target, self.run_config, self.run_args, is_main)
        if self.processing_class is not None and is_main:
            self.processing_class.save_pretrained(str(target))
        if is_main:
            atomic_write_json(target / TRAIN_STATS, self.train_stats())
        if not _internal_call:
            self.accelerator.wait_for_everyone()
            if is_main:
                run_folder.mark_complete(target, self.state.global_step)
                output_folder.replace_final(target, output_dir)
            self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The Trainer looks for full model weights; a checkpoint holds the adapter and the gate only.
        load_trained_weights(self.accelerator.unwrap_model(self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # the engine's own checkpoint (frozen backbone excluded) holds the weights
            return super()._load_best_model()
        logger.info("loading the best checkpoint %s (%s %s)", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        load_trained_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The frozen backbone comes from the pretrained weights, so DeepSpeed need not write it into every checkpoint
        # (IMSMModel.load_state_dict accepts its absence on resume); the rest is the Trainer's own logic.
        engine = self.model_wrapped
        engine.save_checkpoint = functools.partial(type(engine).save_checkpoint, engine,
                                                   exclude_frozen_parameters=True)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint


class CheckpointCompletion(TrainerCallback):
    """After the Trainer has written all of ``checkpoint-N`` (run files, optimizer, scheduler, RNG, trainer state) on
    every rank: write ``COMPLETE`` into it, then rotate among complete checkpoints (``--save_total_limit``)."""

    def __init__(self, trainer: IMSMTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            run_folder.mark_complete(folder, state.global_step)
            output_folder.rotate_checkpoints(args.output_dir, trainer.keep_checkpoints, state.best_model_checkpoint)
        trainer.accelerator.wait_for_everyone()

