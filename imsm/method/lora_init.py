"""PiSSA and CorDA (knowledge-preserved mode) initialisations of LoRA, through PEFT, and how their runs are saved.

Both split each target weight W into an adapter B0·A0 built from its singular directions and a residual
W_res = W − B0·A0 that replaces W in the base layer:

* PiSSA (``init_lora_weights="pissa"``): the top-r singular directions of W go into the adapter;
* CorDA KPM (``init_lora_weights="corda"``, ``CordaConfig(corda_method="kpm")``): the SVD of W·C, C the covariance of
  the layer's inputs on general-domain prompts (the calibration pass, ``preprocess_corda``); the r directions that
  matter LEAST for those prompts go into the trainable adapter, so training leaves what the model uses for world
  knowledge in the frozen residual.

Because the base layer now holds W_res, "adapter disabled" is no longer the pretrained model: these inits are refused
with the IMSM gate (``ImsmArguments``). The saved run must not depend on W_res either (evaluation loads the pretrained
weights), so every save converts the trained adapter into a plain LoRA on W, PEFT's documented conversion
(``subtract_mutated_init``): W_res + B·A = W + [B | −B0]·[A ; A0], a LoRA of rank 2r with alpha 2·alpha (same
scaling). The unconverted adapter is kept beside it (``RESIDUAL_ADAPTER``) for resuming without DeepSpeed.

CorDA calibrates on rows of a user-given file; the run records which ones (``imsm_config.json``, ``calibration``) so
evaluation can leave exactly those rows out: a model is never scored on what it calibrated on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from imsm.atomic import atomic_write_json

logger = logging.getLogger(__name__)

RESIDUAL_ADAPTER = "adapter_model.residual.safetensors"


def _default(args) -> bool:
    return True


def _pissa(args) -> str:
    return "pissa" if args.pissa_niter is None else f"pissa_niter_{args.pissa_niter}"


def _corda(args) -> str:
    return "corda"


def _mica(args) -> str:
    return "mica"


# --init_lora_weights NAME -> PEFT's init_lora_weights value. MiCA (Minor Component Adaptation, PEFT's "mica"): B is
# fixed to the r left singular vectors of W with the smallest singular values, A starts at 0 and is the only trained
# factor; W itself is untouched, so it works with the IMSM gate.
LORA_INITS: dict[str, Callable[..., bool | str]] = {"default": _default, "pissa": _pissa, "corda": _corda,
                                                    "mica": _mica}


def mutates_base(init_name: str) -> bool:
    """Whether the init rewrites the base weights (the residual), so the run must be saved converted."""
    return init_name in ("pissa", "corda")


def calibration_indices(args) -> list[int]:
    """The rows of ``--corda_calibration_file`` the calibration pass uses (0-based, non-empty lines)."""
    from imsm.data import read_jsonl

    rows = read_jsonl(args.corda_calibration_file, require_output=False)
    chosen = list(range(args.corda_calibration_skip, len(rows)))[: args.corda_calibration_examples]
    if not chosen:
        raise ValueError(f"{args.corda_calibration_file}: {len(rows)} rows, none left after skipping "
                         f"{args.corda_calibration_skip}")
    return chosen


def calibration_record(args) -> dict | None:
    """What ``imsm_config.json`` records about the calibration data (None without CorDA); evaluation leaves exactly
    these rows out (``imsm.evaluation.planning.calibration_rows``)."""
    if getattr(args, "init_lora_weights", "default") != "corda":
        return None
    return {"file": str(Path(args.corda_calibration_file).resolve()), "rows": calibration_indices(args)}


@torch.no_grad()
def calibrate_corda(backbone: torch.nn.Module, lora_config, args, template, max_input_length: int) -> None:
    """CorDA's preprocessing: input covariances of every target layer over the calibration prompts, then the SVD of
    W·C (kept on the layers for ``get_peft_model``). One prompt at a time, so no padding enters a covariance."""
    from peft.tuners.lora.corda import preprocess_corda
    from transformers.integrations import is_deepspeed_zero3_enabled

    from imsm.data import encode_prompt, read_jsonl

    if template is None:
        raise ValueError("CorDA's calibration pass needs the prompt template (and its tokenizer)")
    if is_deepspeed_zero3_enabled():
        raise ValueError("--init_lora_weights corda runs its calibration pass through the backbone before DeepSpeed "
                         "starts, and under ZeRO-3 the weights are already partitioned then; use ZeRO-0/1/2")
    rows = read_jsonl(args.corda_calibration_file, require_output=False)
    indices = calibration_indices(args)
    device = next(backbone.parameters()).device
    prompts = [encode_prompt(template, rows[i]["input"], max_input_length) for i in indices]

    def run_model() -> None:
        was_training = backbone.training
        backbone.eval()
        for ids in prompts:
            backbone(input_ids=torch.tensor([ids], device=device), use_cache=False)
        backbone.train(was_training)

    logger.info("CorDA KPM: calibrating on %d rows of %s", len(prompts), args.corda_calibration_file)
    preprocess_corda(backbone, lora_config, run_model=run_model)


def initial_adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter right after a PiSSA/CorDA init (B0, A0), in PEFT's saved-key format."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def convert_saved_adapter(out_dir: str | Path, initial: dict[str, torch.Tensor],
                          config_file: str = "adapter_config.json",
                          weights_file: str = "adapter_model.safetensors") -> None:
    """Turn the adapter PEFT just saved in ``out_dir`` (trained on W_res) into a plain LoRA on the pretrained W."""
    out_dir = Path(out_dir)
    trained = load_file(str(out_dir / weights_file))
    save_file(trained, str(out_dir / RESIDUAL_ADAPTER), metadata={"format": "pt"})
    if set(trained) != set(initial):
        raise ValueError(f"{out_dir}: the trained adapter's tensors differ from the initial adapter's")
    converted = {}
    for name, tensor in trained.items():
        init = initial[name].to(tensor.dtype)
        if "lora_A" in name:
            converted[name] = torch.cat([tensor, init], dim=0).contiguous()
        elif "lora_B" in name:
            converted[name] = torch.cat([tensor, -init], dim=1).contiguous()
        else:
            raise ValueError(f"{out_dir}: cannot convert {name}: only lora_A / lora_B tensors are expected")
    save_file(converted, str(out_dir / weights_file), metadata={"format": "pt"})
    config = json.loads((out_dir / config_file).read_text())
    config |= {"r": 2 * config["r"], "lora_alpha": 2 * config["lora_alpha"], "init_lora_weights": True,
               "corda_config": None}
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {k: 2 * v for k, v in (config.get(key) or {}).items()}
    atomic_write_json(out_dir / config_file, config)

