"""The gate and the mix against the paper's equations computed by hand."""

import pytest
import torch
import torch.nn.functional as F

from imsm.method.gate import GATES, build_gate, query_mean


def _memories(b=3, t=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_m, h_t = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    # Row 0: 4 prompt tokens, row 1: 2 prompt tokens then padding, row 2: 6 prompt tokens.
    query_mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate((4, 2, 6)):
        query_mask[i, :n] = 1
    return h_m, h_t, query_mask


def _randomise(gate, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_query_mean_excludes_padding():
    h, _, mask = _memories()
    expected = torch.stack([h[i, : int(mask[i].sum())].mean(0) for i in range(h.shape[0])])
    torch.testing.assert_close(query_mean(h, mask), expected)
    h2 = h.clone()
    h2[mask == 0] = float("nan")  # anything at non-query positions must not matter, even a non-finite state
    torch.testing.assert_close(query_mean(h2, mask), expected)


def test_query_aware_gate_matches_equations():
    h_m, h_t, mask = _memories()
    gate = build_gate("query_aware", 16, rank=8)
    _randomise(gate)
    w_a, w_b = gate.w_a.weight.T, gate.w_b.weight.T  # 4d×r and r×d as in the paper
    assert w_a.shape == (64, 8) and w_b.shape == (8, 16)
    q_m = torch.stack([h_m[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    q_t = torch.stack([h_t[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    for i in range(3):
        for t in range(7):
            x = torch.cat([q_m[i], h_m[i, t], h_t[i, t], q_t[i]])
            g = torch.sigmoid(x @ w_a @ w_b)
            mixed, gate_val = gate.mix(h_m, h_t, query_mean(h_m, mask), query_mean(h_t, mask))
            torch.testing.assert_close(gate_val[i, t], g)
            torch.testing.assert_close(mixed[i, t], g * h_m[i, t] + (1 - g) * h_t[i, t])


def test_token_gate_has_no_query_term():
    h_m, h_t, _ = _memories()
    gate = build_gate("token", 16, rank=4)
    _randomise(gate)
    g = torch.sigmoid(torch.cat([h_m, h_t], -1) @ gate.w_a.weight.T @ gate.w_b.weight.T)
    mixed, gate_val = gate.mix(h_m, h_t)
    torch.testing.assert_close(gate_val, g)
    torch.testing.assert_close(mixed, g * h_m + (1 - g) * h_t)


@pytest.mark.parametrize("variant", ["query_aware", "token"])
def test_training_dropout_is_on_the_output_of_each_linear_map(variant):
    """As the published code (siamese_model.py: nn.Sequential(Linear, Dropout) for W_A and again for W_B):
    g = sigmoid(drop(drop(x · W_A) · W_B)), the same masks drawn in the same order from the same seed."""
    h_m, h_t, mask = _memories()
    gate = build_gate(variant, 16, rank=4, dropout=0.5)
    _randomise(gate)
    gate.train()
    q_m, q_t = query_mean(h_m, mask), query_mean(h_t, mask)
    x = torch.cat([q_m.unsqueeze(1).expand_as(h_m), h_m, h_t, q_t.unsqueeze(1).expand_as(h_t)], -1) \
        if variant == "query_aware" else torch.cat([h_m, h_t], -1)
    torch.manual_seed(7)
    g = gate(h_m, h_t, q_m, q_t)
    torch.manual_seed(7)
    low = F.dropout(x @ gate.w_a.weight.T, 0.5, training=True)
    expected = torch.sigmoid(F.dropout(low @ gate.w_b.weight.T, 0.5, training=True))
    torch.testing.assert_close(g, expected)
    assert (g == 0.5).any()  # a dropped output unit leaves the gate at sigmoid(0)
    gate.eval()
    torch.testing.assert_close(gate(h_m, h_t, q_m, q_t), torch.sigmoid(x @ gate.w_a.weight.T @ gate.w_b.weight.T))


@pytest.mark.parametrize("variant,value", [("equal", 0.5), ("none", 0.0)])
def test_constant_gates(variant, value):
    h_m, h_t, _ = _memories()
    mixed, _ = build_gate(variant, 16).mix(h_m, h_t)
    torch.testing.assert_close(mixed, value * h_m + (1 - value) * h_t)


@pytest.mark.parametrize("variant,factor", [("query_aware", 5), ("token", 3), ("equal", 0), ("none", 0)])
def test_parameter_count(variant, factor):
    d, r = 4096, 8
    n = sum(p.numel() for p in build_gate(variant, d, rank=r).parameters())
    assert n == factor * d * r
    if variant == "query_aware":
        assert n == 163_840  # the paper's Table 1: 0.164M for d = 4096, r = 8


def test_gate_starts_at_half_and_is_float32_under_bf16():
    h_m, h_t, mask = _memories()
    gate = build_gate("query_aware", 16).to(torch.bfloat16)
    g = gate(h_m.bfloat16(), h_t.bfloat16(), query_mean(h_m, mask).bfloat16(), query_mean(h_t, mask).bfloat16())
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, torch.full_like(g, 0.5))


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown gate variant 'mode2'"):
        build_gate("mode2", 16)
    assert set(GATES) == {"query_aware", "token", "equal", "none"}
