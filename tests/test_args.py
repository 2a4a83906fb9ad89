"""Command-line arguments: values that cannot work and options that the chosen method would ignore are clear errors."""

import pytest

from imsm.args import DataArguments, ImsmArguments


@pytest.mark.parametrize("n", [0, -1])
def test_max_train_examples_below_one_is_refused(n):
    with pytest.raises(ValueError, match=f"--max_train_examples {n}: must be at least 1"):
        DataArguments(max_train_examples=n)


@pytest.mark.parametrize("kw,option", [
    ({"peft": "lora", "adalora_init_r": 6}, "--adalora_init_r"),
    ({"peft": "lora", "adalora_orth_reg_weight": 0.1}, "--adalora_orth_reg_weight"),
    ({"peft": "dora", "loramoe_num_experts": 4}, "--loramoe_num_experts"),
    ({"peft": "ia3", "lora_r": 8}, "--lora_r"),
    ({"peft": "ia3", "lora_dropout": 0.0}, "--lora_dropout"),
    ({"peft": "adalora", "lora_r": 8}, "--lora_r"),  # AdaLoRA's ranks are --adalora_init_r/--adalora_target_r
    ({"peft": "loramoe", "lora_alpha": 32}, "--lora_alpha"),
    ({"peft": "lora", "feedforward_modules": ["down_proj"]}, "--feedforward_modules"),
    ({"gate": "none", "gate_rank": 4}, "--gate_rank"),
    ({"gate": "equal", "gate_dropout": 0.0}, "--gate_dropout"),
    ({"gate": "none", "gate_learning_rate": 1e-4}, "--gate_learning_rate"),
    ({"peft": "dora", "gate": "none", "corda_calibration_examples": 8}, "--corda_calibration_examples"),
])
def test_an_option_of_another_method_is_refused(kw, option):
    with pytest.raises(ValueError, match=f"{option} .*only applies to"):
        ImsmArguments(**kw)


def test_every_misplaced_option_is_named_at_once():
    with pytest.raises(ValueError) as e:
        ImsmArguments(peft="ia3", gate="none", lora_r=8, gate_rank=4, adalora_tinit=3)
    for option in ("--lora_r", "--gate_rank", "--adalora_tinit"):
        assert option in str(e.value)


@pytest.mark.parametrize("kw", [
    {"peft": "lora", "lora_r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "gate_rank": 4, "gate_dropout": 0.0},
    {"peft": "dora", "lora_r": 8, "gate": "token", "gate_learning_rate": 1e-4},
    {"peft": "adalora", "adalora_init_r": 6, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]},
    {"peft": "ia3", "feedforward_modules": ["down_proj"], "target_modules": ["down_proj"]},
    {"peft": "loramoe", "gate": "none", "loramoe_r": 2, "target_modules": ["up_proj"]},
    # the default value of another method's option is indistinguishable from leaving it out: accepted
    {"peft": "ia3", "gate": "none", "lora_r": 16, "gate_rank": 8},
])
def test_options_of_the_chosen_method_are_accepted(kw):
    ImsmArguments(**kw)


def test_every_method_specific_option_is_in_the_table():
    """The table covers each option that only some methods read, and names only real options."""
    from dataclasses import fields

    from imsm.args import OPTION_APPLIES_TO

    tagged = set(OPTION_APPLIES_TO)
    assert tagged <= {f.name for f in fields(ImsmArguments)}
    assert {f.name for f in fields(ImsmArguments) if f.name.startswith(("adalora_", "loramoe_", "lora_", "gate_",
                                                                         "corda_", "pissa_"))} <= tagged
    assert "feedforward_modules" in tagged and "target_modules" not in tagged


def test_max_output_length_must_leave_room_for_an_answer_token_and_its_eos():
    with pytest.raises(ValueError, match="--max_output_length 1: .*at least 2"):
        DataArguments(max_output_length=1)
