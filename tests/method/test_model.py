"""The siamese model: frozen memory, shared weights, the loss, and which parameters train."""

import pytest
import torch
import torch.nn.functional as F
from conftest import imsm_args, make_llama
from method.cases import ALL, TINY_OPTIONS, TOTAL_STEPS

from imsm.args import ImsmArguments
from imsm.loader import build_imsm_model
from imsm.method.gate import query_mean

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 64


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (3, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0  # right padding
    query = torch.zeros_like(ids)
    query[0, :5], query[1, :4], query[2, :6] = 1, 1, 1
    labels = torch.where(query.bool() | ~attention.bool(), torch.full_like(ids, -100), ids)
    return {"input_ids": ids, "attention_mask": attention, "query_mask": query, "labels": labels}


def _imsm(peft="lora", gate="query_aware", seed=0, **kw):
    backbone = make_llama(VOCAB, hidden=32, seed=seed)
    args = imsm_args(**{"peft": peft, "gate": gate, "gate_dropout": 0.0, **TINY_OPTIONS, **kw})
    return backbone, build_imsm_model(backbone, args, total_steps=TOTAL_STEPS)


def _perturb_adapter(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_frozen_memory_is_base_final_hidden_state():
    reference = make_llama(VOCAB, hidden=32, seed=0).eval()
    _, model = _imsm()
    model.eval()
    _perturb_adapter(model)
    b = _batch()
    expected = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         output_hidden_states=True).hidden_states[-1]
    frozen = model.memory(False, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    tuned = model.memory(True, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    torch.testing.assert_close(frozen, expected)
    assert not torch.allclose(tuned, expected, atol=1e-3)  # the adapter is on in the tuned pass
    # the LM head input: logits of the base model are lm_head(frozen memory)
    base_logits = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(model.lm_head(frozen), base_logits)


def test_base_weights_are_shared_not_copied():
    backbone, model = _imsm()
    embed_ptr = backbone.get_input_embeddings().weight.data_ptr()
    assert model.decoder.embed_tokens.weight.data_ptr() == embed_ptr
    n_backbone = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    storages = {p.data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters()))
    base = make_llama(VOCAB, hidden=32)
    assert n_backbone == sum(p.numel() for p in base.parameters())  # exactly one copy of the base weights
    assert all(n.startswith(("peft_model.", "imsm_gate.")) for n, _ in model.named_parameters())


def test_loss_is_answer_token_cross_entropy_of_mixed_memory():
    _, model = _imsm()
    model.eval()
    _perturb_adapter(model)
    b = _batch()
    out = model(**b)
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    h_m = model.memory(False, **kw).last_hidden_state
    h_t = model.memory(True, **kw).last_hidden_state
    q_m, q_t = query_mean(h_m, b["query_mask"]), query_mean(h_t, b["query_mask"])
    gate = model.imsm_gate
    x = torch.cat([q_m.unsqueeze(1).expand_as(h_m), h_m, h_t, q_t.unsqueeze(1).expand_as(h_t)], -1)
    g = torch.sigmoid(x @ gate.w_a.weight.T @ gate.w_b.weight.T)
    logits = model.lm_head(g * h_m + (1 - g) * h_t)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss"], expected)
    answer = b["labels"][:, 1:] != -100
    torch.testing.assert_close(out["gate_mean"], g[:, :-1][answer].mean())


def test_vanilla_peft_skips_the_frozen_pass():
    _, model = _imsm(gate="none")
    calls = []
    model.decoder.register_forward_hook(lambda *a: calls.append(1))
    model(**_batch())
    assert len(calls) == 1


@pytest.mark.parametrize("gate", ["query_aware", "token", "equal", "none"])
@pytest.mark.parametrize("peft", ALL)
def test_only_adapter_and_gate_train(peft, gate):
    _, model = _imsm(peft=peft, gate=gate)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(3):
        loss = model(**_batch(step))["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if model.is_trainable_name(n) and p.requires_grad:
            assert changed, f"{n} did not train"
        else:
            assert not changed, f"frozen parameter {n} changed"
    n_gate = sum(p.numel() for n, p in model.named_parameters() if n.startswith("imsm_gate."))
    assert n_gate == {"query_aware": 5, "token": 3, "equal": 0, "none": 0}[gate] * 32 * 8


def test_default_target_modules_and_override():
    _, model = _imsm(peft="ia3")
    cfg = model.peft_model.peft_config["default"]
    assert set(cfg.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(cfg.feedforward_modules) == {"down_proj"}
    _, model = _imsm(peft="lora")
    assert set(model.peft_model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    _, model = _imsm(peft="lora", target_modules=["o_proj"])
    assert set(model.peft_model.peft_config["default"].target_modules) == {"o_proj"}


def test_unknown_model_type_asks_for_target_modules():
    from imsm.method.adapters import get_method

    with pytest.raises(ValueError, match="pass --target_modules"):
        get_method("lora").adapter_config(ImsmArguments.create().options, None, "gpt_neox", None)


def test_activation_checkpointing_keeps_the_gradients():
    _, model = _imsm()
    model.train()
    _perturb_adapter(model)
    b = _batch()
    model(**b)["loss"].backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**b)["loss"].backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[n], msg=n)


@pytest.mark.parametrize("peft", ALL)
def test_a_target_module_that_matches_nothing_is_named(peft):
    """PEFT adapts the names that match and silently skips the rest; every listed name must match a module."""
    with pytest.raises(ValueError, match=r"--target_modules \['foo_proj'\] match no .*available: .*q_proj") as e:
        _imsm(peft=peft, target_modules=["down_proj", "foo_proj"])
    assert "'down_proj'" not in str(e.value).split("available")[0]


def test_a_target_module_may_name_a_path_suffix():
    _, model = _imsm(peft="lora", target_modules=["self_attn.q_proj"])
    assert any("q_proj.lora_A" in n for n, _ in model.named_parameters())
