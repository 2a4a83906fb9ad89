"""LoRAMoE (Dou et al., 2024, "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style
Plugin"): several LoRA experts on the feed-forward projections, mixed per token by a softmax router, trained with a
localized balancing constraint. Checked against the authors' public code (github.com/Ablustrund/LoRAMoE,
``peft/tuners/lora.py``, ``Linear.forward``); ``tests/test_loramoe.py`` restates that forward and compares.

For a frozen linear layer W0 (d_out × d_in) with experts i = 1..E (A_i r × d_in, B_i d_out × r) and a router
W_g (E × d_in):

    w(x) = softmax(W_g x)                                       per token, computed in float32
    y    = W0 x + (alpha / r) · Σ_i w_i(x) · B_i A_i dropout_i(x)

with an independent dropout mask per expert (the public code calls its dropout once per expert). The experts are
stored stacked: ``loramoe_A`` holds A_1..A_E as one (E·r) × d_in matrix and ``loramoe_B`` holds B_1..B_E side by
side as one d_out × (E·r) matrix, so Σ_i w_i B_i A_i x = B · (w ⊗ 1_r ∘ A x) is one pair of matmuls and the (tokens,
E, d_out) expert outputs are never materialised. In training with dropout the E dropped copies of x (the memory the
public code's E dropout calls also keep) go through ``loramoe_A`` and the block diagonal (A_i on copy i) is kept:
E times the flops of the small A matmul, but every weight stays inside its own module's call, which ZeRO-3 needs to
gather it. B starts at zero (the model starts as the base model), A and the router with PyTorch's default Linear init
(Kaiming-uniform, as the public code).

Localized balancing constraint, for one LoRAMoE layer and a micro-batch of N samples. The experts are split into two
groups: the first ``knowledge_experts`` (default half) form the world-knowledge group, the rest the task group. Each
sample has a type m_j (``imsm/data.py``: 1 = world knowledge, 0 = downstream task). As in the public code:

    Q_{j,n} = Σ_t w_n(x_{j,t})                 importance of expert n for sample j (N × E), over its tokens t
    I_{j,n} = 1 + δ  if expert n's group matches m_j (knowledge group and type 1, or task group and type 0)
              1 − δ  otherwise
    Z = I ∘ Q,     L_lbc = β · Var(Z) / (Mean(Z)² + 1e-10)     over all N·E entries of Z; Var with Bessel's
                                                                correction, as the public code's torch.var

summed over all LoRAMoE layers and added to the language-model loss. The constraint favours, for each sample, the
group matching its type: a type-0 sample's router weight on the task group counts 1 + δ and on the knowledge group
1 − δ, so a run whose samples are all type 0 pushes the knowledge group's importance up relative to the task
group's (toward Q_knowledge / Q_task = (1 + δ)/(1 − δ) once balanced), and only type-1 samples reverse that.

One choice is ours: Q sums over the sample's real tokens, leaving padding out. The public code sums every position
of the padded micro-batch; its launcher trains with one sample per device and step, where there is no padding and
the two agree; with several samples ours does not depend on how long the other samples of the micro-batch are.
The public code casts the router weights to the model dtype before summing; here they stay float32.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from imsm.atomic import atomic_write_json

LORAMOE_PREFIX = "loramoe_"
LORAMOE_CONFIG = "loramoe_config.json"
LORAMOE_WEIGHTS = "loramoe_model.safetensors"
WORLD_KNOWLEDGE = 1  # the sample type of world-knowledge data; every other sample is type 0, downstream task


@dataclass
class LoRAMoEConfig:
    """LoRAMoE hyperparameters. The defaults are the authors' public launcher's (Ablustrund/LoRAMoE ``run_loramoe.sh``,
    whose variable names are given per field); their paper's own values could not be read from here."""

    target_modules: list[str]
    num_experts: int = 8  # run_loramoe.sh: lora_nums=8
    r: int = 4  # run_loramoe.sh: lora_rank=4
    alpha: float = 32.0  # run_loramoe.sh: lora_alpha=32
    dropout: float = 0.05  # run_loramoe.sh: lora_dropout=0.05
    knowledge_experts: int | None = None  # experts in the world-knowledge group; None: half, as the public code
    balance_weight: float = 0.0  # β; run_loramoe.sh: blc_weight=0.0 (the constraint off)
    balance_delta: float = 0.0  # δ; run_loramoe.sh: blc_alpha=0.0
    peft_type: str = field(default="LORAMOE")

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"--loramoe_num_experts must be at least 1, got {self.num_experts}")
        if self.r < 1:
            raise ValueError(f"--loramoe_r must be at least 1, got {self.r}")
        if self.knowledge_experts is None:
            self.knowledge_experts = self.num_experts // 2
        if not 0 <= self.knowledge_experts <= self.num_experts:
            raise ValueError(f"--loramoe_knowledge_experts must be in [0, {self.num_experts}] "
                             f"(the number of experts), got {self.knowledge_experts}")
        if self.balance_weight < 0:
            raise ValueError("--loramoe_balance_weight must be non-negative")
        if not 0 <= self.balance_delta < 1:
            raise ValueError("--loramoe_balance_delta must be in [0, 1) so every coefficient 1 ± δ stays positive")
        if not 0 <= self.dropout < 1:
            raise ValueError("--loramoe_dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("LoRAMoE needs at least one target module")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def coefficients(self, task_types: torch.Tensor) -> torch.Tensor:
        """I (N × E) for samples of the given types (N,): 1 + δ where the expert's group matches the type."""
        knowledge_group = torch.arange(self.num_experts, device=task_types.device) < self.knowledge_experts
        matches = knowledge_group[None, :] == (task_types[:, None] == WORLD_KNOWLEDGE)
        return torch.where(matches, 1.0 + self.balance_delta, 1.0 - self.balance_delta)


class LoRAMoELinear(nn.Module):
    """A frozen ``nn.Linear`` plus E LoRA experts and their router (see the module docstring for the formula)."""

    def __init__(self, base_layer: nn.Linear, config: LoRAMoEConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts, self.r, self.scaling = config.num_experts, config.r, config.scaling
        weight = base_layer.weight
        kw = {"bias": False, "dtype": weight.dtype, "device": weight.device}
        self.loramoe_router = nn.Linear(base_layer.in_features, config.num_experts, **kw)
        self.loramoe_A = nn.Linear(base_layer.in_features, config.num_experts * config.r, **kw)
        self.loramoe_B = nn.Linear(config.num_experts * config.r, base_layer.out_features, **kw)
        nn.init.zeros_(self.loramoe_B.weight)  # the experts add nothing before training
        self.loramoe_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.disabled = False
        self.router_weights: torch.Tensor | None = None  # (..., E) of the last training forward, for the loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        weights = torch.softmax(self.loramoe_router(x).float(), dim=-1)
        if self.training:
            # kept even without a graph (reentrant checkpointing), so the loss can refuse it instead of being zero
            self.router_weights = weights
        a = self.expert_inputs(x)  # (..., E, r): A_i dropout_i(x)
        gated = a * weights.to(a.dtype).unsqueeze(-1)
        return result + self.loramoe_B(gated.flatten(-2)) * self.scaling

    def expert_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A_i dropout_i(x) for every expert i, (..., E, r), with one dropout mask per expert."""
        if self.loramoe_dropout is None or not self.training:
            return self.loramoe_A(x).unflatten(-1, (self.num_experts, self.r))
        copies = self.loramoe_dropout(x.unsqueeze(-2).expand(*x.shape[:-1], self.num_experts, x.shape[-1]))
        every = self.loramoe_A(copies).unflatten(-1, (self.num_experts, self.r))  # (..., copy, expert, r)
        return every.diagonal(dim1=-3, dim2=-2).transpose(-1, -2)  # expert i on copy i


def balancing_loss(router_weights: list[torch.Tensor], attention_mask: torch.Tensor, task_types: torch.Tensor,
                   config: LoRAMoEConfig) -> torch.Tensor:
    """β · Σ_layers Var(Z)/(Mean(Z)² + 1e-10), Z = I ∘ Q with a row per sample (module docstring).

    ``router_weights``: one (N, T, E) tensor per layer; ``attention_mask`` (N, T): 1 on real tokens;
    ``task_types`` (N,): 1 for world-knowledge samples, 0 for task samples."""
    total = torch.zeros((), device=attention_mask.device)
    if config.balance_weight == 0:
        return total
    coefficients = config.coefficients(task_types.to(attention_mask.device))
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    for weights in router_weights:
        z = ((weights * mask).sum(dim=1) * coefficients).flatten()
        if z.numel() > 1:  # one entry has no variance (the public code's cv_squared returns 0 there too)
            total = total + z.var() / (z.mean() ** 2 + 1e-10)
    return config.balance_weight * total


class LoRAMoEModel(nn.Module):
    """A causal LM whose target linear layers became ``LoRAMoELinear``; behaves like a ``PeftModel`` for what IMSM
    uses: ``get_base_model``, ``disable_adapter``, ``base_model.prefix``, ``save_pretrained``, ``from_pretrained``.

    Parameter names keep the backbone's paths (``model.model.layers.0.mlp.down_proj.loramoe_A.weight``); the
    trainable ones are exactly those containing ``loramoe_``.
    """

    prefix = LORAMOE_PREFIX

    def __init__(self, backbone: nn.Module, config: LoRAMoEConfig) -> None:
        super().__init__()
        self.model = backbone
        self.loramoe_config = config
        targets = set(config.target_modules)
        found = [(name, module) for name, module in backbone.named_modules()
                 if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)]
        if not found:
            raise ValueError(f"LoRAMoE target modules {sorted(targets)} match no linear layer of the model")
        for name, module in found:
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            setattr(parent, child, LoRAMoELinear(module, config))
        for name, p in self.named_parameters():
            p.requires_grad_(LORAMOE_PREFIX in name)

    @property
    def base_model(self) -> LoRAMoEModel:
        # PeftModel.base_model is the tuner, which carries the parameter-name prefix IMSMModel selects by.
        return self

    def get_base_model(self) -> nn.Module:
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def loramoe_layers(self) -> list[LoRAMoELinear]:
        return [m for m in self.model.modules() if isinstance(m, LoRAMoELinear)]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The base model: every expert and router switched off (IMSM's frozen memory)."""
        layers = self.loramoe_layers()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def balancing_loss(self, attention_mask: torch.Tensor, task_types: torch.Tensor | None = None) -> torch.Tensor:
        """The localized balancing constraint of the last training forward (0 when none ran); clears what it used.

        ``task_types`` (N,): each sample's type, 1 world knowledge, 0 task; None: every sample is a task sample.
        Refuses router weights recorded without a graph while gradients are wanted: reentrant activation
        checkpointing runs the layers' forward without one, and the constraint would silently train nothing."""
        weights = []
        for layer in self.loramoe_layers():
            if layer.router_weights is not None:
                weights.append(layer.router_weights)
                layer.router_weights = None
        if (self.loramoe_config.balance_weight > 0 and torch.is_grad_enabled()
                and any(not w.requires_grad for w in weights)):
            raise RuntimeError("LoRAMoE's balancing constraint got router weights without gradients: the layers ran "
                               "without autograd (reentrant activation checkpointing?), so the constraint would "
                               "train nothing; use non-reentrant checkpointing (the default, use_reentrant=False)")
        if task_types is None:
            task_types = torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
        return balancing_loss(weights, attention_mask, task_types, self.loramoe_config)

    # ---- files --------------------------------------------------------------------------------------------------
    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The experts and routers, by their names in this module (from ``state_dict`` when given, e.g. gathered)."""
        state = state_dict if state_dict is not None else {n: p for n, p in self.named_parameters()}
        return {n: t.detach().cpu().contiguous().clone() for n, t in state.items() if LORAMOE_PREFIX in n}

    def save_pretrained(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None,
                        safe_serialization: bool = True) -> None:
        if not safe_serialization:
            raise ValueError("LoRAMoE weights are saved as safetensors only")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(state_dict), str(out / LORAMOE_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(out / LORAMOE_CONFIG, asdict(self.loramoe_config))

    def load_adapter_weights(self, path: str | Path) -> None:
        """Copy saved experts and routers in; every one must be present with its shape."""
        saved = load_file(str(path))
        expected = dict(self.named_parameters())
        wanted = {n for n in expected if LORAMOE_PREFIX in n}
        if set(saved) != wanted:
            missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
            raise ValueError(f"{path}: LoRAMoE tensors do not match the model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}); wrong base model or expert settings?")
        with torch.no_grad():
            for name, tensor in saved.items():
                if tensor.shape != expected[name].shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model needs "
                                     f"{tuple(expected[name].shape)}")
                expected[name].copy_(tensor)

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, run_dir: str | Path) -> LoRAMoEModel:
        run_dir = Path(run_dir)
        config = read_loramoe_config(run_dir)
        model = cls(backbone, config)
        model.load_adapter_weights(run_dir / LORAMOE_WEIGHTS)
        return model


def read_loramoe_config(run_dir: Path) -> LoRAMoEConfig:
    try:
        raw = json.loads((run_dir / LORAMOE_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir / LORAMOE_CONFIG}: not valid JSON ({e.msg})") from None
    return LoRAMoEConfig(**raw)

