"""The run-folder contract (imsm/run_folder.py): the typed, versioned config, validation without a model, the
safetensors integrity check."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imsm.method.gate import GATES, build_gate
from imsm.run_folder import (
    CONFIG_FILE,
    FORMAT_VERSION,
    RunConfig,
    safetensors_header,
)

CONFIG = {"base_model": "/models/llama", "peft": "lora", "gate": "query_aware", "gate_rank": 8, "gate_dropout": 0.1,
          "hidden_size": 64, "prompt_template": "chat", "system_prompt": None, "init_lora_weights": "default",
          "calibration": None}


def test_config_round_trips_and_older_folders_still_read(tmp_path):
    config = RunConfig.from_dict(CONFIG | {"format_version": 1}, "x")
    config.write(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["format_version"] == FORMAT_VERSION == 2
    assert RunConfig.read(tmp_path) == config
    legacy = RunConfig.from_dict(dict(CONFIG), "legacy")  # written before the format was versioned
    assert legacy == RunConfig.from_dict(CONFIG | {"format_version": 1}, "x")


@pytest.mark.parametrize("peft,files", [("lora", ["adapter_config.json", "adapter_model.safetensors"]),
                                        ("loramoe", ["loramoe_config.json", "loramoe_model.safetensors"])])
def test_format_1_moves_the_method_settings_into_method_options(peft, files):
    """Format 1 kept LoRA's init and CorDA's calibration rows at the top and implied the adapter files by the
    method; format 2 stores both as data. A format-1 folder reads as the same run."""
    calibration = {"file": "/data/calib.jsonl", "rows": [2, 3]}
    old = CONFIG | {"peft": peft, "format_version": 1, "init_lora_weights": "corda", "calibration": calibration}
    config = RunConfig.from_dict(old, "old")
    assert config.method_options == {"init_lora_weights": "corda", "calibration": calibration}
    assert list(config.adapter_files) == files
    assert config.to_dict()["format_version"] == 2 and "init_lora_weights" not in config.to_dict()
    assert RunConfig.from_dict(config.to_dict(), "new") == config


@pytest.mark.parametrize("change,message", [
    ({"format_version": FORMAT_VERSION + 1}, "written by a newer imsm"),
    ({"surprise": 1}, r"unknown keys \['surprise'\]"),
    ({"gate_rank": "8"}, "gate_rank has the wrong type"),
    ({"gate_rank": True}, "gate_rank has the wrong type"),
    ({"prompt_template": "alpaca"}, "prompt_template 'alpaca' is not one of"),
    ({"format_version": 2}, r"unknown keys \['calibration', 'init_lora_weights'\] for format 2"),
    ({"format_version": 2, "adapter_files": ["a.json"], "init_lora_weights": None, "calibration": None},
     "adapter_files must be two file names"),
])
def test_bad_configs_name_the_file(tmp_path, change, message):
    stored = {k: v for k, v in (CONFIG | change).items() if v is not None or k not in change}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=message) as info:
        RunConfig.read(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(info.value)


@pytest.mark.parametrize("change,message", [
    ({"gate": "softmax"}, "gate 'softmax' is not one of"),
    ({"peft": "lokr"}, "peft 'lokr': choose one of"),
    ({"peft": "loramoe"}, "are not the files --peft loramoe writes"),
])
def test_unknown_methods_and_gates_name_the_file(tmp_path, change, message):
    """The run folder stores a method's name as data; ``check_run`` (which knows the methods) refuses one it does not
    know, or files that are not the method's, naming the config file."""
    from imsm.loader import check_run

    stored = {k: v for k, v in (CONFIG | change).items() if k not in ("init_lora_weights", "calibration")}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(stored | {"format_version": 2}))
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    save_file({}, str(tmp_path / "gate.safetensors"))
    with pytest.raises(ValueError, match=message) as info:
        check_run(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(info.value)


def test_missing_keys_and_bad_json(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match=r"missing keys \['hidden_size'\]"):
        RunConfig.read(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        RunConfig.read(tmp_path)


@pytest.mark.parametrize("variant", sorted(GATES))
def test_gate_shapes_known_without_building_equal_the_built_gate(variant):
    built = {n: tuple(p.shape) for n, p in build_gate(variant, 24, 5).state_dict().items()}
    assert GATES[variant].parameter_shapes(24, 5) == built


def test_safetensors_header_catches_cut_and_padded_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}, str(path))
    assert safetensors_header(path) == {"a": ("F32", (3, 4)), "b": ("BF16", (2,))}
    whole = path.read_bytes()
    for damaged, message in ((whole[:-1], "truncated or corrupt"), (whole + b"\0", "truncated or corrupt"),
                             (whole[:5], "no header"), (whole[:8] + b"{" * (len(whole) - 8), "corrupt")):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=message) as info:
            safetensors_header(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("run", ["lora_query_aware", "lora_none", "loramoe_query_aware"])
def test_a_run_folder_written_in_format_1_still_loads_to_the_same_model(run, tiny_model_dir, tmp_path):
    """tests/data/format1/ holds run folders written by imsm before format 2 (commit 29b1bb5: LoRA with the IMSM gate
    and without, LoRAMoE with its format-1 files) on the tiny Llama the fixtures build, with the logits that
    version computed. They must load through today's loader (the config read as format 1) and give those logits."""
    import shutil

    from safetensors.torch import load_file

    from imsm.loader import check_run, load_run

    folder = shutil.copytree(Path(__file__).parent / "data" / "format1" / run, tmp_path / run)
    assert json.loads((folder / CONFIG_FILE).read_text())["format_version"] == 1
    assert check_run(folder).format_version == FORMAT_VERSION
    model, _, config = load_run(folder, str(tiny_model_dir))
    assert config.peft == run.split("_")[0] and config.method_options["init_lora_weights"] == "default"
    expected = load_file(str(folder / "expected_logits.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=torch.ones_like(expected["input_ids"]),
                       query_mask=expected["query_mask"])["logits"]
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
