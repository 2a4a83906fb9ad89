"""bfloat16, the GPU precision path, on CPU: a few training steps and a decode on the tiny model.

On a GPU the backbone is loaded in bfloat16 (``--bf16``) and DeepSpeed's bf16 casts every module parameter, the gate's
included; the gate must still compute in float32 and its weights and gradients must stay float32 where they are not
cast, the loss must stay finite and training must move the adapter, and evaluate's decoder must run.
"""

import math

import pytest
import torch
from conftest import make_llama, make_tokenizer
from method.cases import ALL, build
from safetensors.torch import load_file

import train
from imsm.data import SupervisedCollator, SupervisedDataset
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.loader import load_run
from imsm.templates import build_template

pytestmark = pytest.mark.usefixtures("single_thread")


def _bf16_model(peft="lora", gate="query_aware"):
    tok = make_tokenizer()
    backbone = make_llama(len(tok), hidden=32).to(torch.bfloat16)  # as load_backbone(dtype=torch.bfloat16)
    return build(backbone, peft, gate, gate_rank=4), tok


@pytest.mark.parametrize("peft", ALL)
def test_training_steps_in_bf16_keep_the_gate_in_float32(peft, tiny_train_file):
    model, tok = _bf16_model(peft)
    gate_outputs = []
    model.imsm_gate.register_forward_hook(lambda module, args, out: gate_outputs.append(out.dtype))
    data = SupervisedDataset(tiny_train_file, build_template("raw", tok), 64, 8)
    batch = SupervisedCollator(tok.pad_token_id)([data[i] for i in range(8)])
    params = [p for p in model.parameters() if p.requires_grad]
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and not n.startswith("imsm_gate.")}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch)["loss"]
        assert math.isfinite(loss.item())
        loss.backward()
        for n, p in model.named_parameters():
            if n.startswith("imsm_gate."):
                assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert gate_outputs and set(gate_outputs) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.imsm_gate.parameters())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, adapter_before[n]) for n, p in model.named_parameters() if n in adapter_before)


def test_a_model_cast_whole_to_bf16_still_gates_in_float32(tiny_train_file):
    """DeepSpeed's bf16 engine casts every parameter, the gate's too: the gate still returns float32."""
    model, tok = _bf16_model()
    model.to(torch.bfloat16)
    gate_outputs = []
    model.imsm_gate.register_forward_hook(lambda module, args, out: gate_outputs.append(out.dtype))
    data = SupervisedDataset(tiny_train_file, build_template("raw", tok), 64, 8)
    loss = model.train()(**SupervisedCollator(tok.pad_token_id)([data[i] for i in range(4)]))["loss"]
    loss.backward()
    assert math.isfinite(loss.item()) and gate_outputs == [torch.float32]


def test_train_py_with_bf16_and_decoding_in_bf16(tiny_model_dir, tiny_train_file, tmp_path):
    trainer = train.main(["--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_train_file),
                          "--output_dir", str(tmp_path / "run"), "--bf16", "--use_cpu",
                          "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_steps", "4",
                          "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--seed", "3",
                          "--disable_tqdm", "true"])
    embed = next(p for n, p in trainer.model.named_parameters() if "embed_tokens" in n)
    assert embed.dtype == torch.bfloat16  # the backbone trained in bf16, as on a GPU
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert all(p.dtype == torch.float32 for p in trainer.model.imsm_gate.parameters())
    final = tmp_path / "run" / "final"
    assert all(t.dtype == torch.float32 for t in load_file(str(final / "gate.safetensors")).values())
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())

    model, tok, _ = load_run(final, dtype=torch.bfloat16)
    assert next(model.peft_model.parameters()).dtype == torch.bfloat16
    template = build_template("raw", tok)
    prompts = [template.encode_prompt(f"Question: Is {i} odd ? Output:") for i in range(3)]
    out = generate(model.eval(), tok, prompts, DecodingConfig(max_new_tokens=3, batch_size=2))
    assert len(out) == 3 and all(g.num_tokens >= 1 for g in out)
    assert all(g.gate_mean is not None and math.isfinite(g.gate_mean) and 0 < g.gate_mean < 1 for g in out)
