"""Batched decoding with a KV cache per memory: IMSM, vanilla PEFT and the untuned backbone on one code path.

For a batch of left-padded prompts x (B, T) with attention mask m and positions p = cumsum(m) − 1 (so left padding
shifts no position), prefill runs each decoder branch over the prompts once, keeping its KV cache:

    h_M  = decoder(x) with the adapter off (frozen memory),   h_M' = decoder(x) with the adapter on (tuned memory)
    q_M, q_M' = means of h_M, h_M' over the prompt positions (padding excluded), computed once per prompt

and then every step feeds the newest token y_t (one per sequence) through each branch with its cache:

    g_t = gate(q_M, h_M_t, h_M'_t, q_M'),   mixed_t = g_t ∘ h_M_t + (1 − g_t) ∘ h_M'_t,   logits_t = lm_head(mixed_t)

The prompt positions enter the gate only through q_M and q_M', so the cached decode equals re-running the whole
sequence through ``IMSMModel`` at every token (what the paper's code does), at a fraction of the cost.

Branches (``build_decoder`` picks them from the model):

* ``SingleBranch``: one pass. The untuned backbone (no adapter at all) and the ``none`` gate (vanilla PEFT: the tuned
  memory alone) both decode through it, so the baseline and IMSM share every line below the branch.
* ``MixedBatchBranches``: LoRA without variants (no DoRA/aLoRA). Both memories come from ONE doubled batch
  ``[frozen rows; tuned rows]`` with one KV cache, using PEFT's mixed-adapter batch (``adapter_names`` with
  ``"__base__"`` for the frozen half): every base weight is read once per step for both memories and only the LoRA
  product runs on the tuned half. Decoding is memory-bound, so this keeps IMSM near the speed of vanilla PEFT where
  two passes would nearly halve it (``bench/bench_decode.py``, SmolLM2-135M on 2 CPU threads, batch 8: decoding at
  0.84 of vanilla PEFT's tokens/s with the mixed batch, 0.57 with two caches). We call the decoder directly (IMSM
  needs the hidden state, not logits), which bypasses ``PeftModel.forward``, so the PEFT hooks that honour
  ``adapter_names`` are entered around the whole batch through ``LoraModel._enable_peft_forward_hooks``;
  ``tests/evaluation/decoding/test_generation.py`` checks that the frozen half equals the ``disable_adapter()`` pass
  and the tuned half the adapter pass.
* ``TwoCacheBranches``: any other adapter (AdaLoRA, DoRA, (IA)3, LoRAMoE ignore ``adapter_names`` or refuse it): two
  passes per step, the frozen one under ``peft_model.disable_adapter()``, each with its own KV cache.

Greedy decoding by default; temperature / top-p sampling draws from a seeded ``torch.Generator`` (reproducible for
the same prompts and batch size; the draws follow the batches, so a sampled output does depend on its batch). A row
stops at an EOS id (the tokenizer's and the generation config's), once its generated text contains one of
``stop_strings`` (lm-evaluation-harness's ``until``; the text is then cut before the first of them), or after
``max_new_tokens``; finished rows are fed padding and no longer grow, and the loop ends when every row is done.
Prompts are batched by sorted length (less padding) and the results come back in input order. An example's greedy
output does not depend on the batch it lands in.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imsm.evaluation.decoding.scoring import SequenceScore
from imsm.method.gate import query_mean
from imsm.method.model import IMSMModel

logger = logging.getLogger(__name__)

FROZEN_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class DecodingConfig:
    """How to decode; greedy unless ``do_sample``."""

    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True  # False forces exactly max_new_tokens per row (throughput benchmarks)
    mixed_batch: bool | None = None  # None: the doubled LoRA batch where PEFT supports it; False: two caches
    output_logits: bool = False  # keep each step's float32 logits in ``Generation.logits`` (tests, analysis)
    stop_strings: tuple[str, ...] = ()  # a row also stops once its generated text contains one of these

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and top_p in (0, 1]")
        self.stop_strings = tuple(s for s in self.stop_strings if s)  # an empty string would stop every row at once


@dataclass
class Generation:
    """One decoded example."""

    text: str  # decoded without special tokens, cut before the first stop string, stripped
    token_ids: list[int]  # generated ids, the stopping EOS (or the tokens that completed a stop string) included
    num_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    gate_mean: float | None  # mean gate over the generated tokens (IMSM only): the share of the frozen memory
    logits: torch.Tensor | None = None  # (num_tokens, vocab) float32 when ``output_logits``
    answer_scores: list[SequenceScore] | None = None  # teacher-forced scores of the given answers, in their order


# --------------------------------------------------------------------------------------------------- branches


def _cache_keyword(decoder: nn.Module) -> str:
    """transformers 5 names the cache argument ``cache``; older and remote-code models ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class MemoryBranches:
    """The decoder pass(es) of one batch, each with its KV cache; ``__call__`` returns (h_M or None, h_M')."""

    siamese = False

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self._cache_kw = _cache_keyword(decoder)
        self._caches: dict[str, object] = {}

    @contextlib.contextmanager
    def batch(self, batch_size: int) -> Iterator[None]:
        """Fresh caches for a batch of ``batch_size`` rows, dropped on exit."""
        self._caches = {}
        try:
            yield
        finally:
            self._caches = {}

    def _run(self, key: str, input_ids, attention_mask, position_ids) -> torch.Tensor:
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, **{self._cache_kw: self._caches.get(key)})
        self._caches[key] = getattr(out, self._cache_kw)
        return out.last_hidden_state

    def __call__(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError

    def rewind(self, tokens: int) -> None:
        """Forget the newest ``tokens`` positions of every cache (after scoring answers on top of the prompt)."""
        for cache in self._caches.values():
            cache.crop(-tokens)


class SingleBranch(MemoryBranches):
    """One pass: the untuned backbone, or the tuned memory alone (vanilla PEFT, the ``none`` gate)."""

    def __call__(self, input_ids, attention_mask, position_ids):
        return None, self._run("tuned", input_ids, attention_mask, position_ids)


class TwoCacheBranches(MemoryBranches):
    """Two passes per step, the frozen one with the adapter disabled; one KV cache each. Works for any PEFT method."""

    siamese = True

    def __init__(self, model: IMSMModel) -> None:
        super().__init__(model.decoder)
        self.peft_model = model.peft_model

    def __call__(self, input_ids, attention_mask, position_ids):
        h_tuned = self._run("tuned", input_ids, attention_mask, position_ids)
        with self.peft_model.disable_adapter():
            h_frozen = self._run("frozen", input_ids, attention_mask, position_ids)
        return h_frozen, h_tuned


class MixedBatchBranches(MemoryBranches):
    """One doubled batch [frozen rows; tuned rows] with one KV cache, through PEFT's mixed-adapter LoRA batch."""

    siamese = True

    def __init__(self, model: IMSMModel) -> None:
        super().__init__(model.decoder)
        self.peft_model = model.peft_model

    @contextlib.contextmanager
    def batch(self, batch_size: int) -> Iterator[None]:
        names = [FROZEN_ADAPTER_NAME] * batch_size + [self.peft_model.active_adapter] * batch_size
        with super().batch(batch_size), self.peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
            yield

    def __call__(self, input_ids, attention_mask, position_ids):
        n = input_ids.shape[0]
        h = self._run("both", input_ids.repeat(2, 1), attention_mask.repeat(2, 1), position_ids.repeat(2, 1))
        return h[:n], h[n:]


def supports_mixed_batch(model: IMSMModel) -> bool:
    """Plain LoRA (no DoRA/aLoRA or other variant, nothing merged): the adapters PEFT mixes per row."""
    from peft import PeftType
    from peft.tuners.lora import LoraLayer

    peft_model = model.peft_model
    if not model.method.mixed_batch:
        return False
    config = peft_model.peft_config[peft_model.active_adapter]
    if config.peft_type != PeftType.LORA or not hasattr(peft_model.base_model, "_enable_peft_forward_hooks"):
        return False
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and not any(layer.lora_variant or layer.merged for layer in layers)


@dataclass
class Decoder:
    """Branches + gate + LM head: turns new tokens into next-token logits and the gate that produced them."""

    branches: MemoryBranches
    lm_head: nn.Module
    model: IMSMModel | None = None  # None: the untuned backbone

    @property
    def siamese(self) -> bool:
        return self.branches.siamese

    @property
    def uses_query(self) -> bool:
        return self.siamese and self.model.imsm_gate.uses_query

    def logits(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 logits (B, V), per-row mean gate (B,) or None) for the newest position of (B, 1, d) memories."""
        newest = torch.zeros(h_tuned.shape[:2], dtype=torch.bool, device=h_tuned.device)
        newest[:, -1] = True
        return self.positions_logits(h_frozen, h_tuned, q_frozen, q_tuned, newest)

    def positions_logits(self, h_frozen, h_tuned, q_frozen, q_tuned, keep: torch.Tensor):
        """(float32 logits (K, V), mean gate per kept position (K,) or None) at the positions ``keep`` (B, T) of
        (B, T, d) memories: the gate and the mix, then the LM head only where it is needed."""
        if not self.siamese:
            return self.lm_head(h_tuned[keep]).float(), None
        mixed, gate = self.model.mix(h_frozen, h_tuned, q_frozen, q_tuned)
        gates = gate[keep].float().mean(-1) if gate.dim() == 3 else gate.float().mean().expand(int(keep.sum()))
        return self.lm_head(mixed[keep]).float(), gates


def _score_answers(decoder: Decoder, answers: Sequence[Sequence[int]], first_logits: torch.Tensor,
                   first_gate: torch.Tensor | None, mask: torch.Tensor, next_pos: torch.Tensor, pad_id: int,
                   q_frozen, q_tuned) -> list[SequenceScore | None]:
    """Teacher-force one answer per row on top of the prompt caches, then rewind the caches to the prompt.

    The first answer token is scored with the prefill's last logits; the rest with one extension pass over the
    answers (right-padded after the left-padded prompts), exactly what ``scoring`` computes from scratch.
    """
    device = mask.device
    n = len(answers)
    width = max(len(a) for a in answers)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    keep = torch.zeros((n, width), dtype=torch.bool, device=device)
    for i, answer in enumerate(answers):
        if answer:
            ids[i, : len(answer)] = torch.tensor(list(answer), dtype=torch.long, device=device)
            keep[i, : len(answer)] = True
    first = torch.log_softmax(first_logits, -1).gather(-1, ids[:, :1]).squeeze(-1)
    first_greedy = first_logits.argmax(-1) == ids[:, 0]
    sums, misses = first.clone(), (~first_greedy).long()
    gate_sums = None if first_gate is None else first_gate.clone()
    if width > 1:
        ext_mask = torch.cat([mask, keep.long()], dim=1)
        positions = next_pos + torch.arange(width, device=device)
        h_frozen, h_tuned = decoder.branches(ids, ext_mask, positions)
        scored = keep[:, 1:]  # answer position j - 1 predicts answer token j
        logits, gates = decoder.positions_logits(None if h_frozen is None else h_frozen[:, :-1], h_tuned[:, :-1],
                                           q_frozen, q_tuned, scored)
        targets = ids[:, 1:][scored]
        token_logprob = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        rows = scored.nonzero()[:, 0]
        sums = sums.index_add(0, rows, token_logprob)
        misses = misses.index_add(0, rows, (logits.argmax(-1) != targets).long())
        if gate_sums is not None:
            gate_sums = gate_sums.index_add(0, rows, gates)
        decoder.branches.rewind(width)
    return [None if not answer else SequenceScore(
        logprob_sum=float(sums[i]), num_tokens=len(answer), is_greedy=bool(misses[i] == 0),
        gate_mean=None if gate_sums is None else float(gate_sums[i]) / len(answer))
        for i, answer in enumerate(answers)]


def build_decoder(model: nn.Module, mixed_batch: bool | None = None) -> Decoder:
    """The decoder of an ``IMSMModel`` (siamese unless its gate is ``none``) or of a plain causal LM (untuned)."""
    if not isinstance(model, IMSMModel):
        return Decoder(SingleBranch(getattr(model, model.base_model_prefix)), model.get_output_embeddings())
    if not model.uses_frozen_memory:
        return Decoder(SingleBranch(model.decoder), model.lm_head, model)
    can_mix = supports_mixed_batch(model)
    if mixed_batch and not can_mix:
        raise ValueError("the mixed-adapter batch needs a plain LoRA adapter; use mixed_batch=None or False")
    branches = MixedBatchBranches(model) if can_mix and mixed_batch is not False else TwoCacheBranches(model)
    logger.info("IMSM decoding path: %s", "one mixed-adapter batch (PEFT's _enable_peft_forward_hooks)"
                if isinstance(branches, MixedBatchBranches) else "two passes, two KV caches")
    return Decoder(branches, model.lm_head, model)


# --------------------------------------------------------------------------------------------------- decoding


def eos_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """The tokenizer's EOS id and the generation config's EOS id(s)."""
    backbone = model.peft_model.get_base_model() if isinstance(model, IMSMModel) else model
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(backbone, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return sorted(i for i in ids if i is not None)


def _next_tokens(logits: torch.Tensor, config: DecodingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a draw from softmax(logits / T) restricted to the top-p nucleus."""
    if not config.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the first always stays)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs > config.top_p, 0.0)
        return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), the prompts right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        input_ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return input_ids.to(device), mask.to(device)


def stop_string_checker(tokenizer, stop_strings: Sequence[str]) -> Callable[[Sequence[int]], bool] | None:
    """Whether generated ids already spell one of ``stop_strings`` (decoded with special tokens, as the harness's
    own stopping criterion does, so a stop string that is a special token's text stops too); None without any."""
    if not stop_strings:
        return None

    def stops(ids: Sequence[int]) -> bool:
        text = tokenizer.decode(list(ids), skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    return stops


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


@dataclass(frozen=True)
class DecodedBatch:
    """What ``decode_batch`` returns, on the CPU; B rows, N decoding steps."""

    tokens: torch.Tensor  # (B, N), padded after a row ends
    lengths: torch.Tensor  # (B,) tokens generated per row
    gate_sums: torch.Tensor | None  # (B,) the gate summed over a row's generated tokens; None without a gate
    hit_eos: torch.Tensor  # (B,) bool
    hit_stop: torch.Tensor  # (B,) bool: a stop string ended the row
    logits: torch.Tensor | None  # (B, N, V) with DecodingConfig.output_logits
    answer_scores: list[list[SequenceScore]] | None  # per row, the teacher-forced scores of its answers


@torch.inference_mode()
def decode_batch(decoder: Decoder, prompts: Sequence[Sequence[int]], pad_id: int, eos_ids: Sequence[int],
                 config: DecodingConfig, generator: torch.Generator | None = None,
                 answers: Sequence[Sequence[Sequence[int]]] | None = None,
                 stops: Callable[[Sequence[int]], bool] | None = None) -> DecodedBatch:
    """Decode one batch. When ``answers`` (per row, a list of answer ids) are given, their teacher-forced scores are
    computed on the prompt's KV cache before decoding (the prefill is shared). ``stops`` says whether a row's
    generated ids end it (a stop string)."""
    device = next(decoder.lm_head.parameters()).device
    input_ids, mask = left_pad(prompts, pad_id, device)
    n, steps = len(prompts), config.max_new_tokens
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    tokens = torch.full((n, steps), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    gate_sums = torch.zeros(n, dtype=torch.float32, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    hit_eos = torch.zeros(n, dtype=torch.bool, device=device)
    hit_stop = torch.zeros(n, dtype=torch.bool, device=device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    ones = torch.ones((n, 1), dtype=mask.dtype, device=device)
    step_logits = []

    with decoder.branches.batch(n):
        h_frozen, h_tuned = decoder.branches(input_ids, mask, positions)
        q_frozen = q_tuned = None
        if decoder.uses_query:
            q_frozen, q_tuned = query_mean(h_frozen, mask), query_mean(h_tuned, mask)
        logits, gate = decoder.logits(None if h_frozen is None else h_frozen[:, -1:], h_tuned[:, -1:],
                                      q_frozen, q_tuned)
        next_pos = positions[:, -1:] + 1
        answer_scores: list[list[SequenceScore]] | None = None
        if answers is not None:
            answer_scores = [[] for _ in range(n)]
            for k in range(max(len(a) for a in answers)):  # the k-th answer of every row that has one
                kth = [a[k] if k < len(a) else [] for a in answers]
                for i, score in enumerate(_score_answers(decoder, kth, logits, gate, mask, next_pos, pad_id,
                                                         q_frozen, q_tuned)):
                    if score is not None:
                        answer_scores[i].append(score)
        for step in range(steps):
            if config.output_logits:
                step_logits.append(logits)
            new = _next_tokens(logits, config, generator)
            live = ~done
            tokens[:, step] = torch.where(live, new, pad_id)
            lengths += live.long()
            if gate is not None:
                gate_sums += torch.where(live, gate, 0.0)
            if config.stop_at_eos:
                stopped = live & torch.isin(new, eos)
                hit_eos |= stopped
                done |= stopped
            if stops is not None:
                for row in (live & ~done).nonzero().flatten().tolist():
                    if stops(tokens[row, : int(lengths[row])].tolist()):
                        hit_stop[row] = True
                        done[row] = True
            if step + 1 == steps or bool(done.all()):
                break
            mask = torch.cat([mask, ones], dim=1)
            h_frozen, h_tuned = decoder.branches(tokens[:, step : step + 1], mask, next_pos)
            logits, gate = decoder.logits(h_frozen, h_tuned, q_frozen, q_tuned)
            next_pos = next_pos + 1
    gates = gate_sums.cpu() if decoder.siamese else None
    all_logits = torch.stack(step_logits, dim=1).cpu() if step_logits else None
    return DecodedBatch(tokens.cpu(), lengths.cpu(), gates, hit_eos.cpu(), hit_stop.cpu(), all_logits, answer_scores)


def generate(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], config: DecodingConfig | None = None,
             answers: Sequence[Sequence[Sequence[int]]] | None = None) -> list[Generation]:
    """Decode token-id prompts with an ``IMSMModel`` (any gate) or a plain causal LM; results in input order.

    ``answers[i]`` (a list of answer id lists, e.g. the gold answers) are also scored teacher-forced on prompt i's KV
    cache before decoding, into ``Generation.answer_scores``: the prefill is shared, so the likelihood costs only the
    answer tokens (``imsm.evaluation.decoding.scoring.score_continuations`` computes the same from scratch)."""
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answer lists for {len(prompts)} prompts")
    if answers is not None and any(not a or any(len(x) == 0 for x in a) for a in answers):
        raise ValueError("every prompt needs at least one answer, and every answer at least one token")
    config = config or DecodingConfig()
    decoder = build_decoder(model, config.mixed_batch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(tokenizer, model)
    device = next(decoder.lm_head.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.do_sample else None
    stops = stop_string_checker(tokenizer, config.stop_strings)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), config.batch_size):
            chunk = order[start : start + config.batch_size]
            out = decode_batch(decoder, [prompts[i] for i in chunk], pad_id, eos_ids, config, generator,
                               None if answers is None else [answers[i] for i in chunk], stops)
            for row, i in enumerate(chunk):
                n = int(out.lengths[row])
                ids = out.tokens[row, :n].tolist()
                text_ids = ids[:-1] if out.hit_eos[row] else ids
                text = cut_at_stop(tokenizer.decode(text_ids, skip_special_tokens=True), config.stop_strings)
                results[i] = Generation(
                    text=text.strip(), token_ids=ids, num_tokens=n,
                    finish_reason="eos" if out.hit_eos[row] else "stop" if out.hit_stop[row] else "length",
                    gate_mean=None if out.gate_sums is None else float(out.gate_sums[row]) / max(n, 1),
                    logits=None if out.logits is None else out.logits[row, :n].clone(),
                    answer_scores=None if out.answer_scores is None else out.answer_scores[row],
                )
            logger.debug("decoded %d / %d prompts", min(start + config.batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return results


@torch.inference_mode()
def reference_generate(model: nn.Module, prompt: Sequence[int], max_new_tokens: int,
                       eos_ids: Sequence[int] = ()) -> list[int]:
    """The slow reference: batch 1, no KV cache, the whole sequence re-run through the model for every token (as the
    paper's published code decodes), greedy. ``IMSMModel`` goes through its training forward ``hidden_states``."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        mask = torch.ones_like(ids)
        if isinstance(model, IMSMModel):
            query = torch.zeros_like(ids)
            query[:, : len(prompt)] = 1
            _, _, mixed, _ = model.hidden_states(ids, mask, query)
            logits = model.lm_head(mixed[:, -1])
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        token = int(logits.argmax(-1))
        out.append(token)
        if token in eos_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return out
