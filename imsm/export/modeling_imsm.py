"""An exported IMSM model (``export.py``): one backbone, two memories, a query-aware gate, one LM head.

Paper: "Interweaving Memories of a Siamese Large Language Model", AAAI 2025. For a sequence with prompt (query)
tokens Q:

    h_M   = decoder(x) with the base weights                      (frozen memory)
    h_M'  = decoder(x) with the tuned weights                     (tuned memory)
    q_M, q_M' = means of h_M, h_M' over the prompt tokens Q, padding excluded
    g_t   = sigmoid([q_M ; h_M_t ; h_M'_t ; q_M'] · W_A · W_B)   float32; the ``query_aware`` gate (``token`` drops
                                                                  the q terms, ``equal`` is g = 0.5)
    mixed_t = g_t ∘ h_M_t + (1 − g_t) ∘ h_M'_t,   logits_t = lm_head(mixed_t)

Both memories come from ONE doubled batch ``[frozen rows; tuned rows]``: every tuned linear layer
(``SiameseLinear``) holds the base weight and the run's adapter merged into a copy of it, and applies the first to the
first half of the batch and the second to the second half; every other weight is read once for both memories. The
KV cache of that doubled batch and the prompt means, computed once at prefill, live in one ``IMSMCache``.

Loading needs only ``torch`` and ``transformers`` (``trust_remote_code=True``):

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    out = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=32)

with the tokenizer padding on the left (the exported tokenizer does). Greedy decoding and sampling work with batched
left-padded prompts, with or without ``use_cache`` (the same tokens either way); beam search, chunked prefill, the
other cache-reordering modes and a static or offloaded ``cache_implementation`` are refused with a message.
A plain ``forward`` over prompt + answer needs the prompt's length (``prompt_length``), because the query means
average the prompt only; see ``IMSMForCausalLM.forward``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_imsm import IMSMConfig

IGNORE_INDEX = -100


def query_mean(hidden: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, d) over the positions where ``query_mask`` (B, T) is true; other positions are
    zeroed (not multiplied by 0), so a non-finite state at a padded position stays out."""
    keep = query_mask.bool().unsqueeze(-1)
    count = keep.sum(dim=1).clamp_min(1).to(hidden.dtype)
    return hidden.masked_fill(~keep, 0.0).sum(dim=1) / count


class LowRankGate(nn.Module):
    """g = sigmoid(x · W_A · W_B) for x the concatenation of ``n_inputs`` d-sized memories, computed in float32."""

    def __init__(self, hidden_size: int, rank: int, n_inputs: int) -> None:
        super().__init__()
        self.n_inputs = n_inputs
        self.w_a = nn.Linear(n_inputs * hidden_size, rank, bias=False, dtype=torch.float32)
        self.w_b = nn.Linear(rank, hidden_size, bias=False, dtype=torch.float32)

    def forward(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> torch.Tensor:
        features = [h_frozen, h_tuned]
        if self.n_inputs == 4:
            features = [q_frozen.unsqueeze(-2).expand_as(h_frozen), h_frozen, h_tuned,
                        q_tuned.unsqueeze(-2).expand_as(h_tuned)]
        x = torch.cat([f.float() for f in features], dim=-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.sigmoid(F.linear(F.linear(x, self.w_a.weight.float()), self.w_b.weight.float()))


class EqualGate(nn.Module):
    """g = 0.5: the two memories averaged (the ``equal`` ablation)."""

    def forward(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> torch.Tensor:
        return torch.full((1,), 0.5, dtype=torch.float32, device=h_tuned.device)


def build_gate(config: IMSMConfig) -> nn.Module:
    hidden = config.text_config.hidden_size
    if config.gate == "equal":
        return EqualGate()
    return LowRankGate(hidden, config.gate_rank, 4 if config.gate == "query_aware" else 2)


class SiameseLinear(nn.Module):
    """A linear layer the adapter tuned: ``weight``/``bias`` are the base model's, ``tuned_weight``/``tuned_bias``
    the adapter merged into a copy. The first half of the batch (frozen rows) goes through the base weight, the
    second half (tuned rows) through the tuned one, so only the IMSM model's doubled batch may call it."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.tuned_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.tuned_bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // 2
        frozen = F.linear(x[:n], self.weight, self.bias)
        return torch.cat([frozen, F.linear(x[n:], self.tuned_weight, self.tuned_bias)])


class IMSMCache(DynamicCache):
    """The KV cache of the doubled batch (2B rows: frozen then tuned) and the prompt means ``(q_M, q_M')``, each
    (B, d), set at prefill and read at every later step."""

    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        self.query_means: tuple[torch.Tensor, torch.Tensor] | None = None

    def _refuse(self, what: str):
        raise NotImplementedError(f"IMSM: {what} of the cache is not supported (the doubled batch and the prompt "
                                  "means would need reordering); use greedy decoding or sampling")

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._refuse("reordering")

    def batch_repeat_interleave(self, repeats: int):
        self._refuse("repeating rows")

    def batch_select_indices(self, indices: torch.Tensor):
        self._refuse("selecting rows")


class IMSMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = IMSMConfig
    base_model_prefix = "model"
    # the gate is computed in float32 whatever dtype the rest loads in, as in training
    _keep_in_fp32_modules: ClassVar[list[str]] = ["imsm_gate"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: IMSMConfig) -> None:
        super().__init__(config)
        text = config.text_config
        self.model = AutoModel.from_config(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=config.lm_head_bias)
        for name in config.tuned_modules:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"IMSMConfig.tuned_modules: {name} is a {type(base).__name__}, not a linear layer")
            setattr(parent, child, SiameseLinear(base.in_features, base.out_features, base.bias is not None))
        self.imsm_gate = build_gate(config)
        if config.tie_word_embeddings:
            embed = next(n for n, m in self.model.named_modules() if m is self.model.get_input_embeddings())
            self._tied_weights_keys = {"lm_head.weight": f"model.{embed}.weight"}
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the exported checkpoint; a fresh model (``from_config``) gets the base model's
        initialisation, tuned copies equal to the base weights and a zero W_B (g = 0.5), as training starts."""
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, SiameseLinear):
            init.normal_(module.weight, std=std)
            init.copy_(module.tuned_weight, module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
                init.zeros_(module.tuned_bias)
        elif isinstance(module, LowRankGate):
            init.kaiming_uniform_(module.w_a.weight, a=5**0.5)
            init.zeros_(module.w_b.weight)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate`` for greedy decoding and sampling; beam search and chunked prefill are refused
        (both would need the prompt means reordered or accumulated)."""
        config = kwargs.get("generation_config") or self.generation_config
        num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if num_beams > 1:
            raise ValueError(f"IMSM: beam search (num_beams={num_beams}) is not supported; use greedy decoding "
                             "(do_sample=False, num_beams=1) or sampling (do_sample=True)")
        if kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)) is not None:
            raise ValueError("IMSM: prefill_chunk_size is not supported (the prompt means need the whole prompt)")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            raise ValueError("IMSM: assisted and prompt-lookup decoding are not supported")
        cache_implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if cache_implementation not in (None, "dynamic"):
            raise ValueError(f"IMSM: cache_implementation={cache_implementation!r} is not supported (the doubled "
                             "batch and the prompt means live in the model's own dynamic cache, IMSMCache); leave "
                             "cache_implementation unset")
        prompt = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
            # without a cache every step runs over prompt + generated tokens: the query means must still average
            # the prompt only, as at prefill
            kwargs.setdefault("prompt_width", prompt.shape[1])
        return super().generate(*args, **kwargs)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: IMSMCache | None = None,
                use_cache: bool | None = None, prompt_length: int | torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0, prompt_width: int | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits of the mixed memory.

        ``prompt_length``: the number of prompt (query) tokens of each row, an int or a (B,) tensor, counted from the
        row's first non-padding token. The query means q_M and q_M' average those tokens only. **Pass it whenever
        ``input_ids`` holds more than the prompt** (prompt + answer for teacher-forced scoring or a loss): without
        it every token of ``input_ids`` counts as the prompt, which is right only for the first pass over a prompt,
        as ``generate()`` makes it. ``labels`` (the next-token loss over the positions whose label is not -100)
        requires ``prompt_length``.

        ``cache``: an ``IMSMCache`` (a plain empty ``DynamicCache``, as ``generate()`` creates, is replaced by one);
        once it holds the prompt means, later calls (one new token per row) reuse them and ``prompt_length`` is
        ignored. ``attention_mask`` covers the cached and the new tokens, as usual; ``position_ids`` default to the
        backbone's own (``generate()`` passes them from the mask, so left padding shifts no position).

        ``prompt_width``: set by ``generate()`` to the (padded) width of the prompt batch; columns from it on are
        generated tokens and never count as the prompt, so ``generate(use_cache=False)``, which runs every step over
        prompt + generated tokens, mixes the memories exactly as the cached decoding does.
        """
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("IMSM: inputs_embeds is not supported; pass input_ids")
        if labels is not None and prompt_length is None:
            raise ValueError("IMSM: a loss over a full sequence needs prompt_length (the query means average the "
                             "prompt only)")
        batch, length = input_ids.shape
        use_cache = (cache is not None) if use_cache is None else use_cache
        if use_cache and not isinstance(cache, IMSMCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("IMSM: a filled cache that is not an IMSMCache cannot continue; pass the cache this "
                                 "model returned")
            cache = IMSMCache(self.config.text_config)
        first_pass = cache is None or cache.query_means is None

        def doubled(t):
            return None if t is None else t.repeat(2, *([1] * (t.dim() - 1))) if t.shape[0] == batch else t

        out = self.model(input_ids=doubled(input_ids), attention_mask=doubled(attention_mask),
                         position_ids=doubled(position_ids), cache=cache if use_cache else None, use_cache=use_cache)
        hidden = out.last_hidden_state
        h_frozen, h_tuned = hidden[:batch], hidden[batch:]
        q_frozen = q_tuned = None
        if first_pass:
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
                else attention_mask[:, -length:].bool()
            query = real
            if prompt_length is not None:
                limit = torch.as_tensor(prompt_length, device=input_ids.device).reshape(-1, 1)
                query = real & (real.long().cumsum(-1) <= limit)
            if prompt_width is not None:
                query = query & (torch.arange(length, device=input_ids.device) < prompt_width)
            q_frozen, q_tuned = query_mean(h_frozen, query), query_mean(h_tuned, query)
            if use_cache:
                cache.query_means = (q_frozen, q_tuned)
        else:
            q_frozen, q_tuned = cache.query_means
        if logits_to_keep:
            h_frozen, h_tuned = h_frozen[:, -logits_to_keep:], h_tuned[:, -logits_to_keep:]
        g = self.imsm_gate(h_frozen, h_tuned, q_frozen, q_tuned)
        mixed = (g * h_frozen.float() + (1.0 - g) * h_tuned.float()).to(h_tuned.dtype)
        logits = self.lm_head(mixed)
        loss = None
        if labels is not None:
            targets = labels[:, -logits.shape[1]:][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


__all__ = ["IMSMCache", "IMSMForCausalLM"]
