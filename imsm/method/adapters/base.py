"""What a PEFT method is to IMSM: ``MethodSpec``, the one place that knows a method, looked up by name.

A method provides
- ``options_class``: a dataclass of its command-line options, with help strings; ``train.py`` parses only the chosen
  method's, so an option of another method is an unknown argument that names the method reading it;
- ``attach``: the adapter on a frozen backbone (``adapter_config`` for a PEFT method), and ``load`` /
  ``load_weights`` / ``save`` for a run folder, whose adapter files are ``files`` (config, weights);
- ``saves_state``: what it saves beyond its trainable parameters (VeRA's shared projections), and ``rebuilds_state``:
  fixed state its build always sets to the same value, so that it need not be saved (AdaLoRA's ``ranknum``); a
  freshly built adapter must come back whole from its own files before training starts
  (``imsm.loader.check_round_trip``);
- ``record``: its resolved options as data for ``imsm_config.json`` (the run folder never imports a method), and
  what is read back from that data: ``describe`` (the exported model card's settings) and ``calibration_rows`` (rows
  of a file the run calibrated on, which evaluation leaves out);
- flags: ``scalable`` (its update merges into one weight change: adapter scaling and export apply) and
  ``mixed_batch`` (the frozen and the tuned pass can run as one batch through PEFT's ``adapter_names``);
- ``extra_loss`` (a term added to the language-model loss) and ``callbacks`` (Trainer callbacks it needs).

Nothing outside a method's own file names it: the command line, training, the run folder, evaluation, scaling, export
and the harness look it up by name through ``registry.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from torch import nn

PEFT_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)  # adapter_config.json, adapter_model.safetensors


@dataclass(frozen=True)
class ExtraLoss:
    """A term a method adds to the loss of a micro-batch."""

    value: torch.Tensor
    log_as: str | None = None  # logged under this name, averaged between logging steps
    # weighted by the micro-batch's share of the answer tokens, so that it sums to one mean over the accumulated batch
    # exactly as the cross-entropy does (else added as it is)
    per_answer_token: bool = False


@dataclass(frozen=True)
class Adapter:
    """A backbone with a fresh adapter attached."""

    peft_model: nn.Module
    # PiSSA/CorDA: the adapter as initialised (B0, A0), to save the run as a plain LoRA on the pretrained weights
    initial_state: dict[str, torch.Tensor] | None = None


def lookup_targets(table: dict[str, list[str]], model_type: str, what: str) -> list[str]:
    """The default modules for ``model_type`` from a method's table keyed by ``config.model_type``."""
    if model_type not in table:
        raise ValueError(
            f"no default {what} for model_type {model_type!r} (known: {sorted(table)}); "
            "pass --target_modules (and --feedforward_modules for ia3) explicitly"
        )
    return list(table[model_type])


def check_target_modules(backbone: nn.Module, targets: list[str] | str | None,
                         layer_type: type[nn.Module] = nn.Module, what: str = "module") -> None:
    """Every name in ``targets`` must match at least one module of ``layer_type``: a module whose path is the name or
    ends with ``.name`` (PEFT's rule for a list). PEFT adapts the names that match and silently skips the others, so
    a typo would train fewer layers than asked; the error names the unmatched ones and the leaf names there are."""
    if not isinstance(targets, list | tuple | set):
        return  # PEFT's regex form or "all-linear": PEFT itself refuses one that matches nothing
    paths = [name for name, module in backbone.named_modules() if name and isinstance(module, layer_type)]
    unmatched = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if unmatched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                         if name and isinstance(module, layer_type) and not list(module.children())
                         and not name.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"--target_modules {unmatched} match no {what} of the model; available: {leaves}")


class MethodSpec:
    """A PEFT method (see the module docstring). The defaults are those of a PEFT library method; a subclass
    overrides with the same signatures (typed, ``options`` being its own ``options_class``)."""

    name: ClassVar[str]  # --peft NAME, and imsm_config.json's "peft"
    display_name: ClassVar[str]  # in report labels: IMSM-<display_name>
    options_class: ClassVar[type]  # a dataclass, every field with a help string
    files: ClassVar[tuple[str, str]] = PEFT_FILES  # (config, weights) in the run folder
    # the update merges into one weight change per adapted layer (PEFT's merge_and_unload): the run can be scaled
    # (evaluate.py --adapter_scale) and exported (export.py)
    scalable: ClassVar[bool] = False
    mixed_batch: ClassVar[bool] = False
    logged_losses: ClassVar[tuple[str, ...]] = ()  # the ExtraLoss.log_as names it produces

    def option_names(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.options_class)}

    def check(self, options: Any, gate: str) -> None:
        """Refuse options that cannot work with ``gate`` (the options' own values are checked in their class)."""

    def adapter_config(self, options: Any, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> Any:
        raise NotImplementedError

    def attach(self, backbone: nn.Module, options: Any, target_modules: list[str] | None,
               total_steps: int | None = None, template=None, max_input_length: int = 1024) -> Adapter:
        """Wrap the backbone in place: the base weights stay where they are and only the adapter is trainable."""
        config = self.adapter_config(options, target_modules, backbone.config.model_type, total_steps)
        check_target_modules(backbone, config.target_modules)
        return Adapter(get_peft_model(backbone, config))

    def load(self, backbone: nn.Module, run_dir: Path) -> nn.Module:
        """The saved adapter of a run folder around ``backbone``."""
        return PeftModel.from_pretrained(backbone, str(run_dir))

    def load_weights(self, peft_model: nn.Module, run_dir: Path, initial_state: dict | None = None) -> None:
        """Put a run folder's adapter values into an attached adapter (resume)."""
        result = set_peft_model_state_dict(peft_model, load_file(str(run_dir / self.files[1])))
        missing = [k for k in result.missing_keys if peft_model.base_model.prefix in k]
        if missing:
            raise ValueError(f"{run_dir}: the saved adapter lacks {missing[:3]}")

    def saves_state(self, key: str) -> bool:
        """Whether the adapter's state-dict entry ``key`` (named as in ``peft_model.state_dict()``, e.g.
        ``base_model.vera_A.default``) is saved although it does not train. The trainable parameters are always
        saved; this adds the fixed state the method's files must hold (parameters or buffers)."""
        return False

    def rebuilds_state(self, key: str) -> bool:
        """Whether the adapter's state-dict entry ``key`` is fixed state that building the adapter from the same
        options sets to the same value every time, so its files need not hold it (AdaLoRA's ``ranknum``). Every other
        tensor the adapter adds must come back from its files (``imsm.loader.check_round_trip``)."""
        return False

    def save(self, peft_model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path,
             initial_state: dict | None = None) -> None:
        """Write the adapter files; ``state_dict`` holds the full (gathered) values by the PeftModel's names: the
        trainable parameters and what ``saves_state`` selects."""
        peft_model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)

    def extra_loss(self, peft_model: nn.Module, attention_mask: torch.Tensor, training: bool,
                   task_types: torch.Tensor | None = None) -> ExtraLoss | None:
        """A term to add to the loss of a micro-batch; ``task_types`` (B,) are the samples' types (0 task,
        1 world knowledge) when the data has them."""
        return None

    def callbacks(self, trainer: Any) -> list:
        """Trainer callbacks the method needs (``trainer`` is the ``IMSMTrainer``)."""
        return []

    def record(self, options: Any) -> dict:
        """The resolved options as JSON data, stored in ``imsm_config.json`` as ``method_options``."""
        return json_ready(dataclasses.asdict(options))

    def describe(self, method_options: dict) -> dict[str, str]:
        """The settings a reader of an exported model card needs, from a run's ``method_options`` (what ``record``
        wrote): every option that is set, as text."""
        return {key: str(value) for key, value in method_options.items() if value is not None}

    def calibration_rows(self, method_options: dict) -> dict | None:
        """``{"file": resolved path, "rows": [0-based row indices]}`` of a file the run calibrated on (evaluation
        never scores a model on those rows), from its ``method_options``; None when it calibrated on nothing."""
        return None


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
