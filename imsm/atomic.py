"""Atomic file and folder writes: a crash leaves either the old content or the new one, never a half file.

Every file is written to a temporary sibling, flushed to disk, then moved into place with ``os.replace``; a folder is
built under a temporary name and renamed once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``final`` (an older ``final`` survives any failure).

    The swap is two renames: ``final`` -> ``final.old-*``, staging -> ``final``; a crash between them leaves the old
    folder under its ``.old`` name, never a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 700: the folder it becomes reads like any other
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, final)


def replace_dir(src: str | os.PathLike, final: str | os.PathLike, old: str | os.PathLike | None = None) -> None:
    """Move the complete folder ``src`` to ``final``, replacing an existing ``final`` with two renames through
    ``old`` (default ``.<name>.old`` beside it), which is removed afterwards."""
    src, final = Path(src), Path(final)
    old = Path(old) if old is not None else final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    moved = False
    if final.exists():
        os.replace(final, old)
        moved = True
    os.replace(src, final)
    if moved:
        shutil.rmtree(old, ignore_errors=True)
