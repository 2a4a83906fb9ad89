"""ChatGLM3 (THUDM/chatglm3-6b) as transformers' native ``glm`` model, converted once and cached.

ChatGLM3's model code lives in its repository and does not run under the transformers this project pins, but its
architecture is exactly transformers' ``GlmForCausalLM``:

    query_key_value (fused, rows [q: heads·d_h ; k: groups·d_h ; v: groups·d_h])  ->  q_proj, k_proj, v_proj
    dense -> o_proj,   dense_h_to_4h ([gate ; up]) -> gate_up_proj,   dense_4h_to_h -> down_proj
    embedding.word_embeddings -> embed_tokens,   encoder.final_layernorm -> norm,   output_layer -> lm_head
    RMSNorm (eps = layernorm_epsilon), SwiGLU, multi-query groups = key/value heads, bias on q, k, v only,
    rotary on the first half of each head's dims in the interleaved pair layout (partial_rotary_factor 0.5,
    theta = 10000 · rope_ratio), untied input and output embeddings.

A ChatGLM3 folder or Hub name (recognised from its config.json, read as JSON: no remote code runs) becomes a native
folder under ``$IMSM_CACHE/chatglm3/`` keyed by the source files (name, size, modification time), exactly as
``imsm/default_model.py`` caches the embedded GGUF model: weights as safetensors in the source dtype, ``config.json``
(``model_type`` "glm"), a fast tokenizer from the SentencePiece file (ChatGLM3's special tokens at their ids, the
``[gMASK] sop`` prefix its tokenizer adds, its chat template) and a generation config that stops where ChatGLM3's
``chat()`` stops: at EOS, ``<|user|>`` and ``<|observation|>``.

The paper's LoRA sits on the fused ``query_key_value``: ΔW = B·A with one A (r × d) and B ((heads + 2·groups)·d_h ×
r). On the split layout that is one shared A and three B's (``tie_fused_lora``): the same function and the same
parameter count (r 16 on ChatGLM3-6B: 3.899M). The paper's AdaLoRA there shares P, Λ and ranknum the same way and
splits Q by rows (init rank 12: 2.925M; its rank allocation on the fused triplet: ``imsm/method/adapters/adalora.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from imsm.atomic import atomic_dir
from imsm.default_model import cache_dir
from imsm.locks import held

logger = logging.getLogger(__name__)

ARCHITECTURES = ("ChatGLMModel", "ChatGLMForConditionalGeneration")
# ChatGLM3's tokenizer places these right after the SentencePiece vocabulary, in this order
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>")
PREFIX = ("[gMASK]", "sop")  # what its tokenizer puts before every input
CHAT_STOPS = ("<|user|>", "<|observation|>")  # chat() stops at these and at EOS
# build_chat_input: [gMASK] sop, then per turn <|role|> + encode("{metadata}\n") + encode(content), then <|assistant|>;
# each text piece is encoded on its own, so it starts with SentencePiece's dummy prefix (the space before content)
CHAT_TEMPLATE = (
    "[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FUSED_QKV = "query_key_value"
SPLIT_QKV = ("q_proj", "k_proj", "v_proj")
NATIVE_MODEL_TYPE = "glm"
CONVERTED_MARKER = "imsm_converted_from"  # config.json key of a converted folder: the source it came from


# ---- recognising a checkpoint --------------------------------------------------------------------------------------
def is_chatglm3_config(config: dict) -> bool:
    return config.get("model_type") == "chatglm" or bool(set(config.get("architectures") or ()) & set(ARCHITECTURES))


def _local_config(path: Path) -> dict | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not readable as JSON ({err})") from err


def _hub_config(name: str) -> dict | None:
    """The Hub repository's config.json as JSON, or None when ``name`` is not a reachable Hub model (the caller's
    ``from_pretrained`` then reports the problem in its own words)."""
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "config.json")).read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - any failure here means "not a Hub ChatGLM3 we can see"
        logger.debug("%s: no Hub config.json read (%s)", name, err)
        return None


def native_model_path(name_or_path: str) -> str:
    """``name_or_path`` itself, or for a ChatGLM3 checkpoint (local folder or Hub name) its converted native folder,
    converting it on first use."""
    local = Path(name_or_path)
    config = _local_config(local) if local.is_dir() else _hub_config(name_or_path)
    if config is None or not is_chatglm3_config(config):
        return name_or_path
    source = local if local.is_dir() else _download(name_or_path)
    target = cache_dir() / "chatglm3" / f"{_slug(name_or_path)}-{source_key(source)}"
    if not (target / "config.json").is_file():
        # every rank of a launch may get here at once: one converts, the others wait and then load its folder
        target.parent.mkdir(parents=True, exist_ok=True)
        with held(target.parent / f".{target.name}.lock", f"converting {name_or_path}"):
            if not (target / "config.json").is_file():
                logger.info("converting the ChatGLM3 checkpoint %s once into the native glm layout at %s",
                            name_or_path, target)
                convert(source, target, name_or_path)
    return str(target)


def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer.model"]
    folder = Path(snapshot_download(name, allow_patterns=patterns + ["*.safetensors"]))
    if not list(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(name, allow_patterns=patterns + ["*.bin"]))
    return folder


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)


def source_key(folder: Path) -> str:
    """Identifies the source files: name, size and modification time of each (Hub snapshots resolve to their blobs)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = file.resolve().stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ---- the conversion ------------------------------------------------------------------------------------------------
def glm_config(chatglm: dict, where: str = "config.json"):
    """transformers' ``GlmConfig`` equal to a ChatGLM3 ``config.json``; a setting the native model lacks is refused."""
    from transformers import GlmConfig

    unsupported = {
        "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
        "apply_residual_connection_post_layernorm": (False, "residual taken after the norm"),
        "post_layer_norm": (True, "no final norm"),
        "add_bias_linear": (False, "bias on every linear layer"),
        "multi_query_attention": (True, "no multi-query groups"),
        "original_rope": (True, "the non-original rotary layout"),
    }
    for key, (needed, what) in unsupported.items():
        if chatglm.get(key, needed) != needed:
            raise ValueError(f"{where}: {key} = {chatglm[key]!r} ({what}) has no native glm equivalent")
    if chatglm.get("pre_seq_len") is not None:
        raise ValueError(f"{where}: pre_seq_len = {chatglm['pre_seq_len']} (a P-tuning prefix) is not supported")
    try:
        heads, hidden = chatglm["num_attention_heads"], chatglm["hidden_size"]
        return GlmConfig(
            vocab_size=chatglm["padded_vocab_size"], hidden_size=hidden,
            intermediate_size=chatglm["ffn_hidden_size"], num_hidden_layers=chatglm["num_layers"],
            num_attention_heads=heads, num_key_value_heads=chatglm["multi_query_group_num"],
            head_dim=chatglm.get("kv_channels") or hidden // heads, hidden_act="silu", attention_dropout=0.0,
            max_position_embeddings=chatglm.get("seq_length", 8192), rms_norm_eps=chatglm["layernorm_epsilon"],
            tie_word_embeddings=False, attention_bias=bool(chatglm.get("add_qkv_bias", True)),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * chatglm.get("rope_ratio", 1),
                             "partial_rotary_factor": 0.5},
            pad_token_id=chatglm.get("pad_token_id", 0), bos_token_id=None,
            eos_token_id=chatglm.get("eos_token_id", 2),
        )
    except KeyError as err:
        raise ValueError(f"{where}: a ChatGLM3 config needs {err.args[0]!r}") from err


def convert_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """ChatGLM3's tensors by native glm names (``config``: the ``GlmConfig``); an unknown tensor is an error."""
    d_h = config.head_dim
    sizes = [config.num_attention_heads * d_h, config.num_key_value_heads * d_h, config.num_key_value_heads * d_h]
    fixed = {
        "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight",
    }
    per_layer = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in fixed:
            out[fixed[name]] = tensor
            continue
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed from the config
        prefix = "transformer.encoder.layers."
        if not name.startswith(prefix):
            raise ValueError(f"ChatGLM3 tensor {name!r} has no native glm counterpart")
        index, rest = name[len(prefix):].split(".", 1)
        layer = f"model.layers.{index}."
        if rest in per_layer:
            out[layer + per_layer[rest]] = tensor
        elif rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{name}: {tensor.shape[0]} rows, the config implies {sum(sizes)} (q, k, v)")
            for proj, part in zip(SPLIT_QKV, torch.split(tensor, sizes, dim=0)):
                out[f"{layer}self_attn.{proj}.{kind}"] = part.contiguous()
        else:
            raise ValueError(f"ChatGLM3 tensor {name!r} has no native glm counterpart")
    return out


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (safetensors preferred, else PyTorch .bin read with weights_only)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    loader = load_file
    if not files:
        files = sorted(folder.glob("*.bin"))
        loader = lambda f: torch.load(f, map_location="cpu", weights_only=True)
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weights in this ChatGLM3 folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(loader(str(file)))
    return state


def fast_tokenizer(model_file: Path, vocab_size: int):
    """ChatGLM3's tokenizer as a fast tokenizer: transformers' SentencePiece conversion (each text piece between
    special tokens encoded as SentencePiece encodes it, dummy prefix included), the nine special tokens at
    n_words + i, ``[gMASK] sop`` before every input, EOS ``</s>``, padding with ``<unk>`` on the left."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: a ChatGLM3 folder needs its SentencePiece tokenizer.model")
    proto = SentencePieceExtractor(str(model_file)).proto
    n_words = len(proto.pieces)
    if n_words + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(f"{model_file}: {n_words} pieces + {len(SPECIAL_TOKENS)} special tokens exceed the model's "
                         f"vocabulary ({vocab_size})")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)},
                                                          legacy=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    if [ids[t] for t in SPECIAL_TOKENS] != list(range(n_words, n_words + len(SPECIAL_TOKENS))):
        raise ValueError(f"{model_file}: the special tokens did not land at ids {n_words}...: {ids}")
    prefix = " ".join(PREFIX)
    backend.post_processor = TemplateProcessing(single=f"{prefix} $A", pair=f"{prefix} $A $B",
                                                special_tokens=[(t, ids[t]) for t in PREFIX])
    unk, eos = proto.trainer_spec.unk_id, proto.trainer_spec.eos_id
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=proto.pieces[unk].piece, eos_token=proto.pieces[eos].piece,
        pad_token=proto.pieces[unk].piece, padding_side="left", chat_template=CHAT_TEMPLATE,
        additional_special_tokens=list(SPECIAL_TOKENS),
    )


def convert(source: Path, target: Path, name: str | None = None) -> None:
    """Write the native glm folder of the ChatGLM3 checkpoint in ``source`` to ``target`` (atomically)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, GlmForCausalLM

    chatglm = _local_config(source)
    if chatglm is None or not is_chatglm3_config(chatglm):
        raise ValueError(f"{source / 'config.json'}: not a ChatGLM3 config (model_type 'chatglm')")
    config = glm_config(chatglm, str(source / "config.json"))
    dtype = getattr(torch, str(chatglm.get("torch_dtype", "float32")), torch.float32)
    tokenizer = fast_tokenizer(source / "tokenizer.model", config.vocab_size)
    stops = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(list(CHAT_STOPS))
    config.eos_token_id = stops
    setattr(config, CONVERTED_MARKER, name or str(source))
    state = convert_state_dict(read_weights(source), config)
    with torch.device("meta"):
        expected = set(GlmForCausalLM(config).state_dict())
    if expected != set(state):
        raise ValueError(f"{source}: the ChatGLM3 weights lack {sorted(expected - set(state))[:5]} and have "
                         f"{sorted(set(state) - expected)[:5]} beyond the native model's")
    config.dtype = dtype
    # written file by file, not with model.save_pretrained, which writes nothing on a rank other than 0 of a launch
    with atomic_dir(target) as staging:
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(staging)
        GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
        tokenizer.save_pretrained(staging)


# ---- the paper's fused LoRA on the split layout --------------------------------------------------------------------
def split_fused_targets(model_type: str, targets: list[str] | str | None) -> tuple[list[str] | str | None, bool]:
    """(``targets`` with ChatGLM's fused ``query_key_value`` as the native q_proj, k_proj, v_proj, whether it was
    there) on a native glm model; anything else passes through unchanged."""
    if model_type != NATIVE_MODEL_TYPE or not isinstance(targets, list | tuple) or FUSED_QKV not in targets:
        return targets, False
    rest = [t for t in targets if t != FUSED_QKV and t not in SPLIT_QKV]
    return list(SPLIT_QKV) + rest, True


def _shape(entry) -> torch.Size:
    return entry.weight.shape if isinstance(entry, nn.Module) else entry.shape


def tie_fused_lora(peft_model: nn.Module, parts: tuple[str, ...] = ("lora_A",)) -> int:
    """Share each attention layer's q_proj ``lora_A`` with its k_proj and v_proj: one A and three B's are LoRA on
    the fused query_key_value (ΔW = [B_q; B_k; B_v]·A). k's and v's A modules become q's module, so the parameter
    exists once (counted, optimised and gathered once). Each projection keeps its own dropout module, so in training
    q, k and v draw separate dropout masks on the shared input where the fused layer draws one: equal in expectation
    and identical without dropout (evaluation). ``parts``: the adapter dicts shared (AdaLoRA: its P ``lora_A``, Λ
    ``lora_E`` and rank count ``ranknum``, so that only Q ``lora_B`` is split by rows). Returns the number of layers
    tied."""
    tied = 0
    for name, module in peft_model.named_modules():
        if not name.endswith("self_attn"):
            continue
        q, k, v = (getattr(module, proj, None) for proj in SPLIT_QKV)
        if not all(hasattr(p, part) for p in (q, k, v) for part in parts):
            continue
        for part in parts:
            for adapter, shared in getattr(q, part).items():
                for other in (k, v):
                    if _shape(getattr(other, part)[adapter]) != _shape(shared):
                        raise ValueError(f"{name}: the q, k and v adapters differ in shape; cannot tie them")
                    getattr(other, part)[adapter] = shared
        tied += 1
    if not tied:
        raise ValueError("the fused query_key_value adapter found no q_proj/k_proj/v_proj adapters to tie")
    return tied


def untied_state_dict(peft_model: nn.Module, state: dict[str, torch.Tensor],
                      parts: tuple[str, ...] = ("lora_A",)) -> dict[str, torch.Tensor]:
    """``state`` (by the PeftModel's parameter names, a shared tensor under q's name only) with k's and v's tied
    ``parts`` written out as copies of q's, so the saved adapter is an ordinary PEFT adapter that any PEFT loads (two
    extra copies of A on disk); ``tie_fused_lora`` ties them again on resume. Untied adapters pass unchanged."""
    out = dict(state)
    for name, module in peft_model.named_modules():
        q, k, v = (getattr(module, proj, None) for proj in SPLIT_QKV)
        if not name.endswith("self_attn"):
            continue
        for part in parts:
            if not hasattr(q, part):
                continue
            for adapter, shared in getattr(q, part).items():
                suffix = ".weight" if isinstance(shared, nn.Module) else ""  # a LoRA A is a Linear, AdaLoRA's a tensor
                source = f"{name}.q_proj.{part}.{adapter}{suffix}"
                for proj, other in zip(SPLIT_QKV[1:], (k, v)):
                    entries = getattr(other, part, {})
                    if adapter in entries and entries[adapter] is shared and source in state:
                        out.setdefault(f"{name}.{proj}.{part}.{adapter}{suffix}", state[source])
    return out
