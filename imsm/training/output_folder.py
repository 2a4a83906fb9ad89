"""train.py's output folder through its life: claimed (``OUTPUT_MARKER``; train.py refuses any other non-empty
folder), checkpoints saved, rotated and resumed from, and ``final/`` staged, swapped in and rebuilt. The run folder's
format (what each folder holds, ``COMPLETE``, validation, reading) is ``imsm.run_folder``; only train.py and the
trainer use this module.

Training resumes from the newest complete checkpoint that validates (``resumable_checkpoint``), moving damaged ones
aside; ``final/`` is always the run's last step: a finished run whose ``final/`` is missing, damaged or older than its
last checkpoint gets it rebuilt (``bring_final_up_to_date``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from imsm.atomic import atomic_write_json, replace_dir
from imsm.run_folder import (
    COMPLETE,
    CONFIG_FILE,
    FORMAT_VERSION,
    checkpoints,
    damage,
    is_complete,
    mark_complete,
    old_dir,
    recorded_step,
    recover_final,
    staging_dir,
    validate,
)

logger = logging.getLogger(__name__)

OUTPUT_MARKER = "imsm_output.json"  # in train.py's --output_dir: what train.py may delete and replace there
# what a checkpoint holds beyond the run folder: the Trainer's and DeepSpeed's resume state
RESUME_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", "latest",
                "zero_to_fp32.py", "rng_state.pth")


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


def replace_final(staging: Path, final: Path) -> None:
    """Swap a complete staging folder in for ``final`` (two renames through ``.final.old``)."""
    replace_dir(staging, final, old=old_dir(final))
