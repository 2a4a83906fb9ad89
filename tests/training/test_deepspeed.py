"""Real ``deepspeed`` launches of train.py on CPU: ZeRO-2 on one process, ZeRO-3 on two.

The saved run must reload to the same logits as the model DeepSpeed holds at the end of training, read back
independently from the engine's own checkpoint (its fp32 master weights, via DeepSpeed's zero_to_fp32).
"""

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imsm.args import ImsmArguments
from imsm.loader import build_imsm_model, load_backbone, load_run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.launch


def _launch(nproc, config, model_dir, train_file, out, *extra):
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
           "--master_port", str(random.randint(20000, 40000)), str(ROOT / "train.py"),
           "--deepspeed", str(ROOT / "ds_configs" / config), "--model_name_or_path", str(model_dir),
           "--train_file", str(train_file), "--output_dir", str(out), "--per_device_train_batch_size", str(4 // nproc),
           "--learning_rate", "1e-2", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
           "--report_to", "none", "--seed", "3", "--disable_tqdm", "true", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _probe_logits(model, tokenizer):
    ids = tokenizer(["Question: Is 3 odd ? Output: yes", "Question: Is 4 odd ? Output:"], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        return model.eval()(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                            query_mask=ids["attention_mask"])["logits"]


def _engine_state_model(model_dir, checkpoint):
    """The model at the end of training, rebuilt from DeepSpeed's own checkpoint rather than our run folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    backbone, tokenizer, _ = load_backbone(str(model_dir))
    model = build_imsm_model(backbone, ImsmArguments.create())
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    assert state and all(not k.startswith("peft_model.base_model.model.model.embed") for k in state)
    model.load_state_dict(state, strict=True)
    return model, tokenizer


@pytest.mark.parametrize("nproc,config", [(1, "zero2.json"), (2, "zero3.json")])
def test_deepspeed_run_saves_trained_adapter_and_gate(tiny_model_dir, tiny_train_file, tmp_path, nproc, config):
    out = tmp_path / "run"
    _launch(nproc, config, tiny_model_dir, tiny_train_file, out)
    engine_model, tokenizer = _engine_state_model(tiny_model_dir, out / "checkpoint-4")
    reloaded, _, _ = load_run(out / "final")
    torch.testing.assert_close(_probe_logits(reloaded, tokenizer), _probe_logits(engine_model, tokenizer))
    gate = load_file(str(out / "final" / "gate.safetensors"))
    assert gate["w_a.weight"].shape == (8, 4 * 32) and gate["w_b.weight"].abs().sum() > 0  # trained, not a shard
    # checkpoints hold no frozen backbone weights
    states = list((out / "checkpoint-4").glob("global_step4/*model_states.pt"))
    assert states and all(p.stat().st_size < 1_000_000 for p in states)


def test_deepspeed_resume_reaches_the_uninterrupted_adapter(tiny_model_dir, tiny_train_file, tmp_path):
    full = tmp_path / "full"
    _launch(1, "zero2.json", tiny_model_dir, tiny_train_file, full)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    _launch(1, "zero2.json", tiny_model_dir, tiny_train_file, part, "--resume_from_checkpoint", "latest")
    for name in ("adapter_model.safetensors", "gate.safetensors"):
        expected, got = load_file(str(full / "final" / name)), load_file(str(part / "final" / name))
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], msg=k)


def test_deepspeed_adalora_allocates(tiny_model_dir, tiny_train_file, tmp_path):
    import json

    out = tmp_path / "run"
    _launch(1, "zero2.json", tiny_model_dir, tiny_train_file, out, "--peft", "adalora", "--adalora_init_r", "4",
            "--adalora_target_r", "2", "--adalora_tinit", "1", "--adalora_tfinal", "1", "--max_steps", "5")
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["rank_pattern"], "update_and_allocate never ran under DeepSpeed"
    load_run(out / "final")


def test_run_script_launches_for_real(tiny_model_dir, tiny_train_file, tmp_path):
    import os

    data = tmp_path / "data" / "cola"
    data.mkdir(parents=True)
    shutil.copy(tiny_train_file, data / "train.jsonl")
    env = {**os.environ, "MODEL": str(tiny_model_dir), "GPUS": "1", "PER_DEVICE_BATCH": "4",
           "DATA_DIR": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "run"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "run_scripts/imsm_lora_cola.sh", "--max_steps", "2", "--bf16", "false",
                           "--report_to", "none"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    load_run(tmp_path / "run" / "final")
