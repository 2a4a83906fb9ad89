"""Teacher-forced scoring: the log-likelihood of a continuation given a context, through the exact model evaluated.

For a context c (the query) and a continuation y = (y_1 .. y_m), one forward pass over [c ; y] gives

    log p(y) = sum_j log softmax(lm_head(h_{|c|+j-1}))[y_j]

where h is the final hidden state the model would turn into logits: the backbone's own for the untuned model and
for vanilla PEFT (the ``none`` gate), and for IMSM the gated mix g ∘ h_M + (1 − g) ∘ h_M' with the query means taken
over the context positions only, exactly as in training (``IMSMModel.hidden_states`` with ``query_mask`` = context).
The model is causal and the query means cover the context alone, so no continuation token sees a later one.

Sequences are right-padded and batched by length (one forward per batch, the LM head applied only at the scored
positions, log-softmax in float32); results come back in input order and do not depend on the batch a sequence
lands in. ``answer_nll`` scores a task's gold answers the way training encodes them (``encode_prompt`` +
``template.encode_answer``: the answer and its closing EOS); with several acceptable golds the lowest mean NLL wins.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imsm.data import Truncation, encode_prompt
from imsm.method.model import IMSMModel
from imsm.templates import PromptTemplate

logger = logging.getLogger(__name__)


@dataclass
class SequenceScore:
    """The teacher-forced score of one continuation."""

    logprob_sum: float  # sum over continuation tokens of log p(token | everything before it)
    num_tokens: int
    is_greedy: bool  # every continuation token is the argmax of its distribution
    gate_mean: float | None  # mean gate over the scored positions (IMSM only): the share of the frozen memory

    @property
    def nll_mean(self) -> float:
        """Mean negative log-likelihood per continuation token (nats)."""
        return -self.logprob_sum / self.num_tokens


class FrozenMemo:
    """The untuned backbone's final hidden states of every batch it scored, so that an IMSM model scoring the very
    same batch (same token ids and mask: measures batch a fixed list of pairs the same way for every model) reads its
    frozen memory h_M instead of computing it again. h_M is the backbone with the adapter switched off, so it is the
    untuned model's own hidden state; with the untuned model measured first, every IMSM model then costs one pass,
    as vanilla PEFT does.

    Trust is checked, not assumed: the first batch a model would read is also computed, and the model reads the memo
    only if the two agree (``torch.allclose``, rtol = atol = 1e-5); a model whose frozen pass is not the untuned
    backbone (another base model, PiSSA's or CorDA's residual weights) computes its own. ``start_model`` resets the
    check for the next model. States are kept on the CPU, at most ``max_bytes`` of them (later batches are computed).
    """

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.states: dict[bytes, torch.Tensor] = {}
        self.trusted: bool | None = None  # the current model's verdict; None: not checked yet
        self.reads = 0  # batches read by the current model

    @staticmethod
    def key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
        ids, mask = input_ids.cpu().contiguous(), attention_mask.cpu().contiguous()
        shape = repr(tuple(ids.shape)).encode()
        return hashlib.sha256(shape + ids.numpy().tobytes() + mask.numpy().tobytes()).digest()

    def start_model(self) -> None:
        self.trusted, self.reads = None, 0

    def record(self, input_ids, attention_mask, hidden: torch.Tensor) -> None:
        key = self.key(input_ids, attention_mask)
        size = hidden.numel() * hidden.element_size()
        if key not in self.states and self.bytes + size <= self.max_bytes:
            self.states[key] = hidden.detach().cpu()
            self.bytes += size

    def frozen_memory(self, model: IMSMModel, input_ids, attention_mask) -> torch.Tensor | None:
        """This batch's h_M for ``model``, or None (the model computes it)."""
        state = self.states.get(self.key(input_ids, attention_mask))
        if state is None or self.trusted is False:
            return None
        state = state.to(input_ids.device)
        if self.trusted is None:
            computed = model.memory(False, input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
            self.trusted = computed.shape == state.shape and torch.allclose(computed.float(), state.float(),
                                                                            rtol=1e-5, atol=1e-5)
            if not self.trusted:
                logger.info("frozen memo: this model's frozen memory is not the untuned model's; it computes its own")
            return computed
        self.reads += 1
        return state


def _hidden_and_head(model: nn.Module, input_ids, attention_mask, query_mask, memo: FrozenMemo | None = None,
                     record: bool = False):
    """(final hidden states (B, T, d) that become logits, LM head, gate or None) of an IMSM model or a causal LM.

    ``memo``: an IMSM model reads its frozen memory from it; with ``record`` a causal LM (the untuned backbone) adds
    its hidden states to it."""
    if isinstance(model, IMSMModel):
        h_frozen = None
        if memo is not None and model.uses_frozen_memory:
            h_frozen = memo.frozen_memory(model, input_ids, attention_mask)
        _, _, mixed, gate = model.hidden_states(input_ids, attention_mask, query_mask, h_frozen=h_frozen)
        return mixed, model.lm_head, gate if model.uses_frozen_memory else None
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    if memo is not None and record:
        memo.record(input_ids, attention_mask, hidden)
    return hidden, model.get_output_embeddings(), None


@dataclass
class ScoredPositions:
    """One right-padded batch of (context, continuation) pairs through the model, at the positions that predict a
    continuation token, in row-major order (pair by pair, token by token)."""

    logits: torch.Tensor  # (N, vocab) float32
    targets: torch.Tensor  # (N,) the continuation token each position predicts
    rows: torch.Tensor  # (N,) the pair each position belongs to
    scored: torch.Tensor  # (B, T) bool: position t predicts the continuation token at t + 1
    gate: torch.Tensor | None  # the model's gate over the whole batch (IMSM only)


@torch.inference_mode()
def scored_positions(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                     device: torch.device, memo: FrozenMemo | None = None, record: bool = False) -> ScoredPositions:
    """One forward pass over the pairs, right-padded, with the context as the query (see the module docstring); the
    LM head runs only where a continuation token is predicted. Other measures
    (``imsm.evaluation.measures.measures``) read full next-token distributions from here. ``memo``/``record``: see
    ``FrozenMemo``."""
    width = max(len(c) + len(y) for c, y in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    query_mask = torch.zeros((n, width), dtype=torch.long)
    scored = torch.zeros((n, width), dtype=torch.bool)
    for i, (context, continuation) in enumerate(pairs):
        length = len(context) + len(continuation)
        input_ids[i, :length] = torch.tensor([*context, *continuation], dtype=torch.long)
        attention_mask[i, :length] = 1
        query_mask[i, : len(context)] = 1
        scored[i, len(context) - 1 : length - 1] = True
    input_ids, attention_mask, query_mask = (t.to(device) for t in (input_ids, attention_mask, query_mask))
    scored = scored.to(device)
    hidden, lm_head, gate = _hidden_and_head(model, input_ids, attention_mask, query_mask, memo, record)
    return ScoredPositions(logits=lm_head(hidden[scored]).float(), targets=input_ids[:, 1:][scored[:, :-1]],
                           rows=scored.nonzero()[:, 0], scored=scored, gate=gate)


@torch.inference_mode()
def _score_batch(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                 device: torch.device) -> list[SequenceScore]:
    n = len(pairs)
    out = scored_positions(model, pairs, pad_id, device)
    logits, targets, rows, scored, gate = out.logits, out.targets, out.rows, out.scored, out.gate
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprob = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    greedy = logits.argmax(-1) == targets
    sums = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, rows, token_logprob)
    misses = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, rows, (~greedy).long())
    gate_rows = None
    if gate is not None:
        if gate.dim() == 3:  # one value per token and hidden unit: average over units, then over scored positions
            per_position = gate[scored].float().mean(-1)
            gate_rows = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, rows, per_position)
        else:  # a constant gate (``equal``)
            gate_rows = gate.float().expand(n) * torch.tensor([len(y) for _, y in pairs], device=device)
        gate_rows = gate_rows.cpu()
    sums, misses = sums.cpu(), misses.cpu()
    return [
        SequenceScore(logprob_sum=float(sums[i]), num_tokens=len(y), is_greedy=bool(misses[i] == 0),
                      gate_mean=None if gate_rows is None else float(gate_rows[i]) / len(y))
        for i, (_, y) in enumerate(pairs)
    ]


def score_continuations(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 16, pad_id: int = 0) -> list[SequenceScore]:
    """Teacher-forced scores of ``(context ids, continuation ids)`` pairs with an ``IMSMModel`` (any gate; the context
    is the query whose memory means feed the gate) or a plain causal LM; results in input order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for i, (context, continuation) in enumerate(pairs):
        if len(context) == 0 or len(continuation) == 0:
            raise ValueError(f"pair {i}: the context and the continuation each need at least one token")
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[SequenceScore | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, score in zip(chunk, _score_batch(model, [pairs[i] for i in chunk], pad_id, device), strict=True):
                results[i] = score
    finally:
        model.train(was_training)
    return results


@dataclass
class AnswerScore:
    """The likelihood of a task example's gold answer (the best of several acceptable golds)."""

    nll_mean: float  # mean NLL per answer token, EOS included (nats)
    nll_sum: float
    num_tokens: int
    gold_index: int  # which gold of a list scored best (0 for a single gold)
    gate_mean: float | None


def gold_answers(template: PromptTemplate, row: dict) -> list[tuple[int, list[int]]]:
    """(index in the row's gold list, token ids) of every gold answer with a token to score, encoded as training
    encodes answers (the answer and its closing EOS)."""
    golds = row["output"] if isinstance(row["output"], list) else [row["output"]]
    return [(j, ids) for j, gold in enumerate(golds) if (ids := template.encode_answer(row["input"], gold))]


def best_answer(row: dict, scored: Sequence[tuple[int, SequenceScore]]) -> AnswerScore:
    """The gold with the lowest mean NLL among ``(gold index, score)``; errors name the example's golds."""
    if not scored:
        raise ValueError(f"no gold answer has a token to score ({row['output']!r})")
    j, s = min(scored, key=lambda item: item[1].nll_mean)
    if not math.isfinite(s.nll_mean):
        raise ValueError(f"the answer likelihood of {row['output']!r} is not finite ({s.nll_mean})")
    return AnswerScore(s.nll_mean, -s.logprob_sum, s.num_tokens, j, s.gate_mean)


def answer_nll(model: nn.Module, template: PromptTemplate, rows: Sequence[dict], max_input_length: int,
               batch_size: int = 16, truncation: Truncation | None = None) -> list[AnswerScore]:
    """Score every row's gold answer(s) teacher-forced, encoded as in training (``encode_prompt``'s prompt, counted
    in ``truncation``; the answer whole, with its closing EOS); a list of golds keeps the lowest mean NLL."""
    pairs, owners = [], []
    for i, row in enumerate(rows):
        prompt = encode_prompt(template, row["input"], max_input_length, truncation)
        for j, answer in gold_answers(template, row):
            pairs.append((prompt, answer))
            owners.append((i, j))
    pad_id = template.tokenizer.pad_token_id
    scores = score_continuations(model, pairs, batch_size, 0 if pad_id is None else pad_id)
    per_row: list[list[tuple[int, SequenceScore]]] = [[] for _ in rows]
    for (i, j), s in zip(owners, scores, strict=True):
        per_row[i].append((j, s))
    return [best_answer(row, scored) for row, scored in zip(rows, per_row, strict=True)]
