"""The forgetting-reducing training options, each against an independent statement of it: the KL anchor against a
direct softmax computation on the backbone's own logits (adapter off / on), cached == uncached (also under
``--gate none``), EAFT's weights against its formula by hand, replay's mix counted in the batches a LoRA run is fed,
MiCA's fixed B (the minor singular vectors of W), OSF's and MiCA's save → reload round trip, the MLP preset's
targets."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import imsm_args, make_llama, make_tokenizer

import train
from imsm.args import ImsmArguments
from imsm.data import WORLD_KNOWLEDGE, SupervisedCollator, SupervisedDataset
from imsm.loader import build_imsm_model, load_backbone, load_run
from imsm.method.eaft import eaft_weights
from imsm.method.kl_anchor import kl_to_frozen
from imsm.templates import build_template
from imsm.training.frozen_cache import FrozenMemoryCache, cache_fingerprint

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[2, 7:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :4] = -100
    labels[attention == 0] = -100
    query = torch.zeros_like(ids, dtype=torch.bool)
    query[:, :4] = True
    return {"input_ids": ids, "attention_mask": attention, "query_mask": query, "labels": labels}


def _randomize_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "imsm_gate" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_kl_term_equals_a_direct_softmax_computation():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    by_hand = [sum(p[i, v] * math.log(p[i, v] / q[i, v]) for v in range(11)) for i in range(5)]
    torch.testing.assert_close(kl_to_frozen(p_logits, q_logits).double(), torch.tensor(by_hand, dtype=torch.double),
                               rtol=0, atol=1e-6)
    assert torch.all(kl_to_frozen(p_logits, p_logits).abs() < 1e-6)  # zero only for the same distribution


@pytest.mark.parametrize("gate", ["none", "query_aware"])
def test_anchored_loss_is_ce_plus_beta_kl_to_the_backbone_with_its_adapter_off(gate):
    tok = make_tokenizer()
    model = build_imsm_model(make_llama(len(tok)), imsm_args(gate=gate, lora_r=4, gate_rank=4, gate_dropout=0.0,
                                                             lora_dropout=0.0, kl_anchor=0.3)).train()
    _randomize_adapter(model)
    batch = _batch(len(tok))
    loss = model(**batch)["loss"]
    plain = build_imsm_model(make_llama(len(tok)), imsm_args(gate=gate, lora_r=4, gate_rank=4, gate_dropout=0.0,
                                                             lora_dropout=0.0)).train()
    plain.load_state_dict(model.state_dict())
    ce = plain(**batch)["loss"]  # the same model without the anchor: its cross-entropy
    selected = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        with model.peft_model.disable_adapter():
            frozen = model.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if gate == "none":  # the tuned distribution is the backbone's own with its adapter on
            tuned = model.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            tuned = tuned[:, :-1][selected]
        else:  # under IMSM it is the mixed model's output
            tuned = model(**{k: v for k, v in batch.items() if k != "labels"})["logits"][:, :-1][selected]
    p, q = frozen[:, :-1][selected].double().softmax(-1), tuned.double().softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss.double(), ce.double() + 0.3 * kl, rtol=0, atol=1e-5)
    assert kl > 1e-3  # a random adapter moved the distribution: the term is not vacuous


def _fingerprint(model_dir, data_file):
    from transformers import AutoConfig

    return cache_fingerprint(str(model_dir), AutoConfig.from_pretrained(model_dir), torch.float32, "raw", None,
                             1024, 512, data_file)


def test_vanilla_anchor_reads_the_cache_and_gives_the_uncached_loss(tiny_model_dir, tiny_train_file, tmp_path):
    backbone, tokenizer, _ = load_backbone(str(tiny_model_dir), attn_implementation="sdpa")
    model = build_imsm_model(backbone, imsm_args(gate="none", lora_r=4, kl_anchor=0.5)).train()
    _randomize_adapter(model)
    dataset = SupervisedDataset(tiny_train_file, build_template("raw", tokenizer), 1024, 512)
    batch = SupervisedCollator(tokenizer.pad_token_id)([dataset[i] for i in (3, 0, 21, 30)])
    model.frozen_cache = FrozenMemoryCache(tmp_path / "cache", _fingerprint(tiny_model_dir, tiny_train_file))
    passes = []
    real_memory = model.memory
    model.memory = lambda adapter, **kw: (passes.append(adapter), real_memory(adapter, **kw))[1]
    losses, grads = [], []
    for _ in range(2):
        torch.manual_seed(0)
        loss = model(**batch)["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
        model.frozen_cache.flush()
    assert passes == [True, False, True]  # vanilla LoRA ran the frozen pass for the anchor, then read the cache
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def _train_args(model_dir, train_file, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
            "--logging_steps", "4", "--save_strategy", "no", "--seed", "7", "--disable_tqdm", "true",
            *extra]


def test_two_anchored_vanilla_epochs_with_the_cache_equal_two_without(tiny_model_dir, tiny_train_file, tmp_path):
    from safetensors.torch import load_file

    common = ("--gate", "none", "--kl_anchor", "0.2", "--num_train_epochs", "2")
    train.main(_train_args(tiny_model_dir, tiny_train_file, tmp_path / "plain", *common))
    trainer = train.main(_train_args(tiny_model_dir, tiny_train_file, tmp_path / "cached", *common,
                                     "--frozen_memory_cache", "on"))
    assert (trainer.model.frozen_cache.hits, trainer.model.frozen_cache.misses) == (8, 8)  # epoch 2 read every batch
    logged = [entry["kl_anchor"] for entry in trainer.state.log_history if "kl_anchor" in entry]
    assert logged and all(v >= 0 for v in logged) and max(logged) > 0
    plain = load_file(str(tmp_path / "plain" / "final" / "adapter_model.safetensors"))
    cached = load_file(str(tmp_path / "cached" / "final" / "adapter_model.safetensors"))
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=0, atol=1e-6, msg=k)
    recorded = json.loads((tmp_path / "cached" / "final" / "run_args.json").read_text())
    assert recorded["kl_anchor"] == 0.2


def test_the_cache_under_gate_none_needs_the_anchor():
    with pytest.raises(ValueError, match="--frozen_memory_cache only applies to --gate .* or with --kl_anchor"):
        ImsmArguments.create(gate="none", frozen_memory_cache="on")
    assert ImsmArguments.create(gate="none", frozen_memory_cache="on", kl_anchor=0.1).kl_anchor == 0.1
    with pytest.raises(ValueError, match="--kl_anchor -1: β must be >= 0"):
        ImsmArguments.create(kl_anchor=-1.0)
    with pytest.raises(ValueError, match="only apply with --eaft"):
        ImsmArguments.create(eaft_alpha=2.0)


def test_eaft_weights_follow_the_formula_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 3.0],    # top-2: 3.0, 2.0
                           [1.0, 1.0, 1.0, 1.0, 1.0],     # uniform: weight 1
                           [50.0, 0.0, 0.0, -1.0, 0.0]])  # all mass on one: weight ~0
    a, b = math.exp(3.0), math.exp(2.0)
    pi = (a / (a + b), b / (a + b))
    h = -(pi[0] * math.log(pi[0]) + pi[1] * math.log(pi[1]))
    expected = torch.tensor([(h / math.log(2)) ** 1.5, 1.0, 0.0])
    torch.testing.assert_close(eaft_weights(logits, alpha=1.5, k=2), expected, rtol=0, atol=1e-6)
    # k = 5 on the uniform row: H = ln 5, weight 1; k larger than the vocabulary is the whole vocabulary
    torch.testing.assert_close(eaft_weights(logits[1:2], k=50), torch.ones(1), rtol=0, atol=1e-6)


def test_eaft_loss_is_the_entropy_weighted_cross_entropy():
    tok = make_tokenizer()
    model = build_imsm_model(make_llama(len(tok)), imsm_args(gate="none", lora_r=4, lora_dropout=0.0, eaft=True,
                                                             eaft_alpha=2.0, eaft_topk=5)).train()
    _randomize_adapter(model)
    batch = _batch(len(tok), seed=3)
    loss = model(**batch)["loss"]
    selected = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        logits = model.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1][selected].double()
    top = logits.topk(5, dim=-1).values.softmax(-1)
    w = (-(top * top.log()).sum(-1) / math.log(5)) ** 2.0
    ce = F.cross_entropy(logits, batch["labels"][:, 1:][selected], reduction="none")
    torch.testing.assert_close(loss.double(), (w * ce).mean(), rtol=0, atol=1e-5)
    assert not torch.allclose(w, torch.ones_like(w))  # the weights are not all one: the test can fail


def test_replay_mixes_knowledge_rows_into_a_lora_run(tiny_model_dir, tiny_train_file, tmp_path):
    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text("".join(json.dumps({"input": f"Is {i} big ? Output:", "output": "yes"}) + "\n"
                                 for i in range(12)))
    out = tmp_path / "replay"
    trainer = train.main(_train_args(tiny_model_dir, tiny_train_file, out, "--gate", "none", "--max_steps", "10",
                                     "--knowledge_file", str(knowledge), "--knowledge_examples", "8"))
    # one epoch of the shuffled loader holds the 32 task rows and the first 8 knowledge rows, each once
    seen = torch.cat([b["task_types"] for b in trainer.get_train_dataloader()])
    assert int((seen == WORLD_KNOWLEDGE).sum()) == 8 and len(seen) == 40
    mix = json.loads((out / "final" / "run_args.json").read_text())["training_mix"]
    assert mix["trained_examples_by_type"] == {"task": 32, "world_knowledge": 8}


def test_mlp_preset_adapts_the_feed_forward_projections_only():
    tok = make_tokenizer()
    model = build_imsm_model(make_llama(len(tok)), imsm_args(target_modules=["mlp"], lora_r=4))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"gate_proj", "up_proj", "down_proj"}


def test_mica_trains_a_only_from_the_minor_singular_vectors_and_reloads(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "mica"
    trainer = train.main(_train_args(tiny_model_dir, tiny_train_file, out, "--init_lora_weights", "mica",
                                     "--lora_r", "4", "--max_steps", "4"))
    backbone, tokenizer, _ = load_backbone(str(tiny_model_dir))
    q_proj = backbone.model.layers[0].self_attn.q_proj.weight.detach()
    u = torch.linalg.svd(q_proj.double(), full_matrices=False).U[:, -4:]
    layer = trainer.model.peft_model.base_model.model.model.layers[0].self_attn.q_proj
    b, a = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach()
    torch.testing.assert_close(b @ b.T, u @ u.T, rtol=0, atol=1e-5)  # B spans W's minor subspace, still after training
    assert a.abs().sum() > 0  # A started at zero and trained
    reloaded, tokenizer, config = load_run(out / "final")
    assert config.method_options["init_lora_weights"] == "mica"
    ids = tokenizer(["Question: Is 3 odd ? Output: yes"], return_tensors="pt")
    kwargs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
              "query_mask": ids["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**kwargs)["logits"], trainer.model.eval()(**kwargs)["logits"])


def test_osf_trains_its_low_subspace_keeps_the_base_and_reloads(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "osf"
    trainer = train.main(_train_args(tiny_model_dir, tiny_train_file, out, "--peft", "osf", "--max_steps", "4"))
    model = trainer.model.eval()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("osf_svd_params" in n or n.startswith("imsm_gate.") for n in trained)
    backbone, tokenizer, _ = load_backbone(str(tiny_model_dir))
    ids = tokenizer(["Question: Is 3 odd ? Output: yes"], return_tensors="pt")
    kwargs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
              "query_mask": ids["attention_mask"]}
    with torch.no_grad(), model.peft_model.disable_adapter():  # adapter off is the pretrained model
        torch.testing.assert_close(model.peft_model(input_ids=ids["input_ids"]).logits,
                                   backbone(input_ids=ids["input_ids"]).logits)
    reloaded, _, config = load_run(out / "final")
    assert config.peft == "osf"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**kwargs)["logits"], model(**kwargs)["logits"])
        assert not torch.allclose(model(**kwargs)["logits"], backbone(input_ids=ids["input_ids"]).logits)
