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
prompt, max lengths, data file content hash, the source code of truncation and templates). The folder given
(``--frozen_memory_cache DIR``) holds one subfolder per fingerprint, named by its hash (``fingerprint_key``), so runs
of different setups (another base model, another data file) share DIR without ever reading each other's memory; a
subfolder whose ``fingerprint.json`` differs anyway (garbled) is emptied with a message and filled again.

One run writes a subfolder at a time: rank 0 of the run that opens it first holds ``.writer.lock`` (``imsm.locks``,
released when the run ends, kill -9 included). A second run of the same setup started meanwhile does not wait: it
**reads** the shards the writer has finished (whole files only, picked up at each epoch end), computes the rest
itself without storing them, and says so in a warning naming the writer's PID.

The cache is derived data, so damage costs a recomputation, never the run. Rank r records the SHA-256 of every shard
it writes in ``rank{r}-index.json`` (before the shard itself, so a kill between the two loses nothing). When a run
starts, rank 0 removes the temporaries a killed write left, and checks every shard already there: its header and
length (``run_folder.safetensors_header``), its tensors' layout and its checksum; one that fails (truncated, empty,
garbled, not in the index, or changed since it was written) is deleted with a warning naming it, and its examples
are computed again. An unreadable ``fingerprint.json`` empties the folder with a warning. Shards that other ranks
write during the run get the header and layout check when indexed.

A batch skips the frozen pass only when every example of it is cached (under data parallelism: on every rank, since
ZeRO-3 gathers parameters collectively during the pass). Filling happens in the first epoch's forward passes, where
the frozen memory is computed anyway (measured faster than a separate no-grad pass, see bench/bench_train.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from transformers import TrainerCallback

from imsm import data as data_module
from imsm import templates as templates_module
from imsm.atomic import atomic_write_bytes, atomic_write_json
from imsm.locks import holder, release, try_lock
from imsm.run_folder import safetensors_header

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
SHARD_GLOB = "rank*-*.safetensors"
INDEX_GLOB = "rank*-index.json"  # rank r's {"sha256": {shard name: hex digest}}
DEFAULT_DIR_NAME = "frozen_memory_cache"
SHARD_TENSORS = ("index", "length", "answers", "q", "h")
LOCK_FILE = ".writer.lock"  # held by rank 0 of the run that fills the subfolder


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


def fingerprint_key(fingerprint: dict) -> str:
    """The subfolder of a fingerprint inside the cache folder: a hash of its canonical JSON."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


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
        self.fingerprint = fingerprint
        self._lock_fd: int | None = None
        self.read_only = not self._claim_writer()
        self._skipped: set[str] = set()  # shards a reader found unreadable (the writer repairs them, not a reader)
        self._prepare(fingerprint)
        self._entries: dict[int, tuple[str, int, int, int, int]] = {}  # index -> shard, row, h offset, L, A
        self._shards: dict[str, object] = {}
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_bytes = 0
        self._pending_index: set[int] = set()
        self._next_seq = 1 + max((int(p.stem.split("-")[1]) for p in
                                  self.directory.glob(f"rank{self.rank}-*.safetensors")
                                  if p.stem.split("-")[1].isdigit()), default=-1)
        # this rank's checksums, of the shards still there (others may have been deleted as damaged)
        self._digests = {name: digest for name, digest in _read_index(self._index_path).items()
                         if (self.directory / name).is_file()}
        self.refresh()
        self.hits = self.misses = 0

    # ---- folder -------------------------------------------------------------------------------------------------
    @property
    def _index_path(self) -> Path:
        return self.directory / f"rank{self.rank}-index.json"

    def _claim_writer(self) -> bool:
        """Rank 0 takes the folder's writer lock (kept until ``close`` or the end of the process); every rank learns
        whether it was free. Without it the run only reads (module docstring)."""
        writer = True
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = try_lock(self.directory / LOCK_FILE)
            writer = self._lock_fd is not None
            if not writer:
                logger.warning("frozen-memory cache %s is being filled by another run (%s): this run reads the shards "
                               "that run has finished and computes the frozen memory of the rest itself, without "
                               "storing it", self.directory, holder(self.directory / LOCK_FILE))
        if self._dist is not None:
            decided = [writer]
            self._dist.broadcast_object_list(decided, src=0)
            writer = decided[0]
        return writer

    def close(self) -> None:
        """Write what is pending and release the writer lock (a later run of the same setup may then write)."""
        self.flush()
        self.release_lock()

    def release_lock(self) -> None:
        """Release the writer lock without writing (a failed run; the end of the process releases it too)."""
        release(self._lock_fd, self.directory / LOCK_FILE)
        self._lock_fd = None

    def _prepare(self, fingerprint: dict) -> None:
        """Rank 0 clears temporaries, checks the fingerprint, empties a folder built for something else and deletes
        damaged shards (see the module docstring); the others wait. A reader changes nothing."""
        path = self.directory / FINGERPRINT
        if self.read_only:
            return
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for tmp in self.directory.glob(".*.tmp"):  # what a write killed before its rename left
                tmp.unlink(missing_ok=True)
            old = _read_fingerprint(path)
            if old != fingerprint:
                shards = list(self.directory.glob(SHARD_GLOB))
                if isinstance(old, dict) or (old is None and shards):
                    changed = sorted(k for k in set(fingerprint) | set(old or {})
                                     if (old or {}).get(k) != fingerprint.get(k))
                    logger.warning("frozen-memory cache %s was built for a different setup (changed: %s); "
                                   "rebuilding it", self.directory, ", ".join(changed) or "no fingerprint")
                for stale in (*shards, *self.directory.glob(INDEX_GLOB)):
                    stale.unlink()
                atomic_write_json(path, fingerprint)
            else:
                self._delete_damaged_shards()
        if self._dist is not None:
            self._dist.barrier()
        if self.rank != 0 and (not path.is_file() or json.loads(path.read_text()) != fingerprint):
            raise RuntimeError(f"--frozen_memory_cache {self.directory}: rank {self.rank} does not see the folder "
                               "rank 0 prepared; put it on a file system that every node shares, or turn it off")

    def _delete_damaged_shards(self) -> None:
        digests = {name: digest for index in self.directory.glob(INDEX_GLOB) for name, digest in
                   _read_index(index).items()}
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            problem = _shard_problem(path)
            if problem is None and path.name not in digests:
                problem = "it is in no rank's index (written by an older imsm, or its index was lost)"
            if problem is None:
                with path.open("rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != digests[path.name]:
                        problem = "its checksum differs from the one recorded when it was written"
            if problem is not None:
                logger.warning("frozen-memory cache: %s cannot be trusted (%s); deleting it, its examples will be "
                               "rebuilt", path, problem)
                path.unlink()

    def refresh(self) -> None:
        """Index the shards written since the last look (by this rank or any other); one that fails the header and
        layout check is skipped with a warning (its examples are computed again). A reader reads only a folder whose
        fingerprint is its own, and deletes nothing."""
        if self.read_only and _read_fingerprint(self.directory / FINGERPRINT) != self.fingerprint:
            return
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            if path.name in self._shards or path.name in self._skipped:
                continue
            problem = _shard_problem(path)
            if problem is not None and self.read_only:
                self._skipped.add(path.name)
                continue
            if problem is not None:
                logger.warning("frozen-memory cache: %s cannot be trusted (%s); its examples will be rebuilt", path,
                               problem)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
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
        if self.read_only:
            return
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
        data = save(tensors, metadata={"format": "pt"})
        self._digests[name] = hashlib.sha256(data).hexdigest()
        atomic_write_json(self._index_path, {"sha256": self._digests})  # first: a kill then loses nothing
        atomic_write_bytes(self.directory / name, data)
        self._next_seq += 1
        self._pending, self._pending_bytes, self._pending_index = [], 0, set()
        self.refresh()


def _read_fingerprint(path: Path) -> dict | str | None:
    """The recorded fingerprint; None when there is none, "unreadable" (with a warning) when it is garbled."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        logger.warning("frozen-memory cache: %s is unreadable (%s); rebuilding the cache", path, e)
        return "unreadable"


def _read_index(path: Path) -> dict[str, str]:
    """{shard name: SHA-256} of one rank's index; empty (a warning when garbled) when it cannot be read."""
    if not path.is_file():
        return {}
    try:
        digests = json.loads(path.read_text())["sha256"]
        if isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values()):
            return digests
    except (ValueError, OSError, KeyError, TypeError):
        pass
    logger.warning("frozen-memory cache: %s is unreadable; the shards it lists will be rebuilt", path)
    return {}


def _shard_problem(path: Path) -> str | None:
    """Why a shard cannot be read as one (header, length, tensor names, dtypes and shapes), or None."""
    try:
        tensors = safetensors_header(path)
    except (ValueError, OSError) as e:
        return str(e).removeprefix(f"{path}: ")
    if set(tensors) != set(SHARD_TENSORS):
        return f"it holds {sorted(tensors)}, not {list(SHARD_TENSORS)}"
    n = tensors["index"][1][0] if len(tensors["index"][1]) == 1 else -1
    (q_dtype, q), (h_dtype, h) = tensors["q"], tensors["h"]
    per_example = all(tensors[k] == ("I64", (n,)) for k in ("index", "length", "answers"))
    if not per_example or len(q) != 2 or len(h) != 2 or q[0] != n or q[1] != h[1] or q_dtype != h_dtype:
        return "its tensors do not have the cache's layout"
    return None


class FlushFrozenCache(TrainerCallback):
    """Writes the pending examples at every epoch end, checkpoint and the end of training, so that the next epoch
    (on any rank) and a resumed run find them."""

    def __init__(self, cache: FrozenMemoryCache) -> None:
        self.cache = cache

    def on_epoch_end(self, args, state, control, **kwargs):
        self.cache.flush()
        if self.cache._dist is not None:
            self.cache._dist.barrier()  # every rank's shards are on disk before anyone starts the next epoch
        if self.cache._dist is not None or self.cache.read_only:
            self.cache.refresh()  # a reader picks up what the writing run finished meanwhile

    def on_save(self, args, state, control, **kwargs):
        self.cache.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.cache.close()
        logger.info("frozen-memory cache: %d batches read, %d computed on this rank", self.cache.hits,
                    self.cache.misses)


def resolve_cache_dir(option: str, output_dir: str | Path) -> Path | None:
    """``off`` -> None, ``on`` -> OUTPUT_DIR/frozen_memory_cache, else the folder given (each holds one subfolder
    per fingerprint)."""
    if option == "off":
        return None
    return Path(output_dir) / DEFAULT_DIR_NAME if option == "on" else Path(option)


def check_cache_dir(option: str, output_dir: str | Path) -> None:
    """The cache folder ``option`` names can be one (checked before the model loads): not a file, not inside a
    checkpoint folder (rotation would delete it), and creatable."""
    directory = resolve_cache_dir(option, output_dir)
    if directory is None:
        return
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"--frozen_memory_cache {directory} is a file; give a folder, on, or off")
    if any(part.startswith("checkpoint-") for part in directory.resolve().parts):
        raise ValueError(f"--frozen_memory_cache {directory}: keep the cache out of checkpoint folders")
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"--frozen_memory_cache {directory}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--frozen_memory_cache {directory}: {existing} is not writable")


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
    """The cache for ``option`` (see ``resolve_cache_dir``) in its subfolder for ``fingerprint``, or None when it is
    off; hand it to the model (``build_imsm_model(frozen_cache=...)``) and flush it from the Trainer
    (``FlushFrozenCache``). Logs the expected size first and refuses one that would not fit on the disk."""
    root = resolve_cache_dir(option, output_dir)
    if root is None:
        return None
    check_cache_dir(option, output_dir)
    directory = root / fingerprint_key(fingerprint)
    if (root / FINGERPRINT).is_file():
        logger.warning("frozen-memory cache %s holds a cache in the layout before per-setup subfolders (shards at "
                       "its top); this run uses %s and never reads those, delete them to free the disk", root,
                       directory)
    check_backbone_is_deterministic(model_config)
    answer_tokens = sum(len(ex["input_ids"]) - ex["query_length"] for ex in (dataset[i] for i in range(len(dataset))))
    need = expected_bytes(answer_tokens, len(dataset), model_config.hidden_size, getattr(torch, fingerprint["dtype"]))
    cache = FrozenMemoryCache(directory, fingerprint)
    logger.info("frozen-memory cache %s: %d of %d examples cached; full size %.3f GB (d=%d x %d answer tokens + %d "
                "query means x %s)", directory, len(cache), len(dataset), need / 1e9, model_config.hidden_size,
                answer_tokens, len(dataset), fingerprint["dtype"])
    check_disk(directory, need)
    return cache
