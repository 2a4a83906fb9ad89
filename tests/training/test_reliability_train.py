"""train.py never hands over the wrong model and never deletes what it did not write (issue 21): a final/ left older
than the newest checkpoint by an interrupted save is rebuilt, a damaged checkpoint that still has COMPLETE is never
resumed from or promoted, bad options fail before the model loads naming the option, a folder of another program is
refused, and a failed run leaves no empty --output_dir behind."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imsm.loader
import train
from imsm import run_folder
from imsm.evaluation.output_dir import EVALUATION_MARKER
from imsm.training import output_folder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def _args(model_dir, train_file, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--seed", "7",
            "--disable_tqdm", "true", "--lr_scheduler_type", "constant", *extra]


def _state(run_dir):
    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    return tensors | {f"gate.{k}": v for k, v in load_file(str(run_dir / "gate.safetensors")).items()}


def _assert_same(got_dir, expected_dir):
    expected, got = _state(expected_dir), _state(got_dir)
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


def _step(folder) -> int:
    return json.loads((folder / "COMPLETE").read_text())["global_step"]


def _leftovers(out) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".staging" in p.name or p.name.endswith(".old"))


# ---- 1. final/ is always the run's last complete step ---------------------------------------------------------------
@pytest.mark.parametrize("killed", ["while_staging", "staged_not_swapped"])
def test_final_killed_while_staged_is_rebuilt_from_the_newest_checkpoint(tiny_model_dir, tiny_train_file, tmp_path,
                                                                         monkeypatch, killed):
    """Train to step 2, continue to 3, die while the new final is staged (before or after its COMPLETE), rerun the
    same command: final/ must become step 3, not keep step 2 with a 'nothing to train'."""
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "2"))
    continued = _args(tiny_model_dir, tiny_train_file, out, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    real_save_file, real_replace = imsm.loader.save_file, output_folder.replace_final
    gate_saves = []

    def save_file(*a, **kw):  # the gate file: 1st checkpoint-3's, 2nd the final staging's
        gate_saves.append(1)
        if killed == "while_staging" and len(gate_saves) == 2:
            raise KeyboardInterrupt
        return real_save_file(*a, **kw)

    def replace_final(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(imsm.loader, "save_file", save_file)
    if killed == "staged_not_swapped":
        monkeypatch.setattr(output_folder, "replace_final", replace_final)
    with pytest.raises(KeyboardInterrupt):
        train.main(continued)
    monkeypatch.setattr(imsm.loader, "save_file", real_save_file)
    monkeypatch.setattr(output_folder, "replace_final", real_replace)
    assert _step(out / "final") == 2 and _step(out / "checkpoint-3") == 3  # the state the kill left

    assert train.main(continued) is None  # nothing to train, but final/ is brought up to date
    assert _step(out / "final") == 3
    _assert_same(out / "final", out / "checkpoint-3")
    assert _leftovers(out) == []
    assert not (out / "final" / "optimizer.pt").exists()


@pytest.mark.launch
def test_sigkill_while_final_is_staged_then_rerun(tiny_model_dir, tiny_train_file, tmp_path):
    """The issue's reproduction with a real SIGKILL of the process at the moment the staged final would be swapped
    in: the rerun of the same command rebuilds final/ at the last step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"

    def run(max_steps, kill):
        argv = _args(tiny_model_dir, tiny_train_file, out, "--max_steps", str(max_steps),
                     "--resume_from_checkpoint", "latest")
        code = ("import os, signal, sys, train\n"
                "from imsm.training import output_folder\n"
                + ("output_folder.replace_final = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n" if kill else "")
                + f"train.main({argv!r})\n")
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=600, check=False)

    assert run(4, kill=False).returncode == 0
    killed = run(5, kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _step(out / "final") == 4 and (out / ".final.staging" / "COMPLETE").is_file()
    rerun = run(5, kill=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _step(out / "final") == 5
    _assert_same(out / "final", out / "checkpoint-5")
    assert _leftovers(out) == []


def test_a_finished_best_model_run_rebuilds_final_from_the_best_checkpoint(tiny_model_dir, tiny_train_file, tmp_path):
    """--load_best_model_at_end: final/ holds the best checkpoint, so a final/ lost to a kill comes back from it (and
    records the run's last step), not from the last checkpoint."""
    out = tmp_path / "run"
    args = _args(tiny_model_dir, tiny_train_file, out, "--max_steps", "6", "--save_steps", "2", "--eval_steps", "2",
                 "--eval_strategy", "steps", "--validation_fraction", "0.25", "--load_best_model_at_end", "true",
                 "--metric_for_best_model", "eval_loss", "--greater_is_better", "true")  # best: a falling loss's first
    trainer = train.main(args)
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-6"  # else this test could not tell the two apart
    reference = tmp_path / "reference"
    shutil.copytree(out / "final", reference)
    shutil.rmtree(out / "final")
    assert train.main([*args, "--resume_from_checkpoint", "latest"]) is None
    _assert_same(out / "final", reference)
    assert _step(out / "final") == 6


# ---- 4. a damaged checkpoint that still has COMPLETE ------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_adapter_in_a_complete_checkpoint_is_skipped_with_a_warning(tiny_model_dir, tiny_train_file,
                                                                              tmp_path, caplog):
    out = tmp_path / "run"
    args = _args(tiny_model_dir, tiny_train_file, out, "--max_steps", "4", "--save_steps", "2")
    train.main(args)
    reference = tmp_path / "reference"
    shutil.copytree(out / "final", reference)
    shutil.rmtree(out / "final")  # killed after the last checkpoint, before final/
    damaged = out / "checkpoint-4" / "adapter_model.safetensors"
    _truncate(damaged)
    assert (out / "checkpoint-4" / "COMPLETE").is_file()

    with pytest.raises(ValueError, match=r"checkpoint-4.*adapter_model\.safetensors.*truncated"):
        train.main([*args, "--resume_from_checkpoint", str(out / "checkpoint-4")])  # named: refused, not used

    with caplog.at_level(logging.WARNING):
        train.main([*args, "--resume_from_checkpoint", "latest"])
    assert "checkpoint-4" in caplog.text and "checkpoint-2" in caplog.text and "truncated" in caplog.text
    _assert_same(out / "final", reference)  # retrained from checkpoint-2 to the uninterrupted result, bit for bit
    assert _step(out / "final") == 4
    run_folder.validate(out / "checkpoint-4")  # saved again, whole
    aside = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-4.damaged")]
    assert len(aside) == 1  # the damaged one kept for inspection, outside the checkpoint-N names


def test_a_finished_run_never_promotes_a_damaged_checkpoint(tiny_model_dir, tiny_train_file, tmp_path):
    """The direct promotion path: final/ is missing and the newest checkpoint's gate is garbled."""
    out = tmp_path / "run"
    args = _args(tiny_model_dir, tiny_train_file, out, "--max_steps", "2")
    train.main(args)
    reference = tmp_path / "reference"
    shutil.copytree(out / "final", reference)
    shutil.rmtree(out / "final")
    gate = out / "checkpoint-2" / "gate.safetensors"
    gate.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + gate.read_bytes()[24:])
    train.main([*args, "--resume_from_checkpoint", "latest"])
    run_folder.validate(out / "final")
    _assert_same(out / "final", reference)


def test_a_damaged_final_of_a_finished_run_is_rebuilt(tiny_model_dir, tiny_train_file, tmp_path, caplog):
    out = tmp_path / "run"
    args = _args(tiny_model_dir, tiny_train_file, out, "--max_steps", "2")
    train.main(args)
    reference = tmp_path / "reference"
    shutil.copytree(out / "final", reference)
    _truncate(out / "final" / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING):
        assert train.main([*args, "--resume_from_checkpoint", "latest"]) is None
    assert "damaged" in caplog.text and "adapter_model.safetensors" in caplog.text
    _assert_same(out / "final", reference)


# ---- 5. inputs checked before any heavy work ------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--num_train_epochs", "0"], "--num_train_epochs 0"),
    (["--max_steps", "2", "--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    (["--max_steps", "2", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
    (["--max_steps", "2", "--learning_rate", "-0.001"], "--learning_rate -0.001"),
    (["--max_steps", "2", "--gate_learning_rate", "-1"], "--gate_learning_rate -1"),
])
def test_bad_training_options_fail_before_the_model_loads(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch,
                                                         extra, message):
    monkeypatch.setattr(train, "load_backbone", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    with pytest.raises(ValueError, match=message):
        train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


def test_a_cache_path_that_is_a_file_fails_before_the_model_loads(tiny_model_dir, tiny_train_file, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(train, "load_backbone", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    blocker = tmp_path / "cache"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"--frozen_memory_cache {blocker}"):
        train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", "--max_steps", "2",
                         "--frozen_memory_cache", str(blocker)))
    with pytest.raises(ValueError, match="--frozen_memory_cache .*checkpoint folders"):
        train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", "--max_steps", "2",
                         "--frozen_memory_cache", str(tmp_path / "run" / "checkpoint-2" / "cache")))


@pytest.mark.parametrize("which", ["train_file", "eval_file"])
def test_non_utf8_data_names_the_file_and_line(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch, which):
    monkeypatch.setattr(train, "load_backbone", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"input": "Is 1 odd ?", "output": "yes"}\n{"input": "caf\xe9 ?", "output": "no"}\n')
    files = {"train_file": tiny_train_file, which: bad}
    argv = _args(tiny_model_dir, files["train_file"], tmp_path / "run", "--max_steps", "1")
    if which == "eval_file":
        argv += ["--eval_file", str(bad)]
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 15\)"):
        train.main(argv)


# ---- 2. train.py writes only into its own folders ------------------------------------------------------------
def test_a_folder_of_another_program_is_refused_and_left_untouched(tiny_model_dir, tiny_train_file, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(train, "load_backbone", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    foreign = tmp_path / "hf_run"
    (foreign / "checkpoint-3").mkdir(parents=True)  # another trainer's checkpoint: no COMPLETE, no imsm_config.json
    (foreign / "checkpoint-3" / "model.safetensors").write_bytes(b"weights")
    report = tmp_path / "report"
    report.mkdir()
    (report / EVALUATION_MARKER).write_text("{}")
    (report / "summary.md").write_text("results")
    for folder in (foreign, report):
        before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        with pytest.raises(FileExistsError, match=f"--output_dir {folder} holds files that train.py did not write"):
            train.main(_args(tiny_model_dir, tiny_train_file, folder, "--max_steps", "1"))
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before


def test_another_process_writing_the_marker_does_not_make_the_folder_foreign(tmp_path):
    """Two saving processes (one per node) claim the folder at once: one's temporary marker is not a foreign file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{output_folder.OUTPUT_MARKER}.x1y2.tmp").write_text("{")
    assert output_folder.claim_output_dir(out) == []
    assert (out / output_folder.OUTPUT_MARKER).is_file()


# ---- 7. a failed run leaves no empty --output_dir behind --------------------------------------------------------
@pytest.mark.parametrize("cache", ["off", "on"])
def test_a_failure_after_the_early_checks_leaves_no_empty_output_dir(tiny_model_dir, tiny_train_file, tmp_path,
                                                                     monkeypatch, cache):
    def fail(*a, **kw):
        raise ValueError("a probe that fails once the model is loaded")

    monkeypatch.setattr(train, "build_imsm_model", fail)
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="probe"):
        train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "1", "--frozen_memory_cache", cache))
    assert not (tmp_path / "new").exists()  # nor the parent it made
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match="probe"):
        train.main(_args(tiny_model_dir, tiny_train_file, existing, "--max_steps", "1"))
    assert existing.is_dir()  # it was there before: kept


HOLD_LOCK = """
import sys, time
from imsm.locks import try_lock
fd = try_lock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_train_py_on_one_output_dir_is_refused_at_once(tiny_model_dir, tiny_train_file, tmp_path):
    """Issue 30: two train.py on one --output_dir took no lock (each deletes the other's interrupted checkpoints and
    replaces its final/). The second refuses before loading anything, naming the folder and the first one's PID;
    once the first ends (its lock released with the process), the folder trains again."""
    out = tmp_path / "run"
    out.mkdir()  # before the holder starts: its try_lock creates the lock file in this folder
    output_folder.claim_output_dir(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / train.OUTPUT_LOCK)],
        env={**os.environ, "PYTHONPATH": str(Path(train.__file__).parent)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"--output_dir {out} is in use by another train.py \\(pid "
                                               f"{holder.pid} on "):
            train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "1"))
        assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    finally:
        holder.kill()
        holder.wait()
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "1"))
    assert run_folder.is_complete(out / "final")
