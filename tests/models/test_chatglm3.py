"""ChatGLM3 converted to the native glm model, against an independent re-typing of ChatGLM3's forward and tokenizer
(tests/models/chatglm3_replica.py), and the paper's fused query_key_value LoRA as one A shared by q, k and v."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from chatglm3_replica import CHATGLM3_6B, chatglm3_logits, make_checkpoint
from conftest import imsm_args
from safetensors.torch import load_file

from imsm.loader import backbone_path, build_imsm_model, load_backbone, load_run, load_trained_weights
from imsm.models.chatglm3 import SPECIAL_TOKENS, glm_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def chatglm3(tmp_path_factory):
    """(source folder, its ChatGLM3 tensors, its config) with $IMSM_CACHE in a temporary folder."""
    folder = tmp_path_factory.mktemp("chatglm3")
    state = make_checkpoint(folder / "source")
    cache = folder / "cache"
    old = os.environ.get("IMSM_CACHE")
    os.environ["IMSM_CACHE"] = str(cache)
    yield folder / "source", state, json.loads((folder / "source" / "config.json").read_text())
    if old is None:
        del os.environ["IMSM_CACHE"]
    else:
        os.environ["IMSM_CACHE"] = old


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def test_converted_model_computes_chatglm3s_forward(chatglm3):
    source, state, config = chatglm3
    model, _, path = load_backbone(str(source), attn_implementation="sdpa")
    assert type(model).__name__ == "GlmForCausalLM" and path != str(source)
    assert json.loads((source / "config.json").read_text())["model_type"] == "chatglm"  # the source is untouched
    ids = _ids(12, 320, seed=1)
    with torch.no_grad():
        got = model(ids).logits
    expected = chatglm3_logits(state, config, ids)
    assert (got - expected).abs().max() < 1e-5
    # greedy decoding: the converted model's generate() against argmax steps of the re-typed forward
    prompt = ids[:1, :5]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, chatglm3_logits(state, config, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == seq.tolist()


def test_converted_once_and_again_when_the_source_changes(chatglm3):
    source, _, _ = chatglm3
    first = Path(backbone_path(str(source)))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert backbone_path(str(source)) == str(first)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not written again
    converted = json.loads((first / "config.json").read_text())
    assert converted["model_type"] == "glm" and converted["imsm_converted_from"] == str(source)
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert backbone_path(str(source)) != str(first)


def test_tokenizer_is_chatglm3s(chatglm3):
    """Plain text: [gMASK] sop + SentencePiece's ids; chat: ChatGLM3's build_chat_input; stops as chat() stops."""
    source, _, _ = chatglm3
    _, tokenizer, path = load_backbone(str(source), attn_implementation="sdpa")
    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    n = sp.vocab_size()
    special = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}  # ChatGLM3's SPTokenizer numbering
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(special.values())
    for text in ["the cat is big", "Question : Is 3 odd ? Output :", "what number\nis odd 42 ?"]:
        assert tokenizer(text)["input_ids"] == [special["[gMASK]"], special["sop"]] + sp.encode(text)
    query = "Is 3 odd ?"
    chat = [special["[gMASK]"], special["sop"], special["<|user|>"]] + sp.encode("\n") + sp.encode(query) + [
        special["<|assistant|>"]]
    text = tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == chat
    stops = json.loads((Path(path) / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(stops) == sorted([sp.eos_id(), special["<|user|>"], special["<|observation|>"]])
    assert tokenizer.eos_token_id == sp.eos_id() and tokenizer.pad_token_id == sp.unk_id()


def _lora_args(**kw):
    return imsm_args(peft="lora", gate="query_aware", gate_dropout=0.0, lora_dropout=0.0, lora_r=4, gate_rank=4, **kw)


def test_fused_lora_is_one_a_shared_by_q_k_v(chatglm3, tmp_path):
    """The default LoRA target on a converted ChatGLM3 is its fused query_key_value: logits equal ChatGLM3's forward
    with W_qkv + (alpha/r)·[B_q; B_k; B_v]·A, and the count is the fused layer's r·(d + rows)."""
    source, state, config = chatglm3
    backbone, _, _ = load_backbone(str(source), attn_implementation="sdpa")
    model = build_imsm_model(backbone, _lora_args())
    attn = model.peft_model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.lora_A["default"] is attn.k_proj.lora_A["default"] is attn.v_proj.lora_A["default"]
    d, rows = config["hidden_size"], (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * 16
    adapter = sum(p.numel() for _, p in model.trainable_parameters()["adapter"])
    assert adapter == config["num_layers"] * 4 * (d + rows)
    g = torch.Generator().manual_seed(5)
    delta = {}
    with torch.no_grad():
        for i, layer in enumerate(model.peft_model.base_model.model.model.layers):
            a = layer.self_attn.q_proj.lora_A["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            bs = []
            for proj in ("q_proj", "k_proj", "v_proj"):
                b = getattr(layer.self_attn, proj).lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
                bs.append(b)
            delta[i] = layer.self_attn.q_proj.scaling["default"] * torch.cat(bs) @ a
    ids = _ids(10, 320, seed=2)
    with torch.no_grad():
        got = model.peft_model(input_ids=ids).logits
    assert (got - chatglm3_logits(state, config, ids, delta)).abs().max() < 1e-5
    # a training step moves the one shared A by the sum of q's, k's and v's gradients
    model.train()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), query_mask=torch.ones_like(ids),
                labels=torch.where(torch.arange(10) >= 6, ids, -100))
    out["loss"].backward()
    assert attn.q_proj.lora_A["default"].weight.grad.abs().sum() > 0


def test_saved_fused_lora_reloads_and_resumes_tied(chatglm3, tmp_path):
    from imsm.args import DataArguments
    from imsm.loader import make_run_config, save_run_files

    source, _, _ = chatglm3
    backbone, _, path = load_backbone(str(source), attn_implementation="sdpa")
    args = _lora_args()
    model = build_imsm_model(backbone, args)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_run_files(model, tmp_path / "run", make_run_config(args, DataArguments(), path, 64), None, True)
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    a_q = saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    for proj in ("k_proj", "v_proj"):  # an ordinary PEFT adapter: k's and v's A written as copies of q's
        assert torch.equal(saved[f"base_model.model.model.layers.1.self_attn.{proj}.lora_A.weight"], a_q)
    ids = _ids(9, 320, seed=4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad():
        expected = model(**batch)["logits"]
        reloaded, _, _ = load_run(tmp_path / "run", attn_implementation="sdpa")
        torch.testing.assert_close(reloaded(**batch)["logits"], expected)
    # resume: a freshly attached (tied) adapter takes the saved values and stays tied
    resumed = build_imsm_model(load_backbone(str(source), attn_implementation="sdpa")[0], args)
    load_trained_weights(resumed, tmp_path / "run")
    attn = resumed.peft_model.base_model.model.model.layers[1].self_attn
    assert attn.q_proj.lora_A["default"] is attn.v_proj.lora_A["default"]
    resumed.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed(**batch)["logits"], expected)


def test_chatglm3_6b_trains_the_papers_parameter_counts():
    """At ChatGLM3-6B's full shape (meta device, no weights): LoRA r 16 on the fused query_key_value is Table 1's
    3.899M = 28·16·(4096 + 4608); AdaLoRA init rank 12 there is Table 1's 2.925M = 28·12·(4096 + 1 + 4608) (P, Λ,
    Q); IMSM's gate adds 5·d·r = 5·4096·8; (IA)3 scales query_key_value's 4608 outputs and dense_4h_to_h's 13696
    inputs per layer."""
    from transformers import GlmForCausalLM

    config = glm_config(CHATGLM3_6B)
    for peft, options, adapter_count in [("lora", {"lora_r": 16}, 28 * 16 * (4096 + 4608)),
                                         ("adalora", {"adalora_init_r": 12}, 28 * 12 * (4096 + 1 + 4608)),
                                         ("ia3", {}, 28 * (4608 + 13696))]:
        with torch.device("meta"):
            backbone = GlmForCausalLM(config)
        model = build_imsm_model(backbone, imsm_args(peft=peft, gate="query_aware", gate_rank=8, **options),
                                 total_steps=1000)
        counts = {k: sum(p.numel() for _, p in group) for k, group in model.trainable_parameters().items()}
        assert counts == {"adapter": adapter_count, "gate": 5 * 4096 * 8}
    assert 28 * 16 * (4096 + 4608) == 3_899_392 and 28 * 12 * (4096 + 1 + 4608) == 2_924_880


def test_imsm_refuses_a_backbone_without_an_lm_head(tiny_model_dir):
    from imsm.method.model import IMSMModel

    backbone, _, _ = load_backbone(str(tiny_model_dir), attn_implementation="sdpa")
    model = build_imsm_model(backbone, _lora_args())
    backbone.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="get_output_embeddings"):
        IMSMModel(model.peft_model, model.imsm_gate, model.method)


def test_remote_code_without_sdpa_falls_back_with_a_warning(tmp_path, caplog):
    (tmp_path / "tinyremote.py").write_text(
        "from torch import nn\nfrom transformers import PretrainedConfig, PreTrainedModel\n\n\n"
        "class TinyConfig(PretrainedConfig):\n    model_type = 'tinyremote'\n\n"
        "    def __init__(self, vocab_size=8, hidden_size=4, **kw):\n"
        "        self.vocab_size, self.hidden_size = vocab_size, hidden_size\n        super().__init__(**kw)\n\n\n"
        "class TinyLM(PreTrainedModel):\n    config_class = TinyConfig\n    _supports_sdpa = False\n\n"
        "    def __init__(self, config):\n        super().__init__(config)\n"
        "        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)\n        self.post_init()\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "tinyremote", "vocab_size": 8, "hidden_size": 4,
        "auto_map": {"AutoConfig": "tinyremote.TinyConfig", "AutoModelForCausalLM": "tinyremote.TinyLM"}}))
    from safetensors.torch import save_file

    from imsm.loader import _from_pretrained

    save_file({"emb.weight": torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):  # asked for explicitly: no fallback
        _from_pretrained(str(tmp_path), torch.float32, "sdpa", True)
    with caplog.at_level("WARNING", logger="imsm.loader"):
        model = _from_pretrained(str(tmp_path), torch.float32, "auto", True)
    assert type(model).__name__ == "TinyLM" and model.config._attn_implementation == "eager"
    assert "refused" in caplog.text


@pytest.mark.parametrize("peft", ["lora", "dora", "ia3", "adalora"])
def test_every_paper_method_trains_on_converted_chatglm3(chatglm3, peft):
    """The paper's methods on ChatGLM3 (Tables 1, 3, 4) find their default targets on the converted model, and a
    backward pass reaches every trainable parameter."""
    source, _, _ = chatglm3
    backbone, _, _ = load_backbone(str(source), attn_implementation="sdpa")
    model = build_imsm_model(backbone, imsm_args(peft=peft, gate="query_aware", gate_rank=4, lora_r=4,
                                                 adalora_init_r=4, adalora_target_r=2), total_steps=10)
    ids = _ids(8, 320, seed=6)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), query_mask=torch.ones_like(ids),
                labels=torch.where(torch.arange(8) >= 5, ids, -100))
    out["loss"].backward()
    names = [n for group in model.trainable_parameters().values() for n, p in group if p.grad is None]
    assert not names
    targets = {part for n, _ in model.trainable_parameters()["adapter"] for part in n.split(".")}
    assert {"q_proj", "k_proj", "v_proj"} <= targets


@pytest.mark.launch
def test_zero3_on_two_processes_trains_the_shared_a_once(chatglm3, tiny_train_file, tmp_path):
    """A real ``deepspeed`` launch (ZeRO-3, 2 CPU processes, both converting the source at once): the engine's own
    fp32 checkpoint holds the shared A once per layer and rebuilds the model the saved run reloads to."""
    import random
    import subprocess
    import sys

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    source, _, _ = chatglm3
    root = Path(__file__).resolve().parents[2]
    cache = tmp_path / "cache"  # not converted yet: the two ranks race for it
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
           str(random.randint(20000, 40000)), str(root / "train.py"), "--deepspeed",
           str(root / "ds_configs" / "zero3.json"), "--model_name_or_path", str(source), "--train_file",
           str(tiny_train_file), "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "2",
           "--learning_rate", "1e-2", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
           "--report_to", "none", "--seed", "3", "--disable_tqdm", "true", "--lora_r", "4"]
    env = {**os.environ, "IMSM_CACHE": str(cache), "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "run" / "checkpoint-2"))
    backbone, tokenizer, _ = load_backbone(str(source))
    engine = build_imsm_model(backbone, imsm_args(lora_r=4))
    assert sum(p.numel() for _, p in engine.trainable_parameters()["adapter"]) == 2 * 4 * (64 + (4 + 2 * 2) * 16)
    engine.load_state_dict(state, strict=True)
    reloaded, _, _ = load_run(tmp_path / "run" / "final")
    ids = tokenizer(["Question : Is 3 odd ? Output : yes"], return_tensors="pt")
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
             "query_mask": ids["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch)["logits"], engine.eval()(**batch)["logits"])
