"""Advisory locks that say who holds them: ``fcntl.flock`` on a small file that records the holder's PID and host.

The kernel releases a flock when its holder exits, however it ends (kill -9 included), so a lock left behind by a
dead process never blocks anyone; the file a killed holder leaves is reused, and a holder that ends normally may remove
it (``release(fd, path)``). flock is per open file: two processes, or two opens in one process, exclude each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def try_lock(path: str | os.PathLike) -> int | None:
    """Take the exclusive lock on ``path`` (created if missing) without waiting: its file descriptor (keep it open
    as long as the lock must hold; closing it releases), or None when another process holds it (``holder`` says
    which). The holder's PID and host are written into the file."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _record_holder(fd)
    return fd


def _record_holder(fd: int) -> None:
    """Write this process's PID and host into the lock file ``fd`` holds (what ``holder`` reads)."""
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())


def holder(path: str | os.PathLike) -> str:
    """Who holds the lock on ``path``, as its file records it ("pid N on HOST"), or "another process"."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def release(fd: int | None, path: str | os.PathLike | None = None) -> None:
    """Release a lock ``try_lock`` took; with ``path``, remove its file first (while still holding it, so no other
    process can hold the old file then), as a finished holder that leaves nothing behind."""
    if fd is None:
        return
    if path is not None:
        Path(path).unlink(missing_ok=True)
    os.close(fd)


@contextlib.contextmanager
def held(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the exclusive lock on ``path`` for the ``with`` block, waiting while another process holds it (logged
    once, naming ``what`` is locked and the holder). The file stays: it is where the next holder records itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = try_lock(path)
    if fd is None:
        logger.info("%s: held by %s; waiting for it", what, holder(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _record_holder(fd)
    try:
        yield
    finally:
        os.close(fd)
