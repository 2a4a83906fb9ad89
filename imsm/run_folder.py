"""The run folder: what a trained run is on disk, owned here alone. Written by training (final folder and every
checkpoint), read by evaluation, the harness model, adapter scaling and resume.

    imsm_config.json            RunConfig: how to rebuild the model (typed, versioned; see FORMAT_VERSION)
    adapter_config.json         the adapter's files, named in RunConfig.adapter_files (a PEFT method: its own format;
    adapter_model.safetensors   LoRAMoE: loramoe_config.json, loramoe_model.safetensors)
    gate.safetensors            the gate's tensors (none for the equal and none gates), float32
    adapter_model.residual.safetensors, adalora_allocator.safetensors
                                what a resume needs beyond the adapter: PiSSA/CorDA's unconverted adapter; AdaLoRA's
                                importance averages and, once ranks are masked, its uncut tensors
    run_args.json               every resolved argument of the run, for reproduction
    train_stats.json            what the run cost: wall time, optimizer steps, tokens seen
    tokenizer files
    COMPLETE                    written last, with the optimizer step ({"global_step": N}); a checkpoint without it
                                was interrupted and is never resumed from

Nothing is pickled. ``validate`` checks a folder without building a model: the config, that every file is present and
that every safetensors file is whole (its header parses and the data it declares is all there). Every error names the
file. This module is storage only: it imports no method; a method's settings are data here (``method_options``), and
``imsm.loader.check_run`` adds what needs the methods (the names, the gate's shapes). Writing a model's files is
``imsm.loader.save_run_files``.

train.py's output folder holds the checkpoints and ``final/``; its life (claiming the folder, rotating and resuming
checkpoints, rebuilding ``final/``) is training's, in ``imsm.training.output_folder``. What every reader needs stays
here: ``resolve`` puts back a ``final/`` an interrupted swap left missing (``recover_final``), and evaluation refuses
an output folder whose ``final/`` trails a whole checkpoint (``resolve_for_evaluation``).
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

from imsm.atomic import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

CONFIG_FILE = "imsm_config.json"
GATE_FILE = "gate.safetensors"
RUN_ARGS = "run_args.json"
TRAIN_STATS = "train_stats.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMPLETE = "COMPLETE"
# 1: the first versioned format; folders written before versioning have the same fields and read as 1.
# 2: the method's settings as data (``method_options``, where format 1 had ``init_lora_weights`` and ``calibration``
#    at the top) and the adapter's file names (``adapter_files``, which format 1 implied by the method's name).
FORMAT_VERSION = 2
# the adapter files format-1 writers used, by method: what a format-1 folder holds (LoRAMoE's own, else PEFT's)
FORMAT_1_ADAPTER_FILES = {"loramoe": ("loramoe_config.json", "loramoe_model.safetensors")}
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


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
    adapter_files: tuple[str, str] = ("adapter_config.json", "adapter_model.safetensors")  # (config, weights)
    # the method's resolved options (its MethodSpec.record), read back only through its MethodSpec (describe,
    # calibration_rows): e.g. LoRA's init_lora_weights and CorDA's calibration file and rows
    method_options: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "adapter_files": list(self.adapter_files)}

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
        kinds = {"base_model": str, "peft": str, "gate": str, "gate_rank": int, "gate_dropout": (int, float),
                 "hidden_size": int, "prompt_template": str, "system_prompt": (str, type(None)),
                 "init_lora_weights": str, "calibration": (dict, type(None)), "adapter_files": list,
                 "method_options": dict, "format_version": int}
        for name, kind in kinds.items():
            if name in raw and (not isinstance(raw[name], kind) or isinstance(raw[name], bool)):
                raise ValueError(f"{source}: {name} has the wrong type ({type(raw[name]).__name__})")
        if version == 1:
            raw = _from_format_1(raw, source)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} for format {version}")
        missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING and n not in raw)
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        files = raw.get("adapter_files", fields["adapter_files"].default)
        if len(files) != 2 or not all(isinstance(f, str) and f and "/" not in f for f in files):
            raise ValueError(f"{source}: adapter_files must be two file names (config, weights), got {files!r}")
        from imsm.templates import TEMPLATES

        if raw.get("prompt_template", "raw") not in TEMPLATES:
            raise ValueError(f"{source}: prompt_template {raw['prompt_template']!r} is not one of {sorted(TEMPLATES)}")
        return cls(**{**raw, "adapter_files": tuple(files), "format_version": FORMAT_VERSION})

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


def _from_format_1(raw: dict, source: str | Path) -> dict:
    """A format-1 config as format 2: ``init_lora_weights`` and ``calibration`` move into ``method_options``; the
    adapter files are those format-1 writers used for the method."""
    raw = dict(raw)
    options = {key: raw.pop(key) for key in ("init_lora_weights", "calibration") if key in raw}
    if "peft" in raw and not isinstance(raw["peft"], str):
        raise ValueError(f"{source}: peft has the wrong type ({type(raw['peft']).__name__})")
    files = FORMAT_1_ADAPTER_FILES.get(raw.get("peft"), ("adapter_config.json", "adapter_model.safetensors"))
    return {**raw, "adapter_files": list(files), "method_options": options}


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


def resolve_for_evaluation(run: str | Path) -> Path:
    """``resolve``, refusing what must not be evaluated as a run: a checkpoint or final folder without ``COMPLETE``
    (an interrupted save) and, given a run's output folder, a ``final/`` older than the newest whole checkpoint
    beside it (a kill while the new ``final/`` was written, or a run still training); ``final/`` named itself is used
    with a warning, and so is a folder without ``COMPLETE`` that train.py did not write (``save_run_files`` called
    from Python: nothing says whether it was saved whole)."""
    folder = resolve(run)
    if not is_complete(folder):
        if CHECKPOINT_PATTERN.match(folder.name) or folder.name == "final" or (folder / "trainer_state.json").exists():
            raise ValueError(f"{folder}: an interrupted save (no {COMPLETE}); give a complete checkpoint, or rerun "
                             "the training command with --resume_from_checkpoint latest")
        logger.warning("%s has no %s, so nothing says it was saved whole (train.py writes it last; call "
                       "run_folder.mark_complete after save_run_files); using it all the same", folder, COMPLETE)
    if folder.name == "final" and (lag := final_lag(folder)) is not None:
        if Path(run) == folder:
            logger.warning("%s; evaluating it all the same, as it was named", lag)
        else:
            raise ValueError(f"{lag}. Rerun the training command with --resume_from_checkpoint latest (a finished run "
                             f"rebuilds final/ without training), give the checkpoint, or name {folder} itself")
    return folder


def final_lag(final: Path) -> str | None:
    """Says how ``final/`` trails the newest complete, whole checkpoint of its run; None when it does not (or its
    step is not recorded)."""
    have = recorded_step(final)
    if have is None:
        return None
    for step, path in reversed(checkpoints(final.parent)):
        if step <= have:
            return None
        if is_complete(path) and damage(path) is None:
            return (f"{final} holds step {have}, but {path} (step {step}) is newer: the run was interrupted while "
                    "final/ was written, or is still training")
    return None


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
    """Check a run folder's storage without building a model (see the module docstring); returns its config.

    With ``hidden_size``, also that the run fits a base model of that size (``model_path`` names it in errors).
    ``imsm.loader.check_run`` adds the checks that need the methods.
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
    safetensors_header(run_dir / GATE_FILE)
    for other in sorted(run_dir.glob("*.safetensors")):  # e.g. PiSSA/CorDA's unconverted adapter, read on resume
        if other.name not in (weights.name, GATE_FILE):
            safetensors_header(other)
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


# ---- completeness -------------------------------------------------------------------------------------------------
def mark_complete(run_dir: str | Path, step: int | None = None) -> None:
    atomic_write_text(Path(run_dir) / COMPLETE, json.dumps({"global_step": step}) + "\n")


def recorded_step(run_dir: str | Path) -> int | None:
    """The optimizer step a folder was saved at: its ``COMPLETE`` record, else (folders from before that record)
    ``trainer_state.json`` or ``train_stats.json``; None when none of them says."""
    run_dir = Path(run_dir)
    for name, key in ((COMPLETE, "global_step"), ("trainer_state.json", "global_step"),
                      (TRAIN_STATS, "optimizer_steps")):
        try:
            step = json.loads((run_dir / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return None


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


def damage(run_dir: str | Path) -> str | None:
    """Why a run folder cannot be used (``validate``'s error, naming the file), or None when it is whole."""
    try:
        validate(run_dir)
    except (OSError, ValueError) as e:
        return str(e)
    return None


# ---- checkpoints --------------------------------------------------------------------------------------------------
def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` in ``output_dir``, complete or not, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted((step, p) for step, p in found if p.is_dir())


# ---- the final folder ---------------------------------------------------------------------------------------------
def staging_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.staging")


def old_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


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
