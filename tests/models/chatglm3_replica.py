"""A tiny ChatGLM3-layout checkpoint (config.json, safetensors by ChatGLM3's names, a SentencePiece tokenizer.model)
and an independent statement of ChatGLM3's forward on those weights, re-typed from THUDM's modeling_chatglm.py
(sequence-first, fused query_key_value, interleaved rotary pairs on half of each head): no transformers model used."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

TEXT = ("the cat is big and the dog is small . is the answer yes or no ? what number is odd ? 1 2 3 4 5 6 7 8 9 0\n"
        "Question : Is 3 odd ? Output : yes . Question : Is 8 odd ? Output : no . red blue true false of to a\n")

# ChatGLM3-6B's published config.json, the fields that shape the model
CHATGLM3_6B = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 28, "padded_vocab_size": 65024,
    "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128, "num_attention_heads": 32,
    "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 8192, "layernorm_epsilon": 1e-05,
    "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
    "add_bias_linear": False, "add_qkv_bias": True, "original_rope": True, "eos_token_id": 2, "pad_token_id": 0,
    "torch_dtype": "float16", "tie_word_embeddings": False,
}


def tiny_config(vocab: int) -> dict:
    return {**CHATGLM3_6B, "num_layers": 2, "padded_vocab_size": vocab, "hidden_size": 64, "ffn_hidden_size": 96,
            "kv_channels": 16, "num_attention_heads": 4, "seq_length": 256, "torch_dtype": "float32"}


def train_sentencepiece(folder: Path) -> Path:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def make_checkpoint(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the tiny checkpoint into ``folder``; returns its tensors by ChatGLM3's names."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    n_words = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(folder))).vocab_size()
    config = tiny_config(vocab=((n_words + 9 + 31) // 32) * 32)
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    d, ffn, heads, d_h, groups = (config[k] for k in ("hidden_size", "ffn_hidden_size", "num_attention_heads",
                                                      "kv_channels", "multi_query_group_num"))
    qkv = (heads + 2 * groups) * d_h

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"transformer.embedding.word_embeddings.weight": rand(config["padded_vocab_size"], d, scale=1.0),
             "transformer.rotary_pos_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, d_h // 2, 2).float() / (d_h // 2)),
             "transformer.encoder.final_layernorm.weight": 1 + rand(d, scale=0.1),
             "transformer.output_layer.weight": rand(config["padded_vocab_size"], d, scale=0.05)}
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        state |= {p + "input_layernorm.weight": 1 + rand(d, scale=0.1),
                  p + "self_attention.query_key_value.weight": rand(qkv, d),
                  p + "self_attention.query_key_value.bias": rand(qkv),
                  p + "self_attention.dense.weight": rand(d, heads * d_h),
                  p + "post_attention_layernorm.weight": 1 + rand(d, scale=0.1),
                  p + "mlp.dense_h_to_4h.weight": rand(2 * ffn, d),
                  p + "mlp.dense_4h_to_h.weight": rand(d, ffn)}
    save_file(state, str(folder / "model.safetensors"))
    return state


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotary(x, positions, d_h):
    """ChatGLM3's apply_rotary_pos_emb: pairs (x[2i], x[2i+1]) of the first d_h/2 dims rotated by pos·θ_i,
    θ_i = 10000^(-2i/(d_h/2)). x: [s, b, heads, d_h]."""
    n_elem = d_h // 2
    theta = 1.0 / (10000 ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    angles = torch.outer(positions.float(), theta)  # [s, n_elem/2]
    cos, sin = angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]
    rot, rest = x[..., :n_elem], x[..., n_elem:]
    pairs = rot.reshape(*rot.shape[:-1], n_elem // 2, 2)
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return torch.cat([out.flatten(3), rest], dim=-1)


def chatglm3_logits(state: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor,
                    qkv_delta: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """ChatGLM3's forward for an unpadded batch [b, s] -> logits [b, s, vocab]. ``qkv_delta``: a change to each
    layer's fused query_key_value weight (the fused LoRA's scale·B·A)."""
    heads, d_h, groups, eps = (config[k] for k in ("num_attention_heads", "kv_channels", "multi_query_group_num",
                                                   "layernorm_epsilon"))
    h = state["transformer.embedding.word_embeddings.weight"][input_ids].transpose(0, 1)  # [s, b, d]
    s = h.shape[0]
    positions = torch.arange(s)
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = _rms_norm(h, state[p + "input_layernorm.weight"], eps)
        w = state[p + "self_attention.query_key_value.weight"]
        if qkv_delta is not None:
            w = w + qkv_delta[i]
        mixed = x @ w.T + state[p + "self_attention.query_key_value.bias"]
        q, k, v = mixed.split([heads * d_h, groups * d_h, groups * d_h], dim=-1)
        q = _rotary(q.view(s, -1, heads, d_h), positions, d_h)
        k = _rotary(k.view(s, -1, groups, d_h), positions, d_h)
        v = v.view(s, -1, groups, d_h)
        # multi-query: each group's key/value serves heads/groups consecutive heads
        k = k.unsqueeze(-2).expand(-1, -1, -1, heads // groups, -1).reshape(s, -1, heads, d_h)
        v = v.unsqueeze(-2).expand(-1, -1, -1, heads // groups, -1).reshape(s, -1, heads, d_h)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d_h]
        scores = q @ k.transpose(-1, -2) / d_h ** 0.5
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        context = (F.softmax(scores, dim=-1) @ v).permute(2, 0, 1, 3).reshape(s, -1, heads * d_h)
        h = h + context @ state[p + "self_attention.dense.weight"].T
        x = _rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
        gate, up = (x @ state[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ state[p + "mlp.dense_4h_to_h.weight"].T
    h = _rms_norm(h, state["transformer.encoder.final_layernorm.weight"], eps)
    return (h @ state["transformer.output_layer.weight"].T).transpose(0, 1)
