"""Training's output folder (imsm/training/output_folder.py): which checkpoint is the latest, and rotation."""

import json

from imsm.run_folder import CONFIG_FILE, is_complete, mark_complete
from imsm.training.output_folder import latest_checkpoint, rotate_checkpoints

CONFIG = {"base_model": "/models/llama", "peft": "lora", "gate": "query_aware", "gate_rank": 8, "gate_dropout": 0.1,
          "hidden_size": 64, "prompt_template": "chat", "system_prompt": None, "init_lora_weights": "default",
          "calibration": None}


def _checkpoint(out, step, complete=True, legacy=False):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(json.dumps(CONFIG if legacy else CONFIG | {"format_version": 1}))
    if complete and not legacy:
        mark_complete(folder, step)
    return folder


def test_latest_skips_interrupted_checkpoints_and_accepts_older_complete_ones(tmp_path):
    _checkpoint(tmp_path, 10, legacy=True)  # renamed into place whole by the versions before COMPLETE
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 30, complete=False)
    (tmp_path / "checkpoint-40").write_text("a file, not a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert not is_complete(tmp_path / "checkpoint-30")


def test_rotation_counts_complete_checkpoints_and_keeps_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 5, complete=False)
    rotate_checkpoints(tmp_path, keep=2, protect=tmp_path / "checkpoint-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-4",
                                                         "checkpoint-5"]
