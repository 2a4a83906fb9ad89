"""AdaLoRA (Zhang et al., 2023) through PEFT: SVD-form adapters whose rank budget is reallocated during training.

Each adapted weight W gets ΔW = Q·diag(Λ)·P · alpha / (ranknum + 1e-5) (P ``lora_A``: r x d_in, Λ ``lora_E``: r,
Q ``lora_B``: d_out x r); triplet i (P's row i, Λ_i, Q's column i) is scored by PEFT's ``RankAllocator`` — element
sensitivity s = EMA(|w·∂L/∂w|) · EMA(uncertainty), triplet score s(Λ_i) + mean_j s(P_ij) + mean_j s(Q_ji) — and the
lowest-scoring Λ_i are zeroed to follow the cubic budget schedule.

IMSM calls the backbone's decoder directly (it needs the hidden state, not the logits), which bypasses
``AdaLoraModel.forward``; so the orthogonality regulariser is added here (``extra_loss``) with PEFT's weight and
formula, and the rank allocation runs from a Trainer callback (``AdaLoraAllocator``).

ChatGLM3 (converted to the native glm layout, ``imsm/models/chatglm3.py``): the paper's AdaLoRA sits on the fused
query_key_value (4096 -> 4608 on ChatGLM3-6B). On the split q_proj, k_proj, v_proj it is rebuilt exactly: one P,
one Λ and one ranknum shared by the three (``tie_fused_lora``), Q split by rows, so [q; k; v] = x·(W + ΔW)ᵀ with
Q = [Q_q; Q_k; Q_v]. The allocator scores each tied triple as the one fused triplet (``FusedRankAllocator``: Q's
column means over all 4608 rows, one budget entry per fused layer), and the penalty takes Q stacked.

A run folder is PEFT's (the adapter cut to its allocated ranks, k's and v's shared P and Λ written as copies);
``ALLOCATOR_STATE`` beside it holds what an exact resume needs beyond that: the allocator's importance averages and,
once ranks are masked, the uncut tensors (a masked triplet keeps training and may be revived).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.adalora.layer import RankAllocator
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from imsm.method.adapters.base import (
    PEFT_FILES,
    Adapter,
    ExtraLoss,
    MethodSpec,
    check_target_modules,
    lookup_targets,
)
from imsm.method.adapters.lora import LORA_TARGET_MODULES
from imsm.method.adapters.registry import register_method
from imsm.models.chatglm3 import split_fused_targets, tie_fused_lora, untied_state_dict

logger = logging.getLogger(__name__)

# shared by q_proj, k_proj and v_proj on the fused query_key_value; Q (lora_B) is split by rows
FUSED_PARTS = ("lora_A", "lora_E", "ranknum")
ALLOCATOR_STATE = "adalora_allocator.safetensors"  # beside the adapter files: what an exact resume needs beyond them
ALLOCATOR_DICTS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator's per-element scores


@dataclass
class AdaLoraOptions:
    lora_alpha: int = field(default=16, metadata={"help": "Alpha: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input."})
    adalora_init_r: int = field(default=12, metadata={"help": "Initial rank per module."})
    adalora_target_r: int = field(default=8, metadata={"help": "Average target rank."})
    adalora_tinit: int = field(default=0, metadata={"help": "Steps before pruning starts."})
    adalora_tfinal: int = field(default=0, metadata={"help": "Final fine-tuning steps."})
    adalora_delta_t: int = field(default=1, metadata={"help": "Steps between budget allocations."})
    adalora_orth_reg_weight: float = field(default=0.5, metadata={"help": "Orthogonality penalty."})

    def __post_init__(self) -> None:
        if self.adalora_init_r < 1 or self.adalora_target_r < 1:
            raise ValueError("--adalora_init_r and --adalora_target_r must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")


class AdaLoraMethod(MethodSpec):
    name = "adalora"
    display_name = "AdaLoRA"
    options_class = AdaLoraOptions
    scalable = True

    def rebuilds_state(self, key: str) -> bool:
        # each layer's rank count, a parameter that does not train: PEFT sets it to the initial rank when it builds
        # the layer and leaves it out of the saved adapter (peft/tuners/adalora/model.py: "ranknum is deterministic")
        return ".ranknum." in key

    def targets(self, target_modules: list[str] | None, model_type: str) -> tuple[list[str], bool]:
        """(PEFT's target modules, whether ChatGLM's fused query_key_value is among them as q, k, v)."""
        targets = target_modules or lookup_targets(LORA_TARGET_MODULES, model_type, "AdaLoRA target modules")
        return split_fused_targets(model_type, targets)

    def adapter_config(self, options: AdaLoraOptions, target_modules: list[str] | None, model_type: str,
                       total_steps: int | None) -> AdaLoraConfig:
        if not total_steps:
            raise ValueError("adalora needs the total number of optimizer steps for its rank budget schedule")
        return AdaLoraConfig(
            task_type=TaskType.CAUSAL_LM, init_r=options.adalora_init_r, target_r=options.adalora_target_r,
            lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout, tinit=options.adalora_tinit,
            tfinal=options.adalora_tfinal, deltaT=options.adalora_delta_t,
            orth_reg_weight=options.adalora_orth_reg_weight, total_step=total_steps,
            target_modules=self.targets(target_modules, model_type)[0],
        )

    def attach(self, backbone: nn.Module, options: AdaLoraOptions, target_modules: list[str] | None,
               total_steps: int | None = None, template=None, max_input_length: int = 1024) -> Adapter:
        model_type = backbone.config.model_type
        config = self.adapter_config(options, target_modules, model_type, total_steps)
        check_target_modules(backbone, config.target_modules)
        peft_model = get_peft_model(backbone, config)
        if self.targets(target_modules, model_type)[1]:
            tie_fused_lora(peft_model, FUSED_PARTS)  # the fused query_key_value AdaLoRA: one P and Λ for q, k, v
            tuner = peft_model.base_model
            # PEFT's allocator counted the budget before the tie (three triplets per rank); this one counts the
            # shared P once and scores each tied triple as one fused triplet
            tuner.rankallocator = FusedRankAllocator(tuner.model, tuner.peft_config[tuner.trainable_adapter_name],
                                                     tuner.trainable_adapter_name)
        return Adapter(peft_model)

    def save(self, peft_model: PeftModel, state_dict: dict[str, torch.Tensor], out_dir: Path,
             initial_state: dict | None = None) -> None:
        tuner = peft_model.base_model
        config = peft_model.peft_config[peft_model.active_adapter]
        pattern = config.rank_pattern
        if pattern:  # PEFT cuts each module by its entry: k's and v's copies of the shared P and Λ need theirs
            config.rank_pattern = untied_rank_pattern(tuner.model, peft_model.active_adapter, pattern)
        try:
            super().save(peft_model, untied_state_dict(peft_model, state_dict, FUSED_PARTS), out_dir)
        finally:
            config.rank_pattern = pattern  # PEFT's save rewrites it in place (adapter names dropped)
        resume = {f"{kind}/{name}": t.detach().cpu().contiguous() for kind in ALLOCATOR_DICTS
                  for name, t in getattr(getattr(tuner, "rankallocator", None), kind, {}).items()}
        if pattern:
            resume |= {f"full/{name}": t.contiguous() for name, t in state_dict.items()}
        if resume:
            save_file(resume, str(Path(out_dir) / ALLOCATOR_STATE), metadata={"format": "pt"})

    def load_weights(self, peft_model: PeftModel, run_dir: Path, initial_state: dict | None = None) -> None:
        """Resume: the adapter at its initial rank (as it trains), the rank pattern and the allocator's scores."""
        run_dir = Path(run_dir)
        pattern, resume = _saved_allocation(run_dir)
        if pattern is None:
            super().load_weights(peft_model, run_dir, initial_state)
        else:  # the adapter file is cut to the allocated ranks: the uncut tensors are in ALLOCATOR_STATE
            full = {name[len("full/"):]: t for name, t in resume.items() if name.startswith("full/")}
            params = dict(peft_model.named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in full]
            if missing:
                raise ValueError(f"{run_dir / self.files[1]}: the adapter is cut to its allocated ranks (rank_pattern "
                                 f"in {self.files[0]}) and {run_dir / ALLOCATOR_STATE} lacks the uncut "
                                 f"{missing[:3]}: training cannot resume from this folder (evaluation can load it)")
            with torch.no_grad():
                for name, tensor in full.items():
                    params[name].copy_(tensor)
        restore_allocation(peft_model, run_dir)

    def extra_loss(self, peft_model: PeftModel, attention_mask: torch.Tensor, training: bool,
                   task_types: torch.Tensor | None = None) -> ExtraLoss | None:
        reg = orth_regularizer(peft_model)
        return None if reg is None else ExtraLoss(reg)

    def callbacks(self, trainer: Any) -> list:
        return [AdaLoraAllocator(trainer)]


def _saved_allocation(run_dir: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(the saved adapter's rank pattern, the tensors of its ``ALLOCATOR_STATE`` file, empty when there is none)."""
    pattern = json.loads((run_dir / PEFT_FILES[0]).read_text(encoding="utf-8")).get("rank_pattern")
    resume = load_file(str(run_dir / ALLOCATOR_STATE)) if (run_dir / ALLOCATOR_STATE).is_file() else {}
    return pattern or None, resume


def restore_allocation(peft_model: PeftModel, run_dir: Path) -> None:
    """Put a run folder's rank pattern (which masks the ranks after tfinal) and the allocator's importance averages
    back into a training adapter."""
    pattern, resume = _saved_allocation(Path(run_dir))
    peft_model.peft_config[peft_model.active_adapter].rank_pattern = pattern
    allocator = getattr(peft_model.base_model, "rankallocator", None)
    if allocator is not None:
        params = dict(peft_model.base_model.model.named_parameters())
        for kind in ALLOCATOR_DICTS:
            scores = {name.split("/", 1)[1]: t for name, t in resume.items() if name.startswith(f"{kind}/")}
            setattr(allocator, kind, {n: t.to(params[n].device) for n, t in scores.items()})


def triplet_groups(model: nn.Module, adapter: str) -> dict[str, list[tuple[str, nn.Module]]]:
    """The AdaLoRA triplet sets of ``model``: the name of the module whose P and Λ they are (the first of the modules
    sharing them, whose name ``named_parameters`` gives the shared tensors) -> the modules whose Q rows stack under
    them, in order: one module, or q_proj, k_proj, v_proj of a fused query_key_value."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        values = getattr(module, "lora_E", None)
        if isinstance(values, nn.ParameterDict) and adapter in values:
            groups.setdefault(owner.setdefault(id(values[adapter]), name), []).append((name, module))
    return groups


def untied_rank_pattern(model: nn.Module, adapter: str, pattern: dict[str, list[bool]]) -> dict[str, list[bool]]:
    """``pattern`` (keys ``<module>.lora_E[.<adapter>]``, on the modules owning a P and Λ) with the same entry for
    each module sharing them, as the untied saved adapter needs."""
    out = dict(pattern)
    for owner, members in triplet_groups(model, adapter).items():
        for suffix in (f".lora_E.{adapter}", ".lora_E"):
            if owner + suffix in pattern:
                for name, _ in members:
                    out.setdefault(name + suffix, pattern[owner + suffix])
    return out


class FusedRankAllocator(RankAllocator):
    """PEFT's ``RankAllocator`` for adapters whose P and Λ are shared by several modules (ChatGLM3's q, k, v on the
    fused query_key_value): each set is one triplet, its Q the modules' Q's stacked by rows. PEFT's own loops meet
    the shared tensors once (under the first module's name, so the budget counts P once) but would pair the other
    modules' Q's with a Λ they cannot find. For unshared adapters this is PEFT's allocation exactly."""

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig, adapter_name: str) -> None:
        super().__init__(model, peft_config, adapter_name)
        # Λ's parameter name -> the parameter names of the Q's stacked under it
        self.stacked_q = {f"{owner}.lora_E.{adapter_name}": [f"{name}.lora_B.{adapter_name}" for name, _ in members]
                          for owner, members in triplet_groups(model, adapter_name).items()}

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Λ's parameter name -> (r, 1): s(Λ_i) + mean_j s(P_ij) + mean over the stacked Q's rows of s(Q_ji)."""
        scores = {}
        for name_e, names_q in self.stacked_q.items():
            score_p = self._element_score(name_e.replace(".lora_E.", ".lora_A.")).mean(dim=1, keepdim=True)
            score_q = torch.cat([self._element_score(n) for n in names_q]).mean(dim=0).view(-1, 1)
            combined = self._combine_ipt(self._element_score(name_e), torch.cat([score_p, score_q], dim=1))
            scores[name_e] = combined.view(-1, 1)
        return scores

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        scores = self.triplet_scores()
        every = torch.cat([score.view(-1) for score in scores.values()])
        threshold = torch.kthvalue(every, k=self.init_bgt - budget)[0].item()
        params = dict(model.named_parameters())
        rank_pattern = {}
        with torch.no_grad():
            for name, score in scores.items():
                params[name].masked_fill_(score <= threshold, 0.0)
                rank_pattern[name] = (~(score <= threshold)).view(-1).tolist()
        return rank_pattern


def orth_regularizer(peft_model) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty, as ``AdaLoraModel.forward`` adds it to the loss: the mean over the adapted
    layers' P and Q of ||P·Pᵀ - I||_F and ||Qᵀ·Q - I||_F, times ``orth_reg_weight``; a fused query_key_value is one
    layer, its P once and its Q the three Q's stacked by rows."""
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    if config.orth_reg_weight == 0:
        return None
    terms = []
    for members in triplet_groups(peft_model.base_model.model, adapter).values():
        p = members[0][1].lora_A[adapter]
        if p.numel() == 0:  # a rank-0 module (PEFT skips ZeRO-3's empty partitions the same way)
            continue
        q = torch.cat([module.lora_B[adapter] for _, module in members])
        for cov in (p @ p.T, q.T @ q):
            terms.append(torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro"))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()


class AdaLoraAllocator(TrainerCallback):
    """Runs AdaLoRA's ``update_and_allocate`` after every optimizer step, while the gradients still exist.

    Without DeepSpeed that is the Trainer's ``on_optimizer_step``. Under DeepSpeed the engine steps (and clears the
    gradients) inside ``backward``, and ZeRO keeps gradients and fp32 weights partitioned, so the engine's ``step``
    is wrapped: gather the adapter's full gradients, step, allocate on full tensors, write the masked weights back to
    the fp32 master copy.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.wrapped = False

    def _peft(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model).peft_model

    def on_train_begin(self, args, state, control, **kwargs):
        # a DeepSpeed resume restores the weights from the engine's checkpoint without our load_weights: the rank
        # pattern and the importance averages come from the run folder it resumed from (train.py's "latest" is the
        # output folder's checkpoint of the restored step)
        resume = args.resume_from_checkpoint
        if self.trainer.is_deepspeed_enabled and resume is not None and state.global_step > 0:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" if resume == "latest" else Path(resume)
            restore_allocation(self._peft(), folder)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled and not self.wrapped:
            self._wrap_engine(self.trainer.model_wrapped)
            self.wrapped = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer.is_deepspeed_enabled:
            self._peft().base_model.update_and_allocate(state.global_step)

    def _wrap_engine(self, engine) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param

        if engine.zero_optimization_stage() == 3:
            raise ValueError("AdaLoRA's rank allocation needs full adapter weights each step; use ZeRO-0/1/2")
        params = [(n, p) for n, p in self._peft().named_parameters() if "lora_" in n and p.requires_grad]
        real_step = engine.step
        trainer = self.trainer

        def step(*a, **kw):
            boundary = engine.is_gradient_accumulation_boundary()
            grads = [safe_get_full_grad(p) for _, p in params] if boundary else None
            result = real_step(*a, **kw)
            if boundary:
                for (_, p), g in zip(params, grads, strict=True):
                    p.grad = g.to(p.dtype)  # DeepSpeed hands back fp32 gradients for bf16/fp16 weights
                self._peft().base_model.update_and_allocate(trainer.state.global_step)
                for _, p in params:
                    p.grad = None
                    safe_set_full_fp32_param(p, p.data.float())
            return result

        engine.step = step


register_method(AdaLoraMethod())
