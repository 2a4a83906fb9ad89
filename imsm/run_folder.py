"""The run folder: what a trained run is on disk, owned here alone. Written by training (final folder and every
checkpoint), read by evaluation, the harness model, adapter scaling and resume.

    imsm_config.json            RunConfig: how to rebuild the model (typed, versioned; see FORMAT_VERSION)
    adapter_config.json         the adapter's files, named in RunConfig.adapter_files (a PEFT method: its own format;
    adapter_model.safetensors   LoRAMoE: loramoe_config.json, loramoe_model.safetensors)
    gate.safetensors            the gate's tensors (none for the equal and none gates), float32
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

train.py's output folder (``OUTPUT_MARKER`` marks it; train.py refuses any other non-empty folder) holds the
checkpoints and ``final/``. Training resumes from the newest complete checkpoint that validates
(``resumable_checkpoint``), moving damaged ones aside; ``final/`` is always the run's last step: a finished run whose
``final/`` is missing, damaged or older than its last checkpoint gets it rebuilt (``bring_final_up_to_date``), and
evaluation refuses an output folder whose ``final/`` trails a whole checkpoint (``resolve_for_evaluation``).
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

from imsm.atomic import atomic_write_json, atomic_write_text, replace_dir

logger = logging.getLogger(__name__)

CONFIG_FILE = "imsm_config.json"
GATE_FILE = "gate.safetensors"
RUN_ARGS = "run_args.json"
TRAIN_STATS = "train_stats.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMPLETE = "COMPLETE"
OUTPUT_MARKER = "imsm_output.json"  # in train.py's --output_dir: what train.py may delete and replace there
# 1: the first versioned format; folders written before versioning have the same fields and read as 1.
# 2: the method's settings as data (``method_options``, where format 1 had ``init_lora_weights`` and ``calibration``
#    at the top) and the adapter's file names (``adapter_files``, which format 1 implied by the method's name).
FORMAT_VERSION = 2
# the adapter files format-1 writers used, by method: what a format-1 folder holds (LoRAMoE's own, else PEFT's)
FORMAT_1_ADAPTER_FILES = {"loramoe": ("loramoe_config.json", "loramoe_model.safetensors")}
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# what a checkpoint holds beyond the run folder: the Trainer's and DeepSpeed's resume state
RESUME_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", "latest",
                "zero_to_fp32.py", "rng_state.pth")


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


# ---- writing ------------------------------------------------------------------------------------------------------
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


def finish_from_checkpoint(checkpoint: str | Path, final: str | Path, step: int | None = None) -> None:
    """Make ``final/`` from a finished checkpoint's run files (no training, no model): check, copy, mark (with
    ``step``, default the checkpoint's own), swap in."""
    checkpoint, final = Path(checkpoint), Path(final)
    validate(checkpoint)  # a damaged checkpoint is never promoted
    staging = staging_dir(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in RESUME_STATE and not path.name.startswith("rng_state"):
            shutil.copy2(path, staging / path.name)
    mark_complete(staging, recorded_step(checkpoint) if step is None else step)
    replace_final(staging, final)


def bring_final_up_to_date(checkpoint: str | Path, final: str | Path, weights_from: str | Path | None = None
                           ) -> str | None:
    """Make ``final/`` the run whose last step ``checkpoint`` holds, without training; says what it did (None when
    ``final/`` already was that run).

    ``final/`` is kept when it is complete, whole, and records the checkpoint's step or a later one (a folder from
    before the step was recorded is kept too: nothing tells it is older). Otherwise (missing, damaged, or older: a
    kill while the new one was staged) the complete staging folder of that step that such a kill leaves is swapped
    in, else the run files of ``weights_from`` (the best checkpoint under ``--load_best_model_at_end``; default
    ``checkpoint``) are copied and marked with the checkpoint's step.
    """
    checkpoint, final = Path(checkpoint), Path(final)
    recover_final(final.parent)
    step, staging = recorded_step(checkpoint), staging_dir(final)
    have = recorded_step(final) if is_complete(final) else None
    problem = damage(final) if final.exists() else None
    if is_complete(final) and problem is None and (have is None or step is None or have >= step):
        if staging.exists():  # a staging left by a kill is older than the final/ it did not replace
            shutil.rmtree(staging)
        return None
    before = ("missing" if not final.exists() else f"damaged ({problem})" if problem is not None
              else f"at step {have}" if have is not None else "incomplete")
    if is_complete(staging) and recorded_step(staging) == step and damage(staging) is None:
        replace_final(staging, final)
        return f"{final} was {before}; moved in the complete step-{step} folder an interrupted save left ({staging})"
    source = Path(weights_from) if weights_from is not None else checkpoint
    finish_from_checkpoint(source, final, step)
    return f"{final} was {before}; rebuilt it from {source} (run ended at step {step}) without training"


def best_checkpoint(checkpoint: str | Path) -> Path | None:
    """The best checkpoint ``trainer_state.json`` records (``--load_best_model_at_end``), looked up beside
    ``checkpoint``; None when none is recorded or it is gone, interrupted or damaged."""
    checkpoint = Path(checkpoint)
    try:
        best = json.loads((checkpoint / "trainer_state.json").read_text()).get("best_model_checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    path = checkpoint.parent / Path(best).name if best else None
    if path is None or not path.is_dir() or not is_complete(path) or damage(path) is not None:
        return None
    return path


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


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; interrupted ones (no ``COMPLETE``) are never chosen."""
    complete = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def resumable_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files are whole (``validate``: headers, lengths, gate shapes, and a
    readable ``trainer_state.json``); a damaged one is skipped with a warning naming the file."""
    skipped = []
    for _, path in reversed(checkpoints(output_dir)):
        if not is_complete(path):
            continue
        problem = damage(path) or _unreadable_state(path)
        if problem is None:
            if skipped:
                logger.warning("resuming from %s: the newer %s damaged (%s)", path, " and ".join(
                    f"{p.name} is" for p, _ in skipped), "; ".join(why for _, why in skipped))
            return path
        skipped.append((path, problem))
    for path, why in skipped:
        logger.warning("%s is damaged (%s) and no earlier checkpoint is whole", path, why)
    return None


def _unreadable_state(checkpoint: Path) -> str | None:
    path = checkpoint / "trainer_state.json"
    try:
        if path.is_file():
            json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path}: not valid JSON"
    return None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete interrupted checkpoints, so a new save of the same step starts from an empty folder; move a complete
    but damaged one aside (``checkpoint-N.damaged``, outside the checkpoint names, kept for inspection), so that a
    new save of its step never mixes new files with its old ``COMPLETE``."""
    removed = []
    for _, path in checkpoints(output_dir):
        if not is_complete(path):
            logger.warning("%s: removing an interrupted checkpoint (no %s)", path, COMPLETE)
            shutil.rmtree(path)
            removed.append(path)
        elif (problem := damage(path) or _unreadable_state(path)) is not None:
            aside = path.with_name(f"{path.name}.damaged")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(path, aside)
            logger.warning("%s is damaged (%s): moved aside to %s; delete it once inspected", path, problem, aside)
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


# ---- the output folder --------------------------------------------------------------------------------------------
def claim_output_dir(output_dir: str | Path) -> list[Path]:
    """Make ``output_dir`` a train.py output folder: create it, or take one that is empty or already holds a
    train.py run (``OUTPUT_MARKER``, or a checkpoint or final folder of this format), and write the marker, which
    also proves the folder writable. Any other folder is refused: train.py deletes interrupted ``checkpoint-N``
    folders and replaces ``final/``, which must never touch another program's files. Returns the folders it created
    (outermost first), for ``remove_if_unused``."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {out} is a file")
    created = [p for p in (*reversed(out.parents), out) if not p.exists()]
    # another saving process may be writing the marker this moment: its temporary says nothing about the folder
    entries = [p for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))] \
        if out.is_dir() else []
    if entries and not _holds_a_run(out):
        held = ", ".join(sorted(p.name for p in entries)[:6])
        raise FileExistsError(f"--output_dir {out} holds files that train.py did not write ({held}); train.py "
                              "deletes interrupted checkpoint-N folders and replaces final/ there, so choose an empty "
                              "or new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / OUTPUT_MARKER).is_file():
            atomic_write_json(out / OUTPUT_MARKER, {"written_by": "imsm train.py", "format_version": FORMAT_VERSION})
    except OSError as e:
        raise PermissionError(f"--output_dir {out} is not writable ({e.strerror}); nothing was trained") from None
    return created


def _holds_a_run(out: Path) -> bool:
    if (out / OUTPUT_MARKER).is_file():
        return True
    folders = [out / "final", *(p for _, p in checkpoints(out))]
    return any((f / CONFIG_FILE).is_file() or (f / COMPLETE).is_file() for f in folders)


def remove_if_unused(created: list[Path], disposable: tuple[str, ...] = ()) -> None:
    """After a failed start: remove the folders ``claim_output_dir`` created if the run left nothing in them but its
    marker, files named in ``disposable`` and empty folders."""
    if not created:
        return
    out = created[-1]
    if out.is_dir() and all(p.is_dir() or p.name in (OUTPUT_MARKER, *disposable) for p in out.rglob("*")):
        shutil.rmtree(out, ignore_errors=True)
        for parent in reversed(created[:-1]):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty


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
