"""Write a trained IMSM run as a self-contained Hugging Face model folder (``export.py``).

    config.json                   IMSMConfig: the base model's config nested as text_config, the gate, the tuned
                                  modules, and auto_map to the two files below
    configuration_imsm.py         the config class      } copied from imsm/export/; they import only torch and
    modeling_imsm.py              the model class       } transformers, never imsm
    model.safetensors             the backbone once, a merged copy of each layer the adapter tuned, the gate (float32)
    generation_config.json        every EOS id that ends an answer (the tokenizer's and the base model's), the pad id
    tokenizer files               padding on the left; a chat run's system prompt baked into the chat template
    README.md                     the model card: base model, method, gate, template, data and settings, how to load

The folder is built under a hidden staging name beside it and swapped in whole (``export_lock``,
``recover_interrupted``): a killed export never leaves a half folder under the output name, and the next export to
the same name removes what it left. ``--overwrite`` replaces only an earlier export (``is_export``), never a run, a
report or any other folder.

The tuned memory is stored as **merged copies of the targeted layers only** (W + ΔW, e.g. LoRA's W + s·B·A, DoRA's
renormalised weight, W scaled by the (IA)3 vector), computed by PEFT's own ``merge_and_unload``; so a run exports
when its method's update merges into the weight (``MethodSpec.scalable``, the flag adapter scaling reads too). Why
merged rather than the adapter's factors: the standalone modeling file then needs no re-implementation of each PEFT
method (each with its own scaling, DoRA's magnitude normalisation, AdaLoRA's rank masks) that could drift from
PEFT's; the tuned pass of a layer is one plain matmul on any hardware; and only the layers PEFT adapted are copied
(q_proj and v_proj by default: a few percent of the backbone), not the whole model as a merged checkpoint would be.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imsm.atomic import atomic_dir

logger = logging.getLogger(__name__)

EXPORTABLE_GATES = ("query_aware", "token", "equal")
TEMPLATE_FILES = ("configuration_imsm.py", "modeling_imsm.py")
TEMPLATE_DIR = Path(__file__).resolve().parent
RUN_ARGS_FILE = "run_args.json"
# the embedded default model (imsm/default_model.py) is the Q4_1 GGUF of this Hub model, dequantized
EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSIDE_A_SAVE = re.compile(r"^(checkpoint-\d+|final)$")  # folders train.py deletes or replaces whole


class ExportRefused(ValueError):
    """A run this exporter cannot turn into a standalone model; the message says what to do instead."""


def check_exportable(peft: str, gate: str, run: str | Path) -> None:
    """Refuse what cannot be exported, with the alternative: vanilla PEFT runs merge into a plain checkpoint."""
    if gate == "none":
        raise ExportRefused(
            f"{run}: a vanilla {peft} run (--gate none) needs no IMSM model; merge it into the base model with PEFT "
            "instead: PeftModel.from_pretrained(base, RUN).merge_and_unload().save_pretrained(OUT_DIR)")
    from imsm.method.adapters import METHODS, get_method

    method = get_method(peft, f"{run}: peft")
    if not method.scalable:
        exportable = sorted(name for name, spec in METHODS.items() if spec.scalable)
        raise ExportRefused(f"{run}: {method.display_name} runs cannot be exported: the exported model stores merged "
                            f"copies of the tuned layers, and a {peft} adapter does not merge into one weight update "
                            f"(exportable: {', '.join(exportable)}); evaluate it with evaluate.py or lm-eval-imsm")
    if gate not in EXPORTABLE_GATES:
        raise ExportRefused(f"{run}: gate {gate!r} cannot be exported; exportable: {EXPORTABLE_GATES}")


# ---- the output folder --------------------------------------------------------------------------------------------
def is_export(folder: Path) -> bool:
    """An earlier export.py folder: ``config.json`` of model type ``imsm`` beside ``modeling_imsm.py`` (what every
    export holds and no run, evaluation report or data folder does)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "imsm" and (folder / "modeling_imsm.py").is_file()


def check_output_dir(out_dir: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, the run or a folder holding it, a folder inside one that train.py replaces
    or deletes (``final/``, ``checkpoint-N/``), or a non-empty folder that is not an earlier export (``--overwrite``
    replaces only those); warn when it lies inside the run's output folder."""
    out, run = out_dir.resolve(), run_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportRefused(f"{out_dir} is a file; give a folder name for the export")
    if out == run or out in run.parents:
        raise ExportRefused(f"{out_dir} holds the run {run_dir} itself; export into a new folder beside it")
    output_folder = run.parent if INSIDE_A_SAVE.match(run.name) else run
    saved = next((a for a in (out, *out.parents) if a.parent == output_folder and INSIDE_A_SAVE.match(a.name)), None)
    if saved is not None:
        raise ExportRefused(f"{out_dir} lies in {saved}, a folder train.py replaces or deletes whole; export into a "
                            "new folder outside it")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        held = ", ".join(sorted(p.name for p in out_dir.iterdir())[:6])
        if not overwrite:
            raise FileExistsError(f"{out_dir}: exists and is not empty ({held}); pass --overwrite to replace an "
                                  "earlier export, or choose another folder")
        if not is_export(out_dir):
            raise ExportRefused(f"{out_dir} holds {held}, not an earlier export (no config.json of model type imsm "
                                "beside modeling_imsm.py); --overwrite replaces only an earlier export, so choose "
                                "another folder (or delete this one yourself)")
    if output_folder in out.parents:
        logger.warning("%s lies inside the run's output folder %s: the export (a whole copy of the backbone) then "
                       "moves and is deleted with the run; a folder beside the run is the usual place", out_dir,
                       output_folder)


@contextlib.contextmanager
def export_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output's parent folder (fcntl.flock, released when the process ends, even by
    kill -9), so that one export at a time stages and swaps folders there; a second one waits, and says so."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another export.py is writing into %s; waiting for it to finish", parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def recover_interrupted(out_dir: Path) -> None:
    """Under ``export_lock``: remove the staging folders a killed export left beside ``out_dir`` (``.NAME.staging-*``,
    partial by definition: no live export holds the lock), and after a kill between ``--overwrite``'s two renames
    put the earlier export back from ``.NAME.old`` (or remove that copy once ``out_dir`` is in place)."""
    for stale in sorted(out_dir.parent.iterdir()):
        if stale.name.startswith(f".{out_dir.name}.staging-") and stale.is_dir():
            logger.warning("removing %s, the partial folder of an export that was killed", stale)
            shutil.rmtree(stale)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.is_dir():
        if out_dir.exists():
            shutil.rmtree(old)
        else:
            logger.warning("%s was missing after an export was killed while replacing it; restoring the earlier "
                           "export from %s", out_dir, old)
            os.replace(old, out_dir)


def public_base_model(loaded: str, given: str | None) -> str | None:
    """The base model as a Hub id for the card and config (never a local path): ``given`` (``--base_model_id``),
    the recorded name when it is not a local folder, the embedded model's Hub id; None when unknown."""
    from imsm.default_model import DEFAULT_MODEL_NAME, cache_dir

    if given:
        return given
    path = Path(loaded)
    if not path.exists():
        return loaded
    if path.name == DEFAULT_MODEL_NAME and path.resolve().parent == cache_dir().resolve():
        return EMBEDDED_MODEL_HUB_ID
    return None


@dataclass
class MergedWeights:
    """The exported model's tensors: the decoder's own (base weights), the tuned copies, the LM head, the gate."""

    state_dict: dict[str, torch.Tensor]
    tuned_modules: list[str]  # relative to the decoder
    tuned_parameters: int


def merge_tuned_layers(model) -> MergedWeights:
    """Base and merged weights of every layer the adapter tuned, from an ``IMSMModel`` (consumed: its adapter is
    merged into the backbone in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_model = model.peft_model
    backbone = peft_model.get_base_model()
    prefix = backbone.base_model_prefix
    base: dict[str, nn.Linear] = {}
    for name, module in backbone.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        layer = module.get_base_layer()
        if not name.startswith(prefix + "."):
            raise ExportRefused(f"the adapter tunes {name}, outside the decoder {prefix}; only decoder layers export")
        if type(layer) is not nn.Linear:
            raise ExportRefused(f"the adapter tunes {name}, a {type(layer).__name__}; only nn.Linear layers export")
        base[name[len(prefix) + 1:]] = (layer.weight.detach().clone(),
                                        None if layer.bias is None else layer.bias.detach().clone())
    if not base:
        raise ExportRefused("the run's adapter tunes no layer")
    merged = peft_model.merge_and_unload(safe_merge=True)
    decoder = getattr(merged, prefix)
    state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    for name, (weight, bias) in base.items():
        tuned = decoder.get_submodule(name)
        state[f"model.{name}.weight"], state[f"model.{name}.tuned_weight"] = weight, tuned.weight.detach().clone()
        if bias is not None:
            state[f"model.{name}.bias"], state[f"model.{name}.tuned_bias"] = bias, tuned.bias.detach().clone()
    head = merged.get_output_embeddings()
    state["lm_head.weight"] = head.weight.detach()
    if head.bias is not None:
        state["lm_head.bias"] = head.bias.detach()
    for name, p in model.imsm_gate.named_parameters():
        state[f"imsm_gate.{name}"] = p.detach().float()
    tuned_count = sum(w.numel() + (0 if b is None else b.numel()) for w, b in base.values())
    return MergedWeights(state, sorted(base), tuned_count)


def chat_template_with_system(template: str | None, system_prompt: str | None) -> str | None:
    """The tokenizer's chat template with the run's system prompt as the default system turn (a conversation that
    brings its own system turn keeps it), so ``apply_chat_template`` renders prompts as training did."""
    if template is None or not system_prompt:
        return template
    turn = json.dumps({"role": "system", "content": system_prompt})
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{turn}] + messages -%}}"
            "{%- endif -%}" + template)


def generation_settings(backbone, tokenizer) -> dict:
    """EOS ids that end an answer (the tokenizer's and the base model's generation config's, as evaluate.py stops)
    and the pad id."""
    eos = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(backbone, "generation_config", None), "eos_token_id", None)
    eos |= set(config_eos) if isinstance(config_eos, list | tuple) else {config_eos}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"eos_token_id": sorted(i for i in eos if i is not None), "pad_token_id": pad,
            "bos_token_id": tokenizer.bos_token_id, "do_sample": False}


def model_card(config, run: Path, run_args: dict | None, merged: MergedWeights, total_parameters: int,
               dtype: torch.dtype, out_name: str, base_model: str | None = None) -> str:
    """The generated README.md of an exported folder: the method's own settings come from the run's
    ``method_options`` as the method describes them (``MethodSpec.describe``), whatever the method. It names the
    base model by its Hub id (``base_model``; its folder's name when unknown) and data files by their names: no
    local path of the machine that exported it."""
    from imsm.method.adapters import get_method

    args = run_args or {}
    training = args.get("training", {}) if isinstance(args.get("training"), dict) else {}
    base_name = base_model or Path(config.base_model).name
    settings = [("base model", base_name), ("PEFT method", config.peft),
                ("gate", f"{config.gate} (rank {config.gate_rank})"), ("prompt template", config.prompt_template),
                ("system prompt", config.system_prompt or "none")]
    settings += list(get_method(config.peft).describe(config.method_options).items())
    for key in ("train_file", "max_input_length", "max_output_length", "target_modules", "gate_learning_rate"):
        if args.get(key) is not None:
            settings.append((key, Path(args[key]).name if key.endswith("_file") else args[key]))
    for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "seed", "bf16"):
        if training.get(key) is not None:
            settings.append((key, training[key]))
    table = "\n".join(f"| {k} | `{v}` |" for k, v in settings)
    prompt_use = ("Prompts are given as they are (the run's `raw` template: no chat markup; the tokenizer adds BOS)."
                  if config.prompt_template == "raw" else
                  "Prompts are the user turn of the chat template (`tokenizer.apply_chat_template(..., "
                  "add_generation_prompt=True)`); the run's system prompt is the template's default system turn.")
    harness_chat = " \\\n    --apply_chat_template" if config.prompt_template == "chat" else ""
    harness_note = ("The run was trained on chat-formatted prompts: `--apply_chat_template` gives the harness's "
                    "prompts that form (without it the answers are not the run's)." if harness_chat else
                    "The run was trained on raw prompts (BOS first): `add_bos_token=True` encodes them so.")
    front_base = f"base_model: {base_model}\n" if base_model else ""
    return f"""---
library_name: transformers
{front_base}tags: [imsm, peft, {config.peft}, siamese]
---

# IMSM model: {config.peft} + {config.gate} gate on {base_name}

An IMSM run ("Interweaving Memories of a Siamese Large Language Model", AAAI 2025) exported from
`{"/".join(run.parts[-2:])}`:
the base model runs twice over one doubled batch, once with its own weights (frozen memory) and once with the
run's {config.peft} adapter merged into the {len(merged.tuned_modules)} layers it tuned (tuned memory); a
query-aware gate mixes the two final hidden states per token before the LM head. Unlike a LoRA run, IMSM cannot be
merged into one plain checkpoint, so this folder carries its own model code (`modeling_imsm.py`,
`configuration_imsm.py`; they need only `torch` and `transformers`).

| setting | value |
|---|---|
{table}

Weights ({dtype}): the backbone once, {merged.tuned_parameters:,} parameters of tuned layer copies, the gate in
float32; {total_parameters:,} parameters in all.

## Intended use

Generation on the task it was trained for, and as a research artefact for comparing IMSM with vanilla PEFT; the
frozen memory is meant to keep the base model's general knowledge. It inherits the base model's limitations and
licence. {prompt_use}

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# trust_remote_code for the tokenizer too: transformers reads config.json (an IMSM config) before the tokenizer
tokenizer = AutoTokenizer.from_pretrained("{out_name}", trust_remote_code=True)   # pads on the left
model = AutoModelForCausalLM.from_pretrained("{out_name}", trust_remote_code=True)
batch = tokenizer(["first prompt", "a second, longer prompt"], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=64)                  # greedy; do_sample=True samples
print(tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True))
```

Beam search and a static cache are refused. A plain forward over prompt + answer (teacher-forced scoring) must pass
`prompt_length` (the prompt's token count per row): the gate's query means average the prompt only.

## lm-evaluation-harness

```bash
lm_eval --model hf --model_args pretrained={out_name},trust_remote_code=True,add_bos_token=True \\
    --tasks TASK{harness_chat}
```
{harness_note}
"""


def export_run(run: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
               model_name_or_path: str | None = None, overwrite: bool = False,
               base_model_id: str | None = None) -> Path:
    """Write ``run`` (a run folder, as evaluate.py takes it: a checkpoint or ``final/`` without ``COMPLETE`` is
    refused) as a Hugging Face folder at ``out_dir``; returns it. ``base_model_id``: the base model's Hub id for the
    card and config when the run recorded a local folder.

    The folder is written under a staging name and swapped in whole, one export at a time per parent folder
    (``export_lock``); what a killed export left is cleaned up first (``recover_interrupted``). An existing
    ``out_dir`` is refused unless ``overwrite`` and it is an earlier export, and survives any failure."""
    from imsm.run_folder import resolve_for_evaluation

    out_dir = Path(out_dir)
    try:
        run_dir = resolve_for_evaluation(run)
    except ValueError as e:
        raise ExportRefused(str(e)) from None
    with export_lock(out_dir):
        recover_interrupted(out_dir)
        check_output_dir(out_dir, run_dir, overwrite)
        return _export(run_dir, out_dir, dtype, model_name_or_path, base_model_id)


def _export(run_dir: Path, out_dir: Path, dtype: torch.dtype, model_name_or_path: str | None,
            base_model_id: str | None) -> Path:
    from imsm.loader import load_run

    model, tokenizer, config = load_run(run_dir, model_name_or_path, torch.float32, attn_implementation="sdpa")
    check_exportable(config.peft, config.gate, run_dir)
    run_args_path = run_dir / RUN_ARGS_FILE
    run_args = json.loads(run_args_path.read_text()) if run_args_path.is_file() else None
    backbone = model.peft_model.get_base_model()
    text_config = backbone.config
    generation = generation_settings(backbone, tokenizer)
    merged = merge_tuned_layers(model)
    del model, backbone
    base_model = public_base_model(model_name_or_path or config.base_model, base_model_id)
    if base_model is None:
        logger.warning("the base model %s is a local folder: the model card names it by its folder name only; pass "
                       "--base_model_id with its Hub id", model_name_or_path or config.base_model)

    from imsm.export.configuration_imsm import IMSMConfig
    from imsm.export.modeling_imsm import IMSMForCausalLM

    text_config.dtype = dtype
    text_config._name_or_path = base_model or Path(model_name_or_path or config.base_model).name
    imsm_config = IMSMConfig(text_config=text_config.to_dict(), gate=config.gate, gate_rank=config.gate_rank,
                             tuned_modules=merged.tuned_modules, peft=config.peft,
                             lm_head_bias="lm_head.bias" in merged.state_dict, dtype=dtype)
    imsm_config.auto_map = {"AutoConfig": "configuration_imsm.IMSMConfig",
                            "AutoModelForCausalLM": "modeling_imsm.IMSMForCausalLM"}
    exported = IMSMForCausalLM(imsm_config)
    if imsm_config.tie_word_embeddings:
        merged.state_dict.pop("lm_head.weight")
    result = exported.load_state_dict(merged.state_dict, strict=False)
    missing = [k for k in result.missing_keys if not (imsm_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"exported weights do not fit the IMSM model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    exported.tie_weights()
    exported.to(dtype)
    exported.imsm_gate.float()
    for key, value in generation.items():
        setattr(exported.generation_config, key, value)
    total = sum(p.numel() for p in exported.parameters())

    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved with the tokenizer: batched generate() needs left padding
    tokenizer.chat_template = chat_template_with_system(tokenizer.chat_template, config.system_prompt)
    with atomic_dir(out_dir) as staging:
        exported.save_pretrained(staging, safe_serialization=True)
        for name in TEMPLATE_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, staging / name)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(config, run_dir, run_args, merged, total, dtype, out_dir.name,
                                                      base_model))
    logger.info("exported %s to %s: %d tuned layers (%d parameters), %d parameters in all, %s", run_dir, out_dir,
                len(merged.tuned_modules), merged.tuned_parameters, total, dtype)
    return out_dir
