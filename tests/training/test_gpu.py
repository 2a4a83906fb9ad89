"""On a CUDA GPU: the IMSM model in bfloat16 computes the float32 model's loss and gradients (within bf16 precision).
Marked ``gpu``: skipped with the reason on a machine without one (tests/conftest.py)."""

import pytest
import torch
from conftest import imsm_args, make_llama, make_tokenizer

from imsm.loader import build_imsm_model

pytestmark = pytest.mark.gpu


def test_bf16_on_gpu_matches_float32_on_cpu():
    tokenizer = make_tokenizer()
    args = imsm_args(gate_dropout=0.0, lora_dropout=0.0, lora_r=4, gate_rank=4)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "query_mask": torch.tensor([[1, 1, 1, 1, 0, 0, 0]]), "labels": torch.tensor([[-100] * 4 + [8, 9, 2]])}
    losses, grads = {}, {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = build_imsm_model(make_llama(len(tokenizer), seed=0).to(dtype), args)
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data.copy_(torch.randn(p.shape) * 0.1)
        model.to(device).train()
        loss = model(**{k: v.to(device) for k, v in batch.items()})["loss"]
        loss.backward()
        losses[device] = float(loss)
        grads[device] = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad])
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(grads["cuda"], grads["cpu"], dim=0)
    assert cosine > 0.99
