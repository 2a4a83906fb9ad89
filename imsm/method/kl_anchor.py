"""The KL anchor: a token-level KL to the frozen model added to the loss (KL-anchored SFT).

    L = CE + β · (1/N) Σ_t KL(p_frozen,t ‖ p_θ,t),   KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)

over the N scored (answer) positions t, with p_frozen,t = softmax(lm_head(h_M[t])) from the frozen pass (adapter off)
and p_θ,t the distribution the trained model outputs there (for IMSM the gate's mix, for ``--gate none`` the tuned
pass). The sum over t is divided by the same count as the cross-entropy (the Trainer's answer tokens over the
accumulated batch), so β weighs one token's KL against one token's cross-entropy.

Direction: frozen ‖ tuned (forward KL, mass-covering), as in ASFT's "sft+kl"/"asft" modes (Zhu et al., 2025,
github.com/zhuchichi56/ASFT ``F.kl_div(log_softmax(policy), softmax(reference))``; LLaMA-Factory ``use_asft_loss``
computes the same term). It penalises the tuned model for taking probability away from tokens the frozen model
gave it, i.e. for forgetting what the frozen model would say, and it is the KL that ``evaluate.py --measures kl``
reports on general text (KL(untuned ‖ tuned)), so the anchor trains on the quantity the study measures. ASFT's
default β is 0.1. Cost: one frozen pass per batch (none after epoch 1 with ``--frozen_memory_cache``: the cache holds
h_M at exactly these positions) and one LM-head product N × d × V without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_to_frozen(frozen_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(frozen_logits) ‖ softmax(logits)) per row, (N,), in float32; gradient flows through ``logits``
    only."""
    log_p = F.log_softmax(frozen_logits.detach().float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
