"""train.py in-process on a tiny Llama: the saved run reloads, resume is exact, an interrupted save loses nothing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

import train
from imsm.loader import load_run

pytestmark = pytest.mark.usefixtures("single_thread")


def _args(model_dir, train_file, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "steps", "--seed", "7", "--disable_tqdm", "true", *extra]


def _probe(model, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["Question: Is 3 odd ? Output: yes", "Question: Is 8 odd ? Output: no"], return_tensors="pt")
    query = torch.ones_like(ids["input_ids"])
    query[:, -1] = 0
    with torch.no_grad():
        return model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], query_mask=query)["logits"]


def _state(run_dir):
    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    tensors |= {f"gate.{k}": v for k, v in load_file(str(run_dir / "gate.safetensors")).items()}
    return tensors


def test_saved_run_reloads_to_the_trained_model(tiny_model_dir, tiny_train_file, tmp_path):
    trainer = train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", "--max_steps", "4",
                               "--save_steps", "2"))
    final = tmp_path / "run" / "final"
    trained = trainer.model.eval()
    reloaded, _, settings = load_run(final)
    torch.testing.assert_close(_probe(reloaded, tiny_model_dir), _probe(trained, tiny_model_dir))
    assert settings["gate"] == "query_aware" and settings["prompt_template"] == "raw"
    args = json.loads((final / "run_args.json").read_text())
    assert args["peft"] == "lora" and args["training"]["max_steps"] == 4
    # the adapter moved away from its zero-initialised B, and the saved adapter is PEFT's own format
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in _state(final).items())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]


def test_resume_reaches_the_uninterrupted_adapter(tiny_model_dir, tiny_train_file, tmp_path):
    full = tmp_path / "full"
    train.main(_args(tiny_model_dir, tiny_train_file, full, "--max_steps", "6", "--save_steps", "3"))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    train.main(_args(tiny_model_dir, tiny_train_file, part, "--max_steps", "6", "--save_steps", "3",
                     "--resume_from_checkpoint", "latest"))
    expected, got = _state(full / "final"), _state(part / "final")
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)


def test_interrupted_checkpoint_save_keeps_the_previous_one(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    import imsm.training.checkpoint

    real, calls = imsm.training.checkpoint.save_file, []

    def failing_save(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(imsm.training.checkpoint, "save_file", failing_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "4", "--save_steps", "2"))
    assert not (out / "checkpoint-4").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    load_run(out / "checkpoint-2")  # complete and loadable
    leftover = out / ".staging" / "checkpoint-4"
    assert leftover.is_dir()  # the half-written one never took the checkpoint's name
    (leftover / "stale.txt").write_text("from the crashed save")
    monkeypatch.setattr(imsm.training.checkpoint, "save_file", real)
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "4", "--save_steps", "2",
                     "--resume_from_checkpoint", "latest"))
    assert (out / "checkpoint-4" / "gate.safetensors").is_file() and (out / "final" / "gate.safetensors").is_file()
    assert not (out / "checkpoint-4" / "stale.txt").exists() and not (out / ".staging").exists()


def test_interrupted_final_save_keeps_the_old_final(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "2", "--save_strategy", "no"))
    before = _state(out / "final")
    import imsm.training.checkpoint

    def failing_save(*a, **kw):
        raise OSError("killed mid-save (simulated)")

    monkeypatch.setattr(imsm.training.checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "3", "--save_strategy", "no"))
    after = _state(out / "final")
    for k in before:
        torch.testing.assert_close(after[k], before[k])


@pytest.mark.parametrize("extra,message", [
    (["--peft", "lokr"], "--peft 'lokr': choose one of"),
    (["--gate", "2"], "--gate '2': choose one of"),
    (["--prompt_template", "alpaca"], "--prompt_template 'alpaca'"),
])
def test_bad_arguments(tiny_model_dir, tiny_train_file, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", "--max_steps", "1", *extra))


def test_bad_train_file_names_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "Is 1 odd ?", "output": "yes"}\n{"input": "Is 2 odd ?"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'output'"):
        train.main(_args(tiny_model_dir, bad, tmp_path / "run", "--max_steps", "1"))
    assert not (tmp_path / "run" / "final").exists()


def test_adalora_allocates_ranks(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "6", "--save_strategy", "no",
                     "--peft", "adalora", "--adalora_init_r", "4", "--adalora_target_r", "2",
                     "--adalora_tinit", "1", "--adalora_tfinal", "2"))
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"], "update_and_allocate never ran"
    load_run(out / "final")


def test_tensorboard_logs_loss_lr_and_gate(tiny_model_dir, tiny_train_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "2", "--save_strategy", "no",
                     "--report_to", "tensorboard"))
    (log_dir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/gate_mean"} <= tags
    gate = [e.value for e in events.Scalars("train/gate_mean")]
    assert all(0.0 < g < 1.0 for g in gate)
