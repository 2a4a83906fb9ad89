"""Adapter scaling: alpha = 0 is the untuned model, alpha = 1 the run, alpha = 0.5 a merged model built by hand for
LoRA and (IA)3; IMSM runs are refused; evaluate.py makes one row per scale."""

import json

import pytest
import torch
from method.cases import SCALABLE, TOTAL_STEPS, method_args, perturb

import evaluate
from imsm.args import DataArguments
from imsm.evaluation.decoding.scaling import load_scaled_run, parse_scales
from imsm.loader import build_imsm_model, load_backbone, load_run, make_run_config, save_run_files


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny matrices only."""


def _save(tiny_model_dir, out, peft="lora", gate="none", seed=0):
    backbone, _, path = load_backbone(str(tiny_model_dir), attn_implementation="sdpa")
    ia3 = {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    args = method_args(peft, gate, **(ia3 if peft == "ia3" else {}))
    model = build_imsm_model(backbone, args, total_steps=TOTAL_STEPS)
    perturb(model, seed=seed)
    config = make_run_config(args, DataArguments(), path, backbone.config.hidden_size)
    save_run_files(model, out, config, None, True)
    return out


def _logits(model, ids):
    with torch.no_grad():
        if hasattr(model, "imsm_gate"):
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), query_mask=torch.ones_like(ids))["logits"]
        return model(input_ids=ids).logits


@pytest.mark.parametrize("peft", SCALABLE)
def test_scale_zero_is_untuned_and_one_is_the_run(tiny_model_dir, tmp_path, peft):
    run = _save(tiny_model_dir, tmp_path / "run", peft)
    ids = torch.tensor([[1, 5, 9, 13, 7, 22]])
    untuned, _, _ = load_backbone(str(tiny_model_dir))
    tuned, _, _ = load_run(run)
    zero, _, _ = load_scaled_run(run, 0.0)
    one, _, _ = load_scaled_run(run, 1.0)
    torch.testing.assert_close(_logits(zero, ids), _logits(untuned, ids))
    torch.testing.assert_close(_logits(one, ids), _logits(tuned, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(one, ids), _logits(untuned, ids), atol=1e-3)


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_half_scale_equals_a_model_merged_by_hand(tiny_model_dir, tmp_path, peft):
    from safetensors.torch import load_file

    run = _save(tiny_model_dir, tmp_path / "run", peft, seed=3)
    saved = load_file(str(run / "adapter_model.safetensors"))
    expected, _, _ = load_backbone(str(tiny_model_dir))
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for key, tensor in saved.items():
            module = key.removeprefix("base_model.model.").rsplit(".", 2)[0] if peft == "lora" else \
                key.removeprefix("base_model.model.").rsplit(".", 1)[0]
            weight = params[module + ".weight"]
            if peft == "lora" and "lora_A" in key:  # W0 + 0.5 * (alpha / r) * B @ A
                b = saved[key.replace("lora_A", "lora_B")]
                weight.add_(0.5 * (8 / 4) * b @ tensor)
            elif peft == "ia3":  # l -> 1 + 0.5 (l - 1); feed-forward l scales the input, others the output
                scale = 1 + 0.5 * (tensor.flatten() - 1)
                weight.mul_(scale[None, :] if "down_proj" in key else scale[:, None])
    half, _, _ = load_scaled_run(run, 0.5)
    ids = torch.tensor([[1, 4, 8, 12, 30, 2]])
    torch.testing.assert_close(_logits(half, ids), _logits(expected, ids), atol=1e-5, rtol=1e-5)


def test_imsm_runs_and_bad_lists_are_refused(tiny_model_dir, tmp_path):
    imsm = _save(tiny_model_dir, tmp_path / "imsm", gate="query_aware")
    with pytest.raises(ValueError, match="IMSM run .* no single weight update"):
        load_scaled_run(imsm, 0.5)
    with pytest.raises(ValueError, match="'half' is not a number"):
        parse_scales("0.25,half")
    with pytest.raises(ValueError, match="not a new finite number"):
        parse_scales("0.5,0.5")
    assert parse_scales("0, 0.5,1") == [0.0, 0.5, 1.0]


def test_evaluate_makes_one_row_per_scale(tiny_model_dir, tmp_path):
    lora = _save(tiny_model_dir, tmp_path / "lora")
    imsm = _save(tiny_model_dir, tmp_path / "imsm", gate="query_aware", seed=1)
    data = tmp_path / "data" / "mrpc"
    data.mkdir(parents=True)
    data.joinpath("test.jsonl").write_text("".join(
        json.dumps({"input": f"Question: Is {i} odd ? Output:", "output": "yes" if i % 2 else "no"}) + "\n"
        for i in range(6)))
    out = tmp_path / "eval"
    base = ["--model_name_or_path", str(tiny_model_dir), "--data_dir", str(tmp_path / "data"), "--tasks", "mrpc",
            "--max_new_tokens", "2"]
    evaluate.main([*base, "--output_dir", str(out), "--untuned", "--run", str(lora), str(imsm),
                   "--adapter_scale", "0,0.5,1", "--compare", "IMSM-LoRA:LoRA@1"])
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["labels"]) == ["untuned", "LoRA@0", "LoRA@0.5", "LoRA@1", "IMSM-LoRA"]
    nll = {label: v["tasks"]["mrpc"]["answer_nll"]["value"] for label, v in stats["labels"].items()}
    assert nll["LoRA@0"] == pytest.approx(nll["untuned"], abs=1e-6)
    assert nll["LoRA@0.5"] != pytest.approx(nll["LoRA@1"], abs=1e-4)
    # --full_scale_labels: that run stays one row at its full update, the same as the scale-1 row
    evaluate.main([*base, "--output_dir", str(tmp_path / "full"), "--untuned", "--run", str(lora), str(lora),
                   "--labels", "untuned,LoRA,LoRA-full", "--adapter_scale", "0.5", "--full_scale_labels", "LoRA-full"])
    full = json.loads((tmp_path / "full" / "stats.json").read_text())["labels"]
    assert list(full) == ["untuned", "LoRA@0.5", "LoRA-full"]
    assert full["LoRA-full"]["tasks"]["mrpc"]["answer_nll"]["value"] == pytest.approx(nll["LoRA@1"], abs=1e-6)
    with pytest.raises(ValueError, match="not labels of this evaluation"):
        evaluate.main([*base, "--output_dir", str(tmp_path / "o4"), "--run", str(lora), "--adapter_scale", "0.5",
                       "--full_scale_labels", "LoRA@step30"])
    with pytest.raises(ValueError, match="none is given"):
        evaluate.main([*base, "--output_dir", str(tmp_path / "o2"), "--run", str(imsm), "--adapter_scale", "0.5"])
    with pytest.raises(ValueError, match="not a number"):
        evaluate.main([*base, "--output_dir", str(tmp_path / "o3"), "--run", str(lora), "--adapter_scale", "x"])


def test_only_mergeable_vanilla_runs_are_expanded(tmp_path):
    from imsm.evaluation.planning import MethodKey, ModelPlan, expand_scales

    plans = [ModelPlan("untuned", "m", "raw", None),
             ModelPlan("LoRAMoE", "m", "raw", None, tmp_path / "a", MethodKey("loramoe", "none", 8)),
             ModelPlan("IMSM", "m", "raw", None, tmp_path / "b", MethodKey("lora", "query_aware", 8)),
             ModelPlan("IA3", "m", "raw", None, tmp_path / "c", MethodKey("ia3", "none", 8))]
    out = expand_scales(plans, [0.5, 1.0])
    assert [(p.label, p.scale) for p in out] == [("untuned", None), ("LoRAMoE", None), ("IMSM", None),
                                                 ("IA3@0.5", 0.5), ("IA3@1", 1.0)]
    with pytest.raises(ValueError, match="LoRAMoE run routes per token"):
        expand_scales(plans[:3], [0.5])
    # --full_scale_labels: a labelled run (a checkpoint on the frontier) stays one row at its full update
    checkpoint = ModelPlan("IA3@step30", "m", "raw", None, tmp_path / "d", MethodKey("ia3", "none", 8))
    out = expand_scales([*plans, checkpoint], [0.5, 1.0], {"IA3@step30"})
    assert [(p.label, p.scale) for p in out][-3:] == [("IA3@0.5", 0.5), ("IA3@1", 1.0), ("IA3@step30", None)]
