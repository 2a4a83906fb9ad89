"""LoRAMoE: the layer and the localized balancing constraint against a restatement of the authors' published forward
(Ablustrund/LoRAMoE, peft/tuners/lora.py ``Linear.forward``), dropout per expert, the constraint under activation
checkpointing, what trains, the frozen memory, KV-cache decoding, a train -> save -> reload -> evaluate.py run, a run
with a knowledge file, bad options, and real DeepSpeed launches."""

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
from imsm.evaluation.decoding.generation import (
    DecodingConfig,
    SingleBranch,
    TwoCacheBranches,
    build_decoder,
    generate,
    reference_generate,
)
from imsm.loader import build_imsm_model, load_backbone, load_run
from imsm.method.loramoe import LoRAMoEConfig, LoRAMoELinear, balancing_loss
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


def published_forward(x, w0, bias, router, experts_a, experts_b, scaling, task_types, blc_alpha, blc_weight,
                      real=None):
    """The LoRAMoE authors' layer forward, restated: x (N, T, d_in); experts_a / experts_b the E matrices A_i (r, d_in)
    and B_i (d_out, r); returns (output, balancing term). ``real`` (N, T) leaves padding out of the router-weight sum
    (our one change; None sums every position, as the published code does)."""
    result = x @ w0.T + bias
    route_weight = torch.softmax(x @ router.T, dim=-1, dtype=torch.float32)
    for i, (a, b) in enumerate(zip(experts_a, experts_b, strict=True)):
        result = result + route_weight[:, :, i].unsqueeze(-1) * (x @ a.T @ b.T) * scaling
    if real is not None:
        route_weight = route_weight * real[..., None]
    half = len(experts_a) // 2
    types = task_types.view(-1, 1)
    is_first = torch.cat(((types == 1).repeat(1, half), (types == 0).repeat(1, half)), dim=-1)
    z = (route_weight.sum(dim=1) * torch.where(is_first, 1.0 + blc_alpha, 1.0 - blc_alpha)).flatten()
    cv_squared = z.var() / (z.mean() ** 2 + 1e-10)
    return result, cv_squared * blc_weight


def _experts(layer, r):
    a, b = layer.loramoe_A.weight, layer.loramoe_B.weight
    return [a[i * r:(i + 1) * r] for i in range(layer.num_experts)], [b[:, i * r:(i + 1) * r]
                                                                      for i in range(layer.num_experts)]


def test_layer_and_constraint_match_the_published_forward_on_mixed_types():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    config = LoRAMoEConfig(target_modules=["x"], num_experts=4, r=2, alpha=6.0, dropout=0.0, balance_weight=0.3,
                           balance_delta=0.2)
    layer = LoRAMoELinear(base, config).train()
    with torch.no_grad():
        for p in (layer.loramoe_A.weight, layer.loramoe_B.weight, layer.loramoe_router.weight):
            p.copy_(torch.randn(p.shape))
    x = torch.randn(5, 7, 12)
    types = torch.tensor([1, 0, 0, 1, 1])  # both types, several samples
    experts_a, experts_b = _experts(layer, 2)
    want, want_loss = published_forward(x, base.weight, base.bias, layer.loramoe_router.weight, experts_a, experts_b,
                                        3.0, types, 0.2, 0.3)
    torch.testing.assert_close(layer(x), want)
    full = torch.ones(5, 7)
    torch.testing.assert_close(balancing_loss([layer.router_weights], full, types, config), want_loss)
    # padding: the router weights of padded positions are left out of Q
    real = full.clone()
    real[1, 4:], real[3, 2:] = 0, 0
    _, want_padded = published_forward(x, base.weight, base.bias, layer.loramoe_router.weight, experts_a, experts_b,
                                       3.0, types, 0.2, 0.3, real=real)
    got_padded = balancing_loss([layer.router_weights], real, types, config)
    torch.testing.assert_close(got_padded, want_padded)
    assert not torch.allclose(got_padded, want_loss)  # the padded positions did count in the unmasked sum
    # one row of Q per sample: the per-micro-batch sum (one entry per expert) gives another value
    assert not torch.allclose(want_loss, 0.3 * _cv_squared(layer.router_weights.sum(dim=(0, 1))))
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x))


def _cv_squared(z):
    return z.var() / (z.mean() ** 2 + 1e-10)


def test_the_constraint_favours_the_group_of_each_samples_type():
    """A sample's router weight counts 1 + δ on the group of its type (knowledge experts first)."""
    config = LoRAMoEConfig(target_modules=["x"], num_experts=5, knowledge_experts=2, balance_delta=0.25)
    got = config.coefficients(torch.tensor([0, 1]))
    torch.testing.assert_close(got, torch.tensor([[0.75, 0.75, 1.25, 1.25, 1.25], [1.25, 1.25, 0.75, 0.75, 0.75]]))
    # every sample of type 0: the constraint is balanced when the knowledge group carries (1 + δ)/(1 − δ) times the
    # task group's weight per expert, so it pushes routing toward the first (knowledge) group
    q = torch.tensor([[1.25 / 0.75, 1.25 / 0.75, 1.0, 1.0, 1.0]])
    weights = q[:, None, :].expand(1, 3, 5) / 3
    on = LoRAMoEConfig(target_modules=["x"], num_experts=5, knowledge_experts=2, balance_weight=1.0,
                       balance_delta=0.25)
    assert float(balancing_loss([weights], torch.ones(1, 3), torch.tensor([0]), on)) < 1e-10
    assert float(balancing_loss([weights], torch.ones(1, 3), torch.tensor([1]), on)) > 0.1


def test_dropout_draws_one_mask_per_expert():
    torch.manual_seed(0)
    base = torch.nn.Linear(1, 3)
    config = LoRAMoEConfig(target_modules=["x"], num_experts=4, r=1, dropout=0.5)
    layer = LoRAMoELinear(base, config)
    with torch.no_grad():
        layer.loramoe_A.weight.fill_(2.0)  # identical experts: only their dropout masks can tell them apart
    x = torch.rand(1, 400, 1) + 0.5
    inputs = layer.train().expert_inputs(x)[..., 0]  # (1, 400, E): A_i dropout_i(x)
    kept = inputs != 0
    torch.testing.assert_close(inputs[kept], (2.0 * x / 0.5).expand_as(inputs)[kept])  # a kept input is scaled
    assert 0.4 < kept.float().mean() < 0.6
    for i in range(1, 4):
        assert not torch.equal(kept[..., 0], kept[..., i])  # each expert its own mask
    torch.testing.assert_close(layer.eval().expert_inputs(x)[..., 0], (2.0 * x).expand(1, 400, 4))


def test_fresh_experts_leave_the_model_unchanged():
    reference = make_llama(VOCAB, hidden=32, seed=0).eval()
    _, model = _imsm()
    b = _batch()
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    torch.testing.assert_close(model.eval()(**kw, query_mask=b["query_mask"])["logits"], reference(**kw).logits)


def _capture_layer_inputs(model):
    inputs = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRAMoELinear):
            m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, (mod, args[0])))
    return inputs


def test_training_loss_adds_the_published_constraint_for_a_padded_mixed_batch():
    _, model = _imsm(loramoe_num_experts=6, loramoe_balance_weight=0.3, loramoe_balance_delta=0.2)
    _randomize(model)
    inputs = _capture_layer_inputs(model)
    b = _batch()  # three samples, the second right-padded
    types = torch.tensor([1, 0, 1])
    out = model.train()(**b, task_types=types)
    assert len(inputs) == 2 * 3  # gate, up and down projections of both layers
    expected = torch.zeros(())
    for mod, x in inputs.values():
        a, bb = _experts(mod, mod.r)
        _, term = published_forward(x, mod.base_layer.weight, torch.zeros(()), mod.loramoe_router.weight, a, bb,
                                    mod.scaling, types, 0.2, 0.3, real=b["attention_mask"].float())
        expected = expected + term
    torch.testing.assert_close(out["balance_loss"], expected)
    # the training loss is the answer-token cross-entropy plus the constraint
    logits = model.eval()(**{k: v for k, v in b.items() if k != "labels"})["logits"][:, :-1]
    targets = b["labels"][:, 1:]
    ce = F.cross_entropy(logits[targets != -100], targets[targets != -100])
    torch.testing.assert_close(out["loss"], ce + expected)
    # without types every sample is a task sample
    all_task = model.train()(**b)["balance_loss"]
    zeros = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(all_task, model.train()(**b, task_types=zeros)["balance_loss"])
    assert not torch.allclose(all_task, expected)


def test_the_constraint_is_not_lost_under_activation_checkpointing():
    """Non-reentrant checkpointing gives the same term and the same router gradients; the reentrant variant, whose
    first forward has no graph, is refused rather than training nothing."""
    b, types = _batch(), torch.tensor([0, 1, 1])

    def term_and_grads(model):
        model.zero_grad()
        term = model(**b, task_types=types)["balance_loss"]
        term.backward()
        return term.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "loramoe_router" in n}

    _, model = _imsm(loramoe_balance_weight=0.5, loramoe_balance_delta=0.1)
    _randomize(model)
    model.train()
    plain_term, plain_grads = term_and_grads(model)
    model.activation_checkpointing_enable()
    assert model.peft_model.get_base_model().model.layers[0].gradient_checkpointing
    term, grads = term_and_grads(model)
    assert plain_term > 1e-4
    torch.testing.assert_close(term, plain_term)
    assert all(g.abs().sum() > 0 for g in grads.values())
    torch.testing.assert_close(grads, plain_grads)
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(RuntimeError, match="without gradients.*reentrant"):
        model(**b, task_types=types)


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
    ({"peft": "loramoe", "loramoe_knowledge_experts": 9}, "knowledge_experts must be in"),
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
    assert json.loads((final / "loramoe_config.json").read_text())["num_experts"] == 8  # run_loramoe.sh: lora_nums
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
                          "--loramoe_balance_weight", "0.1", "--loramoe_balance_delta", "0.1",
                          "--report_to", "none", "--max_steps", "2", "--save_strategy", "no", "--seed", "3",
                          "--logging_steps", "1", "--disable_tqdm", "true"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert all(h["balance_loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    reloaded, tokenizer, settings = load_run(out / "final")
    assert settings.gate == "query_aware" and settings.peft == "loramoe"
    torch.testing.assert_close(_probe(reloaded, tokenizer), _probe(trainer.model, tokenizer))
    assert load_file(str(out / "final" / "gate.safetensors"))["w_b.weight"].abs().sum() > 0


def test_a_knowledge_file_trains_with_its_types_and_is_recorded(tiny_model_dir, tiny_train_file, tmp_path,
                                                                 monkeypatch):
    from imsm.method.model import IMSMModel

    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text("".join(json.dumps({"input": f"Question: Is {c} big ? Output:", "output": "yes"}) + "\n"
                                 for c in ("cat", "dog", "red", "blue") * 5))
    seen = []
    forward = IMSMModel.forward

    def recording_forward(self, *args, task_types=None, **kwargs):
        if self.training:
            seen.append(task_types.clone())
        return forward(self, *args, task_types=task_types, **kwargs)

    monkeypatch.setattr(IMSMModel, "forward", recording_forward)
    out = tmp_path / "run"
    trainer = train.main(["--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_train_file),
                          "--knowledge_file", str(knowledge), "--knowledge_share", "0.2", "--output_dir", str(out),
                          "--peft", "loramoe", "--gate", "none", "--loramoe_balance_weight", "0.1",
                          "--loramoe_balance_delta", "0.1", "--per_device_train_batch_size", "8",
                          "--learning_rate", "1e-2", "--report_to", "none", "--max_steps", "5",
                          "--save_strategy", "no", "--seed", "3", "--logging_steps", "1", "--disable_tqdm", "true"])
    # 32 task rows; a share of 0.2 takes round(0.2 * 32 / 0.8) = 8 knowledge rows: 40 examples, one pass in 5 steps
    types = torch.cat(seen)
    assert len(seen) == 5 and (types == 1).sum() == 8 and (types == 0).sum() == 32
    assert all(h["balance_loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    run_args = json.loads((out / "final" / "run_args.json").read_text())
    assert (run_args["knowledge_file"], run_args["knowledge_share"]) == (str(knowledge), 0.2)
    mix = run_args["training_mix"]
    assert mix["knowledge_rows_taken"] == 8 and mix["knowledge_file"] == str(knowledge)
    assert mix["trained_examples_by_type"] == {"task": 32, "world_knowledge": 8}
    reloaded, tokenizer, _ = load_run(out / "final")
    torch.testing.assert_close(_probe(reloaded, tokenizer), _probe(trainer.model, tokenizer))
