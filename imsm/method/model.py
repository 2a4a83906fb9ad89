"""The siamese model: one backbone, two passes, one LM head.

    h_M   = decoder(x) with the PEFT adapter switched off, without gradient   (frozen memory)
    h_M'  = decoder(x) with the adapter on                                    (tuned memory)
    q_M, q_M' = means of h_M, h_M' over the query (prompt) tokens, padding excluded
    mixed = g ∘ h_M + (1 − g) ∘ h_M',   g = gate(q_M, h_M, h_M', q_M')
    logits = lm_head(mixed)

"decoder" is the backbone without its LM head, so a memory is the final hidden state after the final norm (the LM
head's input). Both passes run through the same module, so the base weights exist once in memory; the frozen pass
keeps neither logits nor per-layer states. With the ``none`` gate the frozen pass is skipped: that is vanilla PEFT on
the very same code path (unless the KL anchor needs the frozen distribution, below).

In training (``labels`` given) the gate, the mix and the LM head run only at the scored positions t (those whose next
token is an answer token); the query means still average over every query token. A ``frozen_cache`` (see
``imsm/training/frozen_cache.py``) supplies q_M and h_M at those positions for examples it holds, and the frozen pass
is then skipped; the frozen pass runs under a forked RNG, so whether it runs or not never shifts the random stream
that the adapter's and the gate's dropout draw from.

Two optional terms change the training loss, any method and any gate (``ImsmArguments``): the KL anchor
(``imsm/method/kl_anchor.py``, β · mean KL(p_frozen ‖ p_θ) at the scored positions, p_frozen = softmax(lm_head(h_M)),
so it runs the frozen pass, or reads the cache, also under ``--gate none``) and EAFT's entropy weights on each
token's cross-entropy (``imsm/method/eaft.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imsm.data import IGNORE_INDEX
from imsm.method.adapters import MethodSpec
from imsm.method.eaft import eaft_weights
from imsm.method.gate import GATE_PARAM_PREFIX, Gate, NoGate, query_mean
from imsm.method.kl_anchor import kl_to_frozen


def peft_frozen_tensors(peft_model: nn.Module) -> frozenset[str]:
    """Parameter names (as ``IMSMModel`` names them, ``peft_model.…``) of adapter tensors that PEFT keeps frozen in
    training: its layers' ``frozen_peft_weight_names`` (e.g. MiCA's ``lora_B``, fixed to minor singular vectors)."""
    names = set()
    for path, module in peft_model.named_modules():
        for adapter, layers in (getattr(module, "frozen_peft_weight_names", None) or {}).items():
            for layer in layers:
                names |= {f"peft_model.{path}.{layer}.{adapter}.{n}"
                          for n, _ in getattr(module, layer)[adapter].named_parameters()}
    return frozenset(names)


class IMSMModel(nn.Module):
    """``peft_model`` (the ``method``'s adapter around a causal LM) plus a gate, named ``imsm_gate`` so that its
    parameters are found by the prefix ``imsm_gate.``.

    ``initial_adapter_state``: PiSSA/CorDA's adapter as initialised (B0, A0), to save the run as a LoRA on the
    pretrained weights. ``frozen_cache`` (training): a ``FrozenMemoryCache`` (``imsm/training/frozen_cache.py``).
    ``kl_anchor`` (β, 0 = off) and ``eaft`` ((α, k), None = off): the optional loss terms of the module docstring."""

    # The loss is normalised by the Trainer's ``num_items_in_batch`` (answer tokens over the accumulated batch).
    accepts_loss_kwargs = True

    def __init__(self, peft_model: nn.Module, gate: Gate, method: MethodSpec,
                 initial_adapter_state: dict[str, torch.Tensor] | None = None, frozen_cache=None,
                 kl_anchor: float = 0.0, eaft: tuple[float, int] | None = None) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.imsm_gate = gate
        self.method = method
        self.initial_adapter_state = initial_adapter_state
        self.frozen_cache = frozen_cache
        self.kl_anchor = kl_anchor
        self.eaft = eaft
        self.peft_frozen = peft_frozen_tensors(peft_model)
        backbone = peft_model.get_base_model()
        self.decoder = getattr(backbone, backbone.base_model_prefix)
        self.lm_head = backbone.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(
                f"{type(backbone).__name__} returns no output embeddings (get_output_embeddings() is None), so IMSM "
                "cannot turn the mixed memory into logits; use a causal LM class whose LM head transformers exposes "
                "(ChatGLM3 checkpoints are converted to the native glm model for this: imsm/models/chatglm3.py)"
            )
        self.config = backbone.config

    # The decoder and LM head are registered submodules of the backbone already; keep them out of this module's
    # own registry so state_dict names stay unique ("peft_model.…" and "imsm_gate.…" only).
    def __setattr__(self, name, value):
        if name in ("decoder", "lm_head"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def uses_frozen_memory(self) -> bool:
        return not isinstance(self.imsm_gate, NoGate)

    @property
    def runs_frozen_pass(self) -> bool:
        """In training: the mixing gates need h_M, and so does the KL anchor under any gate."""
        return self.uses_frozen_memory or self.kl_anchor > 0

    @property
    def logged_terms(self) -> tuple[str, ...]:
        """The loss terms of its own that ``forward`` returns for logging (the method's are ``logged_losses``)."""
        return ("kl_anchor",) if self.kl_anchor > 0 else ()

    def adapter_prefix(self) -> str:
        return self.peft_model.base_model.prefix

    def is_trainable_name(self, name: str) -> bool:
        """Adapter and gate parameters, found by name: the gate by its prefix, the adapter by its method's tensor
        prefix (``lora_``, ``ia3_``, ``vera_lambda_``, ``loramoe_``, ``osf_``), less the adapter tensors PEFT itself
        declares frozen (MiCA's B: ``peft_frozen_tensors``). The one rule behind freezing, counting, the optimizer's
        groups and saving (``trainable_parameters``, ``saved_state``)."""
        return name.startswith(GATE_PARAM_PREFIX) or (self.adapter_prefix() in name and name not in self.peft_frozen)

    def trainable_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """{"adapter": [(name, p)], "gate": [(name, p)]}: the parameters training updates (``is_trainable_name``)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"adapter": [], "gate": []}
        for name, p in self.named_parameters():
            if self.is_trainable_name(name):
                groups["gate" if name.startswith(GATE_PARAM_PREFIX) else "adapter"].append((name, p))
        return groups

    def saved_state(self) -> list[tuple[str, torch.Tensor]]:
        """What a run folder holds, by this module's names: the trainable parameters plus the adapter's fixed state
        (parameters or buffers) that its method declares saved (``MethodSpec.saves_state``, e.g. VeRA's shared
        projections) or that PEFT declares frozen (``peft_frozen``: MiCA's B)."""
        trainable = {n for group in self.trainable_parameters().values() for n, _ in group}
        adapter = "peft_model."
        extra = [(n, t) for n, t in [*self.named_parameters(), *self.named_buffers(remove_duplicate=False)]
                 if n not in trainable and n.startswith(adapter)
                 and (self.method.saves_state(n[len(adapter):]) or n in self.peft_frozen)]
        return [(n, p) for n, p in self.named_parameters() if n in trainable] + extra

    def memory(self, adapter: bool, **decoder_kwargs):
        """One pass of the decoder; ``adapter=False`` gives the frozen memory (no gradient)."""
        if adapter:
            return self.decoder(**decoder_kwargs)
        device = decoder_kwargs["input_ids"].device
        accel = [device] if device.type != "cpu" else []
        with torch.no_grad(), self.peft_model.disable_adapter(), torch.random.fork_rng(accel, device_type=device.type):
            return self.decoder(**decoder_kwargs)

    def mix(self, h_frozen, h_tuned, q_frozen=None, q_tuned=None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.uses_frozen_memory:
            return h_tuned, torch.zeros((), device=h_tuned.device)
        return self.imsm_gate.mix(h_frozen, h_tuned, q_frozen, q_tuned)

    def hidden_states(self, input_ids, attention_mask, query_mask, h_frozen=None):
        """(frozen memory or None, tuned memory, mixed memory, gate) for a right- or left-padded batch.

        ``h_frozen``: this very batch's frozen memory, computed before (evaluation's ``FrozenMemo``): the frozen pass
        is then skipped."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        h_tuned = self.memory(True, **kwargs).last_hidden_state
        q_frozen = q_tuned = None
        if not self.uses_frozen_memory:
            h_frozen = None
        else:
            if h_frozen is None:
                h_frozen = self.memory(False, **kwargs).last_hidden_state
            if self.imsm_gate.uses_query:
                q_frozen, q_tuned = query_mean(h_frozen, query_mask), query_mean(h_tuned, query_mask)
        mixed, gate = self.mix(h_frozen, h_tuned, q_frozen, q_tuned)
        return h_frozen, h_tuned, mixed, gate

    def forward(self, input_ids, attention_mask, query_mask, labels=None, num_items_in_batch=None,
                example_index=None, task_types=None, **kwargs):
        """Loss on the answer tokens (labels != -100), next-token shifted; gate, mix and logits only where a label is.

        Returns a dict with ``loss`` (summed cross-entropy / ``num_items_in_batch``, or the mean when not given) and
        ``gate_mean``, the mean gate value over the answer tokens (the share of the frozen memory).
        ``example_index`` (B,) keys the frozen-memory cache in training; ``task_types`` (B,), the sample types, feed
        LoRAMoE's balancing constraint.
        """
        out = {}
        if labels is None:
            _, _, mixed, _ = self.hidden_states(input_ids, attention_mask, query_mask)
            out["logits"] = self.lm_head(mixed)
            return out
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        mixed, gate, h_frozen = self.scored_memory(input_ids, attention_mask, query_mask, selected, example_index)
        logits = self.lm_head(mixed).float()
        token_loss = F.cross_entropy(logits, targets[selected], reduction="none")
        if self.eaft is not None:
            token_loss = token_loss * eaft_weights(logits, *self.eaft)
        denom = num_items_in_batch if num_items_in_batch is not None else selected.sum().clamp_min(1)
        loss = token_loss.sum() / denom
        if self.kl_anchor > 0:
            with torch.no_grad():
                frozen_logits = self.lm_head(h_frozen)
            kl = kl_to_frozen(frozen_logits, logits)
            loss = loss + self.kl_anchor * kl.sum() / denom
            out["kl_anchor"] = kl.detach().mean() if kl.numel() else kl.new_zeros(())
        extra = self.method.extra_loss(self.peft_model, attention_mask, self.training, task_types)
        if extra is not None:
            loss = loss + (extra.value * (selected.sum() / denom) if extra.per_answer_token else extra.value)
            if extra.log_as is not None:
                out[extra.log_as] = extra.value
        out["loss"] = loss
        with torch.no_grad():
            out["gate_mean"] = gate.float().mean()  # over the answer tokens (and hidden units)
        return out

    def scored_memory(self, input_ids, attention_mask, query_mask, selected, example_index=None):
        """(mixed memory (N, d), gate, frozen memory (N, d) or None) at the N scored positions ``selected`` (B, T-1),
        in row-major order; the frozen memory is None when neither the gate nor the KL anchor needs it.

        Each selected state is a row (N, 1, d) and its example's query means (N, d) ride along, so the gates'
        broadcasting applies unchanged to one position per row.
        """
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        h_tuned_all = self.memory(True, **kwargs).last_hidden_state
        h_tuned = h_tuned_all[:, :-1][selected]
        if not self.runs_frozen_pass:
            return *self.mix(None, h_tuned), None
        cache = self.frozen_cache if self.training and example_index is not None else None
        cached = cache.lookup(example_index, attention_mask, selected) if cache is not None else None
        if cached is None:
            h_frozen_all = self.memory(False, **kwargs).last_hidden_state
            q_frozen, h_frozen = query_mean(h_frozen_all, query_mask), h_frozen_all[:, :-1][selected]
            if cache is not None:
                cache.store(example_index, attention_mask, selected, q_frozen, h_frozen)
        else:
            q_frozen, h_frozen = cached
        if not self.uses_frozen_memory:
            return *self.mix(None, h_tuned), h_frozen
        rows = selected.nonzero()[:, 0]
        q_tuned = query_mean(h_tuned_all, query_mask)[rows] if self.imsm_gate.uses_query else None
        q_frozen = q_frozen[rows] if self.imsm_gate.uses_query else None
        mixed, gate = self.mix(h_frozen.unsqueeze(1), h_tuned.unsqueeze(1), q_frozen, q_tuned)
        return mixed.squeeze(1), gate, h_frozen

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint the backbone's layers (the Trainer calls this for ``--gradient_checkpointing``).

        Non-reentrant by default: the frozen embedding produces no grad, and the reentrant variant would then drop the
        adapter's gradients unless inputs were forced to require grad.
        """
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.peft_model.get_base_model().activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load adapter and gate values; frozen backbone weights may be absent (they come from the pretrained model).

        DeepSpeed checkpoints are written without frozen parameters, and DeepSpeed reloads them with ``strict``; this
        keeps the strict check for every trainable parameter and for unexpected keys.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            missing = sorted(set(result.missing_keys) & trainable)
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"state dict mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
                )
        return result

