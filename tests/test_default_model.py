"""The embedded model's first-use conversion when several processes start at once on a fresh machine (the ranks of a
launch, a study's jobs): one converts, the others wait for its folder instead of converting again and replacing the
folder under a process that is reading it."""

import logging
import subprocess
import sys
import threading
import time

from imsm import default_model

CHILD = """
import pathlib, sys, time
from imsm.locks import held
cache, name = pathlib.Path(sys.argv[1]), sys.argv[2]
with held(cache / f".{name}.lock", "the stand-in converter"):
    (cache / "holding").touch()
    while not (cache / "go").exists():  # holds the lock until the test has seen the other process wait for it
        time.sleep(0.01)
    (cache / name).mkdir()
    (cache / name / "config.json").write_text("{}")
    (cache / name / "model.safetensors").write_text("stand-in")
"""


def test_a_process_waits_for_the_conversion_another_is_running(tmp_path, monkeypatch):
    """The stand-in converter holds the lock with no folder written; default_model_path must wait (the lock logs so)
    rather than convert, then load the folder the holder wrote once it lets go."""
    monkeypatch.setenv("IMSM_CACHE", str(tmp_path))
    converted, waiting, result = [], threading.Event(), []
    monkeypatch.setattr(default_model, "_convert", converted.append)

    class Waiting(logging.Handler):
        def emit(self, record):
            if "waiting for it" in record.getMessage():
                waiting.set()

    handler = Waiting()
    locks_logger = logging.getLogger("imsm.locks")
    locks_logger.addHandler(handler)
    monkeypatch.setattr(locks_logger, "level", logging.INFO)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), default_model.DEFAULT_MODEL_NAME])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "holding").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the stand-in converter did not start"
            time.sleep(0.02)
        caller = threading.Thread(target=lambda: result.append(default_model.default_model_path()), daemon=True)
        caller.start()
        while not waiting.is_set():  # without the lock it converts at once and ends instead
            assert caller.is_alive() and time.monotonic() < deadline, f"did not wait; converted {converted}"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        caller.join(timeout=60)
    finally:
        (tmp_path / "go").touch()
        child.wait(timeout=60)
        locks_logger.removeHandler(handler)
    path = tmp_path / default_model.DEFAULT_MODEL_NAME
    assert result == [path] and converted == []  # it waited for the other process's folder, converted nothing
    assert (path / "model.safetensors").read_text() == "stand-in"


def test_the_first_process_converts_once_and_the_next_loads_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("IMSM_CACHE", str(tmp_path))
    converted = []

    def convert(target):
        converted.append(target)
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_text("converted")

    monkeypatch.setattr(default_model, "_convert", convert)
    first, second = default_model.default_model_path(), default_model.default_model_path()
    assert first == second == tmp_path / default_model.DEFAULT_MODEL_NAME and converted == [first]
