"""The IMSM gates that interweave the frozen memory h_M with the tuned memory h_M'.

Paper: "Interweaving Memories of a Siamese Large Language Model", AAAI 2025, Eq. (3)-(5).

For a token t, with q_M and q_M' the means of each memory over the query (prompt) tokens, padding excluded:

    g_t     = sigmoid([q_M ; h_M_t ; h_M'_t ; q_M'] · W_A · W_B)      W_A: 4d × r, W_B: r × d, no bias
    mixed_t = g_t ∘ h_M_t + (1 − g_t) ∘ h_M'_t

In training, dropout acts on the output of each of the two linear maps, as in the published code
(github.com/ECNU-Text-Computing/IMSM, siamese_model.py: ``nn.Sequential(Linear, Dropout)`` for W_A and for W_B):

    g_t     = sigmoid(drop(drop(x_t · W_A) · W_B))                  x_t = [q_M ; h_M_t ; h_M'_t ; q_M']

so a dropped output unit leaves its gate at sigmoid(0) = 0.5, the equal mix. The paper does not say where the dropout
sits. The gate has one value per token and hidden unit and is computed in float32. Variants are chosen by name:

    query_aware  the paper's IMSM (default)                         5·d·r parameters
    token        no query term: sigmoid([h_M_t ; h_M'_t] W_A W_B)     3·d·r parameters
    equal        no gate: g = 0.5                                     no parameters
    none         vanilla PEFT: the tuned memory alone (g = 0)         no parameters
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_PARAM_PREFIX = "imsm_gate."


def query_mean(hidden: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, d) over the positions where ``query_mask`` (B, T) is 1.

    Other positions are zeroed (not multiplied by 0), so even a non-finite state at a padded position stays out.
    """
    keep = query_mask.bool().unsqueeze(-1)
    count = keep.sum(dim=1).clamp_min(1).to(hidden.dtype)
    return hidden.masked_fill(~keep, 0.0).sum(dim=1) / count


class Gate(nn.Module):
    """Base class: ``forward`` returns the gate g (float32, broadcastable to the memories); ``mix`` applies it."""

    uses_query = False

    def __init__(self, hidden_size: int, rank: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden_size, self.rank = hidden_size, rank

    @classmethod
    def parameter_shapes(cls, hidden_size: int, rank: int) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} of this gate's parameters, known without building it (run-folder validation)."""
        return {}

    def forward(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> torch.Tensor:
        raise NotImplementedError

    def mix(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mixed memory in the memories' dtype, gate in float32)."""
        g = self(h_frozen, h_tuned, q_frozen, q_tuned)
        mixed = g * h_frozen.float() + (1.0 - g) * h_tuned.float()
        return mixed.to(h_tuned.dtype), g


class LowRankGate(Gate):
    """sigmoid(drop(drop(x · W_A) · W_B)) for x the concatenation of ``n_inputs`` d-sized vectors: dropout on the
    output of each of the two layers, as the published code (its runs use 0.1; 0 for (IA)3)."""

    n_inputs = 2

    def __init__(self, hidden_size: int, rank: int = 8, dropout: float = 0.0) -> None:
        super().__init__(hidden_size, rank, dropout)
        self.dropout = nn.Dropout(dropout)
        self.w_a = nn.Linear(self.n_inputs * hidden_size, rank, bias=False, dtype=torch.float32)
        self.w_b = nn.Linear(rank, hidden_size, bias=False, dtype=torch.float32)
        self.reset_parameters()

    @classmethod
    def parameter_shapes(cls, hidden_size: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {"w_a.weight": (rank, cls.n_inputs * hidden_size), "w_b.weight": (hidden_size, rank)}

    def reset_parameters(self) -> None:
        """Kaiming-uniform W_A and zero W_B, as in LoRA: the gate starts at exactly 0.5 everywhere, so training
        begins from the equal mix and the gate learns where to lean."""
        nn.init.kaiming_uniform_(self.w_a.weight, a=5**0.5)
        nn.init.zeros_(self.w_b.weight)

    def features(self, h_frozen, h_tuned, q_frozen, q_tuned) -> list[torch.Tensor]:
        return [h_frozen, h_tuned]

    def forward(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> torch.Tensor:
        x = torch.cat([f.float() for f in self.features(h_frozen, h_tuned, q_frozen, q_tuned)], dim=-1)
        # float32 whatever the engine cast the weights to (DeepSpeed's bf16 casts every module parameter)
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.dropout(F.linear(x, self.w_a.weight.float()))
            return torch.sigmoid(self.dropout(F.linear(h, self.w_b.weight.float())))


class QueryAwareGate(LowRankGate):
    """The paper's gate: [q_M ; h_M_t ; h_M'_t ; q_M'] · W_A · W_B, the query means broadcast over tokens."""

    n_inputs = 4
    uses_query = True

    def features(self, h_frozen, h_tuned, q_frozen, q_tuned) -> list[torch.Tensor]:
        if q_frozen is None or q_tuned is None:
            raise ValueError("the query_aware gate needs the query means of both memories")
        q_m = q_frozen.unsqueeze(-2).expand_as(h_frozen)
        q_t = q_tuned.unsqueeze(-2).expand_as(h_tuned)
        return [q_m, h_frozen, h_tuned, q_t]


class TokenGate(LowRankGate):
    """Ablation without the query term: [h_M_t ; h_M'_t] · W_A · W_B."""

    n_inputs = 2


class ConstantGate(Gate):
    """A fixed gate value: 0.5 for the ``equal`` ablation, 0.0 for vanilla PEFT (the tuned memory alone)."""

    value = 0.5

    def forward(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> torch.Tensor:
        return torch.full((1,), self.value, dtype=torch.float32, device=h_tuned.device)


class EqualGate(ConstantGate):
    value = 0.5


class NoGate(ConstantGate):
    value = 0.0


GATES: dict[str, type[Gate]] = {
    "query_aware": QueryAwareGate,
    "token": TokenGate,
    "equal": EqualGate,
    "none": NoGate,
}


def build_gate(variant: str, hidden_size: int, rank: int = 8, dropout: float = 0.0) -> Gate:
    if variant not in GATES:
        raise ValueError(f"unknown gate variant {variant!r}; choose one of {sorted(GATES)}")
    return GATES[variant](hidden_size, rank=rank, dropout=dropout)
