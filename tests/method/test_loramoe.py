"""LoRAMoE: the layer and the localized balancing constraint against a hand computation, what trains, the frozen
memory, KV-cache decoding, a train -> save -> reload -> evaluate.py run, bad options, and real DeepSpeed launches."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import imsm_args, make_llama, make_tokenizer
from safetensors.torch import load_file

import evaluate
import train
from imsm.args import ImsmArguments
from imsm.data import SupervisedDataset
from imsm.evaluation.generation import (
    DecodingConfig,
    SingleBranch,
    TwoCacheBranches,
    build_decoder,
    generate,
    reference_generate,
)
from imsm.loader import build_imsm_model, load_backbone, load_run
from imsm.method.loramoe import LoRAMoEConfig, LoRAMoELinear
from imsm.run_folder import read_train_stats
from imsm.templates import build_template

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 64


def _imsm(gate="none", seed=0, **kw):
    backbone = make_llama(VOCAB, hidden=32, seed=seed)
    args = imsm_args(peft="loramoe", gate=gate, gate_dropout=0.0, loramoe_dropout=0.0, **kw)
    return backbone, build_imsm_model(backbone, args)


def _randomize(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (3, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # right padding
    query = torch.zeros_like(ids)
    query[0, :5], query[1, :3], query[2, :6] = 1, 1, 1
    labels = torch.where(query.bool() | ~attention.bool(), torch.full_like(ids, -100), ids)
    return {"input_ids": ids, "attention_mask": attention, "query_mask": query, "labels": labels}


def test_layer_is_base_plus_router_weighted_experts():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    config = LoRAMoEConfig(target_modules=["x"], num_experts=3, r=2, alpha=6.0, dropout=0.0)
    layer = LoRAMoELinear(base, config)
    with torch.no_grad():
        for p in (layer.loramoe_A.weight, layer.loramoe_B.weight, layer.loramoe_router.weight):
            p.copy_(torch.randn(p.shape))
    x = torch.randn(2, 5, 12)
    # y = W0 x + b + (alpha / r) * sum_i softmax(W_g x)_i * B_i A_i x, expert by expert
    w = torch.softmax(x @ layer.loramoe_router.weight.T, dim=-1)
    expected = x @ base.weight.T + base.bias
    for i in range(3):
        a_i = layer.loramoe_A.weight[2 * i: 2 * i + 2]  # r x d_in
        b_i = layer.loramoe_B.weight[:, 2 * i: 2 * i + 2]  # d_out x r
        expected = expected + 3.0 * w[..., i: i + 1] * (x @ a_i.T @ b_i.T)
    torch.testing.assert_close(layer(x), expected)
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x))


def test_fresh_experts_leave_the_model_unchanged():
    reference = make_llama(VOCAB, hidden=32, seed=0).eval()
    _, model = _imsm()
    b = _batch()
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    torch.testing.assert_close(model.eval()(**kw, query_mask=b["query_mask"])["logits"], reference(**kw).logits)


def test_balancing_loss_is_the_papers_formula_by_hand():
    _, model = _imsm(loramoe_num_experts=5, loramoe_knowledge_experts=2, loramoe_balance_weight=0.3,
                     loramoe_balance_delta=0.2)
    _randomize(model)
    inputs = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRAMoELinear):
            m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, (mod, args[0])))
    b = _batch()
    model.train()
    out = model(**b)
    assert len(inputs) == 2 * 3  # gate, up and down projections of both layers
    mask = b["attention_mask"].float()
    coef = torch.tensor([0.8, 0.8, 1.2, 1.2, 1.2])  # knowledge group 1 - delta, task group 1 + delta
    expected = torch.zeros(())
    for mod, x in inputs.values():
        w = torch.softmax(x @ mod.loramoe_router.weight.T, dim=-1)  # (B, T, E)
        q = (w * mask[..., None]).sum(dim=(0, 1))  # importance per expert over the non-padding tokens
        z = coef * q
        var = ((z - z.mean()) ** 2).sum() / (len(z) - 1)
        expected = expected + var / z.mean() ** 2
    expected = 0.3 * expected
    torch.testing.assert_close(out["balance_loss"], expected)
    # the training loss is the answer-token cross-entropy plus the constraint
    logits = model.eval()(**{k: v for k, v in b.items() if k != "labels"})["logits"][:, :-1]
    targets = b["labels"][:, 1:]
    ce = F.cross_entropy(logits[targets != -100], targets[targets != -100])
    torch.testing.assert_close(out["loss"], ce + expected)


@pytest.mark.parametrize("gate", ["none", "query_aware"])
def test_only_experts_routers_and_gate_train(gate):
    _, model = _imsm(gate=gate)
    _randomize(model, scale=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if "loramoe_" in n or n.startswith("imsm_gate.")}
    assert any("loramoe_router" in n for n in trainable)
    assert (gate == "none") != any("imsm_gate" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for seed in range(2):
        opt.zero_grad()
        model(**_batch(seed))["loss"].backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_frozen_memory_under_the_imsm_gate_is_the_base_model():
    reference = make_llama(VOCAB, hidden=32, seed=0).eval()
    _, model = _imsm(gate="query_aware")
    _randomize(model)
    b = _batch()
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    frozen = model.eval().memory(False, **kw).last_hidden_state
    torch.testing.assert_close(frozen, reference(**kw, output_hidden_states=True).hidden_states[-1])
    tuned = model.memory(True, **kw).last_hidden_state
    assert not torch.allclose(frozen, tuned, atol=1e-3)


@pytest.mark.parametrize("gate,branches", [("none", SingleBranch), ("query_aware", TwoCacheBranches)])
def test_kv_cache_decoding_equals_the_no_cache_reference(gate, branches):
    tokenizer = make_tokenizer()
    backbone = make_llama(len(tokenizer), hidden=32, seed=0)
    model = build_imsm_model(backbone, imsm_args(peft="loramoe", gate=gate, gate_dropout=0.0))
    _randomize(model, scale=0.5)
    model.eval()
    assert isinstance(build_decoder(model).branches, branches)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, len(tokenizer), (n,), generator=g).tolist() for n in (2, 7, 4)]
    got = generate(model, tokenizer, prompts, DecodingConfig(max_new_tokens=6, batch_size=3, stop_at_eos=False))
    for prompt, gen in zip(prompts, got, strict=True):
        assert gen.token_ids == reference_generate(model, prompt, 6)


@pytest.mark.parametrize("kw,match", [
    ({"peft": "moe"}, "--peft 'moe'"),
    ({"peft": "loramoe", "loramoe_num_experts": 0}, "num_experts must be at least 1"),
    ({"peft": "loramoe", "loramoe_r": 0}, "loramoe_r must be at least 1"),
    ({"peft": "loramoe", "loramoe_knowledge_experts": 7}, "knowledge_experts must be in"),
    ({"peft": "loramoe", "loramoe_balance_delta": 1.0}, "balance_delta"),
    ({"peft": "loramoe", "loramoe_balance_weight": -1.0}, "balance_weight"),
])
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ImsmArguments.create(**kw)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match="match no linear layer"):
        _imsm(target_modules=["no_such_proj"])


def _probe(model, tokenizer):
    ids = tokenizer(["Question: Is 3 odd ? Output: yes", "Question: Is 4 odd ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                            query_mask=ids["attention_mask"])["logits"]


def test_train_save_reload_evaluate_and_cost(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "run"
    trainer = train.main(["--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_train_file),
                          "--output_dir", str(out), "--peft", "loramoe", "--gate", "none",
                          "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
                          "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--seed", "3",
                          "--disable_tqdm", "true"])
    final = out / "final"
    assert {"loramoe_config.json", "loramoe_model.safetensors", "gate.safetensors", "imsm_config.json",
            "train_stats.json"} <= {p.name for p in final.iterdir()}
    weights = load_file(str(final / "loramoe_model.safetensors"))
    assert weights and all("loramoe_" in k for k in weights)
    assert any("loramoe_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained, not the zero init
    assert json.loads((final / "loramoe_config.json").read_text())["num_experts"] == 6
    reloaded, tokenizer, settings = load_run(final)
    assert settings.peft == "loramoe"
    torch.testing.assert_close(_probe(reloaded, tokenizer), _probe(trainer.model, tokenizer))

    # cost: 8 steps of 4 rows are one pass over the 32 rows, so every row's tokens were seen once
    stats = read_train_stats(out)
    _, tok, _ = load_backbone(str(tiny_model_dir))
    dataset = SupervisedDataset(str(tiny_train_file), build_template("raw", tok), 1024, 512)
    assert stats["optimizer_steps"] == 8 and stats["train_runtime_s"] > 0
    assert stats["tokens_seen"] == sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
    assert stats["trainable_parameters"] == sum(v.numel() for v in weights.values())
    assert read_train_stats(out / "checkpoint-4")["optimizer_steps"] == 4

    data = tmp_path / "data" / "mrpc"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps({"input": f"Question: Is {i} odd ? Output:",
                                                         "output": "yes" if i % 2 else "no"}) + "\n"
                                             for i in range(5)))
    evaluate.main(["--run", str(out), "--data_dir", str(tmp_path / "data"), "--tasks", "mrpc", "--target", "mrpc",
                   "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "3", "--batch_size", "2"])
    preds = [json.loads(line) for line in (tmp_path / "eval" / "LoRAMoE" / "mrpc" / "predictions.jsonl").open()]
    expected = generate(reloaded, tokenizer, [tokenizer(r["input"])["input_ids"] for r in preds],
                        DecodingConfig(max_new_tokens=3, batch_size=2))
    assert [p["prediction"] for p in preds] == [g.text for g in expected]


@pytest.mark.launch
@pytest.mark.parametrize("nproc,config", [(1, "zero2.json"), (2, "zero3.json")])
def test_deepspeed_run_saves_real_gathered_experts(tiny_model_dir, tiny_train_file, tmp_path, nproc, config):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_deepspeed import _launch, _probe_logits

    out = tmp_path / "run"
    _launch(nproc, config, tiny_model_dir, tiny_train_file, out, "--peft", "loramoe", "--gate", "none")
    # the model DeepSpeed holds at the end, rebuilt from the engine's own fp32 checkpoint, not from our files
    backbone, tokenizer, _ = load_backbone(str(tiny_model_dir))
    engine_model = build_imsm_model(backbone, ImsmArguments.create(peft="loramoe", gate="none"))
    engine_model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4")), strict=True)
    reloaded, _, _ = load_run(out / "final")
    torch.testing.assert_close(_probe_logits(reloaded, tokenizer), _probe_logits(engine_model, tokenizer))
    weights = load_file(str(out / "final" / "loramoe_model.safetensors"))
    assert all(v.numel() > 0 for v in weights.values())  # whole tensors, not ZeRO-3 shards
    assert any("loramoe_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    assert read_train_stats(out)["optimizer_steps"] == 4 and read_train_stats(out)["world_size"] == nproc


def test_imsm_gate_with_loramoe_and_checkpointing_trains_and_reloads(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "run"
    trainer = train.main(["--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_train_file),
                          "--output_dir", str(out), "--peft", "loramoe", "--gate", "query_aware",
                          "--gradient_checkpointing", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
                          "--report_to", "none", "--max_steps", "2", "--save_strategy", "no", "--seed", "3",
                          "--logging_steps", "1", "--disable_tqdm", "true"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert all(h["balance_loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    reloaded, tokenizer, settings = load_run(out / "final")
    assert settings.gate == "query_aware" and settings.peft == "loramoe"
    torch.testing.assert_close(_probe(reloaded, tokenizer), _probe(trainer.model, tokenizer))
    assert load_file(str(out / "final" / "gate.safetensors"))["w_b.weight"].abs().sum() > 0
