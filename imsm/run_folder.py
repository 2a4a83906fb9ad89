"""The run folder: what a trained run is on disk, owned here alone. Written by training (final folder and every
checkpoint), read by evaluation, the harness model, adapter scaling and resume.

    imsm_config.json            RunConfig: how to rebuild the model (typed, versioned; see FORMAT_VERSION)
    adapter_config.json         the adapter in PEFT's own format (LoRAMoE: loramoe_config.json,
    adapter_model.safetensors   loramoe_model.safetensors)
    gate.safetensors            the gate's tensors (none for the equal and none gates), float32
    run_args.json               every resolved argument of the run, for reproduction
    train_stats.json            what the run cost: wall time, optimizer steps, tokens seen
    tokenizer files
    COMPLETE                    written last; a checkpoint without it was interrupted and is never resumed from

Nothing is pickled. ``validate`` checks a folder without building a model: the config, that every file is present,
that every safetensors file is whole (its header parses and the data it declares is all there) and that the gate's
tensors have the shapes the config implies for a base model of a given hidden size. Every error names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from imsm.atomic import atomic_write_json, atomic_write_text, replace_dir
from imsm.method.gate import GATE_PARAM_PREFIX, GATES
from imsm.method.lora_init import calibration_record, convert_saved_adapter
from imsm.method.loramoe import LORAMOE_CONFIG, LORAMOE_WEIGHTS

logger = logging.getLogger(__name__)

CONFIG_FILE = "imsm_config.json"
GATE_FILE = "gate.safetensors"
RUN_ARGS = "run_args.json"
TRAIN_STATS = "train_stats.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMPLETE = "COMPLETE"
# (config, weights) of a run's adapter by method; every other method is a PEFT adapter folder
ADAPTER_FILES: dict[str, tuple[str, str]] = {"loramoe": (LORAMOE_CONFIG, LORAMOE_WEIGHTS)}
# 1: the first versioned format; folders written before versioning have the same fields and read as 1
FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# what a checkpoint holds beyond the run folder: the Trainer's and DeepSpeed's resume state
RESUME_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", "latest",
                "zero_to_fp32.py", "rng_state.pth")


def adapter_files(peft: str) -> tuple[str, str]:
    return ADAPTER_FILES.get(peft, (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


@dataclass(frozen=True)
class RunConfig:
    """How to rebuild a trained model: base model, method, gate and the prompt format it was trained with."""

    base_model: str
    peft: str
    gate: str
    gate_rank: int
    gate_dropout: float
    hidden_size: int
    prompt_template: str = "raw"
    system_prompt: str | None = None
    init_lora_weights: str = "default"
    calibration: dict | None = None  # CorDA: the calibration file and rows (evaluation skips them)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_args(cls, imsm_args, data_args, model_path: str, hidden_size: int) -> RunConfig:
        return cls(base_model=model_path, peft=imsm_args.peft, gate=imsm_args.gate, gate_rank=imsm_args.gate_rank,
                   gate_dropout=imsm_args.gate_dropout, hidden_size=hidden_size,
                   prompt_template=data_args.prompt_template, system_prompt=data_args.system_prompt,
                   init_lora_weights=imsm_args.init_lora_weights, calibration=calibration_record(imsm_args))

    @property
    def adapter_files(self) -> tuple[str, str]:
        return adapter_files(self.peft)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object, source: str | Path) -> RunConfig:
        """Check types, known keys and the format version; ``source`` names the file in every error."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object")  # noqa: TRY004
        version = raw.get("format_version", 1)
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{source}: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"{source}: run folder format {version} was written by a newer imsm; this one reads up "
                             f"to format {FORMAT_VERSION} (upgrade imsm)")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} for format {version}")
        missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in raw)
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        kinds = {"base_model": str, "peft": str, "gate": str, "gate_rank": int, "gate_dropout": (int, float),
                 "hidden_size": int, "prompt_template": str, "system_prompt": (str, type(None)),
                 "init_lora_weights": str, "calibration": (dict, type(None)), "format_version": int}
        for name, kind in kinds.items():
            if name in raw and (not isinstance(raw[name], kind) or isinstance(raw[name], bool)):
                raise ValueError(f"{source}: {name} has the wrong type ({type(raw[name]).__name__})")
        from imsm.method.adapters import PEFT_METHODS
        from imsm.templates import TEMPLATES

        for name, known in (("peft", PEFT_METHODS), ("gate", GATES), ("prompt_template", TEMPLATES)):
            if name in raw and raw[name] not in known:
                raise ValueError(f"{source}: {name} {raw[name]!r} is not one of {sorted(known)}")
        return cls(**{**raw, "format_version": version})

    @classmethod
    def read(cls, run_dir: str | Path) -> RunConfig:
        path = Path(run_dir) / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
        return cls.from_dict(raw, path)

    def write(self, run_dir: str | Path) -> None:
        atomic_write_json(Path(run_dir) / CONFIG_FILE, self.to_dict())


# ---- reading ------------------------------------------------------------------------------------------------------
def resolve(run: str | Path) -> Path:
    """A run folder: a checkpoint or final folder holding ``imsm_config.json``, or an output folder with ``final/``.

    A ``final/`` whose replacement was interrupted between its two renames is put back first (``recover_final``).
    """
    run = Path(run)
    recover_final(run.parent if run.name == "final" else run)
    for candidate in (run, run / "final"):
        if (candidate / CONFIG_FILE).is_file():
            break
    else:
        raise FileNotFoundError(f"{run}: not an IMSM run folder (no {CONFIG_FILE} here or in {run / 'final'})")
    config = RunConfig.read(candidate)
    for needed in (*config.adapter_files, GATE_FILE):
        if not (candidate / needed).is_file():
            raise FileNotFoundError(f"{candidate}: incomplete run folder, {needed} is missing")
    return candidate


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, read from its header without loading it; raises naming
    the file when the header is unreadable or the file is shorter or longer than its header declares."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header")  # noqa: TRY004
    header.pop("__metadata__", None)
    end, tensors = 0, {}
    try:
        for name, info in header.items():
            end = max(end, int(info["data_offsets"][1]))
            tensors[name] = (str(info["dtype"]), tuple(int(n) for n in info["shape"]))
    except (KeyError, TypeError, IndexError, ValueError):
        raise ValueError(f"{path}: corrupt safetensors header") from None
    if 8 + length + end != size:
        raise ValueError(f"{path}: truncated or corrupt safetensors file: the header declares {8 + length + end} "
                         f"bytes, the file has {size}")
    return tensors


def validate(run_dir: str | Path, hidden_size: int | None = None, model_path: str | None = None) -> RunConfig:
    """Check a run folder without building a model (see the module docstring); returns its config.

    With ``hidden_size``, also that the run fits a base model of that size (``model_path`` names it in errors).
    """
    run_dir = resolve(run_dir)
    config = RunConfig.read(run_dir)
    weights = run_dir / config.adapter_files[1]
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: incomplete run folder, {weights.name} is missing")
    if not safetensors_header(weights):
        raise ValueError(f"{weights}: holds no tensors")
    if hidden_size is not None:
        check_hidden_size(config, run_dir, hidden_size, model_path)
    saved = safetensors_header(run_dir / GATE_FILE)
    expected = GATES[config.gate].parameter_shapes(config.hidden_size, config.gate_rank)
    if set(saved) != set(expected):
        raise ValueError(f"{run_dir / GATE_FILE}: gate tensors {sorted(saved)} do not match the {config.gate} gate's "
                         f"{sorted(expected)}")
    for name, shape in expected.items():
        if saved[name][1] != shape:
            raise ValueError(f"{run_dir / GATE_FILE}: {name} has shape {saved[name][1]}, the {config.gate} gate of "
                             f"rank {config.gate_rank} on hidden size {config.hidden_size} needs {shape}")
    return config


def check_hidden_size(config: RunConfig, run_dir: Path, hidden_size: int, model_path: str | None = None) -> None:
    """The run fits a base model of ``hidden_size`` (``model_path`` names that model in the error)."""
    if config.hidden_size != hidden_size:
        raise ValueError(f"{run_dir / CONFIG_FILE}: the run was trained on hidden size {config.hidden_size}, "
                         f"{model_path or 'the base model'} has {hidden_size}")


def read_train_stats(run: str | Path) -> dict | None:
    """A run's cost (``train_stats.json``); None for runs saved before it was recorded."""
    path = resolve(run) / TRAIN_STATS
    return json.loads(path.read_text()) if path.is_file() else None


# ---- writing ------------------------------------------------------------------------------------------------------
def _gathered(params: list[torch.nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_run_files(model, out_dir: str | Path, config: RunConfig, run_args: dict | None, is_main: bool) -> None:
    """Write the model's files into ``out_dir``; every rank must call this (ZeRO-3 gathers collectively).

    Under ZeRO-3 only the saved parameters are gathered (the Trainer's own DeepSpeed save would consolidate the whole
    16-bit backbone on rank 0 to keep a few MB of it). The caller writes ``COMPLETE`` once everything else is in.
    """
    out_dir = Path(out_dir)
    named = model.saved_parameters()
    with _gathered([p for _, p in named]):
        if not is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        full = {n[len("peft_model."):]: p.detach().cpu().clone() for n, p in named if n.startswith("peft_model.")}
        # save_pretrained picks the adapter's entries out of this (AdaLoRA: cut to the allocated ranks)
        model.peft_model.save_pretrained(str(out_dir), state_dict=full, safe_serialization=True)
        if model.lora_initial_state is not None:
            convert_saved_adapter(out_dir, model.lora_initial_state)
        gate = {n[len(GATE_PARAM_PREFIX):]: p.detach().cpu().float().contiguous().clone()
                for n, p in named if n.startswith(GATE_PARAM_PREFIX)}
        save_file(gate, str(out_dir / GATE_FILE), metadata={"format": "pt", "variant": config.gate})
    config.write(out_dir)
    if run_args is not None:
        atomic_write_json(out_dir / RUN_ARGS, json.loads(json.dumps(run_args, default=str)))


def mark_complete(run_dir: str | Path, step: int | None = None) -> None:
    atomic_write_text(Path(run_dir) / COMPLETE, json.dumps({"global_step": step}) + "\n")


def is_complete(run_dir: str | Path) -> bool:
    """``COMPLETE`` is present, or the folder predates it (a config without ``format_version``: those versions
    renamed a checkpoint into place only once it was whole)."""
    run_dir = Path(run_dir)
    if (run_dir / COMPLETE).is_file():
        return True
    try:
        raw = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and "format_version" not in raw


def finished_checkpoint(checkpoint: str | Path, max_steps: int, num_train_epochs: float) -> bool:
    """Whether a checkpoint already reached the end of the training asked for: ``max_steps`` (when > 0), else the
    step count its own run computed for the same number of epochs."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    if max_steps > 0:
        return state.get("global_step", 0) >= max_steps
    same_epochs = state.get("num_train_epochs") == num_train_epochs
    return same_epochs and state.get("global_step", 0) >= state.get("max_steps", float("inf"))


def finish_from_checkpoint(checkpoint: str | Path, final: str | Path) -> None:
    """Make ``final/`` from a finished checkpoint's run files (no training, no model): copy, mark, swap in."""
    checkpoint, final = Path(checkpoint), Path(final)
    staging = staging_dir(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in RESUME_STATE and not path.name.startswith("rng_state"):
            shutil.copy2(path, staging / path.name)
    mark_complete(staging, json.loads((checkpoint / COMPLETE).read_text()).get("global_step")
                  if (checkpoint / COMPLETE).is_file() else None)
    replace_final(staging, final)


# ---- checkpoints --------------------------------------------------------------------------------------------------
def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` in ``output_dir``, complete or not, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted((step, p) for step, p in found if p.is_dir())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; interrupted ones (no ``COMPLETE``) are never chosen."""
    complete = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete interrupted checkpoints, so a new save of the same step starts from an empty folder."""
    removed = []
    for _, path in checkpoints(output_dir):
        if not is_complete(path):
            logger.warning("%s: removing an interrupted checkpoint (no %s)", path, COMPLETE)
            shutil.rmtree(path)
            removed.append(path)
    return removed


def rotate_checkpoints(output_dir: str | Path, keep: int | None, protect: str | Path | None = None) -> None:
    """Keep the ``keep`` newest complete checkpoints (and ``protect``, the best one); None keeps all."""
    if not keep:
        return
    complete = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    protected = Path(protect).resolve() if protect else None
    for path in complete[: max(0, len(complete) - keep)]:
        if path.resolve() != protected:
            shutil.rmtree(path, ignore_errors=True)


# ---- the final folder ---------------------------------------------------------------------------------------------
def staging_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.staging")


def old_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def replace_final(staging: Path, final: Path) -> None:
    """Swap a complete staging folder in for ``final`` (two renames through ``.final.old``)."""
    replace_dir(staging, final, old=old_dir(final))


def recover_final(output: Path) -> None:
    """After a crash between ``replace_final``'s two renames ``final/`` is missing: put the new folder in place if it
    was complete, else the old one; clear a leftover ``.final.old`` once ``final/`` is there."""
    final = output / "final"
    staging, old = staging_dir(final), old_dir(final)
    if not final.exists():
        source = staging if staging.is_dir() and is_complete(staging) else old if old.is_dir() else None
        if source is not None:
            logger.warning("%s was missing after an interrupted save; restoring it from %s", final, source)
            with contextlib.suppress(FileNotFoundError):  # another process restored it first
                os.replace(source, final)
    if final.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)
