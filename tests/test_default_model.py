"""The embedded model's first-use conversion when several processes start at once on a fresh machine (the ranks of a
launch, a study's jobs): one converts, the others wait for its folder instead of converting again and replacing the
folder under a process that is reading it."""

import subprocess
import sys
import time

from imsm import default_model

CHILD = """
import pathlib, sys, time
from imsm.locks import held
cache, name = pathlib.Path(sys.argv[1]), sys.argv[2]
with held(cache / f".{name}.lock", "the stand-in converter"):
    (cache / "holding").touch()
    time.sleep(1.5)
    (cache / name).mkdir()
    (cache / name / "config.json").write_text("{}")
    (cache / name / "model.safetensors").write_text("stand-in")
"""


def test_a_process_waits_for_the_conversion_another_is_running(tmp_path, monkeypatch):
    monkeypatch.setenv("IMSM_CACHE", str(tmp_path))
    converted = []
    monkeypatch.setattr(default_model, "_convert", converted.append)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), default_model.DEFAULT_MODEL_NAME])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "holding").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the stand-in converter did not start"
            time.sleep(0.02)
        path = default_model.default_model_path()
    finally:
        child.wait(timeout=60)
    assert path == tmp_path / default_model.DEFAULT_MODEL_NAME
    assert converted == []  # it waited for the other process's folder, and converted nothing itself
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
