"""IMSM inside EleutherAI's lm-evaluation-harness: the untuned base model, vanilla PEFT and IMSM runs through one
``lm_eval`` model class, registered under the name ``imsm``.

    lm-eval-imsm run --model imsm --model_args run=runs/imsm_lora_gsm8k --tasks mmlu,arc_easy,hellaswag
    accelerate launch .venv/bin/lm-eval-imsm run --model imsm --model_args run=runs/imsm_lora_gsm8k --tasks mmlu

``lm-eval-imsm`` (installed by ``scripts/setup.sh``) is the harness's own command line with this class registered
first: lm-eval 0.4.13 looks ``--model`` up in its in-process registry only and discovers no external package, so
the class has to be imported before the command line resolves the name (its documented ``register_model`` route).
From Python: ``import imsm.evaluation.harness`` and then ``lm_eval.simple_evaluate(model="imsm", ...)``.

Each request type maps onto the project's own code path, the one evaluate.py and training use:

* ``loglikelihood(context, continuation)``: the token ids go to ``scoring.score_continuations``, whose context
  is the query: q_M and q_M' are the memory means over the context positions, exactly as training's ``query_mask``
  covers the prompt. Returns (sum of log-probs, every token greedy).
* ``loglikelihood_rolling(text)``: the harness's disjoint windows (``get_rolling_token_windows``, one prefix token),
  each scored as ``(window context, window tokens)`` through the same ``score_continuations``. The query of a window
  is its conditioning prefix only — the BOS/prefix token for the first window, the already-scored tokens it
  conditions on for the next ones — never a token it scores, so no prediction depends on a later token (the model
  is causal and the query mean covers earlier positions only). Training never sees a query this short (its query is
  a whole prompt), so rolling perplexities measure the mixed model in an unfamiliar gate regime; for the untuned and
  vanilla models the query plays no part and this is the ordinary perplexity.
* ``generate_until(context, gen_kwargs)``: ``generation.generate`` (the batched KV-cache decoder) with the
  harness's ``until`` as stop strings, ``max_gen_toks`` as ``max_new_tokens``, greedy unless ``do_sample`` (then
  ``temperature``, ``top_p`` and the model argument ``seed``). The text is the decoder's: special tokens dropped,
  cut before the first stop string, stripped — what evaluate.py scores.

Prompt templates. A run records the template it was trained with; by default the context the harness builds (few-shot
examples included) is encoded the way training encoded a prompt (``imsm.data.encode_prompt``): ``raw`` as it is,
``chat`` as the user turn of the tokenizer's chat template (with the run's system prompt), the continuation then
being the assistant turn. With the harness's ``--apply_chat_template`` the harness renders the conversation itself
through ``apply_chat_template`` (the tokenizer's template, the run's system prompt unless the request has one) and
the rendered text is used as it is, not wrapped a second time.

Several processes (``accelerate launch`` or ``torchrun``): the harness gives each rank a strided share of every task's
documents (as evaluate.py's ``shard`` does) and gathers the results on rank 0; this class joins the launcher's
process group as evaluate.py does, supplies the rank, the world size and the collectives, and puts the model on the
rank's GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from imsm.data import Truncation, encode_prompt, truncate_prompt
from imsm.evaluation.arguments import DTYPES
from imsm.evaluation.decoding.generation import DecodingConfig, generate
from imsm.evaluation.decoding.scoring import score_continuations
from imsm.loader import load_backbone, load_run
from imsm.run_folder import RunConfig, resolve_for_evaluation
from imsm.templates import TEMPLATES, build_template

logger = logging.getLogger(__name__)

DECODING_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}
PROGRESS_BATCHES = 8  # batches per progress-bar update


@dataclass
class HarnessArguments:
    """The ``--model_args`` of ``--model imsm`` (comma-separated ``key=value``)."""

    run: str | None = field(default=None, metadata={
        "help": "A run folder (train.py's output folder, its final/ or a checkpoint); none: the untuned base model."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model; default: the run's recorded base_model (the embedded SmolLM2 when untuned)."})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, else float32) or a dtype name."})
    batch_size: int = field(default=16, metadata={"help": "Sequences scored or decoded together per process."})
    prompt_template: str | None = field(default=None, metadata={
        "help": f"One of {sorted(TEMPLATES)}; default: the run's recorded template (untuned: raw)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System turn of the chat template; default: the run's recorded one."})
    max_input_length: int = field(default=1024, metadata={"help": "Context tokens kept (cut from the left)."})
    max_length: int | None = field(default=None, metadata={
        "help": "Window of loglikelihood_rolling; default: the model's max_position_embeddings (at most 4096)."})
    max_gen_toks: int = field(default=256, metadata={"help": "New tokens when a task does not say."})
    seed: int = field(default=0, metadata={"help": "Seed of sampled generation."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:N; default: cuda when present."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, eager, flash_attention_2."})
    trust_remote_code: bool = False
    max_batch_size: int | None = None  # passed by the harness for its automatic batch size; unused

    def __post_init__(self) -> None:
        if self.batch_size == "auto" or isinstance(self.batch_size, str) and self.batch_size.startswith("auto"):
            raise ValueError("--model imsm: batch_size=auto is not supported; give a number (e.g. --batch_size 16)")
        self.batch_size = int(self.batch_size)
        if self.batch_size < 1 or self.max_input_length < 1 or self.max_gen_toks < 1:
            raise ValueError("--model imsm: batch_size, max_input_length and max_gen_toks must be at least 1")
        if self.prompt_template is not None and self.prompt_template not in TEMPLATES:
            raise ValueError(f"--model imsm: prompt_template {self.prompt_template!r}; "
                             f"choose one of {sorted(TEMPLATES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--model imsm: dtype {self.dtype!r}; choose auto or one of {sorted(DTYPES)}")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> HarnessArguments:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"--model imsm: unknown model_args {unknown}; known: {sorted(names)}")
        return cls(**kwargs)


def rolling_windows(token_ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The harness's disjoint rolling windows as ``(context, scored tokens)``: every token scored exactly once, each
    window conditioned on (and querying) only tokens before the ones it scores."""
    windows = get_rolling_token_windows(token_list=list(token_ids), prefix_token=prefix_id, max_seq_len=max_length,
                                        context_len=1)
    return [make_disjoint_window(w) for w in windows]


def distributed_setup(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under a launcher (``accelerate launch``, ``torchrun``: WORLD_SIZE > 1) join its
    process group, as evaluate.py does (NCCL on GPUs, gloo on CPUs), one GPU per local rank; else one process on
    ``device`` (default: cuda when present)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if chosen.type == "cuda" and not torch.cuda.is_available():  # the harness's CLI asks cuda:0 by default
            logger.warning("device %s requested but CUDA is not available; using the CPU", device)
            chosen = torch.device("cpu")
        return 0, 1, chosen
    import torch.distributed as dist

    chosen = torch.device("cpu")
    if torch.cuda.is_available():
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), chosen


@register_model("imsm")
class IMSMLM(TemplateLM):
    """An untuned base model, a vanilla PEFT run (gate ``none``) or an IMSM run, as an lm-eval model."""

    def __init__(self, **model_args) -> None:
        super().__init__()
        args = HarnessArguments.from_kwargs(model_args)
        self.args = args
        self._rank, self._world_size, self._device = distributed_setup(args.device)
        dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
        self.run_config: RunConfig | None = None  # None: the untuned base model
        if args.run is not None:
            run = resolve_for_evaluation(args.run)  # no interrupted save, no final/ older than the last checkpoint
            model, tokenizer, self.run_config = load_run(run, args.model_name_or_path, dtype,
                                                         args.attn_implementation, args.trust_remote_code)
            self.base_model = self.run_config.base_model
        else:
            model, tokenizer, self.base_model = load_backbone(args.model_name_or_path, dtype, args.attn_implementation,
                                                              args.trust_remote_code)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        recorded_template = self.run_config.prompt_template if self.run_config else "raw"
        self.template_name = args.prompt_template or recorded_template
        if self.run_config and args.prompt_template and args.prompt_template != recorded_template:
            logger.warning("prompt_template=%s overrides the run's recorded %s", args.prompt_template,
                           recorded_template)
        self.system_prompt = args.system_prompt or (self.run_config.system_prompt if self.run_config else None)
        self.template = build_template(self.template_name, tokenizer, self.system_prompt)
        self.harness_renders_chat = False  # set once the harness calls apply_chat_template
        self.truncation = self._new_truncation()
        self._max_length = args.max_length or min(getattr(model.config, "max_position_embeddings", 2048), 4096)
        logger.info("imsm lm-eval model: %s (gate %s, template %s) on %s, rank %d of %d",
                    args.run or self.base_model, self.run_config and self.run_config.gate, self.template_name,
                    self._device, self._rank, self._world_size)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> IMSMLM:
        """``model_args`` first, then the harness's own ``--batch_size`` / ``--device`` where model_args lack them."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> IMSMLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------------------------------ harness plumbing

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) conditions on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated in rank order (a 0-dim tensor becomes one entry per rank)."""
        if self._world_size <= 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat([p.reshape(1) if p.dim() == 0 else p for p in parts])

    def gather_object(self, obj, dst=0):
        if self._world_size <= 1:
            return [obj]
        result = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer, its chat template and the system prompt (the harness keys caches of
        rendered conversations by it)."""
        name = str(getattr(self.tokenizer, "name_or_path", "") or "tokenizer").replace("/", "__")
        digest = hashlib.sha256(f"{self.tokenizer.chat_template}\n{self.system_prompt}".encode()).hexdigest()[:12]
        return f"{name}__{digest}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The harness renders the conversation: the tokenizer's template, the run's system prompt unless the
        conversation brings one. The rendered text is then encoded as it is (no second wrapping)."""
        if not self.harness_renders_chat:
            logger.info("the harness applies the chat template; contexts are not wrapped again")
            self.harness_renders_chat = True
        if self.system_prompt and not any(m["role"] == "system" for m in chat_history):
            chat_history = [{"role": "system", "content": self.system_prompt}, *chat_history]
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        config = self.run_config
        info = {"base_model": self.base_model, "peft": config and config.peft, "gate": config and config.gate}
        return info | {"run": self.args.run, "prompt_template": self.template_name,
                       "model_dtype": str(next(self.model.parameters()).dtype)}

    # ------------------------------------------------------------------------------------------ encoding

    @property
    def wraps_in_chat(self) -> bool:
        """The context becomes the user turn of the chat template, as in training with ``--prompt_template chat``."""
        return self.template_name == "chat" and not self.harness_renders_chat

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids as training's raw template encodes a prompt (special tokens added), unless the text already
        starts with BOS (a rendered chat template)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_context(self, context: str) -> list[int]:
        """The query ids of a harness context: ``encode_prompt`` of the run's template (the context cut from its left
        to ``max_input_length``, the template's frame kept); a context the harness rendered itself is cut from the
        left, BOS kept."""
        if self.wraps_in_chat:
            return encode_prompt(self.template, context, self.args.max_input_length, self.truncation)
        return self._truncate(self.tok_encode(context))

    def _new_truncation(self) -> Truncation:
        return Truncation(f"lm-eval --model imsm (model_args max_input_length={self.args.max_input_length})")

    def _truncate(self, ids: list[int]) -> list[int]:
        """``truncate_prompt``, counted: contexts longer than max_input_length are cut from the left, and
        ``_warn_truncation`` says how many once per request type."""
        self.truncation.examples += 1
        if len(ids) > self.args.max_input_length:
            self.truncation.prompts += 1
            self.truncation.prompt_tokens += len(ids) - self.args.max_input_length
        return truncate_prompt(ids, self.args.max_input_length, self.tokenizer.bos_token_id)

    def _warn_truncation(self) -> None:
        self.truncation.warn()
        self.truncation = self._new_truncation()

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.wraps_in_chat:  # the continuation is the assistant turn, stripped as training strips an answer
            return self.encode_context(context), self.tok_encode(continuation.lstrip(), add_special_tokens=False)
        context_ids, continuation_ids = super()._encode_pair(context, continuation)
        return self._truncate(context_ids), continuation_ids

    # ------------------------------------------------------------------------------------------ requests

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool = False):
        """``score_continuations`` over the pairs, longest first, in chunks of a few batches for a progress bar."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores = [None] * len(pairs)
        step = self.args.batch_size * PROGRESS_BATCHES
        with tqdm(total=len(pairs), desc=desc, disable=disable_tqdm or self._rank != 0) as bar:
            for start in range(0, len(order), step):
                chunk = order[start : start + step]
                chunk_scores = score_continuations(self.model, [pairs[i] for i in chunk], self.args.batch_size,
                                                   self.pad_id)
                for i, score in zip(chunk, chunk_scores, strict=True):
                    scores[i] = score
                bar.update(len(chunk))
        return scores

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self._score([(context, continuation) for _, context, continuation in requests], "loglikelihood",
                             disable_tqdm)
        results = []
        for (key, _, _), score in zip(requests, scores, strict=True):
            result = (score.logprob_sum, score.is_greedy)
            self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        self._log_gate("loglikelihood", scores)
        self._warn_truncation()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in rolling_windows(self.tok_encode(text, add_special_tokens=False), self.prefix_token_id,
                                          self.max_length):
                pairs.append(window)
                owners.append(i)
        totals = [0.0] * len(requests)
        scores = self._score(pairs, "loglikelihood_rolling", disable_tqdm)
        for i, score in zip(owners, scores, strict=True):
            totals[i] += score.logprob_sum
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        self._log_gate("loglikelihood_rolling", scores)
        return totals

    def decoding_config(self, gen_kwargs: dict) -> DecodingConfig:
        """The decoder's settings for one group of requests (the harness's gen_kwargs, normalised by the harness)."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.args.max_gen_toks))
        ignored = sorted(set(kwargs) - DECODING_KEYS)
        if ignored:
            logger.warning("generation arguments %s are not supported by the imsm decoder and are ignored", ignored)
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
        return DecodingConfig(
            max_new_tokens=int(kwargs["max_gen_toks"]), batch_size=self.args.batch_size, do_sample=sample,
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 1.0,
            top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=self.args.seed, stop_strings=tuple(kwargs["until"]),
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their gen_kwargs, each group decoded longest prompt first in chunks of a few batches
        (chunk k samples with seed + k; greedy answers do not depend on the chunking)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        texts: list[str | None] = [None] * len(requests)
        step = self.args.batch_size * PROGRESS_BATCHES
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self._rank != 0) as bar:
            for indices in groups.values():
                config = self.decoding_config(requests[indices[0]].args[1])
                prompts = {i: self.encode_context(requests[i].args[0]) for i in indices}
                indices = sorted(indices, key=lambda i: -len(prompts[i]))
                for k, start in enumerate(range(0, len(indices), step)):
                    chunk = indices[start : start + step]
                    chunk_config = dataclasses.replace(config, seed=config.seed + k)
                    for i, gen in zip(chunk, generate(self.model, self.tokenizer, [prompts[i] for i in chunk],
                                                      chunk_config), strict=True):
                        texts[i] = gen.text
                        self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
                    bar.update(len(chunk))
        self._warn_truncation()
        return texts

    def _log_gate(self, kind: str, scores) -> None:
        gates = [s.gate_mean for s in scores if s.gate_mean is not None]
        if gates:
            logger.info("%s: %d sequences, mean gate %.4f (share of the frozen memory)", kind, len(scores),
                        sum(gates) / len(gates))


def main() -> None:
    """``lm-eval-imsm``: the harness's own command line, with ``imsm`` registered (by importing this module)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
