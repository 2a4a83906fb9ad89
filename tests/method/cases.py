"""The contract tests' table: one case per registered method, read from the registry (``METHODS``), so a method is
covered the moment its file registers it and no test lists methods by hand (peft's tests/test_custom_models.py
``TEST_CASES``). Imported as ``method.cases`` (``tests/`` is on the path).

What each group gets:
- ``ALL``: only the adapter and the gate train, an unmatched target module is named (tests/method/test_model.py);
  save -> reload -> the same logits through evaluation's load and training's resume, and the pre-training round
  trip (tests/method/test_contract.py); training steps in bfloat16 (tests/training/test_bf16.py);
- ``TWO_CACHES`` (every method that does not mix one batch): decoding equal to the paper's equations recomputed
  without a cache (tests/evaluation/decoding/test_generation.py);
- ``SCALABLE`` (the update merges into the weight): scale 0 is the untuned model and scale 1 the run
  (tests/evaluation/decoding/test_scaling.py), the exported folder gives the project's logits and its model card
  the method's settings (tests/export/test_export.py);
- ``NOT_SCALABLE``: export refused, naming the method.
"""

from __future__ import annotations

import torch
from conftest import imsm_args

from imsm.loader import build_imsm_model
from imsm.method.adapters import METHODS

# Small sizes, each applied only where the chosen method reads the option; a method's other options keep their
# defaults, so a new method needs no entry here.
TINY_OPTIONS = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "adalora_init_r": 4, "adalora_target_r": 2,
                "loramoe_num_experts": 4, "loramoe_r": 2, "loramoe_dropout": 0.0}
TOTAL_STEPS = 100  # a method with a schedule (AdaLoRA's rank budget) needs the run's length

ALL = sorted(METHODS)
SCALABLE = sorted(name for name, spec in METHODS.items() if spec.scalable)
NOT_SCALABLE = sorted(name for name, spec in METHODS.items() if not spec.scalable)
TWO_CACHES = sorted(name for name, spec in METHODS.items() if not spec.mixed_batch)


def method_args(peft: str, gate: str = "query_aware", **kw):
    """``ImsmArguments`` for ``peft`` at the tiny sizes, gate dropout off; ``kw`` overrides."""
    return imsm_args(**{"peft": peft, "gate": gate, "gate_dropout": 0.0, **TINY_OPTIONS, **kw})


def build(backbone, peft: str, gate: str = "query_aware", **kw):
    return build_imsm_model(backbone, method_args(peft, gate, **kw), total_steps=TOTAL_STEPS)


@torch.no_grad()
def perturb(model, seed: int = 0, scale: float = 0.3) -> None:
    """Values as after training: noise added to every trainable tensor as it was built (so (IA)3's vectors stay
    around 1 and LoRA's zero B moves), the gate's included, so the two memories and the gate differ per token."""
    g = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
