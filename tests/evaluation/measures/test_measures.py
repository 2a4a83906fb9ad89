"""The measures against independent hand computations on the tiny model: the yes/no log-odds and the general-text NLL
from the paper's equations one unpadded sequence at a time, AUROC against a direct pairwise count, the threshold
chosen from training rows alone, KL against a direct softmax computation."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import imsm_args, make_llama, make_tokenizer

from imsm.evaluation.decoding.generation import reference_generate
from imsm.evaluation.decoding.scoring import FrozenMemo
from imsm.evaluation.measures.measures import (
    auroc,
    auroc_resampled,
    choose_threshold,
    continuation_nll,
    general_text_pairs,
    gold_yes,
    greedy_pairs,
    kl_to_reference,
    pooled,
    read_general_text,
    threshold_metrics,
    yes_no_log_odds,
    yes_no_measures,
)
from imsm.loader import build_imsm_model
from imsm.templates import build_template

VARIANTS = ["query_aware", "token", "none", "untuned"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny matrices only."""


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _model(tokenizer, variant, seed=0):
    backbone = make_llama(len(tokenizer), hidden=32, seed=seed)
    if variant == "untuned":
        return backbone.train()
    model = build_imsm_model(backbone, imsm_args(peft="lora", gate=variant, gate_dropout=0.3, lora_dropout=0.2,
                                                 lora_r=4, lora_alpha=8))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "w_b" in name else 0.3))
    return model.train()  # the measures must switch dropout off themselves


@torch.no_grad()
def _logits_by_hand(model, ids: list[int], query_length: int) -> torch.Tensor:
    """(T, vocab) float64 logits of one unpadded sequence from the paper's equations: h_M with the adapter off, h_M'
    with it on, q = means over the first ``query_length`` positions, g = sigmoid([q_M; h_M; h_M'; q_M'] W_A W_B)
    (the token gate without the q terms), mixed = g h_M + (1 - g) h_M', logits = lm_head(mixed)."""
    was = model.training
    model.eval()
    x = torch.tensor([ids])
    if not hasattr(model, "imsm_gate"):
        out = model(input_ids=x).logits[0]
    else:
        backbone = model.peft_model.get_base_model()
        inner = getattr(backbone, backbone.base_model_prefix)
        h_tuned = inner(input_ids=x).last_hidden_state[0]
        gate = model.imsm_gate
        if gate.__class__.__name__ == "NoGate":
            mixed = h_tuned
        else:
            with model.peft_model.disable_adapter():
                h_frozen = inner(input_ids=x).last_hidden_state[0]
            parts = [h_frozen, h_tuned]
            if gate.uses_query:
                t = len(ids)
                q_m, q_t = h_frozen[:query_length].mean(0), h_tuned[:query_length].mean(0)
                parts = [q_m.expand(t, -1), h_frozen, h_tuned, q_t.expand(t, -1)]
            g = torch.sigmoid(torch.cat(parts, -1) @ gate.w_a.weight.T @ gate.w_b.weight.T)
            mixed = g * h_frozen + (1 - g) * h_tuned
        out = backbone.lm_head(mixed)
    model.train(was)
    return out.double()


def _rows(n, seed=0):
    """Yes/no rows of varied prompt lengths (so a batch is padded), gold yes for odd numbers."""
    g = np.random.default_rng(seed)
    words = ["cat", "dog", "red", "blue", "big", "small", "the", "a"]
    rows = []
    for i in range(n):
        filler = " ".join(g.choice(words, size=int(g.integers(0, 7))))
        rows.append({"input": f"Question: Is {i % 10} odd ? {filler} Output:", "output": "yes" if i % 2 else "no"})
    return rows


# --------------------------------------------------------------------------------------------------- yes/no


@pytest.mark.parametrize("variant", VARIANTS)
def test_log_odds_match_the_equations_one_prompt_at_a_time(tokenizer, variant):
    model = _model(tokenizer, variant)
    template = build_template("raw", tokenizer)
    rows = _rows(7)
    got = yes_no_log_odds(model, template, rows, max_input_length=64, batch_size=3)
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    for row, value in zip(rows, got, strict=True):
        ids = tokenizer(row["input"])["input_ids"]  # raw template: BOS + the words
        logp = torch.log_softmax(_logits_by_hand(model, ids, len(ids))[-1], -1)
        assert value == pytest.approx(float(logp[yes] - logp[no]), abs=1e-4)
    assert model.training  # the mode is restored


def test_auroc_is_the_pairwise_ranking_count_with_ties_as_half(tokenizer):
    scores = yes_no_log_odds(_model(tokenizer, "query_aware"), build_template("raw", tokenizer), _rows(24), 64, 5)
    labels = gold_yes(_rows(24))
    for s in (scores, np.round(scores, 1), np.round(scores * 0)):  # as they are, with ties, all tied
        direct = [(1.0 if a > b else 0.5 if a == b else 0.0)
                  for (a, la), (b, lb) in itertools.product(zip(s, labels, strict=True), repeat=2) if la and not lb]
        assert auroc(s, labels) == pytest.approx(sum(direct) / len(direct), abs=1e-12)
    assert auroc(np.zeros(6), np.array([1, 0, 1, 0, 1, 0], bool)) == 0.5  # a constant (majority-class) model


def test_resampled_auroc_is_the_auroc_of_the_drawn_multiset():
    g = np.random.default_rng(3)
    scores, labels = np.round(g.normal(size=40), 1), g.random(40) < 0.6
    counts = g.integers(0, 3, size=(5, 40)).astype(float)
    for b in range(5):
        drawn = np.repeat(np.arange(40), counts[b].astype(int))
        assert auroc_resampled(scores, labels, counts)[b] == pytest.approx(auroc(scores[drawn], labels[drawn]))
    with pytest.raises(ValueError, match="only one class"):
        auroc(scores, np.ones(40, bool))


def test_threshold_is_chosen_on_training_rows_and_ignores_the_test_rows():
    g = np.random.default_rng(0)
    train_labels = g.random(60) < 0.5
    train_scores = g.normal(size=60) + 1.5 * train_labels
    t = choose_threshold(train_scores, train_labels)
    # by hand: every cut between two training scores; none gives a higher MCC than the chosen one
    best = max(threshold_metrics(train_scores, train_labels, c)["mcc"] for c in np.r_[train_scores, -99, 99])
    assert threshold_metrics(train_scores, train_labels, t)["mcc"] == pytest.approx(best)

    test_labels = g.random(50) < 0.7
    test_scores = g.normal(size=50) + 3.0 * test_labels + 2.0  # shifted: the test-optimal cut is elsewhere
    first = yes_no_measures(test_scores, test_labels, train_scores, train_labels)
    assert first["threshold"] == t
    assert choose_threshold(test_scores, test_labels) != t  # so using the test rows would have shown
    other = yes_no_measures(g.normal(size=30) * 5, g.random(30) < 0.2, train_scores, train_labels)
    assert other["threshold"] == t  # different test rows, the same threshold
    said = test_scores > t
    tp, tn = np.sum(said & test_labels), np.sum(~said & ~test_labels)
    fp, fn = np.sum(said & ~test_labels), np.sum(~said & test_labels)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert first["mcc"] == pytest.approx(mcc)
    assert first["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert first["auroc"] == pytest.approx(auroc(test_scores, test_labels))
    assert "mcc" not in yes_no_measures(test_scores, test_labels)  # no training rows: no threshold metrics


# --------------------------------------------------------------------------------------------------- general NLL


@pytest.mark.parametrize("variant", ["query_aware", "none", "untuned"])
def test_general_text_nll_matches_the_equations(tokenizer, variant):
    model = _model(tokenizer, variant)
    passages = [{"text": t} for t in ("the cat is big and the dog is small .", "red", "a blue dog ? 1 2 3 4 5 6 7 8",
                                      "what is the number of the answer")]
    pairs = general_text_pairs(tokenizer, passages, prefix_tokens=4, max_length=10)
    assert [len(c) for c, _ in pairs] == [4, 1, 4, 4]  # "red" = BOS + one word: a one-token query
    assert all(len(c) + len(y) <= 10 for c, y in pairs)
    got = continuation_nll(model, pairs, batch_size=3, pad_id=tokenizer.pad_token_id)
    total = tokens = 0.0
    for (context, rest), (nll_sum, count) in zip(pairs, got, strict=True):
        logp = torch.log_softmax(_logits_by_hand(model, context + rest, len(context)), -1)
        by_hand = -sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(rest))
        assert nll_sum == pytest.approx(by_hand, abs=1e-4)
        assert count == len(rest)
        total, tokens = total + by_hand, tokens + len(rest)
    assert pooled(got) == pytest.approx(total / tokens, abs=1e-5)


def test_general_text_file_errors_name_the_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"text": "a b", "source": "x"}\n{"source": "y"}\n')
    with pytest.raises(ValueError, match=r"g.jsonl:2: .*'text'"):
        read_general_text(path)
    with pytest.raises(FileNotFoundError, match="build_general_text"):
        read_general_text(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("variant", ["query_aware", "none"])
def test_kl_matches_a_direct_softmax_computation(tokenizer, variant):
    reference, model = _model(tokenizer, "untuned"), _model(tokenizer, variant)  # the same base weights (seed 0)
    template = build_template("raw", tokenizer)
    rows = _rows(5, seed=1)
    pairs = greedy_pairs(reference, tokenizer, template, rows, 64, max_new_tokens=4, batch_size=2)
    for row, (prompt, answer) in zip(rows, pairs, strict=True):
        assert prompt == tokenizer(row["input"])["input_ids"]
        assert answer == reference_generate(reference.eval(), prompt, 4, [tokenizer.eos_token_id])
    got = kl_to_reference(reference, model, pairs, batch_size=2, pad_id=tokenizer.pad_token_id)
    for (prompt, answer), (kl_sum, count) in zip(pairs, got, strict=True):
        ids, n = prompt + answer, len(prompt)
        p = torch.softmax(_logits_by_hand(reference, ids, n), -1)[n - 1 : n - 1 + len(answer)]
        q = torch.softmax(_logits_by_hand(model, ids, n), -1)[n - 1 : n - 1 + len(answer)]
        assert kl_sum == pytest.approx(float((p * (p.log() - q.log())).sum()), abs=1e-5)
        assert count == len(answer)
    same = kl_to_reference(reference, _model(tokenizer, "untuned"), pairs, batch_size=2)
    assert np.abs(same[:, 0]).max() < 1e-6  # the untuned model against itself


# --------------------------------------------------------------------------------------------------- frozen memo


def _count_frozen_passes(model):
    """Wrap ``model.memory`` so that each frozen pass (adapter off) is counted."""
    calls = {"frozen": 0}
    memory = model.memory

    def counted(adapter, **kwargs):
        calls["frozen"] += not adapter
        return memory(adapter, **kwargs)

    model.memory = counted
    return calls


def test_frozen_memo_gives_the_same_measures_with_one_frozen_pass(tokenizer):
    """An IMSM model reading its frozen memory from the untuned model's passes measures exactly what it measures
    alone, and computes the frozen pass once (the trust check) instead of once per batch."""
    untuned, model = _model(tokenizer, "untuned"), _model(tokenizer, "query_aware")  # the same base weights
    template = build_template("raw", tokenizer)
    rows = _rows(9, seed=3)
    passages = general_text_pairs(tokenizer, [{"text": " ".join(r["input"] for r in rows[i : i + 3])}
                                              for i in range(0, 9, 3)], prefix_tokens=4)
    pairs = greedy_pairs(untuned, tokenizer, template, rows, 64, max_new_tokens=4, batch_size=4)
    alone = (yes_no_log_odds(model, template, rows, 64, 4), continuation_nll(model, passages, 2),
             kl_to_reference(untuned, model, pairs, 4))

    memo = FrozenMemo()
    yes_no_log_odds(untuned, template, rows, 64, 4, memo=memo, record=True)
    continuation_nll(untuned, passages, 2, memo=memo, record=True)
    assert len(memo.states) == 3 + 2  # one per batch
    calls = _count_frozen_passes(model)
    memo.start_model()
    read = (yes_no_log_odds(model, template, rows, 64, 4, memo=memo), continuation_nll(model, passages, 2, memo=memo),
            kl_to_reference(untuned, model, pairs, 4, memo=memo))
    for a, b in zip(alone, read, strict=True):
        np.testing.assert_array_equal(a, b)
    assert memo.trusted is True
    assert calls["frozen"] == 1 and memo.reads == 3 + 2 + 3 - 1  # every batch but the checked one read the memo


def test_frozen_memo_is_not_read_by_a_model_on_another_backbone(tokenizer):
    """States recorded by another backbone fail the trust check: the model computes its own frozen memory."""
    other, model = _model(tokenizer, "untuned", seed=5), _model(tokenizer, "query_aware")
    template = build_template("raw", tokenizer)
    rows = _rows(8, seed=4)
    memo = FrozenMemo()
    yes_no_log_odds(other, template, rows, 64, 4, memo=memo, record=True)
    calls = _count_frozen_passes(model)
    memo.start_model()
    got = yes_no_log_odds(model, template, rows, 64, 4, memo=memo)
    assert memo.trusted is False and memo.reads == 0 and calls["frozen"] == 2
    np.testing.assert_array_equal(got, yes_no_log_odds(model, template, rows, 64, 4))
    by_hand = []
    for row in rows:
        ids = tokenizer(row["input"])["input_ids"]
        logits = _logits_by_hand(model, ids + [0], len(ids))[len(ids) - 1]
        yes, no = (template.encode_answer(row["input"], a)[0] for a in ("yes", "no"))
        by_hand.append(float(torch.log_softmax(logits, -1)[yes] - torch.log_softmax(logits, -1)[no]))
    np.testing.assert_allclose(got, by_hand, atol=1e-5)
