"""train.py in-process on a tiny Llama: the saved run reloads, resume is exact, an interrupted save loses nothing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

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
    assert settings.gate == "query_aware" and settings.prompt_template == "raw"
    args = json.loads((final / "run_args.json").read_text())
    assert args["peft"] == "lora" and args["training"]["max_steps"] == 4
    # the adapter moved away from its zero-initialised B, and the saved adapter is PEFT's own format
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in _state(final).items())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4", "final",
                                                                 "imsm_output.json"]


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


def _fail_on_call(monkeypatch, module, name, call):
    """Make ``module.name`` raise on its ``call``-th call (a crash at that moment), counting from 1."""
    real, calls = getattr(module, name), []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            raise OSError("killed (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(module, name, failing)
    return real


def test_interrupted_checkpoint_is_never_resumed_from(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    import imsm.loader
    import imsm.training.output_folder

    real = _fail_on_call(monkeypatch, imsm.loader, "save_file", 2)  # the gate file of checkpoint-4
    out = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "4", "--save_steps", "2"))
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "COMPLETE").exists()
    assert imsm.training.output_folder.latest_checkpoint(out) == out / "checkpoint-2"
    load_run(out / "checkpoint-2")  # complete and loadable
    with pytest.raises(ValueError, match="interrupted checkpoint"):
        train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "4", "--save_steps", "2",
                         "--resume_from_checkpoint", str(out / "checkpoint-4")))
    (out / "checkpoint-4" / "stale.txt").write_text("from the crashed save")
    monkeypatch.setattr(imsm.loader, "save_file", real)
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "4", "--save_steps", "2",
                     "--resume_from_checkpoint", "latest"))
    assert (out / "checkpoint-4" / "COMPLETE").is_file() and (out / "final" / "COMPLETE").is_file()
    assert not (out / "checkpoint-4" / "stale.txt").exists()


def test_interrupted_final_save_keeps_the_old_final(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "2", "--save_strategy", "no"))
    before = _state(out / "final")
    import imsm.loader

    _fail_on_call(monkeypatch, imsm.loader, "save_file", 1)
    with pytest.raises(OSError, match="simulated"):
        train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "3", "--save_strategy", "no"))
    after = _state(out / "final")
    for k in before:
        torch.testing.assert_close(after[k], before[k])


@pytest.mark.parametrize("crash_at", ["between_renames", "after_renames"])
def test_crash_while_swapping_final_leaves_a_loadable_final(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch,
                                                            crash_at):
    """final/ is replaced by two renames (final -> .final.old, staging -> final); a crash between them must not leave
    the run without final/: the next reader restores the complete new folder, and no .final.old stays behind."""
    import imsm.atomic

    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "2", "--save_strategy", "no"))
    real_replace, real_rmtree = imsm.atomic.os.replace, imsm.atomic.shutil.rmtree

    def replace(src, dst):  # the second rename: the complete new folder into final/
        if crash_at == "between_renames" and str(src).endswith(".final.staging"):
            raise OSError("killed (simulated)")
        return real_replace(src, dst)

    def rmtree(path, *a, **kw):  # the old folder's removal, after both renames
        if crash_at == "after_renames" and str(path).endswith(".final.old"):
            raise OSError("killed (simulated)")
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(imsm.atomic.os, "replace", replace)
    monkeypatch.setattr(imsm.atomic.shutil, "rmtree", rmtree)
    with pytest.raises(OSError, match="simulated"):
        train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "3", "--save_strategy", "no"))
    monkeypatch.undo()
    if crash_at == "between_renames":
        assert not (out / "final").exists()
    load_run(out / "final" if crash_at == "between_renames" else out)  # evaluate.py --run takes either
    assert json.loads((out / "final" / "COMPLETE").read_text())["global_step"] == 3
    assert not (out / ".final.old").exists() and not (out / ".final.staging").exists()


def test_finished_run_resumed_is_a_no_op(tiny_model_dir, tiny_train_file, tmp_path, caplog):
    out = tmp_path / "run"
    args = _args(tiny_model_dir, tiny_train_file, out, "--max_steps", "4", "--save_steps", "2",
                 "--lr_scheduler_type", "constant")
    train.main(args)
    before, listing = _state(out / "final"), sorted(p.name for p in out.iterdir())
    assert train.main([*args, "--resume_from_checkpoint", "latest"]) is None
    assert sorted(p.name for p in out.iterdir()) == listing  # no checkpoint-5, no new final
    for k, v in _state(out / "final").items():
        assert torch.equal(v, before[k]), k
    # killed after the last checkpoint, before final/: final/ comes from that checkpoint, without training
    shutil.rmtree(out / "final")
    assert train.main([*args, "--resume_from_checkpoint", "latest"]) is None
    for k, v in _state(out / "final").items():
        assert torch.equal(v, before[k]), k
    assert json.loads((out / "final" / "train_stats.json").read_text())["optimizer_steps"] == 4
    assert not (out / "final" / "optimizer.pt").exists()
    load_run(out)
    # a longer --max_steps continues training
    train.main([*args[:-6], "--max_steps", "6", "--save_steps", "2", "--lr_scheduler_type", "constant",
                "--resume_from_checkpoint", "latest"])
    assert (out / "checkpoint-6" / "COMPLETE").is_file()


def test_inputs_checked_before_the_model_loads(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    import imsm.loader

    monkeypatch.setattr(train, "load_backbone", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable|is a file"):
        train.main(_args(tiny_model_dir, tiny_train_file, blocker / "run", "--max_steps", "1"))
    with pytest.raises(NotADirectoryError, match="is a file"):
        train.main(_args(tiny_model_dir, tiny_train_file, blocker, "--max_steps", "1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing field 'output'"):
        train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", "--max_steps", "1", "--eval_file",
                         str(bad)))
    with pytest.raises(ValueError, match="--load_best_model_at_end needs validation data"):
        train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", "--max_steps", "2", "--eval_strategy",
                         "steps", "--eval_steps", "1", "--save_steps", "1", "--load_best_model_at_end", "true"))
    assert imsm.loader  # the loader itself was never reached


def test_validation_logs_loss_and_gate_and_loads_the_best(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "run"
    trainer = train.main(_args(tiny_model_dir, tiny_train_file, out, "--max_steps", "6", "--save_steps", "2",
                               "--eval_steps", "2", "--eval_strategy", "steps", "--validation_fraction", "0.25",
                               "--load_best_model_at_end", "true", "--save_total_limit", "1",
                               "--learning_rate", "5e-2"))
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6]
    assert all(0.0 < h["eval_gate_mean"] < 1.0 for h in evals)
    n = len(train.read_jsonl(tiny_train_file))
    assert len(trainer.eval_dataset) == round(0.25 * n) and len(trainer.train_dataset) == n - round(0.25 * n)
    best = min(evals, key=lambda h: h["eval_loss"])
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{best['step']}")
    expected = _state(out / f"checkpoint-{best['step']}")
    for k, v in _state(out / "final").items():
        torch.testing.assert_close(v, expected[k], msg=k)
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == sorted({f"checkpoint-{best['step']}", "checkpoint-6"})  # the newest and the best


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
