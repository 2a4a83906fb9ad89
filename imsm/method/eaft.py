"""Entropy-adaptive fine-tuning (EAFT; Diao et al., 2026, arXiv:2601.02151): each answer token's cross-entropy is
weighted by the model's own normalised top-k entropy there, so confident tokens (low entropy: "confident conflicts"
when the label disagrees) move the model less.

    L = (1/N) Σ_t w_t · CE_t,   w_t = (H_k(t) / ln k)^α   (no gradient through w_t)
    H_k(t) = −Σ_{v ∈ top-k} π_v log π_v,   π = softmax of the k largest logits at t

H_k/ln k lies in [0, 1]: 1 when the k candidates are equally likely, 0 when one holds all the mass. Defaults k = 20,
α = 1 as in LLaMA-Factory's ``use_eaft_loss`` (which divides by 3.0 ≈ ln 20) and axolotl's ``use_eaft`` (which does
not normalise: its weights are ln 20 ≈ 3.0 times ours, the same as a learning rate 3× higher). The logits are the
model's output (for IMSM the gate's mix). Cost: one top-k over the vocabulary at the answer positions.
"""

from __future__ import annotations

import math

import torch


def eaft_weights(logits: torch.Tensor, alpha: float = 1.0, k: int = 20) -> torch.Tensor:
    """w_t = (H_k(t) / ln k)^α per row of ``logits`` (N, V), detached, float32."""
    k = min(k, logits.size(-1))
    with torch.no_grad():
        top = torch.topk(logits.detach().float(), k, dim=-1).values
        log_pi = torch.log_softmax(top, dim=-1)
        entropy = -(log_pi.exp() * log_pi).sum(dim=-1)
        return (entropy / math.log(k)).clamp_min(0.0).pow(alpha)
