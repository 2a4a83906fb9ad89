"""The life of evaluate.py's output folder: refused unless new, empty or an earlier report (``--overwrite``),
marked as a report and as incomplete while it is written, unmarked once the report is complete."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from imsm.atomic import atomic_write_json, atomic_write_text
from imsm.evaluation.report.results import REPORT_INPUTS

REPORT_FILES = ("summary.md", "summary.csv", "forgetting.md", "forgetting.png", "comparisons.md", "stats.json",
                "stats.csv", "tradeoff.png", "tradeoff.csv", REPORT_INPUTS)
INCOMPLETE = "INCOMPLETE"  # present while an evaluation writes its folder; removed once the report is complete
EVALUATION_MARKER = "imsm_evaluation.json"  # written first into every report folder: --overwrite replaces only these

logger = logging.getLogger(__name__)


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite`` and it is an earlier evaluate.py report (it holds
    ``EVALUATION_MARKER``: nothing else is ever deleted); then empty it, mark it as a report and as incomplete."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {out} is a file")
    if out.is_dir() and _nothing_written(out):
        # an evaluation killed before it wrote anything but its markers: it holds no result, so it starts again
        logger.warning("%s holds only the marker of an evaluation killed before it wrote anything; starting it "
                       "again", out)
        for path in out.iterdir():
            path.unlink()
    if out.exists() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
        if not overwrite:
            raise FileExistsError(f"--output_dir {out} already holds results ({held}); pass --overwrite to replace "
                                  "them or choose another folder")
        if not (out / EVALUATION_MARKER).is_file():
            raise FileExistsError(f"--output_dir {out} holds {held}, not an evaluate.py report (no "
                                  f"{EVALUATION_MARKER}); --overwrite replaces only an earlier report, so choose "
                                  "another folder (or delete this one yourself)")
        logger.warning("--overwrite: removing the earlier results in %s", out)
        for path in out.iterdir():
            if path.name != EVALUATION_MARKER:  # removed last: an interrupted removal stays recognisable
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / EVALUATION_MARKER, {"written_by": "imsm evaluate.py", "command": sys.argv,
                                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_text(out / INCOMPLETE, "evaluation under way or interrupted: " + " ".join(sys.argv) + "\n")


def _nothing_written(out: Path) -> bool:
    """The folder holds ``EVALUATION_MARKER`` and temporaries only: an evaluation killed between writing its marker
    and ``INCOMPLETE`` (a live one always has ``INCOMPLETE`` beside the marker, so it is never taken for this)."""
    entries = list(out.iterdir())
    return (out / EVALUATION_MARKER).is_file() and all(
        p.is_file() and (p.name == EVALUATION_MARKER or (p.name.startswith(".") and p.name.endswith(".tmp")))
        for p in entries)


def finish_output_dir(out: Path) -> None:
    (out / INCOMPLETE).unlink(missing_ok=True)
