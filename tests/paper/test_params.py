"""The trainable parameters of every paper run, counted at full shape, against the paper's Params columns.

Each backbone is built from its published ``config.json`` shapes on the meta device (no weights), each run of
``reproduce.py all`` is expanded through its real launcher (a stand-in ``deepspeed`` records the arguments), parsed by
train.py's own parser and attached by the one build path (``imsm.loader.build_imsm_model``); the count is what
training would update. Table 1 and Table 6 print it ("6.980M"); Table 3 (DoRA) and Figure 3 print none, so there the
adapted modules are checked against the authors' published code (github.com/ECNU-Text-Computing/IMSM).
"""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from imsm.args import parse_train_args
from imsm.loader import build_imsm_model
from imsm.paper.numbers import PAPER_ROWS
from imsm.paper.plans import build_plan
from tests.paper.launchers import launch_args

# The published config.json shapes (vocabulary and rope settings do not change the adapters' size).
FULL_SHAPE = {
    "Qwen1.5-4B": lambda: Qwen2Config(vocab_size=151936, hidden_size=2560, intermediate_size=6912,
                                      num_hidden_layers=40, num_attention_heads=20, num_key_value_heads=20),
    "Llama3-8B": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "Llama3.1-8B-Instruct": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "Llama2-7B": lambda: LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}
# ChatGLM3-6B joins when it loads as transformers' native ``glm`` (the ChatGLM3 branch): add its GlmConfig
# (hidden 4096, ffn 13696, 28 layers, 32 heads, 2 multi-query groups) here, and its seven Table 1 rows
# (LoRA 3.899M on the fused query_key_value, i.e. q/k/v with one shared lora_A) are checked like the others.
PENDING_BACKBONES = {"ChatGLM3-6B"}

# Modules the published code adapts where the paper prints no count: (backbone, --peft) -> module names.
PUBLISHED_MODULES = {
    ("Qwen1.5-4B", "dora"): {"q_proj", "v_proj"},  # dora.py: PEFT's default for qwen2
    ("Llama3.1-8B-Instruct", "dora"): {"q_proj", "v_proj"},  # PEFT's default for llama
    ("Llama2-7B", "lora"): {"gate_proj", "up_proj", "down_proj"},  # train.py: "llama-2" -> LoRAMoE's modules
    ("Llama2-7B", "loramoe"): {"gate_proj", "up_proj", "down_proj"},  # LoRAMoE's run_loramoe.sh
}


def _runs_by_row() -> dict[tuple[str, str], list]:
    """One run per (backbone, label, launcher arguments) of ``all``: the target task does not change the adapter."""
    rows: dict[tuple[str, str], list] = {}
    for run in build_plan("all").runs:
        rows.setdefault((run.backbone.name, run.label), []).append(run)
    return rows


ROWS = _runs_by_row()
CHECKED = sorted(key for key in ROWS if key[0] not in PENDING_BACKBONES)


def _build(run, tmp_path):
    args = launch_args(run, tmp_path)
    _, _, imsm_args, _ = parse_train_args([*args, "--bf16", "false"])
    with torch.device("meta"):
        backbone = AutoModelForCausalLM.from_config(FULL_SHAPE[run.backbone.name]())
        backbone.requires_grad_(False)
        return build_imsm_model(backbone, imsm_args, total_steps=1000)


def _printed(backbone: str, label: str) -> set[str]:
    return {row.params for row in PAPER_ROWS if (row.backbone, row.label) == (backbone, label) and row.params}


def _adapted_modules(model) -> set[str]:
    names = set()
    for name, _ in model.trainable_parameters()["adapter"]:
        match = re.search(r"\.(\w+)\.(lora|ia3|loramoe)_", name)
        names.add(match.group(1))
    return names


def test_every_printed_params_cell_has_a_backbone_to_count_it_on():
    printed = {(row.backbone, row.label) for row in PAPER_ROWS if row.params}
    assert len(printed) == 18 + 9 - 3  # Table 1: 6 methods x 3 backbones; Table 6: 9, 3 of them Table 1 rows
    assert {key for key in printed if key[0] not in PENDING_BACKBONES} <= set(CHECKED)


@pytest.mark.parametrize("backbone,label", CHECKED, ids=[f"{b}/{label}" for b, label in CHECKED])
def test_trainable_parameters_at_full_shape_match_the_paper(backbone, label, tmp_path):
    run = ROWS[(backbone, label)][0]
    model = _build(run, tmp_path)
    groups = model.trainable_parameters()
    adapter = sum(p.numel() for _, p in groups["adapter"])
    gate = sum(p.numel() for _, p in groups["gate"])
    d = model.config.hidden_size
    rank = re.search(r"-r(\d+)$", label)
    assert gate == (5 * d * (int(rank.group(1)) if rank else 8) if label.startswith("IMSM-") else 0)
    for printed in _printed(backbone, label):  # Table 1's and Table 6's cells of the same run agree
        assert f"{(adapter + gate) / 1e6:.3f}M" == printed, (run.shell("DATA"), adapter, gate)
    modules = PUBLISHED_MODULES.get((backbone, run.variant.peft))
    if modules is not None:
        assert _adapted_modules(model) == modules
    # Table 4's ablations (ChatGLM3 only) print no count; every other row is checked one way or the other
    assert _printed(backbone, label) or modules is not None, f"{backbone} {label}: nothing to check it against"
