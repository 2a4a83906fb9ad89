"""One build/load/save path for training and evaluation: backbone + tokenizer, the method's adapter
(``imsm/method/adapters``), the gate, and a saved run (its format: ``imsm/run_folder.py``)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from imsm.default_model import resolve_model_path
from imsm.method.adapters import get_method
from imsm.method.gate import GATE_PARAM_PREFIX, GATES, build_gate
from imsm.method.model import IMSMModel
from imsm.models.chatglm3 import native_model_path
from imsm.run_folder import (
    GATE_FILE,
    RUN_ARGS,
    RunConfig,
    check_hidden_size,
    resolve,
    safetensors_header,
    validate,
)

logger = logging.getLogger(__name__)

def pick_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def backbone_path(model_name_or_path: str | None) -> str:
    """The folder or Hub name a backbone loads from: the embedded model's cached folder for None, a ChatGLM3
    checkpoint's converted native folder (``imsm/models/chatglm3.py``), else the name itself."""
    return native_model_path(resolve_model_path(model_name_or_path))


def _from_pretrained(path: str, dtype: torch.dtype, attn_implementation: str, trust_remote_code: bool):
    attn = pick_attn_implementation(attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                    trust_remote_code=trust_remote_code)
    except ValueError as err:
        # a remote-code class may support neither FlashAttention-2 nor SDPA; "auto" then means its own default
        if attn_implementation != "auto" or not trust_remote_code or "attention" not in str(err).lower():
            raise
        logger.warning("%s: attn_implementation %s refused (%s); loading with the model's default attention", path,
                       attn, str(err).splitlines()[0])
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def load_backbone(model_name_or_path: str | None, dtype: torch.dtype = torch.float32, attn_implementation="auto",
                  trust_remote_code: bool = False):
    """(causal LM with frozen weights, tokenizer, resolved path)."""
    path = backbone_path(model_name_or_path)
    model = _from_pretrained(path, dtype, attn_implementation, trust_remote_code)
    model.requires_grad_(False)
    return model, load_tokenizer(path, trust_remote_code), path


def build_imsm_model(backbone, imsm_args, total_steps: int | None = None, template=None,
                     max_input_length: int = 1024, frozen_cache=None) -> IMSMModel:
    """Attach a fresh adapter (``imsm_args.method`` with ``imsm_args.options``) and gate; only they require grad.
    CorDA calibrates on its calibration file first, encoding its prompts with ``template``. ``frozen_cache``
    (training) supplies the frozen memory of the examples it holds."""
    method = imsm_args.method
    options = imsm_args.options if imsm_args.options is not None else method.options_class()
    backbone_tensors = {id(t) for t in backbone.state_dict(keep_vars=True).values()}
    adapter = method.attach(backbone, options, imsm_args.target_modules, total_steps, template, max_input_length)
    gate = build_gate(imsm_args.gate, backbone.config.hidden_size, imsm_args.gate_rank, imsm_args.gate_dropout)
    model = IMSMModel(adapter.peft_model, gate, method, initial_adapter_state=adapter.initial_state,
                      frozen_cache=frozen_cache, kl_anchor=imsm_args.kl_anchor,
                      eaft=imsm_args.eaft_setting)
    model.requires_grad_(False)
    for group in model.trainable_parameters().values():
        for _, p in group:
            p.requires_grad_(True)
    check_round_trip(model, backbone_tensors)
    return model


def check_round_trip(model: IMSMModel, backbone_tensors: set[int]) -> None:
    """Refuse a method whose freshly built adapter does not come back whole from its own files, before any training.

    The adapter's state is every tensor of its state dict that the backbone did not have before the adapter was
    attached (``backbone_tensors``: their ids), trainable or not, but for what its build always sets the same way
    (``MethodSpec.rebuilds_state``): this does not take the method's word for what it must save. That state is
    saved as a checkpoint is (``MethodSpec.save`` of the trainable parameters and of what ``MethodSpec.saves_state``
    selects), overwritten in place, read back with ``MethodSpec.load_weights`` (the resume path) and compared
    exactly. In place rather than into a second build, which would load the backbone twice; the evaluation path
    (``MethodSpec.load`` into a new backbone) is checked for every registered method by tests/method/cases.py.
    Under ZeRO-3 the adapter's tensors are gathered, and the changes are discarded with the gathered copies; a model
    built on the meta device has no values and is not checked."""
    method = model.method
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in model.peft_model.state_dict(keep_vars=True).items():
        if id(tensor) not in backbone_tensors and not method.rebuilds_state(name):
            seen.setdefault(id(tensor), (name, tensor))
    state = list(seen.values())
    if any(tensor.is_meta for _, tensor in state):
        return  # built on the meta device (shapes only, e.g. to count parameters): no values to round-trip
    with _gathered([t for _, t in state if isinstance(t, torch.nn.Parameter)]), torch.no_grad(), \
            tempfile.TemporaryDirectory(prefix="imsm_round_trip_") as tmp:
        built = {name: tensor.detach().cpu().clone() for name, tensor in state}
        try:
            method.save(model.peft_model, _method_state(model), Path(tmp), model.initial_adapter_state)
        except Exception as e:
            raise ValueError(f"--peft {method.name}: a freshly built adapter cannot be saved ({type(e).__name__}: "
                             f"{e}); its MethodSpec.saves_state must select every tensor its save needs") from e
        for _, tensor in state:  # every value changed, so whatever the files do not restore differs
            if tensor.dtype == torch.bool:
                tensor.logical_not_()
            else:
                tensor.add_(1)
        try:
            method.load_weights(model.peft_model, Path(tmp), model.initial_adapter_state)
        except Exception as e:
            raise ValueError(f"--peft {method.name}: a freshly built adapter cannot be read back from the files "
                             f"it saved ({type(e).__name__}: {e})") from e
        lost = [name for name, tensor in state if not torch.equal(tensor.detach().cpu(), built[name])]
        for name, tensor in state:
            tensor.copy_(built[name])
    if lost:
        raise ValueError(
            f"--peft {method.name}: {len(lost)} of the {len(state)} tensors its adapter adds do not come back from "
            f"the files it saves, so a checkpoint would not restore the model: {lost[:4]}; a fixed tensor its files "
            "lack is declared in its MethodSpec.saves_state, and MethodSpec.save must write every value as it is")


def make_run_config(imsm_args, data_args, model_path: str, hidden_size: int) -> RunConfig:
    """What ``imsm_config.json`` records of a training run: the method's options as data."""
    method = imsm_args.method
    return RunConfig(base_model=model_path, peft=imsm_args.peft, gate=imsm_args.gate, gate_rank=imsm_args.gate_rank,
                     gate_dropout=imsm_args.gate_dropout, hidden_size=hidden_size,
                     prompt_template=data_args.prompt_template, system_prompt=data_args.system_prompt,
                     adapter_files=method.files, method_options=method.record(imsm_args.options))


def load_gate_into(model: IMSMModel, gate_path: Path) -> None:
    expected = {n[len(GATE_PARAM_PREFIX):]: p for n, p in model.named_parameters() if n.startswith(GATE_PARAM_PREFIX)}
    saved = load_file(str(gate_path))
    if set(saved) != set(expected):
        raise ValueError(f"{gate_path}: gate tensors {sorted(saved)} do not match the model's {sorted(expected)}")
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{gate_path}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[name].shape)} "
                "(wrong base model or gate rank?)"
            )
    with torch.no_grad():
        for name, tensor in saved.items():
            expected[name].copy_(tensor)


def load_trained_weights(model: IMSMModel, run_dir: str | Path) -> None:
    """Put a run folder's adapter and gate values into an already built model (the Trainer's non-DeepSpeed resume)."""
    run_dir = resolve(run_dir)
    model.method.load_weights(model.peft_model, run_dir, model.initial_adapter_state)
    load_gate_into(model, run_dir / GATE_FILE)


def check_run(run: str | Path, hidden_size: int | None = None, model_path: str | None = None) -> RunConfig:
    """``run_folder.validate`` (the config, every file whole) plus what needs the methods: the method and gate are
    known, the adapter files are the method's, and the gate's tensors have the shapes the config implies."""
    run_dir = resolve(run)
    config = validate(run_dir, hidden_size, model_path)
    source = run_dir / "imsm_config.json"
    method = get_method(config.peft, f"{source}: peft")
    if config.gate not in GATES:
        raise ValueError(f"{source}: gate {config.gate!r} is not one of {sorted(GATES)}")
    if tuple(config.adapter_files) != method.files:
        raise ValueError(f"{source}: adapter_files {list(config.adapter_files)} are not the files "
                         f"--peft {method.name} writes ({list(method.files)})")
    saved = safetensors_header(run_dir / GATE_FILE)
    expected = GATES[config.gate].parameter_shapes(config.hidden_size, config.gate_rank)
    if set(saved) != set(expected):
        raise ValueError(f"{run_dir / GATE_FILE}: gate tensors {sorted(saved)} do not match the {config.gate} gate's "
                         f"{sorted(expected)}")
    for name, shape in expected.items():
        if saved[name][1] != shape:
            raise ValueError(f"{run_dir / GATE_FILE}: {name} has shape {saved[name][1]}, the {config.gate} gate of "
                             f"rank {config.gate_rank} on hidden size {config.hidden_size} needs {shape}")
    return config


def load_run(run: str | Path, model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
             attn_implementation: str = "auto", trust_remote_code: bool = False):
    """(IMSMModel in eval mode, tokenizer, RunConfig) from a saved run; the base model is the recorded one unless
    ``model_name_or_path`` is given. The folder is checked (``check_run``) before the backbone loads."""
    run_dir = resolve(run)
    config = check_run(run_dir)
    method = get_method(config.peft)
    backbone, tokenizer, path = load_backbone(model_name_or_path or config.base_model, dtype,
                                              attn_implementation, trust_remote_code)
    check_hidden_size(config, run_dir, backbone.config.hidden_size, path)
    peft_model = method.load(backbone, run_dir)
    gate = build_gate(config.gate, backbone.config.hidden_size, config.gate_rank, config.gate_dropout)
    model = IMSMModel(peft_model, gate, method)
    load_gate_into(model, run_dir / GATE_FILE)
    model.eval()
    return model, tokenizer, config


# ---- writing ------------------------------------------------------------------------------------------------------
def _gathered(params: list[torch.nn.Parameter]):
    """Full values of ZeRO-3 partitioned parameters inside (changes are discarded on exit); others as they are."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    return contextlib.nullcontext()


def _method_state(model: IMSMModel) -> dict[str, torch.Tensor]:
    """The adapter's saved state (``IMSMModel.saved_state``) by the PeftModel's names, on the CPU; inside
    ``_gathered`` under ZeRO-3."""
    return {n[len("peft_model."):]: t.detach().cpu().clone() for n, t in model.saved_state()
            if n.startswith("peft_model.")}


def save_run_files(model: IMSMModel, out_dir: str | Path, config: RunConfig, run_args: dict | None,
                   is_main: bool) -> None:
    """Write the model's files into ``out_dir``; every rank must call this (ZeRO-3 gathers collectively).

    Under ZeRO-3 only the saved parameters are gathered (the Trainer's own DeepSpeed save would consolidate the whole
    16-bit backbone on rank 0 to keep a few MB of it). The caller writes ``COMPLETE`` once everything else is in.
    """
    from imsm.atomic import atomic_write_json

    out_dir = Path(out_dir)
    named = model.saved_state()
    with _gathered([p for _, p in named]):
        if not is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # the method picks its entries out of this (AdaLoRA: cut to the allocated ranks)
        model.method.save(model.peft_model, _method_state(model), out_dir, model.initial_adapter_state)
        gate = {n[len(GATE_PARAM_PREFIX):]: p.detach().cpu().float().contiguous().clone()
                for n, p in named if n.startswith(GATE_PARAM_PREFIX)}
        save_file(gate, str(out_dir / GATE_FILE), metadata={"format": "pt", "variant": config.gate})
    config.write(out_dir)
    if run_args is not None:
        atomic_write_json(out_dir / RUN_ARGS, json.loads(json.dumps(run_args, default=str)))
