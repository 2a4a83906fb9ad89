"""Command-line arguments: values that cannot work and options that the chosen method or gate would ignore are clear
errors, naming the method that reads them."""

import pytest

from imsm.args import DataArguments, ImsmArguments, parse_train_args


@pytest.mark.parametrize("n", [0, -1])
def test_max_train_examples_below_one_is_refused(n):
    with pytest.raises(ValueError, match=f"--max_train_examples {n}: must be at least 1"):
        DataArguments(max_train_examples=n)


@pytest.mark.parametrize("kw,option,readers", [
    ({"peft": "lora", "adalora_init_r": 6}, "--adalora_init_r", "adalora"),
    ({"peft": "lora", "adalora_orth_reg_weight": 0.1}, "--adalora_orth_reg_weight", "adalora"),
    ({"peft": "dora", "loramoe_num_experts": 4}, "--loramoe_num_experts", "loramoe"),
    ({"peft": "ia3", "lora_r": 8}, "--lora_r", "dora/lora"),
    ({"peft": "ia3", "lora_dropout": 0.0}, "--lora_dropout", "adalora/dora/lora"),
    ({"peft": "adalora", "lora_r": 8}, "--lora_r", "dora/lora"),  # AdaLoRA's ranks: --adalora_init_r/_target_r
    ({"peft": "loramoe", "lora_alpha": 32}, "--lora_alpha", "adalora/dora/lora"),
    ({"peft": "lora", "feedforward_modules": ["down_proj"]}, "--feedforward_modules", "ia3"),
    ({"peft": "dora", "gate": "none", "corda_calibration_examples": 8}, "--corda_calibration_examples", "lora"),
    # another method's option is refused even at its default value: the method does not have it at all
    ({"peft": "ia3", "gate": "none", "lora_r": 16}, "--lora_r", "dora/lora"),
])
def test_an_option_of_another_method_is_refused_naming_its_method(kw, option, readers, tmp_path):
    with pytest.raises(ValueError, match=f"{option} is an option of --peft {readers}"):
        ImsmArguments.create(**kw)
    # the same on the command line: the chosen method's parser does not know the option
    argv = [f"--{k}" if v is True else f"--{k}={v[0] if isinstance(v, list) else v}" for k, v in kw.items()]
    with pytest.raises(ValueError, match=f"{option} is an option of --peft {readers}"):
        parse_train_args([*argv, "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("kw,option", [
    ({"gate": "none", "gate_rank": 4}, "--gate_rank"),
    ({"gate": "equal", "gate_dropout": 0.0}, "--gate_dropout"),
    ({"gate": "none", "gate_learning_rate": 1e-4}, "--gate_learning_rate"),
    ({"gate": "none", "frozen_memory_cache": "on"}, "--frozen_memory_cache"),
])
def test_an_option_of_another_gate_is_refused(kw, option):
    with pytest.raises(ValueError, match=f"{option} .*only applies to --gate"):
        ImsmArguments.create(**kw)


def test_every_misplaced_option_is_named_at_once():
    with pytest.raises(ValueError) as e:
        ImsmArguments.create(peft="ia3", gate="none", lora_r=8, adalora_tinit=3)
    for option in ("--lora_r", "--adalora_tinit"):
        assert option in str(e.value)


def test_an_unknown_option_is_still_an_argparse_error(tmp_path):
    with pytest.raises(ValueError, match="--no_such_option is not an option"):
        parse_train_args(["--no_such_option", "3", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("kw", [
    {"peft": "lora", "lora_r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "gate_rank": 4, "gate_dropout": 0.0},
    {"peft": "dora", "lora_r": 8, "gate": "token", "gate_learning_rate": 1e-4},
    {"peft": "adalora", "adalora_init_r": 6, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]},
    {"peft": "ia3", "feedforward_modules": ["down_proj"], "target_modules": ["down_proj"]},
    {"peft": "loramoe", "gate": "none", "loramoe_r": 2, "target_modules": ["up_proj"]},
    # the default value of another gate's option is indistinguishable from leaving it out: accepted
    {"peft": "ia3", "gate": "none", "gate_rank": 8},
])
def test_options_of_the_chosen_method_are_accepted(kw):
    args = ImsmArguments.create(**kw)
    assert isinstance(args.options, args.method.options_class)
    for name, value in kw.items():
        assert getattr(args.options if name in args.method.option_names() else args, name) == value


def test_every_method_lists_its_options_with_help_and_no_option_is_shared_with_the_common_ones():
    """Each registered method is one file with a typed options class whose fields all carry help; none of them
    shadows a common option (``ImsmArguments``), so one command line cannot mean two things. The set of methods is
    not pinned: every file of imsm/method/adapters but base and registry registers at least one, defined there."""
    import pkgutil
    from dataclasses import fields

    from imsm.method import adapters
    from imsm.method.adapters import METHODS

    files = {m.name for m in pkgutil.iter_modules(adapters.__path__)} - {"base", "registry"}
    defined_in = {type(spec).__module__.rsplit(".", 1)[-1] for spec in METHODS.values()}
    assert files and files <= defined_in, f"a method file registers nothing: {sorted(files - defined_in)}"
    common = {f.name for f in fields(ImsmArguments)}
    for name, spec in METHODS.items():
        assert spec.name == name and spec.files[0].endswith(".json") and spec.files[1].endswith(".safetensors")
        for f in fields(spec.options_class):
            assert f.metadata.get("help"), f"{name}: --{f.name} has no help string"
            assert f.name not in common, f"{name}: --{f.name} shadows a common option"


def test_help_lists_the_chosen_methods_options(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--peft", "adalora", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--adalora_init_r" in text and "--loramoe_r" not in text and "--peft NAME --help" in text


def test_max_output_length_must_leave_room_for_an_answer_token_and_its_eos():
    with pytest.raises(ValueError, match="--max_output_length 1: .*at least 2"):
        DataArguments(max_output_length=1)


@pytest.mark.parametrize("kw,match", [
    ({"peft": "lora", "lora_r": 0}, "--lora_r 0: the rank must be at least 1"),
    ({"peft": "dora", "lora_dropout": 1.0}, "--lora_dropout 1.0: must be in"),
    ({"peft": "adalora", "adalora_init_r": 0}, "--adalora_init_r and --adalora_target_r must be at least 1"),
])
def test_bad_method_option_values_fail_before_any_model_loads(kw, match):
    with pytest.raises(ValueError, match=match):
        ImsmArguments.create(**kw)
