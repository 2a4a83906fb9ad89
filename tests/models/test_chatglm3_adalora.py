"""The paper's AdaLoRA on ChatGLM3's fused query_key_value, rebuilt on the converted glm layout (one P, one Λ and one
ranknum shared by q_proj, k_proj and v_proj, Q split by rows), against hand computations on the fused matrices of
the ChatGLM3-layout replica (tests/models/chatglm3_replica.py): the forward, the rank allocation, the orthogonality
penalty, and a train.py run through save, reload and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chatglm3_replica import chatglm3_logits, make_checkpoint
from conftest import imsm_args
from safetensors.torch import load_file

import train
from imsm.loader import build_imsm_model, load_backbone, load_run
from imsm.method.adapters.adalora import ALLOCATOR_STATE, orth_regularizer

pytestmark = pytest.mark.usefixtures("single_thread")

R, TARGET_R, ALPHA = 6, 2, 8


@pytest.fixture(scope="module")
def chatglm3(tmp_path_factory):
    """(source folder, its ChatGLM3 tensors, its config), converted into a temporary $IMSM_CACHE."""
    folder = tmp_path_factory.mktemp("chatglm3")
    state = make_checkpoint(folder / "source")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMSM_CACHE", str(folder / "cache"))
        yield folder / "source", state, json.loads((folder / "source" / "config.json").read_text())


def _model(source, seed: int = 0, total_steps: int = 10):
    """IMSM-AdaLoRA on the converted replica (default targets: the fused query_key_value), every trainable tensor
    set to noise so that Λ, P and Q are all non-trivial."""
    backbone, _, _ = load_backbone(str(source), attn_implementation="sdpa")
    args = imsm_args(peft="adalora", gate="query_aware", gate_rank=4, gate_dropout=0.0, lora_dropout=0.0,
                     lora_alpha=ALPHA, adalora_init_r=R, adalora_target_r=TARGET_R, adalora_tinit=0,
                     adalora_tfinal=0, adalora_delta_t=1)
    model = build_imsm_model(backbone, args, total_steps=total_steps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _fused(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, Λ, Q) of one layer's fused query_key_value adapter, Q the three row blocks stacked as ChatGLM3 stacks
    q, k and v."""
    attn = layer.self_attn
    q = torch.cat([getattr(attn, proj).lora_B["default"] for proj in ("q_proj", "k_proj", "v_proj")])
    return attn.q_proj.lora_A["default"], attn.q_proj.lora_E["default"], q


def _batch(ids):
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "query_mask": torch.ones_like(ids)}


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 320, (2, n), generator=torch.Generator().manual_seed(seed))


def test_forward_is_adalora_on_the_fused_query_key_value(chatglm3):
    """x·(W_qkv + Q·diag(Λ)·P·alpha/(r + 1e-5))ᵀ + b with ChatGLM3's own fused weight, per layer and through the
    whole model; the count is one fused adapter's r·(d + 1 + rows) per layer."""
    source, state, config = chatglm3
    model = _model(source)
    layers = model.peft_model.base_model.model.model.layers
    attn = layers[0].self_attn
    for part in ("lora_A", "lora_E", "ranknum"):
        assert getattr(attn.q_proj, part)["default"] is getattr(attn.k_proj, part)["default"] \
            is getattr(attn.v_proj, part)["default"]
    assert attn.q_proj.lora_B["default"] is not attn.k_proj.lora_B["default"]
    d = config["hidden_size"]
    rows = (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * config["kv_channels"]
    assert sum(p.numel() for _, p in model.trainable_parameters()["adapter"]) == config["num_layers"] * R * (
        d + 1 + rows)

    delta = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            p, lam, q = _fused(layer)
            delta[i] = ALPHA / (R + 1e-5) * q @ torch.diag(lam.view(-1)) @ p
        x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(1))
        prefix = "transformer.encoder.layers.0.self_attention.query_key_value."
        expected = x @ (state[prefix + "weight"] + delta[0]).T + state[prefix + "bias"]
        got = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        ids = _ids(10, seed=2)
        logits = model.peft_model(input_ids=ids).logits
    assert (logits - chatglm3_logits(state, config, ids, delta)).abs().max() < 1e-4


def test_rank_allocation_scores_each_fused_triplet(chatglm3):
    """Two allocation steps against AdaLoRA's importance by hand on the fused P, Λ and stacked Q: sensitivity
    |w·g|, its EMA (β1) and the EMA (β2) of its deviation, triplet score s(Λ_i) + mean_j s(P_ij) + mean_j s(Q_ji),
    the budget of a model with one triplet set per layer, and the mask on the one shared Λ."""
    source, _, _ = chatglm3
    total = 10
    model = _model(source, seed=3, total_steps=total)
    tuner = model.peft_model.base_model
    config = tuner.peft_config["default"]
    layers = tuner.model.model.layers
    n = len(layers)
    assert (tuner.rankallocator.init_bgt, tuner.rankallocator.target_bgt) == (n * R, n * TARGET_R)
    ema = {}  # (layer, part) -> (EMA of sensitivity, EMA of uncertainty)
    for step, seed in ((1, 4), (2, 5)):
        model.zero_grad()
        ids = _ids(8, seed)
        model(**_batch(ids), labels=torch.where(torch.arange(8) >= 4, ids, -100))["loss"].backward()
        scores = []
        for i, layer in enumerate(layers):
            parts = []
            for part, tensor in zip("PEQ", _fused(layer)):  # P, Λ (E), Q: their weights and (summed) gradients
                grad = tensor.grad if part != "Q" else torch.cat(
                    [getattr(layer.self_attn, proj).lora_B["default"].grad for proj in ("q_proj", "k_proj", "v_proj")])
                ipt = (tensor.detach() * grad).abs()
                avg, unc = ema.get((i, part), (torch.zeros_like(ipt), torch.zeros_like(ipt)))
                avg = config.beta1 * avg + (1 - config.beta1) * ipt
                unc = config.beta2 * unc + (1 - config.beta2) * (ipt - avg).abs()
                ema[(i, part)] = (avg, unc)
                parts.append(avg * unc)
            s_p, s_e, s_q = parts
            scores.append(s_e.view(-1) + s_p.mean(dim=1) + s_q.mean(dim=0))
        budget = int((n * R - n * TARGET_R) * (1 - step / total) ** 3 + n * TARGET_R)
        threshold = torch.kthvalue(torch.cat(scores), n * R - budget).values
        tuner.update_and_allocate(step)

        got = tuner.rankallocator.triplet_scores()
        pattern = config.rank_pattern
        assert len(pattern) == n  # one entry per fused layer
        for i, layer in enumerate(layers):
            name = f"model.layers.{i}.self_attn.q_proj.lora_E.default"
            torch.testing.assert_close(got[name].view(-1), scores[i], rtol=1e-5, atol=0)
            keep = scores[i] > threshold
            assert pattern[name] == keep.tolist()
            lam = layer.self_attn.v_proj.lora_E["default"].view(-1)  # the shared Λ, masked once for q, k, v
            assert (lam[~keep] == 0).all() and (lam[keep] != 0).all()
        assert sum(sum(v) for v in pattern.values()) == budget


def test_penalty_is_on_the_fused_p_and_stacked_q(chatglm3):
    """orth_reg_weight · mean over layers of ||P·Pᵀ - I||_F and ||Qᵀ·Q - I||_F, Q over all 4608-equivalent rows."""
    source, _, _ = chatglm3
    model = _model(source, seed=6)
    terms = []
    for layer in model.peft_model.base_model.model.model.layers:
        p, _, q = _fused(layer)
        terms += [torch.linalg.matrix_norm(p @ p.T - torch.eye(R)), torch.linalg.matrix_norm(q.T @ q - torch.eye(R))]
    expected = model.peft_model.peft_config["default"].orth_reg_weight * sum(terms) / len(terms)
    torch.testing.assert_close(orth_regularizer(model.peft_model), expected)
    ids = _ids(6, seed=7)
    extra = model.method.extra_loss(model.peft_model, torch.ones_like(ids), True)
    torch.testing.assert_close(extra.value, expected)


def test_allocator_is_pefts_on_unshared_adapters():
    """On adapters that share nothing (a Llama's q_proj and v_proj) the fused allocator masks exactly as PEFT's."""
    from conftest import make_llama

    from imsm.method.adapters.adalora import FusedRankAllocator

    model = build_imsm_model(make_llama(64), imsm_args(peft="adalora", gate="none", lora_dropout=0.0,
                                                       adalora_init_r=R, adalora_target_r=TARGET_R), total_steps=10)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(4, 60, (2, 8), generator=g)
    model(**_batch(ids), labels=ids)["loss"].backward()
    tuner = model.peft_model.base_model
    peft, ours = tuner.rankallocator, FusedRankAllocator(tuner.model, tuner.peft_config["default"], "default")
    assert (ours.init_bgt, ours.target_bgt) == (peft.init_bgt, peft.target_bgt)
    for allocator in (peft, ours):
        allocator.update_ipt(tuner.model)
    budget = peft.init_bgt - 5
    # the mask depends on the scores only, so PEFT masking first does not change ours
    assert peft.mask_to_budget(tuner.model, budget) == ours.mask_to_budget(tuner.model, budget)


def test_resume_needs_the_uncut_adapter(chatglm3, tmp_path):
    """A folder whose adapter is cut to its allocated ranks but lacks the allocator file is refused for resume,
    naming the files."""
    from imsm.args import DataArguments
    from imsm.loader import load_trained_weights, make_run_config, save_run_files

    source, _, _ = chatglm3
    model = _model(source, seed=10)
    ids = _ids(8, seed=11)
    model(**_batch(ids), labels=ids)["loss"].backward()
    model.peft_model.base_model.update_and_allocate(1)
    args = imsm_args(peft="adalora", gate="query_aware", gate_rank=4, adalora_init_r=R, adalora_target_r=TARGET_R)
    save_run_files(model, tmp_path / "run", make_run_config(args, DataArguments(), str(source), 64), None, True)
    (tmp_path / "run" / ALLOCATOR_STATE).unlink()
    with pytest.raises(ValueError, match=f"{ALLOCATOR_STATE} lacks the uncut"):
        load_trained_weights(_model(source), tmp_path / "run")


def _args(model_dir, train_file, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
            "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--seed", "7",
            "--disable_tqdm", "true", "--gate_rank", "4", "--peft", "adalora", "--adalora_init_r", "4",
            "--adalora_target_r", "2", "--adalora_tinit", "0", "--adalora_tfinal", "0", *extra]


def _files(run_dir) -> dict[str, torch.Tensor]:
    return {f"{name}:{key}": value for name in ("adapter_model.safetensors", "gate.safetensors", ALLOCATOR_STATE)
            for key, value in load_file(str(run_dir / name)).items()}


def test_train_save_reload_and_resume(chatglm3, tiny_train_file, tmp_path):
    """train.py 3 steps (ranks masked after the second and third): the saved adapter is PEFT's, cut to the allocated
    ranks with k's and v's P and Λ as copies of q's; it reloads to the trained model's logits; a run resumed from
    checkpoint-2 (ranks already masked) ends where the uninterrupted run ends."""
    source, _, _ = chatglm3
    trainer = train.main(_args(source, tiny_train_file, tmp_path / "full"))
    final = tmp_path / "full" / "final"
    pattern = json.loads((final / "adapter_config.json").read_text())["rank_pattern"]
    saved = load_file(str(final / "adapter_model.safetensors"))
    for i in range(2):
        layer = f"model.layers.{i}.self_attn."
        masks = [pattern[f"{layer}{proj}.lora_E"] for proj in ("q_proj", "k_proj", "v_proj")]
        assert masks[0] == masks[1] == masks[2] and len(masks[0]) == 4
        for part in ("lora_A", "lora_E"):
            q_part = saved[f"base_model.model.{layer}q_proj.{part}"]
            assert q_part.shape[0] == sum(masks[0])
            for proj in ("k_proj", "v_proj"):
                assert torch.equal(saved[f"base_model.model.{layer}{proj}.{part}"], q_part)
    assert sum(sum(m) for m in pattern.values()) < 3 * 2 * 4  # ranks were masked

    ids = _ids(9, seed=8)
    model = trainer.model.eval()
    reloaded, _, _ = load_run(final, attn_implementation="sdpa")
    attn = reloaded.peft_model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.ranknum["default"].item() == 4  # the scale alpha/ranknum of the initial rank, as trained
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_batch(ids))["logits"], model(**_batch(ids))["logits"])

    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")
    assert json.loads((tmp_path / "part" / "checkpoint-2" / "adapter_config.json").read_text())["rank_pattern"]
    train.main(_args(source, tiny_train_file, tmp_path / "part", "--resume_from_checkpoint", "latest"))
    trained, resumed = _files(final), _files(tmp_path / "part" / "final")
    assert resumed.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], msg=key)


@pytest.mark.launch
def test_deepspeed_zero2_resume_restores_the_allocation(chatglm3, tiny_train_file, tmp_path):
    """A real ``deepspeed`` launch (ZeRO-2, one CPU process): the engine restores the weights on resume, the
    allocator its rank pattern and importance averages from the checkpoint, and the run ends where the uninterrupted
    one does."""
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    source, _, _ = chatglm3
    root = Path(__file__).resolve().parents[2]

    def launch(out, *extra):
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port",
               str(random.randint(20000, 40000)), str(root / "train.py"), "--deepspeed",
               str(root / "ds_configs" / "zero2.json"), *_args(source, tiny_train_file, out, *extra)]
        env = {**os.environ, "PYTHONPATH": str(root)}
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    launch(tmp_path / "full")
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")
    launch(tmp_path / "part", "--resume_from_checkpoint", "latest")
    trained, resumed = _files(tmp_path / "full" / "final"), _files(tmp_path / "part" / "final")
    assert resumed.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], msg=key)
