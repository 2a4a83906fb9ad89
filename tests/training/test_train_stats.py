"""train_stats.json: what a run cost (wall time, optimizer steps, tokens seen), kept across a resume."""

import json
import shutil

import pytest

import train
from imsm.data import SupervisedDataset
from imsm.loader import load_backbone
from imsm.run_folder import read_train_stats
from imsm.templates import build_template

pytestmark = pytest.mark.usefixtures("single_thread")


def _train(model_dir, train_file, out, *extra):
    return train.main(["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir",
                       str(out), "--gate", "none", "--per_device_train_batch_size", "4", "--report_to", "none",
                       "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--seed", "1",
                       "--disable_tqdm", "true", *extra])


def test_stats_count_one_epoch_and_survive_a_resume(tiny_model_dir, tiny_train_file, tmp_path):
    _train(tiny_model_dir, tiny_train_file, tmp_path / "full")
    full = read_train_stats(tmp_path / "full")
    # 8 steps of 4 rows are one pass over the 32 rows: every row's prompt and answer tokens are seen once
    _, tokenizer, _ = load_backbone(str(tiny_model_dir))
    dataset = SupervisedDataset(str(tiny_train_file), build_template("raw", tokenizer), 1024, 512)
    assert full["tokens_seen"] == sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
    assert full["optimizer_steps"] == 8 and full["world_size"] == 1 and full["trainable_parameters"] > 0
    assert read_train_stats(tmp_path / "full" / "checkpoint-4")["optimizer_steps"] == 4

    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", part / "checkpoint-4")
    stats_file = part / "checkpoint-4" / "train_stats.json"
    earlier = json.loads(stats_file.read_text()) | {"train_runtime_s": 1000.0}  # an earlier session's wall time
    stats_file.write_text(json.dumps(earlier))
    _train(tiny_model_dir, tiny_train_file, part, "--resume_from_checkpoint", "latest")
    resumed = read_train_stats(part)
    assert resumed["train_runtime_s"] > 1000.0
    assert resumed["optimizer_steps"] == 8 and resumed["tokens_seen"] == full["tokens_seen"]
