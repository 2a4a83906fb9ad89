"""Measures that separate learning from answer format: target learning without a threshold, and forgetting without
the answer format, each through the exact model evaluated (``scoring.scored_positions``: the IMSM model's gated mix,
vanilla PEFT's or the untuned backbone's own hidden states, one right-padded forward pass per batch).

**Yes/no log-odds** (MRPC, CoLA, MultiRC). For a prompt x under the run's template, with y and n the token ids of
the answers ``yes`` and ``no`` as training encodes them (``template.encode_answer``) and k the first position where
they differ (0 for every template here; a shared prefix, such as a chat header, is teacher-forced),

    s(x) = log p(y_k | x, y_<k) − log p(n_k | x, y_<k),

one forward pass per prompt. **AUROC** of s against the gold labels is the Mann–Whitney probability that a random
gold-yes row outscores a random gold-no row, ties counting 1/2: 0.5 for a model that only learned the majority class,
whatever its yes-rate. **MCC and balanced accuracy** (the mean of the yes and no recalls) read "yes iff s > t" at a
threshold t chosen on held-out *training* rows (``choose_threshold``: the t maximising MCC there); the test rows never
enter the choice.

**General-text NLL.** Each passage (``scripts/build_general_text.py``) is tokenized as plain text; its first
``prefix_tokens`` tokens are the query (what IMSM's gate averages over, as a prompt is in training) and the rest are
scored teacher-forced, so no scored token sees a later one. Per passage the components are (NLL sum, tokens), pooled
over passages as Σ NLL / Σ tokens, the cross-entropy per token of the text (log-perplexity): every token weighs the
same, so short passages do not count more per token, the convention of language-model evaluation. Forgetting is the
tuned model's minus the untuned model's, on the very same tokens.

**KL(untuned ‖ tuned).** On a general benchmark's prompts the untuned model decodes greedily; at every position that
predicts one of its answer tokens (the stopping EOS included) both models' next-token distributions p (untuned) and q
(tuned) are compared, KL = Σ_v p_v (log p_v − log q_v), and pooled per position like the NLL: (KL sum, positions) per
prompt. It needs no gold answer and no answer format. Both models score the same token sequences, encoded with the
untuned model's template.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imsm.data import Truncation, encode_prompt, jsonl_lines
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.evaluation.decoding.scoring import FrozenMemo, ScoredPositions, scored_positions
from imsm.evaluation.measures.metrics import NO, YES, read_yes_no
from imsm.method.kl_anchor import kl_to_frozen
from imsm.templates import PromptTemplate

logger = logging.getLogger(__name__)

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def _map_batches(models: Sequence[nn.Module], pairs: Sequence[Pair], batch_size: int, pad_id: int,
                 fn: Callable[[list[ScoredPositions], list[int]], np.ndarray], memo: FrozenMemo | None = None,
                 record: Sequence[bool] = ()) -> np.ndarray:
    """``fn(each model's scored positions, the pairs' indices)`` on every batch of pairs (longest first, so padding
    stays small); ``fn`` returns one row per pair of the batch, and the rows come back in input order. The batches
    depend on the pairs alone, so every model sees the same ones: an IMSM model reads its frozen memory from
    ``memo``, which the models flagged in ``record`` (the untuned backbone) fill (``scoring.FrozenMemo``)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: the context and the continuation each need at least one token")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: np.ndarray | None = None
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = [pairs[i] for i in chunk]
            outs = [scored_positions(m, batch, pad_id, next(m.parameters()).device, memo,
                                     k < len(record) and record[k]) for k, m in enumerate(models)]
            rows = fn(outs, chunk)
            if results is None:
                results = np.zeros((len(pairs), *rows.shape[1:]), dtype=np.float64)
            results[chunk] = rows
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return np.zeros((0,)) if results is None else results


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _pooled_rows(values: torch.Tensor, rows: torch.Tensor, size: int) -> np.ndarray:
    """(size, 2): per pair, the sum of its positions' values and its number of positions."""
    rows = rows.cpu()
    sums = torch.zeros(size, dtype=torch.float64).index_add_(0, rows, values.double().cpu())
    counts = torch.zeros(size, dtype=torch.float64).index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    return torch.stack([sums, counts], dim=1).numpy()


def pooled(components: np.ndarray) -> float:
    """Σ sums / Σ counts of (n, 2) per-example components: the per-token mean over all examples' tokens."""
    components = np.asarray(components, dtype=float)
    return float(components[:, 0].sum() / components[:, 1].sum())


# --------------------------------------------------------------------------------------------------- yes/no tasks


def gold_yes(rows: Sequence[dict], source: str = "rows") -> np.ndarray:
    """(n,) bool: whether each row's single gold answer is ``yes``; anything but one yes/no gold is an error."""
    labels = []
    for i, row in enumerate(rows):
        gold = row["output"]
        label = read_yes_no(gold) if isinstance(gold, str) else None
        if label is None:
            raise ValueError(f"{source}: row {i} needs a single gold 'yes' or 'no', got {gold!r}")
        labels.append(label == YES)
    return np.asarray(labels, dtype=bool)


def yes_no_pair(template: PromptTemplate, prompt: str, prompt_ids: list[int]) -> tuple[Pair, int, int]:
    """((context, [yes token]), yes token id, no token id): the context is the prompt plus the answers' shared
    prefix, so the one position scored is where ``yes`` and ``no`` first differ."""
    yes, no = template.encode_answer(prompt, YES), template.encode_answer(prompt, NO)
    k = 0
    while k < min(len(yes), len(no)) and yes[k] == no[k]:
        k += 1
    if k == len(yes) or k == len(no):
        raise ValueError(f"the {template.name} template encodes 'yes' ({yes}) and 'no' ({no}) so that one is a "
                         "prefix of the other; their log-odds is undefined")
    return (prompt_ids + yes[:k], [yes[k]]), yes[k], no[k]


def yes_no_log_odds(model: nn.Module, template: PromptTemplate, rows: Sequence[dict], max_input_length: int,
                    batch_size: int = 16, truncation: Truncation | None = None, memo: FrozenMemo | None = None,
                    record: bool = False) -> np.ndarray:
    """(n,) log p(yes) − log p(no) at the first answer token of every row's prompt (module docstring); ``memo`` and
    ``record`` as in ``_map_batches``."""
    pairs, tokens = [], []
    for row in rows:
        prompt_ids = encode_prompt(template, row["input"], max_input_length, truncation)
        pair, yes, no = yes_no_pair(template, row["input"], prompt_ids)
        pairs.append(pair)
        tokens.append((yes, no))
    token_ids = torch.tensor(tokens, dtype=torch.long)

    def log_odds(outs: list[ScoredPositions], chunk: list[int]) -> np.ndarray:
        logprobs = torch.log_softmax(outs[0].logits, dim=-1).cpu()  # one scored position per pair, in batch order
        picked = logprobs.gather(-1, token_ids[chunk])
        return (picked[:, 0] - picked[:, 1]).double().numpy()

    return _map_batches([model], pairs, batch_size, _pad_id(template.tokenizer), log_odds, memo, [record])


def auroc_resampled(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) AUROC of ``scores`` against the bool labels ``positive`` on each resample, ``counts`` (B, n) being how
    often each example was drawn: Σ over (yes i, no j) of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (W_yes W_no),
    from one sort (ties grouped). A resample without both classes gives NaN."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    counts = np.atleast_2d(np.asarray(counts, dtype=float))
    if scores.shape != positive.shape or counts.shape[1] != len(scores):
        raise ValueError(f"{len(scores)} scores, {len(positive)} labels and {counts.shape[1]} counts per resample")
    if not np.all(np.isfinite(scores)):
        raise ValueError("the scores must be finite")
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each group of equal scores
    w = counts[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)  # (B, groups)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # weight of the no rows scored strictly lower
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC with ties as 1/2 (``auroc_resampled`` on the examples as they are); both classes are needed."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError(f"AUROC needs gold yes and gold no rows; these {len(positive)} rows hold only one class")
    return float(auroc_resampled(scores, positive, np.ones((1, len(positive))))[0])


def confusion(scores: np.ndarray, positive: np.ndarray, threshold: float) -> np.ndarray:
    """(n, 4) per-example (tp, tn, fp, fn) of "yes iff score > threshold": the ``mcc_counts`` components."""
    said = np.asarray(scores, dtype=float) > threshold
    positive = np.asarray(positive, dtype=bool)
    return np.stack([said & positive, ~said & ~positive, said & ~positive, ~said & positive], axis=1).astype(float)


def mcc_from_counts(tp, tn, fp, fn) -> np.ndarray:
    """Matthews correlation (0 where a factor of the denominator is 0); works on arrays."""
    tp, tn, fp, fn = (np.asarray(x, dtype=float) for x in (tp, tn, fp, fn))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(denom), where=denom != 0)


def balanced_accuracy_from_counts(tp, tn, fp, fn) -> np.ndarray:
    """(recall of yes + recall of no) / 2, a class's recall counted 0 when the class is absent; works on arrays."""
    tp, tn, fp, fn = (np.asarray(x, dtype=float) for x in (tp, tn, fp, fn))
    yes = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn != 0)
    no = np.divide(tn, tn + fp, out=np.zeros_like(tn), where=tn + fp != 0)
    return (yes + no) / 2.0


def choose_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold t maximising the MCC of "yes iff score > t" on these (held-out training) rows.

    The candidates are the midpoints between consecutive distinct scores and one value either side of them all
    (every row yes / every row no); the first best wins, so the choice is a function of these rows alone."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    if len(scores) == 0 or len(scores) != len(positive):
        raise ValueError(f"choosing a threshold needs scored rows: {len(scores)} scores, {len(positive)} labels")
    values = np.unique(scores)
    candidates = np.r_[values[0] - 1.0, (values[1:] + values[:-1]) / 2.0, values[-1] + 1.0]
    said = scores[None, :] > candidates[:, None]  # (candidates, n)
    tp, fp = (said & positive).sum(1), (said & ~positive).sum(1)
    fn, tn = (~said & positive).sum(1), (~said & ~positive).sum(1)
    return float(candidates[int(np.argmax(mcc_from_counts(tp, tn, fp, fn)))])


def threshold_metrics(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, float]:
    """MCC, balanced accuracy and yes-rate of "yes iff score > threshold" on these rows."""
    tp, tn, fp, fn = confusion(scores, positive, threshold).sum(axis=0)
    n = max(tp + tn + fp + fn, 1.0)
    return {"mcc": float(mcc_from_counts(tp, tn, fp, fn)),
            "balanced_accuracy": float(balanced_accuracy_from_counts(tp, tn, fp, fn)),
            "yes_rate": float((tp + fp) / n)}


# --------------------------------------------------------------------------------------------------- general text


def read_general_text(path: str | Path) -> list[dict]:
    """The passages of a general-text file: JSONL rows with a non-empty ``text`` (and the ``source`` it came from);
    a malformed line or an empty file is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--general_text {path}: no such file (build it with scripts/build_general_text.py)")
    rows = []
    for lineno, row in jsonl_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a non-empty string 'text'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file, no passages")
    return rows


def general_text_pairs(tokenizer, passages: Sequence[dict], prefix_tokens: int = 32,
                       max_length: int = 1024) -> list[Pair]:
    """(query prefix, scored rest) of every passage: its tokens (with the tokenizer's own special tokens, e.g. BOS),
    the first ``max_length`` of them kept, the first ``prefix_tokens`` (fewer for a short passage, leaving at least
    one token to score) as the query."""
    if prefix_tokens < 1 or max_length <= prefix_tokens:
        raise ValueError(f"general text: need 1 <= prefix_tokens ({prefix_tokens}) < max_length ({max_length})")
    pairs, cut = [], 0
    for i, row in enumerate(passages):
        ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
        if len(ids) < 2:
            raise ValueError(f"general text passage {i} ({row.get('source', 'no source')}) has {len(ids)} token(s); "
                             "at least 2 are needed (one of query, one to score)")
        cut += len(ids) > max_length
        ids = ids[:max_length]
        split = min(prefix_tokens, len(ids) - 1)
        pairs.append((ids[:split], ids[split:]))
    if cut:
        logger.warning("general text: %d of %d passages cut to their first %d tokens", cut, len(passages), max_length)
    return pairs


def continuation_nll(model: nn.Module, pairs: Sequence[Pair], batch_size: int = 16, pad_id: int = 0,
                     memo: FrozenMemo | None = None, record: bool = False) -> np.ndarray:
    """(n, 2): per pair, the summed NLL of its continuation tokens (nats) and their number (``pooled`` pools them);
    ``memo`` and ``record`` as in ``_map_batches``."""
    def nll(outs: list[ScoredPositions], chunk: list[int]) -> np.ndarray:
        out = outs[0]
        logprobs = torch.log_softmax(out.logits, dim=-1)
        token_nll = -logprobs.gather(-1, out.targets.unsqueeze(-1)).squeeze(-1)
        return _pooled_rows(token_nll, out.rows, len(chunk))

    return _map_batches([model], pairs, batch_size, pad_id, nll, memo, [record])


# --------------------------------------------------------------------------------------------------- KL


def greedy_pairs(reference: nn.Module, tokenizer, template: PromptTemplate, rows: Sequence[dict],
                 max_input_length: int, max_new_tokens: int, batch_size: int = 16,
                 truncation: Truncation | None = None) -> list[Pair]:
    """(prompt, the reference model's greedy answer) per row, its stopping EOS included: where KL is read."""
    prompts = [encode_prompt(template, row["input"], max_input_length, truncation) for row in rows]
    config = DecodingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [(prompt, g.token_ids) for prompt, g in zip(prompts, generate(reference, tokenizer, prompts, config),
                                                        strict=True)]


def kl_to_reference(reference: nn.Module, model: nn.Module, pairs: Sequence[Pair], batch_size: int = 16,
                    pad_id: int = 0, memo: FrozenMemo | None = None) -> np.ndarray:
    """(n, 2): per pair, Σ over its continuation positions of KL(reference ‖ model) of the next-token distributions
    (nats), and the number of positions. With ``memo`` the reference's pass over a batch serves as an IMSM model's
    frozen memory of it (``scoring.FrozenMemo``)."""
    def kl(outs: list[ScoredPositions], chunk: list[int]) -> np.ndarray:
        ref, tuned = outs
        per_position = kl_to_frozen(ref.logits, tuned.logits.to(ref.logits.device))  # the KL anchor's own term
        return _pooled_rows(per_position, ref.rows, len(chunk))

    return _map_batches([reference, model], pairs, batch_size, pad_id, kl, memo, [True, False])


def yes_no_measures(scores: np.ndarray, positive: np.ndarray, train_scores: np.ndarray | None = None,
                    train_positive: np.ndarray | None = None) -> dict[str, float]:
    """AUROC of the test rows' log-odds, and with held-out training rows the threshold they choose
    (``choose_threshold``) and the test rows' MCC, balanced accuracy and yes-rate at it. The test rows never enter
    the choice: the threshold is a function of the training rows alone."""
    out = {"auroc": auroc(scores, positive)}
    if train_scores is not None:
        out["threshold"] = choose_threshold(train_scores, train_positive)
        out |= threshold_metrics(scores, positive, out["threshold"])
    return out
