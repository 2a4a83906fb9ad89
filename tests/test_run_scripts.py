"""Every launcher in run_scripts/ builds the deepspeed command the paper's settings call for, and refuses settings it
cannot launch before launching anything.

What a launcher does is read from the launcher itself: it runs with a stand-in ``deepspeed`` on PATH that records its
arguments, and its defaults (GPUS, PER_DEVICE_BATCH, GLOBAL_BATCH, ...) are parsed from its text. It is checked
against the settings the papers and the IMSM authors' published code state, written once per method below, and
against the other launchers: an IMSM launcher and its vanilla twin differ only in the gate, and the launchers of one
method differ only in the dataset.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from imsm.args import parse_train_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "run_scripts").glob("*.sh") if not p.name.startswith(("cpu_", "common")))
SHIM = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$CAPTURE"\n'
TASKS = ("gsm8k", "mrpc", "cola", "ropes")

# The IMSM paper's experimental settings (Meta-Llama-3-8B in the main table, Llama-2-7B for LoRAMoE as its Figure 3):
# global batch 16 ((IA)3: 8), 3 epochs, gate rank 8; LoRA r=16 alpha=16 lr 3e-4; AdaLoRA lr 2e-3; DoRA r=16
# alpha=32 lr 1e-4; (IA)3 Adafactor lr 3e-3. LoRAMoE: its authors' public launcher (run_loramoe.sh: lora_nums=8,
# lora_rank=4, lora_alpha=32, lora_dropout=0.05, blc_weight=blc_alpha=0, lr=0.0002).
PAPER = {
    "lora": {"learning_rate": 3e-4, "global_batch": 16, "lora_r": 16, "lora_alpha": 16},
    "adalora": {"learning_rate": 2e-3, "global_batch": 16},
    "dora": {"learning_rate": 1e-4, "global_batch": 16, "lora_r": 16, "lora_alpha": 32},
    "ia3": {"learning_rate": 3e-3, "global_batch": 8, "optim": "adafactor"},
    "loramoe": {"learning_rate": 2e-4, "global_batch": 16, "loramoe_num_experts": 8, "loramoe_r": 4,
                "loramoe_alpha": 32, "loramoe_dropout": 0.05, "loramoe_balance_weight": 0.0,
                "loramoe_balance_delta": 0.0},
}
MODEL = {"loramoe": "meta-llama/Llama-2-7b-hf"}  # every other method: meta-llama/Meta-Llama-3-8B
# Where the paper is silent, the IMSM authors' "Recommended parameters/llama3_{lora,adalora,ia3}_GSM8K.json"
# (DoRA has none, so LoRA's): scheduler, warmup ratio, weight decay, and the gate's dropout.
PUBLISHED_CODE = {
    "lora": ("cosine", 0.1, 0.01, 0.1),
    "adalora": ("cosine", 0.1, 0.01, 0.1),
    "dora": ("cosine", 0.1, 0.01, 0.1),
    "ia3": ("linear", 0.03, 0.0, 0.0),
    "loramoe": ("cosine", 0.03, 0.0, None),  # LoRAMoE's own launcher; it has no IMSM gate
}
GATE_OPTIONS = ("--gate", "--gate_rank", "--gate_dropout", "--gate_learning_rate", "--frozen_memory_cache")


def _run(script: Path, tmp_path: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                      Path]:
    """Run the launcher with a stand-in ``deepspeed`` that records its arguments instead of launching."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "deepspeed").write_text(SHIM)
    (bin_dir / "deepspeed").chmod(0o755)
    capture = tmp_path / f"{script.stem}.args"
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CAPTURE": str(capture), **(env or {})}
    done = subprocess.run(["bash", str(script), *extra], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          check=False)
    return done, capture


def _launcher_args(script: Path, tmp_path: Path, *extra: str, env: dict | None = None) -> list[str]:
    """The whole deepspeed command line the launcher runs."""
    done, capture = _run(script, tmp_path, *extra, env=env)
    assert done.returncode == 0, done.stderr
    return capture.read_text().splitlines()


def _captured_args(script: Path, tmp_path: Path, *extra: str, env: dict | None = None) -> list[str]:
    """The arguments the launcher hands train.py."""
    args = _launcher_args(script, tmp_path, *extra, env=env)
    return args[args.index("train.py") + 1 :]


def _options(args: list[str]) -> dict[str, str | None]:
    """``--name value`` pairs of a command line (None for a flag without a value)."""
    options = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[i + 1] if i + 1 < len(args) else None
            options[arg] = None if following is None or following.startswith("--") else following
    return options


def _defaults(script: Path) -> dict[str, str]:
    """The launcher's settings: ``NAME=${NAME:-default}`` lines and plain ``NAME=value`` ones (GLOBAL_BATCH)."""
    settings = {}
    for line in script.read_text().splitlines():
        if found := re.fullmatch(r"(\w+)=\$\{\1:-(.*)\}", line) or re.fullmatch(r"([A-Z_]+)=(\w+)", line):
            settings[found[1]] = found[2]
    return settings


def _parse(args: list[str], tmp_path: Path):
    """train.py's own parsing: (model, data, imsm with its method's ``options``, training) arguments."""
    return parse_train_args([*args, "--output_dir", str(tmp_path / "out"), "--bf16", "false"])


def _method(script: Path) -> str:
    return script.stem.removeprefix("imsm_").split("_")[0]


def test_one_imsm_and_one_vanilla_launcher_per_method_and_dataset():
    names = {p.stem for p in SCRIPTS}
    for method in ("lora", "adalora", "dora", "ia3"):
        for task in TASKS:
            assert {f"imsm_{method}_{task}", f"{method}_{task}"} <= names
    assert {f"loramoe_{task}" for task in TASKS} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_launcher_arguments_parse_with_paper_settings(script, tmp_path):
    args = _captured_args(script, tmp_path)
    _, data, imsm, training = _parse(args, tmp_path)
    method, is_imsm = _method(script), script.stem.startswith("imsm_")
    assert imsm.peft == method
    assert imsm.gate == ("query_aware" if is_imsm else "none")
    assert imsm.frozen_memory_cache == ("on" if is_imsm else "off")  # all run 3 epochs, where the cache pays
    assert training.num_train_epochs == 3 and imsm.gate_rank == 8
    paper = PAPER[method]
    assert training.learning_rate == paper["learning_rate"]
    assert training.optim == paper.get("optim", "adamw_torch")
    for name in ("lora_r", "lora_alpha", "loramoe_num_experts", "loramoe_r", "loramoe_alpha", "loramoe_dropout",
                 "loramoe_balance_weight", "loramoe_balance_delta"):
        if name in paper:
            assert getattr(imsm.options, name) == paper[name], name
    # the accumulation the launcher computed, at its own default device count, makes the paper's global batch
    defaults = _defaults(script)
    devices = int(defaults["NNODES"]) * int(defaults["GPUS"])
    assert training.per_device_train_batch_size == int(defaults["PER_DEVICE_BATCH"])
    assert training.per_device_train_batch_size * devices * training.gradient_accumulation_steps == \
        paper["global_batch"]
    scheduler, warmup, weight_decay, gate_dropout = PUBLISHED_CODE[method]
    assert (training.lr_scheduler_type.value, training.warmup_steps, training.weight_decay) == \
        (scheduler, warmup, weight_decay)
    if is_imsm:
        assert imsm.gate_dropout == gate_dropout
    assert _options(args)["--model_name_or_path"] == MODEL.get(method, "meta-llama/Meta-Llama-3-8B")
    assert data.train_file.endswith(f"/{script.stem.split('_')[-1]}/train.jsonl")


def test_an_imsm_launcher_differs_from_its_vanilla_twin_only_in_the_gate(tmp_path):
    """The paper's comparison: the same PEFT method, data and schedule, with and without the gate."""
    for imsm_script in (p for p in SCRIPTS if p.stem.startswith("imsm_")):
        twin = imsm_script.with_name(imsm_script.name.removeprefix("imsm_"))
        with_gate, without = (_options(_captured_args(p, tmp_path)) for p in (imsm_script, twin))
        for options in (with_gate, without):
            for name in (*GATE_OPTIONS, "--output_dir"):
                options.pop(name, None)
        assert with_gate == without, imsm_script.stem


def test_the_launchers_of_one_method_differ_only_in_the_dataset(tmp_path):
    """Same hyperparameters on every dataset; the lengths depend on the dataset alone, the same for every method."""
    lengths_of = {}
    for script in SCRIPTS:
        options = _options(_captured_args(script, tmp_path))
        task = script.stem.split("_")[-1]
        lengths = (options.pop("--max_input_length"), options.pop("--max_output_length"))
        assert lengths_of.setdefault(task, lengths) == lengths, script.stem
        assert options.pop("--train_file").endswith(f"/{task}/train.jsonl")
        assert options.pop("--output_dir") == f"runs/{script.stem}"
        sibling = script.with_name(script.name.replace(f"_{task}.sh", "_gsm8k.sh"))
        reference = _options(_captured_args(sibling, tmp_path))
        for name in ("--max_input_length", "--max_output_length", "--train_file", "--output_dir"):
            reference.pop(name)
        assert options == reference, script.stem


def test_the_batch_arithmetic_lives_in_one_helper():
    """Each launcher shows its settings and command; the check and the accumulation are sourced, not copied."""
    for script in SCRIPTS:
        text = script.read_text()
        assert 'source "$(dirname "$0")/common.sh"' in text and "$((" not in text, script.name
        assert '--gradient_accumulation_steps "$ACCUMULATION"' in text, script.name


def test_environment_and_extra_arguments_pass_through(tmp_path):
    script = ROOT / "run_scripts" / "imsm_lora_gsm8k.sh"
    args = _captured_args(script, tmp_path, "--num_train_epochs", "1",
                          env={"MODEL": "my/model", "GPUS": "2", "DATA_DIR": "/d", "OUTPUT_DIR": "/o"})
    _, data, _, training = _parse(args, tmp_path)
    assert args[args.index("--model_name_or_path") + 1] == "my/model"
    assert data.train_file == "/d/gsm8k/train.jsonl"
    assert training.num_train_epochs == 1  # the user's argument wins
    assert training.gradient_accumulation_steps == 4  # global batch 16 = 2 per device x 2 GPUs x 4


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_a_global_batch_that_the_gpus_cannot_split_is_refused(script, tmp_path):
    """16 / (3 x 2) is no integer: integer division would silently train with a global batch of 12."""
    done, capture = _run(script, tmp_path, env={"GPUS": "3"})
    assert done.returncode != 0 and not capture.exists()
    assert "global batch" in done.stderr and "NNODES x GPUS x PER_DEVICE_BATCH = " in done.stderr


def test_more_devices_than_the_global_batch_is_refused(tmp_path):
    done, capture = _run(ROOT / "run_scripts" / "lora_mrpc.sh", tmp_path, env={"NNODES": "2"})  # 2 x 8 x 2 = 32
    assert done.returncode != 0 and not capture.exists() and "= 32" in done.stderr


# In bash arithmetic each passes the batch check or breaks it: -2 x 2 = -4 divides 16 (accumulation -4), -8 x -2 = 16
# (accumulation 1 on -8 GPUs), "abc" is read as an unset variable, "2.5" is a syntax error, "08" is bad octal.
NOT_POSITIVE_INTEGERS = [
    ({"GPUS": "-2"}, "GPUS", "-2"),
    ({"GPUS": "-8", "PER_DEVICE_BATCH": "-2"}, "GPUS", "-8"),
    ({"GPUS": "abc"}, "GPUS", "abc"),
    ({"GPUS": "2.5"}, "GPUS", "2.5"),
    ({"GPUS": "08"}, "GPUS", "08"),
    ({"GPUS": "8 "}, "GPUS", "8 "),
    ({"NNODES": "0"}, "NNODES", "0"),
    ({"NNODES": "-1", "GPUS": "-8"}, "NNODES", "-1"),
    ({"PER_DEVICE_BATCH": "-2", "GPUS": "-8"}, "GPUS", "-8"),
    ({"PER_DEVICE_BATCH": "1e1"}, "PER_DEVICE_BATCH", "1e1"),
]


@pytest.mark.parametrize(("env", "name", "value"), NOT_POSITIVE_INTEGERS,
                         ids=[" ".join(f"{k}={v}" for k, v in env.items()) for env, _, _ in NOT_POSITIVE_INTEGERS])
def test_a_count_that_is_not_a_positive_integer_is_refused_by_name(env, name, value, tmp_path):
    done, capture = _run(ROOT / "run_scripts" / "imsm_lora_gsm8k.sh", tmp_path, env=env)
    assert done.returncode != 0 and not capture.exists()
    assert f"{name} must be a positive integer" in done.stderr and f"got '{value}'" in done.stderr
    assert "imsm_lora_gsm8k.sh" in done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_launcher_refuses_a_negative_gpu_count(script, tmp_path):
    done, capture = _run(script, tmp_path, env={"GPUS": "-2", "PER_DEVICE_BATCH": "-1"})  # -2 x -1 divides 16 and 8
    assert done.returncode != 0 and not capture.exists() and "GPUS must be a positive integer" in done.stderr


def test_multi_node_counts_every_gpu(tmp_path):
    script = ROOT / "run_scripts" / "imsm_lora_gsm8k.sh"
    args = _launcher_args(script, tmp_path, env={"NNODES": "2", "GPUS": "2", "HOSTFILE": "/h"})
    assert args[args.index("--num_nodes") + 1] == "2" and args[args.index("--num_gpus") + 1] == "2"
    assert args[args.index("--hostfile") + 1] == "/h"
    _, _, _, training = _parse(args[args.index("train.py") + 1 :], tmp_path)
    assert training.gradient_accumulation_steps == 2  # global batch 16 = 2 per device x 2 GPUs x 2 nodes x 2
