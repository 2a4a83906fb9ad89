"""A disk cache of the frozen memory, so that epochs after the first skip IMSM's frozen pass.

The frozen memory h_M = decoder(x) with the adapter off depends on the example's token ids and the frozen backbone
only, never on anything that trains. Training uses two pieces of it per example i with L_i tokens, Q_i of them query
tokens and A_i = L_i − Q_i answer tokens:

    q_M(i)          the mean of h_M over the query tokens                           (d,)
    h_M(i)[t]       for the A_i positions t whose next token is scored              (A_i, d)

Both are kept in the training dtype (bf16 in the paper's runs) as the decoder produced them, so a cached batch gives
the same loss as a recomputed one. Size on disk: d × (Σ_i A_i + n_examples) × bytes per value; e.g. Llama-3-8B
(d = 4096) on GSM8K train (7,473 examples, 724,546 answer tokens, ~97 each) in bf16: 4096 × 732,019 × 2 B ≈ 6.0 GB
(9.2 GB at 150 answer tokens per example).

Format: a folder of safetensors shards, never pickles. A shard holds ``index``, ``length``, ``answers`` (n,) int64
(dataset index, L_i, A_i), ``q`` (n, d) and ``h`` (Σ A_i, d), the h rows of example k at offset Σ_{j<k} A_j. Rank r
writes only the examples it computed, as ``rank{r}-{seq}.safetensors``, each shard written to a temporary name and
renamed when complete (a killed run leaves whole shards only, and a resumed run reuses them); every rank reads any
shard in the folder, memory-mapped, since data-parallel ranks see a different share of the examples every epoch.
``fingerprint.json`` names what the memory depends on (base model path and config, dtype, template and system
prompt, max lengths, data file content hash, the source code of truncation and templates); a folder built for
anything else is emptied with a message and filled again.

A batch skips the frozen pass only when every example of it is cached (under data parallelism: on every rank, since
ZeRO-3 gathers parameters collectively during the pass). Filling happens in the first epoch's forward passes, where
the frozen memory is computed anyway (measured faster than a separate no-grad pass, see bench/bench_train.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from transformers import TrainerCallback

from imsm import data as data_module
from imsm import templates as templates_module
from imsm.atomic import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
SHARD_GLOB = "rank*-*.safetensors"
DEFAULT_DIR_NAME = "frozen_memory_cache"


def truncation_rule() -> str:
    """A hash of the code that turns a row into token ids (truncation and templates): a change to it changes what
    is cached."""
    source = "".join(inspect.getsource(f) for f in (data_module.encode_example, data_module.encode_prompt,
                                                    data_module.truncate_prompt, data_module.training_answer,
                                                    templates_module))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_fingerprint(model_path: str, config, dtype: torch.dtype, template: str, system_prompt: str | None,
                      max_input_length: int, max_output_length: int, train_file: str | Path) -> dict:
    """What the frozen memory of a dataset example depends on; two equal fingerprints give equal memories."""
    return {
        "model_path": str(model_path),
        "model_config": json.loads(config.to_json_string(use_diff=False)),
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_template": template,
        "system_prompt": system_prompt,
        "max_input_length": max_input_length,
        "max_output_length": max_output_length,
        "train_file_sha256": file_sha256(train_file),
        "truncation_rule": truncation_rule(),
    }


def expected_bytes(answer_tokens: int, n_examples: int, hidden_size: int, dtype: torch.dtype) -> int:
    """d × (answer tokens + one query mean per example) × bytes per value."""
    return hidden_size * (answer_tokens + n_examples) * torch.tensor([], dtype=dtype).element_size()


def _dist():
    """(rank, world size, torch.distributed or None)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed
    return 0, 1, None


class FrozenMemoryCache:
    """q_M and the scored-position h_M of dataset examples, by dataset index; see the module docstring."""

    def __init__(self, directory: str | Path, fingerprint: dict, flush_bytes: int = 256 << 20) -> None:
        self.directory = Path(directory)
        self.rank, self.world_size, self._dist = _dist()
        self.flush_bytes = flush_bytes
        self._prepare(fingerprint)
        self._entries: dict[int, tuple[str, int, int, int, int]] = {}  # index -> shard, row, h offset, L, A
        self._shards: dict[str, object] = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_bytes = 0
        self._pending_index: set[int] = set()
        self._next_seq = 1 + max((int(p.stem.split("-")[1]) for p in self.directory.glob(f"rank{self.rank}-*")
                                  if p.stem.split("-")[1].isdigit()), default=-1)
        self.refresh()
        self.hits = self.misses = 0

    # ---- folder -------------------------------------------------------------------------------------------------
    def _prepare(self, fingerprint: dict) -> None:
        """Rank 0 checks the fingerprint and empties a folder built for something else; the others wait."""
        path = self.directory / FINGERPRINT
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            old = json.loads(path.read_text()) if path.is_file() else None
            if old != fingerprint:
                shards = list(self.directory.glob(SHARD_GLOB))
                if old is not None or shards:
                    changed = sorted(k for k in set(fingerprint) | set(old or {})
                                     if (old or {}).get(k) != fingerprint.get(k))
                    logger.warning("frozen-memory cache %s was built for a different setup (changed: %s); "
                                   "rebuilding it", self.directory, ", ".join(changed) or "no fingerprint")
                for shard in shards:
                    shard.unlink()
                atomic_write_json(path, fingerprint)
        if self._dist is not None:
            self._dist.barrier()
        if self.rank != 0 and (not path.is_file() or json.loads(path.read_text()) != fingerprint):
            raise RuntimeError(f"--frozen_memory_cache {self.directory}: rank {self.rank} does not see the folder "
                               "rank 0 prepared; put it on a file system that every node shares, or turn it off")

    def refresh(self) -> None:
        """Index the shards written since the last look (by this rank or any other)."""
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            if path.name in self._shards:
                continue
            handle = safe_open(str(path), framework="pt")
            self._shards[path.name] = handle
            index, length, answers = (handle.get_tensor(k).tolist() for k in ("index", "length", "answers"))
            offset = 0
            for row, (i, n, a) in enumerate(zip(index, length, answers, strict=True)):
                self._entries.setdefault(i, (path.name, row, offset, n, a))
                offset += a

    def __len__(self) -> int:
        return len(self._entries)

    def cached_indices(self, rank: int | None = None) -> set[int]:
        """Indices held in the shards of ``rank`` (every rank's when None)."""
        prefix = None if rank is None else f"rank{rank}-"
        return {i for i, (name, *_) in self._entries.items() if prefix is None or name.startswith(prefix)}

    # ---- training -----------------------------------------------------------------------------------------------
    def lookup(self, example_index: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor):
        """(q_M (B, d), h_M at the scored positions (N, d)) on the batch's device, or None unless all are cached.

        Under data parallelism every rank must agree (ZeRO-3's frozen pass gathers parameters collectively).
        """
        indices = example_index.tolist()
        hit = all(i in self._entries for i in indices)  # shards are indexed when written, not looked for per step
        if self._dist is not None and self.world_size > 1:
            flag = torch.tensor([int(hit)], device=example_index.device)
            self._dist.all_reduce(flag, op=self._dist.ReduceOp.MIN)
            hit = bool(flag.item())
        if not hit:
            self.misses += 1
            return None
        self.hits += 1
        lengths, answers = attention_mask.sum(1).tolist(), selected.sum(1).tolist()
        q, h = [], []
        for i, n, a in zip(indices, lengths, answers, strict=True):
            name, row, offset, cached_n, cached_a = self._entries[i]
            if (cached_n, cached_a) != (n, a):
                raise RuntimeError(
                    f"frozen-memory cache {self.directory}: example {i} has {n} tokens ({a} scored) but its cached "
                    f"memory has {cached_n} ({cached_a}); the fingerprint missed a change, delete the folder"
                )
            shard = self._shards[name]
            q.append(shard.get_slice("q")[row : row + 1])
            h.append(shard.get_slice("h")[offset : offset + a])
        device = attention_mask.device
        return torch.cat(q).to(device, non_blocking=True), torch.cat(h).to(device, non_blocking=True)

    def store(self, example_index: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor,
              q_frozen: torch.Tensor, h_frozen: torch.Tensor) -> None:
        """Keep the batch's examples that no shard holds yet; written out every ``flush_bytes`` and by ``flush``."""
        indices = example_index.tolist()
        keep = [k for k, i in enumerate(indices) if i not in self._entries and i not in self._pending_index]
        if not keep:
            return
        answers = selected.sum(1)
        offsets = torch.cat([answers.new_zeros(1), answers.cumsum(0)]).tolist()
        h_cpu, q_cpu = h_frozen.detach().cpu(), q_frozen.detach().cpu()
        rows = torch.tensor(keep)
        h_rows = torch.cat([h_cpu[offsets[k] : offsets[k + 1]] for k in keep])
        self._pending.append((torch.tensor([indices[k] for k in keep]), attention_mask.sum(1).cpu()[rows],
                              answers.cpu()[rows], q_cpu[rows], h_rows))
        self._pending_index.update(indices[k] for k in keep)
        self._pending_bytes += h_rows.numel() * h_rows.element_size()
        if self._pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write this rank's pending examples as one shard (atomically), then index it."""
        if not self._pending:
            return
        columns = [torch.cat(c).contiguous() for c in zip(*self._pending, strict=True)]
        tensors = dict(zip(("index", "length", "answers", "q", "h"), columns, strict=True))
        name = f"rank{self.rank}-{self._next_seq:06d}.safetensors"
        atomic_write_bytes(self.directory / name, save(tensors, metadata={"format": "pt"}))
        self._next_seq += 1
        self._pending, self._pending_bytes, self._pending_index = [], 0, set()
        self.refresh()


class FlushFrozenCache(TrainerCallback):
    """Writes the pending examples at every epoch end, checkpoint and the end of training, so that the next epoch
    (on any rank) and a resumed run find them."""

    def __init__(self, cache: FrozenMemoryCache) -> None:
        self.cache = cache

    def on_epoch_end(self, args, state, control, **kwargs):
        self.cache.flush()
        if self.cache._dist is not None:
            self.cache._dist.barrier()  # every rank's shards are on disk before anyone starts the next epoch
            self.cache.refresh()

    def on_save(self, args, state, control, **kwargs):
        self.cache.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.cache.flush()
        logger.info("frozen-memory cache: %d batches read, %d computed on this rank", self.cache.hits,
                    self.cache.misses)


def resolve_cache_dir(option: str, output_dir: str | Path) -> Path | None:
    """``off`` -> None, ``on`` -> OUTPUT_DIR/frozen_memory_cache, else the folder given."""
    if option == "off":
        return None
    return Path(output_dir) / DEFAULT_DIR_NAME if option == "on" else Path(option)


def check_backbone_is_deterministic(config) -> None:
    """A backbone with dropout gives a random frozen memory in training; caching one draw would change the method."""
    rates = {k: v for k, v in config.to_dict().items() if "dropout" in k and isinstance(v, float) and v > 0}
    if rates:
        raise ValueError(f"--frozen_memory_cache: the backbone has dropout in training ({rates}), so its frozen "
                         "memory is random and cannot be cached; use --frozen_memory_cache off")


def check_disk(directory: Path, need: int) -> None:
    """Refuse to start filling when the cache would not fit beside what it already holds."""
    have = sum(p.stat().st_size for p in directory.glob(SHARD_GLOB))
    free = shutil.disk_usage(directory).free
    if need - have > free:
        raise OSError(
            f"--frozen_memory_cache {directory}: the cache needs {need / 1e9:.2f} GB and only {free / 1e9:.2f} GB "
            "are free on that disk; point it to a larger disk or use --frozen_memory_cache off"
        )


def open_frozen_cache(option: str, output_dir: str, dataset, model_config, fingerprint: dict
                      ) -> FrozenMemoryCache | None:
    """The cache for ``option`` (see ``resolve_cache_dir``), or None when it is off; hand it to the model
    (``build_imsm_model(frozen_cache=...)``) and flush it from the Trainer (``FlushFrozenCache``). Logs the expected
    size first and refuses one that would not fit on the disk."""
    directory = resolve_cache_dir(option, output_dir)
    if directory is None:
        return None
    if any(part.startswith("checkpoint-") for part in directory.resolve().parts):
        raise ValueError(f"--frozen_memory_cache {directory}: keep the cache out of checkpoint folders")
    check_backbone_is_deterministic(model_config)
    answer_tokens = sum(len(ex["input_ids"]) - ex["query_length"] for ex in (dataset[i] for i in range(len(dataset))))
    need = expected_bytes(answer_tokens, len(dataset), model_config.hidden_size, getattr(torch, fingerprint["dtype"]))
    cache = FrozenMemoryCache(directory, fingerprint)
    logger.info("frozen-memory cache %s: %d of %d examples cached; full size %.3f GB (d=%d x %d answer tokens + %d "
                "query means x %s)", directory, len(cache), len(dataset), need / 1e9, model_config.hidden_size,
                answer_tokens, len(dataset), fingerprint["dtype"])
    check_disk(directory, need)
    return cache
