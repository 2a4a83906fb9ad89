"""Every backbone of the paper as a tiny replica — ChatGLM3 (its own checkpoint layout, converted), Qwen1.5
(``qwen2``: bias on q, k, v), Llama-3 (grouped-query attention, θ 500000), Llama-3.1 (RoPE scaling "llama3") and
Llama-2 (multi-head attention) — through the whole life of an IMSM run with each backbone's default LoRA targets:
train.py 2 steps, an exact resume, decoding (KV cache) against step-by-step argmax of the full forward, and the
exported folder's logits against the project's model."""

from __future__ import annotations

import shutil

import pytest
import torch
from chatglm3_replica import make_checkpoint
from conftest import make_tokenizer
from safetensors.torch import load_file

import train
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.export.folder import export_run
from imsm.loader import load_run

pytestmark = pytest.mark.usefixtures("single_thread")

_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 256, "tie_word_embeddings": False}
_LLAMA3_SCALING = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _hf_backbone(folder, config_class: str, **config) -> None:
    import transformers

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    cls = getattr(transformers, config_class)
    model_config = cls(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3, **_TINY, **config)
    transformers.AutoModelForCausalLM.from_config(model_config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


BACKBONES = {
    "chatglm3": lambda folder: make_checkpoint(folder),
    "qwen1.5": lambda folder: _hf_backbone(folder, "Qwen2Config", num_key_value_heads=4),
    "llama3": lambda folder: _hf_backbone(folder, "LlamaConfig", num_key_value_heads=2,
                                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3.1": lambda folder: _hf_backbone(folder, "LlamaConfig", num_key_value_heads=2,
                                            rope_parameters=_LLAMA3_SCALING),
    "llama2": lambda folder: _hf_backbone(folder, "LlamaConfig", num_key_value_heads=4),
}
MODEL_TYPES = {"chatglm3": "glm", "qwen1.5": "qwen2", "llama3": "llama", "llama3.1": "llama", "llama2": "llama"}


def _args(model_dir, train_file, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
            "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--seed", "7",
            "--disable_tqdm", "true", "--lora_r", "4", "--gate_rank", "4", *extra]


def _adapter_and_gate(run_dir):
    return load_file(str(run_dir / "adapter_model.safetensors")) | {
        f"gate.{k}": v for k, v in load_file(str(run_dir / "gate.safetensors")).items()}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_imsm_trains_resumes_decodes_and_exports(backbone, tiny_train_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("IMSM_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    BACKBONES[backbone](model_dir)
    trainer = train.main(_args(model_dir, tiny_train_file, tmp_path / "full"))
    model = trainer.model
    assert model.config.model_type == MODEL_TYPES[backbone]
    final = tmp_path / "full" / "final"
    trained = _adapter_and_gate(final)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())

    # resume from the step-1 checkpoint: the same adapter and gate as the uninterrupted run
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", tmp_path / "part" / "checkpoint-1")
    train.main(_args(model_dir, tiny_train_file, tmp_path / "part", "--resume_from_checkpoint", "latest"))
    resumed = _adapter_and_gate(tmp_path / "part" / "final")
    assert resumed.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], msg=key)

    # decoding with the KV cache = greedy argmax of the full forward, token by token
    model, tokenizer, _ = load_run(final, attn_implementation="sdpa")
    prompt = tokenizer("Question: Is 3 odd ? Output:")["input_ids"]
    steps = 6
    got = generate(model, tokenizer, [prompt], DecodingConfig(max_new_tokens=steps, stop_at_eos=False))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([seq])
            query = torch.tensor([[1] * len(prompt) + [0] * (len(seq) - len(prompt))])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), query_mask=query)["logits"]
            seq.append(int(logits[0, -1].argmax()))
    assert got.token_ids == seq[len(prompt):]

    # the exported folder computes the project's logits
    folder = export_run(final, tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([seq])
    with torch.no_grad():
        theirs = exported(input_ids=ids, attention_mask=torch.ones_like(ids),
                          prompt_length=torch.tensor([len(prompt)])).logits
        query = torch.tensor([[1] * len(prompt) + [0] * (len(seq) - len(prompt))])
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids), query_mask=query)["logits"]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
