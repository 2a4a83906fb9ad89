"""Teacher-forced answer likelihood against a hand computation from the paper's equations, batch invariance, and the
scoring of a task's golds as training encodes them."""

import math

import pytest
import torch
from conftest import imsm_args, make_llama, make_tokenizer

from imsm.data import encode_example
from imsm.evaluation.decoding.scoring import answer_nll, score_continuations
from imsm.loader import build_imsm_model
from imsm.templates import build_template

VARIANTS = ["query_aware", "token", "equal", "none", "untuned"]


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
    args = imsm_args(peft="lora", gate=variant, gate_dropout=0.3, lora_dropout=0.2, lora_r=4, lora_alpha=8)
    model = build_imsm_model(backbone, args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "w_b" in name else 0.3))
    return model.train()  # scoring must switch dropout off itself


def _pairs(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (7, 1), (1, 4), (5, 3), (9, 2)]
    return [([tokenizer.bos_token_id] + torch.randint(4, len(tokenizer), (c - 1,), generator=g).tolist(),
             torch.randint(4, len(tokenizer), (m,), generator=g).tolist()) for c, m in shapes]


@torch.no_grad()
def _by_hand(model, context, continuation):
    """log p(continuation | context) written from the paper's equations, one unpadded sequence at a time:
    h_M with the adapter off, h_M' with it on, q = means over the context, g = sigmoid([q_M; h_M; h_M'; q_M'] W_A W_B),
    mixed = g h_M + (1 - g) h_M', logits = lm_head(mixed)."""
    ids = torch.tensor([context + continuation])
    if not hasattr(model, "imsm_gate"):
        logits = model(input_ids=ids).logits[0]
    else:
        backbone = model.peft_model.get_base_model()
        inner = getattr(backbone, backbone.base_model_prefix)
        h_tuned = inner(input_ids=ids).last_hidden_state[0]
        with model.peft_model.disable_adapter():
            h_frozen = inner(input_ids=ids).last_hidden_state[0]
        gate = model.imsm_gate
        if gate.__class__.__name__ == "NoGate":
            mixed = h_tuned
        elif gate.__class__.__name__ == "EqualGate":
            mixed = 0.5 * h_frozen + 0.5 * h_tuned
        else:
            n_ctx = len(context)
            q_m, q_t = h_frozen[:n_ctx].mean(0), h_tuned[:n_ctx].mean(0)
            t = ids.shape[1]
            parts = [h_frozen, h_tuned]
            if gate.uses_query:
                parts = [q_m.expand(t, -1), h_frozen, h_tuned, q_t.expand(t, -1)]
            g = torch.sigmoid(torch.cat(parts, -1) @ gate.w_a.weight.T @ gate.w_b.weight.T)
            mixed = g * h_frozen + (1 - g) * h_tuned
        logits = backbone.lm_head(mixed)
    logp = torch.log_softmax(logits.double(), -1)
    n = len(context)
    return sum(float(logp[n - 1 + j, tok]) for j, tok in enumerate(continuation))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logprob_equals_the_hand_computation(tokenizer, variant):
    model = _model(tokenizer, variant)
    pairs = _pairs(tokenizer)
    scores = score_continuations(model, pairs, batch_size=3, pad_id=tokenizer.pad_token_id)
    assert model.training  # restored
    model.eval()
    for (context, continuation), score in zip(pairs, scores, strict=True):
        assert score.num_tokens == len(continuation)
        assert score.logprob_sum == pytest.approx(_by_hand(model, context, continuation), abs=1e-4)
        assert score.nll_mean == pytest.approx(-score.logprob_sum / len(continuation))
    gated = variant in ("query_aware", "token", "equal")
    assert all((s.gate_mean is not None) == gated for s in scores)
    if variant == "equal":
        assert all(s.gate_mean == pytest.approx(0.5) for s in scores)


@pytest.mark.parametrize("variant", ["query_aware", "untuned"])
def test_padded_batches_equal_one_by_one(tokenizer, variant):
    model = _model(tokenizer, variant).eval()
    pairs = _pairs(tokenizer, seed=4)
    together = score_continuations(model, pairs, batch_size=5, pad_id=tokenizer.pad_token_id)
    alone = [score_continuations(model, [p], batch_size=1)[0] for p in pairs]
    for a, b in zip(together, alone, strict=True):
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
        assert a.is_greedy == b.is_greedy


def test_greedy_flag_matches_the_argmax(tokenizer):
    model = _model(tokenizer, "query_aware").eval()
    context = _pairs(tokenizer)[3][0]
    from imsm.evaluation.decoding.generation import reference_generate

    greedy = reference_generate(model, context, 3)
    scores = score_continuations(model, [(context, greedy), (context, greedy[:-1] + [(greedy[-1] + 1) % 40 + 4])])
    assert scores[0].is_greedy and not scores[1].is_greedy


def test_bad_pairs_are_refused(tokenizer):
    model = _model(tokenizer, "none")
    with pytest.raises(ValueError, match="at least one token"):
        score_continuations(model, [([1, 5], [])])
    with pytest.raises(ValueError, match="at least one token"):
        score_continuations(model, [([], [5])])


def test_answer_nll_scores_the_training_tokens_and_the_best_gold(tokenizer):
    model = _model(tokenizer, "query_aware").eval()
    template = build_template("raw", tokenizer)
    rows = [{"input": "Question: Is 3 odd ? Output:", "output": "yes"},
            {"input": "Question: what is the number ? Output:", "output": ["red cat", "7", "blue dog big"]}]
    scores = answer_nll(model, template, rows, max_input_length=64, batch_size=2)
    # the first row: exactly the tokens training puts a label on (the answer and its closing EOS)
    ex = encode_example(template, rows[0]["input"], "yes", 64, 512)
    answer = [t for t in ex["labels"] if t != -100]
    context = ex["input_ids"][: ex["query_length"]]
    assert answer[-1] == tokenizer.eos_token_id and scores[0].num_tokens == len(answer) == 2
    assert scores[0].nll_sum == pytest.approx(-_by_hand(model, context, answer), abs=1e-4)
    # the second: each gold scored alone, the lowest mean NLL kept
    each = [answer_nll(model, template, [{"input": rows[1]["input"], "output": g}], 64)[0] for g in rows[1]["output"]]
    best = min(range(3), key=lambda j: each[j].nll_mean)
    assert scores[1].gold_index == best
    assert scores[1].nll_mean == pytest.approx(each[best].nll_mean, abs=1e-5)
    assert math.isclose(scores[1].nll_mean * scores[1].num_tokens, scores[1].nll_sum, rel_tol=1e-5)
