"""The method contract over the registry (``method.cases``): every registered method's run reloads to the same
logits, both the way evaluation loads it and the way training resumes it; a method whose adapter cannot round-trip
through its own files is refused before its first training step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from method.cases import ALL, build, method_args, perturb
from peft import TaskType, VeraConfig

import train
from imsm.args import DataArguments
from imsm.loader import load_backbone, load_run, load_trained_weights, make_run_config, save_run_files
from imsm.method.adapters import METHODS, MethodSpec, get_method
from imsm.method.adapters.lora import LoraMethod
from imsm.training.trainer import IMSMTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[1, 5, 9, 13, 7, 22, 30, 4], [1, 12, 6, 40, 3, 3, 3, 3]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
QUERY = torch.tensor([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5])


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(input_ids=IDS, attention_mask=MASK, query_mask=QUERY)["logits"]


def _saved_run(model_dir: Path, out: Path, peft: str, gate: str):
    """(the built and perturbed model, its run folder as train.py writes it)."""
    backbone, _, path = load_backbone(str(model_dir), attn_implementation="sdpa")
    args = method_args(peft, gate)
    model = build(backbone, peft, gate)
    perturb(model, seed=1)
    save_run_files(model, out, make_run_config(args, DataArguments(), path, backbone.config.hidden_size), None, True)
    return model, out


@pytest.mark.parametrize("gate", ["query_aware", "none"])
@pytest.mark.parametrize("peft", ALL)
def test_a_saved_run_reloads_with_the_same_logits(tiny_model_dir, tmp_path, peft, gate):
    model, run = _saved_run(tiny_model_dir, tmp_path / "run", peft, gate)
    expected = _logits(model)
    untuned, _, _ = load_backbone(str(tiny_model_dir), attn_implementation="sdpa")
    with torch.no_grad():
        base = untuned.eval()(input_ids=IDS, attention_mask=MASK).logits
    assert not torch.allclose(expected, base, atol=1e-3), "the perturbed adapter must change the outputs"

    loaded, _, config = load_run(run, attn_implementation="sdpa")  # evaluation's path: MethodSpec.load
    assert config.peft == peft and config.method_options == get_method(peft).record(method_args(peft, gate).options)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)

    torch.manual_seed(7)  # a fresh adapter with other random values, as a resumed run builds it
    backbone, _, _ = load_backbone(str(tiny_model_dir), attn_implementation="sdpa")
    resumed = build(backbone, peft, gate)
    load_trained_weights(resumed, run)  # training's resume path: MethodSpec.load_weights
    torch.testing.assert_close(_logits(resumed), expected, atol=1e-6, rtol=0)


# ---- methods that cannot round-trip, registered by the tests below ------------------------------------------------
@dataclass
class NoOptions:
    pass


class VeraWithoutProjections(MethodSpec):
    """PEFT's VeRA with its shared projection buffers left out of the saved state: PEFT refuses to save."""

    name = "test_vera_without_projections"
    display_name = "VeRA-broken"
    options_class = NoOptions

    def adapter_config(self, options, target_modules, model_type, total_steps) -> VeraConfig:
        return VeraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"])


class LoraForgettingB(LoraMethod):
    """A LoRA whose files lack every lora_B: it saves without error, and only reading it back fails."""

    name = "test_lora_forgetting_b"
    display_name = "LoRA-broken"

    def save(self, peft_model, state_dict, out_dir, initial_state=None) -> None:
        super().save(peft_model, {k: v for k, v in state_dict.items() if "lora_B" not in k}, out_dir, initial_state)


class LoraInHalfPrecision(LoraMethod):
    """A LoRA that saves in float16: saving and reading back succeed, and every lora_A comes back changed (lora_B,
    zero as built, survives)."""

    name = "test_lora_half_precision"
    display_name = "LoRA-fp16"

    def save(self, peft_model, state_dict, out_dir, initial_state=None) -> None:
        super().save(peft_model, {k: v.half() for k, v in state_dict.items()}, out_dir, initial_state)


SAVE_FAILS = (r"--peft test_vera_without_projections: a freshly built adapter cannot be saved "
              r"\(ValueError: .*vera_A")
READ_FAILS = (r"--peft test_lora_forgetting_b: a freshly built adapter cannot be read back from the files it saved "
              r"\(ValueError: .*lacks .*lora_B")
VALUES_CHANGE = (r"--peft test_lora_half_precision: 4 of the 8 tensors its adapter adds do not come back from the "
                 r"files it saves.*lora_A")


@pytest.mark.parametrize("spec,message", [
    (VeraWithoutProjections(), SAVE_FAILS), (LoraForgettingB(), READ_FAILS), (LoraInHalfPrecision(), VALUES_CHANGE),
], ids=["save fails", "read back fails", "values change"])
def test_a_method_that_cannot_round_trip_fails_before_its_first_step(monkeypatch, tiny_model_dir, tiny_train_file,
                                                                    tmp_path, spec, message):
    monkeypatch.setitem(METHODS, spec.name, spec)
    steps = []
    real_step = IMSMTrainer.training_step
    monkeypatch.setattr(IMSMTrainer, "training_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    with pytest.raises(ValueError, match=message):
        train.main(["--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_train_file),
                    "--output_dir", str(tmp_path / "run"), "--peft", spec.name, "--use_cpu", "--max_steps", "2",
                    "--save_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none"])
    assert steps == []
    assert not list((tmp_path / "run").glob("checkpoint-*"))
