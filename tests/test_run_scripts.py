"""Every launcher in run_scripts/ hands train.py arguments it accepts, with the paper's settings."""

import os
import subprocess
from pathlib import Path

import pytest
from transformers import HfArgumentParser, TrainingArguments

from imsm.args import DataArguments, ImsmArguments, ModelArguments

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "run_scripts").glob("*.sh") if not p.name.startswith("cpu_"))
SHIM = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$CAPTURE"\n'


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


def _parse(args: list[str], tmp_path: Path):
    parser = HfArgumentParser((ModelArguments, DataArguments, ImsmArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=[*args, "--output_dir", str(tmp_path / "out"), "--bf16", "false"])


def test_one_imsm_and_one_vanilla_launcher_per_method_and_dataset():
    names = {p.stem for p in SCRIPTS}
    for method in ("lora", "adalora", "dora", "ia3"):
        for task in ("gsm8k", "mrpc", "cola", "ropes"):
            assert {f"imsm_{method}_{task}", f"{method}_{task}"} <= names
    assert {f"loramoe_{task}" for task in ("gsm8k", "mrpc", "cola", "ropes")} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_launcher_arguments_parse_with_paper_settings(script, tmp_path):
    _, data, imsm, training = _parse(_captured_args(script, tmp_path), tmp_path)
    method = script.stem.removeprefix("imsm_").split("_")[0]
    assert imsm.peft == method
    assert imsm.gate == ("query_aware" if script.stem.startswith("imsm_") else "none")
    assert imsm.frozen_memory_cache == ("on" if script.stem.startswith("imsm_") else "off")  # all run 3 epochs
    lr = {"lora": 3e-4, "adalora": 2e-3, "dora": 1e-4, "ia3": 3e-3, "loramoe": 2e-4}[method]
    assert training.learning_rate == lr and training.num_train_epochs == 3 and imsm.gate_rank == 8
    global_batch = training.per_device_train_batch_size * 8 * training.gradient_accumulation_steps  # GPUS=8
    assert global_batch == (8 if method == "ia3" else 16)
    if method == "ia3":
        assert training.optim == "adafactor"
    # the IMSM authors' recommended settings ("Recommended parameters/llama3_{lora,adalora,ia3}_GSM8K.json")
    schedule = ("linear", 0.03, 0.0) if method == "ia3" else ("cosine", 0.1, 0.01) if method != "loramoe" else \
        ("cosine", 0.03, 0.0)
    assert (training.lr_scheduler_type.value, training.warmup_steps, training.weight_decay) == schedule
    if script.stem.startswith("imsm_"):
        assert imsm.gate_dropout == (0.0 if method == "ia3" else 0.1)
    expected_model = "meta-llama/Llama-2-7b-hf" if method == "loramoe" else "meta-llama/Meta-Llama-3-8B"
    args = _captured_args(script, tmp_path)
    assert args[args.index("--model_name_or_path") + 1] == expected_model
    if method in ("lora", "dora"):
        assert (imsm.lora_r, imsm.lora_alpha) == ((16, 16) if method == "lora" else (16, 32))
    if method == "loramoe":
        # the LoRAMoE authors' launcher (run_loramoe.sh): lora_nums=8, lora_rank=4, lora_alpha=32, lora_dropout=0.05,
        # blc_weight=0, blc_alpha=0
        assert (imsm.loramoe_num_experts, imsm.loramoe_r, imsm.loramoe_alpha, imsm.loramoe_dropout) == (8, 4, 32, 0.05)
        assert (imsm.loramoe_balance_weight, imsm.loramoe_balance_delta) == (0.0, 0.0)
    assert data.train_file.endswith(f"/{script.stem.split('_')[-1]}/train.jsonl")


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


def test_multi_node_counts_every_gpu(tmp_path):
    script = ROOT / "run_scripts" / "imsm_lora_gsm8k.sh"
    args = _launcher_args(script, tmp_path, env={"NNODES": "2", "GPUS": "2", "HOSTFILE": "/h"})
    assert args[args.index("--num_nodes") + 1] == "2" and args[args.index("--num_gpus") + 1] == "2"
    assert args[args.index("--hostfile") + 1] == "/h"
    _, _, _, training = _parse(args[args.index("train.py") + 1 :], tmp_path)
    assert training.gradient_accumulation_steps == 2  # global batch 16 = 2 per device x 2 GPUs x 2 nodes x 2
