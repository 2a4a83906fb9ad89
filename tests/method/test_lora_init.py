"""PiSSA and CorDA (knowledge-preserved mode) inits: the run is saved as a LoRA on the pretrained weights and reloads
to the trained model, CorDA records its calibration rows, resume is exact, and the IMSM gate is refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train
from imsm.args import ImsmArguments
from imsm.evaluation.planning import calibration_rows
from imsm.loader import load_run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("general") / "test.jsonl"
    words = ["cat", "dog", "red", "blue", "big", "small"]
    rows = [{"input": f"Question: what is the {words[i % 6]} {words[(i * 5) % 6]} number {i % 10} ? Output:",
             "output": words[i % 6]} for i in range(14)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(model_dir, train_file, out, *extra):
    return train.main(["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir",
                       str(out), "--peft", "lora", "--gate", "none", "--lora_r", "4", "--lora_alpha", "8",
                       "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
                       "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--seed", "5",
                       "--disable_tqdm", "true", *extra])


def _probe(model, tokenizer):
    ids = tokenizer(["Question: Is 3 odd ? Output: yes", "Question: Is 4 odd ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                            query_mask=ids["attention_mask"])["logits"]


def _init_args(init, calibration_file):
    if init == "corda":
        return ["--init_lora_weights", "corda", "--corda_calibration_file", str(calibration_file),
                "--corda_calibration_examples", "8", "--corda_calibration_skip", "2"]
    return ["--init_lora_weights", "pissa"]


@pytest.mark.parametrize("init", ["pissa", "corda"])
def test_run_is_a_lora_on_the_pretrained_weights_and_reloads(tiny_model_dir, tiny_train_file, calibration_file,
                                                               tmp_path, init):
    out = tmp_path / "run"
    trainer = _train(tiny_model_dir, tiny_train_file, out, *_init_args(init, calibration_file))
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained_base = trainer.model.peft_model.get_base_model()
    q_name = "model.layers.0.self_attn.q_proj"
    residual = trained_base.get_submodule(q_name).base_layer.weight
    assert not torch.allclose(residual, pretrained.get_submodule(q_name).weight, atol=1e-4)  # the init moved W
    reloaded, tokenizer, settings = load_run(out / "final")
    assert settings.method_options["init_lora_weights"] == init
    # the reloaded model starts from the pretrained weights, not the residual, and gives the trained logits
    torch.testing.assert_close(reloaded.peft_model.get_base_model().get_submodule(q_name).base_layer.weight,
                               pretrained.get_submodule(q_name).weight)
    torch.testing.assert_close(_probe(reloaded, tokenizer), _probe(trainer.model, tokenizer), atol=1e-4, rtol=1e-4)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    if init == "corda":
        rows = {(str(calibration_file.resolve()), i) for i in range(2, 10)}
        assert calibration_rows(out) == rows and calibration_rows(out / "checkpoint-2") == rows
    else:
        assert calibration_rows(out) == set()


def test_pissa_resume_reaches_the_uninterrupted_adapter(tiny_model_dir, tiny_train_file, tmp_path):
    full = tmp_path / "full"
    _train(tiny_model_dir, tiny_train_file, full, "--init_lora_weights", "pissa")
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    _train(tiny_model_dir, tiny_train_file, part, "--init_lora_weights", "pissa", "--resume_from_checkpoint", "latest")
    expected = load_file(str(full / "final" / "adapter_model.safetensors"))
    got = load_file(str(part / "final" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)


@pytest.mark.parametrize("init", ["pissa", "corda"])
def test_imsm_gate_is_refused_saying_why(init, calibration_file):
    extra = {"corda_calibration_file": str(calibration_file)} if init == "corda" else {}
    with pytest.raises(ValueError, match="no longer the pretrained model"):
        ImsmArguments.create(peft="lora", gate="query_aware", init_lora_weights=init, **extra)


def test_corda_is_refused_under_zero3(calibration_file):
    from conftest import make_llama
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from imsm.method.lora_init import calibrate_corda

    args = ImsmArguments.create(gate="none", init_lora_weights="corda", corda_calibration_file=str(calibration_file))
    ds_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})
    try:
        with pytest.raises(ValueError, match="ZeRO-3"):
            calibrate_corda(make_llama(64), None, args, template=object(), max_input_length=16)
    finally:
        del ds_config
        unset_hf_deepspeed_config()


@pytest.mark.parametrize("kw,match", [
    ({"init_lora_weights": "olora"}, "choose one of"),
    ({"peft": "ia3", "init_lora_weights": "pissa"}, "--init_lora_weights is an option of --peft lora"),
    ({"init_lora_weights": "corda"}, "needs --corda_calibration_file"),
    ({"corda_calibration_file": "x.jsonl"}, "needs --corda_calibration_file"),
    ({"init_lora_weights": "pissa", "pissa_niter": 0}, "pissa_niter"),
    ({"pissa_niter": 4}, "pissa_niter"),
])
def test_bad_init_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ImsmArguments.create(gate="none", **kw)


@pytest.mark.launch
@pytest.mark.parametrize("nproc,config", [(1, "zero2.json"), (2, "zero3.json")])
def test_deepspeed_pissa_run_reloads_to_the_engines_model(tiny_model_dir, tiny_train_file, tmp_path, nproc, config):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_deepspeed import _launch, _probe_logits

    from imsm.loader import build_imsm_model, load_backbone

    out = tmp_path / "run"
    _launch(nproc, config, tiny_model_dir, tiny_train_file, out, "--gate", "none", "--init_lora_weights", "pissa")
    # the engine's model: the PiSSA residual base plus the unconverted adapter from DeepSpeed's fp32 checkpoint
    backbone, tokenizer, _ = load_backbone(str(tiny_model_dir))
    engine_model = build_imsm_model(backbone, ImsmArguments.create(gate="none", init_lora_weights="pissa"))
    engine_model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4")), strict=True)
    reloaded, _, _ = load_run(out / "final")  # the pretrained weights plus the converted adapter
    torch.testing.assert_close(_probe_logits(reloaded, tokenizer), _probe_logits(engine_model, tokenizer))


def test_evaluation_skips_the_calibration_rows_for_every_model(tiny_model_dir, tiny_train_file, calibration_file,
                                                               tmp_path):
    import evaluate

    data = tmp_path / "data" / "webq"
    data.mkdir(parents=True)
    shutil.copy(calibration_file, data / "test.jsonl")  # the general benchmark's test file is the calibration file
    run = tmp_path / "corda"
    _train(tiny_model_dir, tiny_train_file, run, "--init_lora_weights", "corda", "--corda_calibration_file",
           str(data / "test.jsonl"), "--corda_calibration_examples", "8", "--corda_calibration_skip", "2")
    out = tmp_path / "eval"
    evaluate.main(["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(tmp_path / "data"), "--tasks",
                   "webq", "--untuned", "--run", str(run), "--labels", "untuned,CorDA", "--output_dir", str(out),
                   "--max_new_tokens", "2"])
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    expected = [r["input"] for i, r in enumerate(rows) if not 2 <= i < 10]  # rows 2-9 calibrated CorDA
    for label in ("untuned", "CorDA"):
        preds = [json.loads(line) for line in (out / label / "webq" / "predictions.jsonl").read_text().splitlines()]
        assert [p["input"] for p in preds] == expected
    assert "rows 2-9 of" in (out / "summary.md").read_text()
    assert json.loads((out / "stats.json").read_text())["notes"][0].startswith("webq: rows 2-9")
