"""The Hugging Face Trainer with what IMSM needs on top; DeepSpeed, "auto" config values, schedulers, accumulation,
resume and logging stay the Trainer's.

Written by hand, and why:
- the optimizer: two parameter groups, because the gate has its own learning rate;
- saving: the run folder format (adapter + gate + settings), gathering only trainable weights under ZeRO-3, and
  checkpoints built in a staging folder and renamed when complete, so a crash mid-save leaves the previous checkpoint
  as the latest usable one (the Trainer writes ``checkpoint-N`` in place);
- DeepSpeed checkpoints without the frozen backbone (the Trainer only does that for a bare PeftModel);
- AdaLoRA's ``update_and_allocate`` after every optimizer step, reading gradients that DeepSpeed keeps partitioned;
- the mean gate value (and LoRAMoE's balancing constraint) in the logs;
- what the run cost, written as ``train_stats.json`` into every checkpoint and the final folder: training wall time
  (summed over resumed sessions), optimizer steps, non-padding input tokens seen over all ranks (the Trainer's own
  count), trainable parameters.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from imsm.atomic import atomic_write_json, replace_dir
from imsm.loader import TRAIN_STATS, load_trained_weights
from imsm.method.gate import GATE_PARAM_PREFIX
from imsm.training.checkpoint import save_run_files

logger = logging.getLogger(__name__)
STAGING = ".staging"


class IMSMTrainer(Trainer):
    def __init__(self, *args, imsm_settings: dict, run_args: dict, gate_learning_rate: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.imsm_settings, self.run_args, self.gate_learning_rate = imsm_settings, run_args, gate_learning_rate
        self._gate_values: list[float] = []
        self._balance_values: list[float] = []  # LoRAMoE's balancing constraint
        self._staging = False
        self._seconds_before = 0.0  # wall time of earlier sessions of a resumed run
        self._started: float | None = None
        self._ended: float | None = None
        self._trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        if self.args.include_num_input_tokens_seen in ("no", False):
            self.args.include_num_input_tokens_seen = "non_padding"
        if imsm_settings["peft"] == "adalora":
            self.add_callback(AdaLoraAllocator(self))

    # ---- optimisation -------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        adapter = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(GATE_PARAM_PREFIX)]
        gate = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(GATE_PARAM_PREFIX)]
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
        if model.training:
            self._gate_values.append(float(outputs["gate_mean"]))
            if "balance_loss" in outputs:
                self._balance_values.append(float(outputs["balance_loss"]))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._gate_values:
            # This rank's micro-batches since the last log: the share of the frozen memory in the mix.
            logs["gate_mean"] = round(sum(self._gate_values) / len(self._gate_values), 4)
            self._gate_values.clear()
        if "loss" in logs and self._balance_values:
            logs["balance_loss"] = round(sum(self._balance_values) / len(self._balance_values), 6)
            self._balance_values.clear()
        super().log(logs, *args, **kwargs)

    # ---- cost ---------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str) and (Path(resume_from_checkpoint) / TRAIN_STATS).is_file():
            previous = json.loads((Path(resume_from_checkpoint) / TRAIN_STATS).read_text())
            self._seconds_before = float(previous.get("train_runtime_s", 0.0))
        self._started, self._ended = time.monotonic(), None
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
        """Write the run folder; outside checkpoints it is built beside ``output_dir`` and swapped in whole."""
        output_dir = Path(output_dir or self.args.output_dir)
        is_main = self.args.should_save
        unwrapped = self.accelerator.unwrap_model(self.model)
        target = output_dir if _internal_call else output_dir.with_name(f".{output_dir.name}.staging")
        if not _internal_call:
            self._clear_leftover(target)
        save_run_files(unwrapped, target, self.imsm_settings, self.run_args, is_main)
        if self.processing_class is not None and is_main:
            self.processing_class.save_pretrained(str(target))
        if is_main:
            atomic_write_json(target / TRAIN_STATS, self.train_stats())
        if not _internal_call:
            self.accelerator.wait_for_everyone()
            if is_main:
                replace_dir(target, output_dir)
            self.accelerator.wait_for_everyone()

    def _clear_leftover(self, staging: Path) -> None:
        """A staging folder left by an interrupted save must not lend stale files to the new one."""
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The Trainer looks for full model weights; a checkpoint holds the adapter and the gate only.
        load_trained_weights(self.accelerator.unwrap_model(self.model), resume_from_checkpoint)

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

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Build ``checkpoint-N`` under ``.staging/``, rename it into place once complete, then rotate."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._clear_leftover(Path(run_dir) / STAGING / name)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_dir(os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name))
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(run_dir, STAGING))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


class AdaLoraAllocator(TrainerCallback):
    """Runs AdaLoRA's ``update_and_allocate`` after every optimizer step, while the gradients still exist.

    Without DeepSpeed that is the Trainer's ``on_optimizer_step``. Under DeepSpeed the engine steps (and clears the
    gradients) inside ``backward``, and ZeRO keeps gradients and fp32 weights partitioned, so the engine's ``step``
    is wrapped: gather the adapter's full gradients, step, allocate on full tensors, write the masked weights back to
    the fp32 master copy.
    """

    def __init__(self, trainer: IMSMTrainer) -> None:
        self.trainer = trainer
        self.wrapped = False

    def _peft(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model).peft_model

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled and not self.wrapped:
            self._wrap_engine(self.trainer.model_wrapped)
            self.wrapped = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer.is_deepspeed_enabled:
            self._peft().base_model.update_and_allocate(state.global_step)

    def _wrap_engine(self, engine) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param

        if engine.zero_optimization_stage() == 3:
            raise ValueError("AdaLoRA's rank allocation needs full adapter weights each step; use ZeRO-0/1/2")
        params = [(n, p) for n, p in self._peft().named_parameters() if "lora_" in n and p.requires_grad]
        real_step = engine.step
        trainer = self.trainer

        def step(*a, **kw):
            boundary = engine.is_gradient_accumulation_boundary()
            grads = [safe_get_full_grad(p) for _, p in params] if boundary else None
            result = real_step(*a, **kw)
            if boundary:
                for (_, p), g in zip(params, grads, strict=True):
                    p.grad = g.to(p.dtype)  # DeepSpeed hands back fp32 gradients for bf16/fp16 weights
                self._peft().base_model.update_and_allocate(trainer.state.global_step)
                for _, p in params:
                    p.grad = None
                    safe_set_full_fp32_param(p, p.data.float())
            return result

        engine.step = step
