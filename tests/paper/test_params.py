"""The trainable parameters of every paper run, counted at full shape, against the paper's Params columns.

Each backbone is built from its published ``config.json`` shapes on the meta device (no weights), each run of
``reproduce.py all`` is expanded through its real launcher (a stand-in ``deepspeed`` records the arguments), parsed by
train.py's own parser and attached by the one build path (``imsm.loader.build_imsm_model``); the count is what
training would update. Table 1 and Table 6 print it ("6.980M"); Table 3 (DoRA), Table 4 (the gate ablations) and
Figure 3 print none, so there the adapted modules are checked against the authors' published code
(github.com/ECNU-Text-Computing/IMSM), and on ChatGLM3-6B every row's count against a hand count as well.
"""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from imsm.args import parse_train_args
from imsm.loader import build_imsm_model
from imsm.models.chatglm3 import glm_config
from imsm.paper.compare import CANNOT_MATCH
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
    # ChatGLM3 trains as transformers' native glm (imsm/models/chatglm3.py), converted from its own config.json
    "ChatGLM3-6B": lambda: glm_config({
        "padded_vocab_size": 65024, "hidden_size": 4096, "ffn_hidden_size": 13696, "num_layers": 28,
        "kv_channels": 128, "num_attention_heads": 32, "multi_query_group_num": 2, "seq_length": 8192,
        "layernorm_epsilon": 1e-05}),
}

# Modules the published code adapts, for rows the paper prints no count of (and ChatGLM3's, whose q_proj, k_proj,
# v_proj stand for the fused query_key_value): (backbone, --peft) -> module names.
PUBLISHED_MODULES = {
    ("Qwen1.5-4B", "dora"): {"q_proj", "v_proj"},  # dora.py: PEFT's default for qwen2
    ("Llama3.1-8B-Instruct", "dora"): {"q_proj", "v_proj"},  # PEFT's default for llama
    ("Llama2-7B", "lora"): {"gate_proj", "up_proj", "down_proj"},  # train.py: "llama-2" -> LoRAMoE's modules
    ("Llama2-7B", "loramoe"): {"gate_proj", "up_proj", "down_proj"},  # LoRAMoE's run_loramoe.sh
    # train.py: chatglm -> PEFT's chatglm default (query_key_value) for LoRA and AdaLoRA, query_key_value and
    # mlp.dense_4h_to_h for (IA)3; DoRA (train.py, dora.py) leaves PEFT's default: query_key_value. On the native glm
    # layout query_key_value is q_proj, k_proj, v_proj and dense_4h_to_h is down_proj.
    ("ChatGLM3-6B", "lora"): {"q_proj", "k_proj", "v_proj"},
    ("ChatGLM3-6B", "adalora"): {"q_proj", "k_proj", "v_proj"},
    ("ChatGLM3-6B", "dora"): {"q_proj", "k_proj", "v_proj"},
    ("ChatGLM3-6B", "ia3"): {"q_proj", "k_proj", "v_proj", "down_proj"},
}

# ChatGLM3-6B's adapters by hand: 28 layers, hidden 4096, query_key_value's 4608 outputs (q: 32 heads x 128, k and v:
# 2 groups x 128 each), dense_4h_to_h's 13696 inputs; the launchers' LoRA/DoRA r 16, AdaLoRA init_r 12.
# A fused adapter has one A (r x 4096) and one B (4608 x r); DoRA adds a magnitude per output row; AdaLoRA adds Λ (r)
# (its P, Λ and Q on the fused layer, as the published code has it: imsm/method/adapters/adalora.py).
CHATGLM3_LAYERS, CHATGLM3_QKV = 28, 4096 + 4608
CHATGLM3_ADAPTER = {
    "lora": CHATGLM3_LAYERS * 16 * CHATGLM3_QKV,
    "dora": CHATGLM3_LAYERS * (16 * CHATGLM3_QKV + 4608),
    "ia3": CHATGLM3_LAYERS * (4608 + 13696),
    "adalora": CHATGLM3_LAYERS * 12 * (CHATGLM3_QKV + 1),
}
# The gate's trainable parameters, 5dr (query-aware: W_A 4d x r, W_B r x d), 3dr without the query, none for 0.5/0.5
GATE_INPUTS = {"IMSM-token-": 3, "IMSM-equal-": 0, "IMSM-": 5}


def _runs_by_row() -> dict[tuple[str, str], list]:
    """One run per (backbone, label, launcher arguments) of ``all``: the target task does not change the adapter."""
    rows: dict[tuple[str, str], list] = {}
    for run in build_plan("all").runs:
        rows.setdefault((run.backbone.name, run.label), []).append(run)
    return rows


ROWS = _runs_by_row()
CHECKED = sorted(ROWS)


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
    assert printed <= set(CHECKED)


def _gate_count(label: str, d: int) -> int:
    rank = re.search(r"-r(\d+)$", label)
    inputs = next((n for prefix, n in GATE_INPUTS.items() if label.startswith(prefix)), 0)
    return inputs * d * (int(rank.group(1)) if rank else 8)


@pytest.mark.parametrize("backbone,label", CHECKED, ids=[f"{b}/{label}" for b, label in CHECKED])
def test_trainable_parameters_at_full_shape_match_the_paper(backbone, label, tmp_path):
    run = ROWS[(backbone, label)][0]
    model = _build(run, tmp_path)
    groups = model.trainable_parameters()
    adapter = sum(p.numel() for _, p in groups["adapter"])
    gate = sum(p.numel() for _, p in groups["gate"])
    assert gate == _gate_count(label, model.config.hidden_size)
    if backbone == "ChatGLM3-6B":  # every ChatGLM3 row, Table 4's ablations (no printed count) among them
        assert adapter == CHATGLM3_ADAPTER[run.variant.peft]
    for printed in _printed(backbone, label):  # Table 1's and Table 6's cells of the same run agree
        assert f"{(adapter + gate) / 1e6:.3f}M" == printed, (run.shell("DATA"), adapter, gate)
    modules = PUBLISHED_MODULES.get((backbone, run.variant.peft))
    if modules is not None:
        assert _adapted_modules(model) == modules
    # every row is checked against a printed count or the published code's modules
    assert _printed(backbone, label) or modules is not None, f"{backbone} {label}: nothing to check it against"


def test_chatglm3_adalora_is_the_fused_adapter_table_1_counts():
    """Table 1's 2.925M (3.089M with the gate) is one AdaLoRA of init rank 12 on the fused query_key_value: P, Λ and
    Q of 12 x 4096, 12 and 4608 x 12 per layer; the report no longer lists it as a difference."""
    gate = _gate_count("IMSM-AdaLoRA", 4096)
    assert CHATGLM3_ADAPTER["adalora"] == 28 * (12 * 4096 + 12 + 4608 * 12) == 2_924_880
    assert _printed("ChatGLM3-6B", "AdaLoRA") == {f"{CHATGLM3_ADAPTER['adalora'] / 1e6:.3f}M"} == {"2.925M"}
    assert _printed("ChatGLM3-6B", "IMSM-AdaLoRA") == {f"{(CHATGLM3_ADAPTER['adalora'] + gate) / 1e6:.3f}M"} == {
        "3.089M"}
    assert not [line for line in CANNOT_MATCH if "ChatGLM3" in line and "AdaLoRA" in line]
