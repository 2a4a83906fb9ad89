"""Adapter scaling (the WiSE-FT idea for PEFT): a vanilla run's learned weight update, scaled back toward the base.

For a run whose merged weights are W1 = W0 + ΔW, the model at scale α has

    W(α) = W0 + α · (W1 − W0)

for every weight the adapter touches: for LoRA and AdaLoRA ΔW = s·B·A, so W(α) = W0 + α·s·B·A; for DoRA ΔW is the
whole change its magnitude and direction make; for (IA)3, whose merged weight scales W0 by a learned vector l,
W(α) = W0 ∘ (1 + α(l − 1)), i.e. l moves to 1 + α(l − 1). α = 0 is the untuned model and α = 1 the run itself. The
scaled model is a plain causal LM, so it decodes and scores through the untuned model's path.

An IMSM run is refused: its output mixes two passes through a gate, there is no single weight update to scale, and
scaling only its adapter would change what the gate was trained on.
"""

from __future__ import annotations

import math

import torch

from imsm.loader import load_backbone, load_run
from imsm.method.adapters import METHODS, get_method
from imsm.run_folder import RunConfig


def parse_scales(spec: str | None) -> list[float]:
    """``"0.25,0.5,1"`` -> [0.25, 0.5, 1.0]; a non-number or a repeated scale is an error naming it."""
    scales = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--adapter_scale {spec!r}: {item.strip()!r} is not a number") from None
        if not math.isfinite(value) or value in scales:
            raise ValueError(f"--adapter_scale {spec!r}: {item.strip()!r} is not a new finite number")
        scales.append(value)
    return scales


def check_scalable(config: RunConfig, run_dir) -> None:
    if not get_method(config.peft).scalable:
        scalable = ", ".join(sorted(name for name, spec in METHODS.items() if spec.scalable))
        raise ValueError(f"{run_dir}: --adapter_scale needs a PEFT adapter that merges into one weight update "
                         f"({scalable}); {config.peft!r} does not")
    if config.gate != "none":
        raise ValueError(
            f"{run_dir}: --adapter_scale scales a vanilla PEFT run's weight update (train with --gate none); this is "
            f"an IMSM run (gate {config.gate!r}), whose output mixes two passes through a gate, so it has no "
            "single weight update to scale")


@torch.no_grad()
def load_scaled_run(run_dir, scale: float, model_name_or_path: str | None = None,
                    dtype: torch.dtype = torch.float32, attn_implementation: str = "auto",
                    trust_remote_code: bool = False):
    """(plain causal LM with W0 + scale·ΔW, tokenizer, RunConfig) for a vanilla run folder."""
    model, tokenizer, config = load_run(run_dir, model_name_or_path, dtype, attn_implementation, trust_remote_code)
    check_scalable(config, run_dir)
    merged = model.peft_model.merge_and_unload()
    base, _, _ = load_backbone(model_name_or_path or config.base_model, dtype, attn_implementation,
                               trust_remote_code)
    originals = dict(base.named_parameters())
    for name, weight in merged.named_parameters():
        w0 = originals[name]
        if not torch.equal(weight, w0):
            weight.copy_(w0 + scale * (weight - w0))
    merged.requires_grad_(False)
    return merged.eval(), tokenizer, config
