"""A crash campaign: train.py killed with SIGKILL at random moments (in a step, in a checkpoint save, in the final
swap), then resumed with ``--resume_from_checkpoint latest`` until it finishes, must end with exactly the adapter and
gate of the uninterrupted run, a complete checkpoint trail and no temporary files left behind."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imsm.run_folder import checkpoints, is_complete

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.launch


def _cmd(model_dir, train_file, out, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--model_name_or_path", str(model_dir), "--train_file",
            str(train_file), "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
            "--max_steps", "8", "--save_steps", "1", "--save_total_limit", "2", "--report_to", "none",
            "--seed", "7", "--disable_tqdm", "true", *extra]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "adapter_model.safetensors")) | {
        f"gate.{k}": v for k, v in load_file(str(final / "gate.safetensors")).items()}


def test_killed_at_random_moments_then_resumed_equals_the_uninterrupted_run(tiny_model_dir, tiny_train_file,
                                                                             tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    start = time.monotonic()
    subprocess.run(_cmd(tiny_model_dir, tiny_train_file, reference), env=env, check=True, capture_output=True)
    lifetime = time.monotonic() - start  # a kill lands anywhere from start-up to the final save
    expected = _weights(reference / "final")

    rng = random.Random(0)
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        attempts = kills = 0
        while not (out / "final" / "COMPLETE").is_file():
            proc = subprocess.Popen(_cmd(tiny_model_dir, tiny_train_file, out, "--resume_from_checkpoint", "latest"),
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if attempts < 3:  # three kill attempts per trial, each after a random share of a fresh run's life
                attempts += 1
                try:
                    proc.wait(timeout=rng.uniform(0.3, 0.9) * lifetime)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    continue
                if kills == 0:  # a fresh run outran its kill (the machine got less busy): the trial again, sooner
                    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
                    shutil.rmtree(out)
                    attempts, lifetime = 0, lifetime / 2
                    continue
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-3000:]
        assert kills >= 1, f"trial {trial}: the run finished before it could be killed"
        got = _weights(out / "final")
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=f"trial {trial}: {name}")
        steps = [(step, is_complete(path)) for step, path in checkpoints(out)]
        assert steps == [(7, True), (8, True)], f"trial {trial}: {steps}"
        leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or ".staging" in p.name
                     or p.name.endswith(".old")]
        assert leftovers == [], f"trial {trial}: {leftovers}"
