"""The frozen-memory cache changes the cost of training, never its result: float32 runs with and without it (gate
and LoRA dropout on) reach the same adapter and gate, a cached batch has the uncached loss, a changed setup empties
the cache, a killed run resumes onto what it wrote, and under a real two-process ``deepspeed`` launch each rank
writes only the examples it computed."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig

import train
from imsm.args import ImsmArguments
from imsm.data import SupervisedCollator, SupervisedDataset
from imsm.loader import build_imsm_model, load_backbone
from imsm.templates import build_template
from imsm.training import frozen_cache
from imsm.training.frozen_cache import FrozenMemoryCache, cache_fingerprint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def _args(model_dir, train_file, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "no", "--seed", "7", "--disable_tqdm", "true",
            "--num_train_epochs", "2", *extra]


def _state(run_dir):
    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    return tensors | {f"gate.{k}": v for k, v in load_file(str(run_dir / "gate.safetensors")).items()}


def _assert_same_state(got_dir, expected_dir, atol=1e-6):
    expected, got = _state(expected_dir), _state(got_dir)
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=atol, msg=k)


def _shard_indices(cache_dir, rank=None):
    out = []
    for path in sorted(Path(cache_dir).rglob("rank*-*.safetensors")):  # in the setup's subfolder
        if rank is None or path.name.startswith(f"rank{rank}-"):
            with safe_open(str(path), framework="pt") as f:
                out += f.get_tensor("index").tolist()
    return out


def _fingerprint(model_dir, data_file, **changes):
    from transformers import AutoConfig

    setup = {"template": "raw", "system_prompt": None, "max_input_length": 1024, "max_output_length": 512,
             "train_file": data_file} | changes
    return cache_fingerprint(str(model_dir), AutoConfig.from_pretrained(model_dir), torch.float32, **setup)


def test_cached_batch_gives_the_uncached_loss_and_skips_the_frozen_pass(tiny_model_dir, tiny_train_file, tmp_path):
    backbone, tokenizer, _ = load_backbone(str(tiny_model_dir), attn_implementation="sdpa")
    model = build_imsm_model(backbone, ImsmArguments.create(gate_dropout=0.1, lora_r=4, gate_rank=4)).train()
    with torch.no_grad():
        model.imsm_gate.w_b.weight.normal_(0, 0.3)  # a gate that is not 0.5 everywhere
    dataset = SupervisedDataset(tiny_train_file, build_template("raw", tokenizer), 1024, 512)
    batch = SupervisedCollator(tokenizer.pad_token_id)([dataset[i] for i in (5, 0, 17, 30)])
    model.frozen_cache = FrozenMemoryCache(tmp_path / "cache", _fingerprint(tiny_model_dir, tiny_train_file))
    frozen_passes = []
    real_memory = model.memory
    model.memory = lambda adapter, **kw: (frozen_passes.append(adapter), real_memory(adapter, **kw))[1]

    losses, grads = [], []
    for _ in range(2):
        torch.manual_seed(0)  # same dropout masks for gate and LoRA in both passes, if both consume alike
        loss = model(**batch)["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
        model.frozen_cache.flush()
    assert frozen_passes == [True, False, True]  # the second forward ran the tuned pass only
    assert model.frozen_cache.hits == 1 and model.frozen_cache.misses == 1
    assert sorted(_shard_indices(tmp_path / "cache")) == [0, 5, 17, 30]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_two_epochs_with_the_cache_equal_two_without(tiny_model_dir, tiny_train_file, tmp_path):
    plain = tmp_path / "plain"
    train.main(_args(tiny_model_dir, tiny_train_file, plain))
    cached = tmp_path / "cached"
    trainer = train.main(_args(tiny_model_dir, tiny_train_file, cached, "--frozen_memory_cache", "on"))
    cache = trainer.model.frozen_cache
    assert (cache.hits, cache.misses) == (8, 8)  # 8 batches per epoch; epoch 2 read every one
    assert sorted(_shard_indices(cached / "frozen_memory_cache")) == list(range(32))
    _assert_same_state(cached / "final", plain / "final")


@pytest.mark.parametrize("change", [{"template": "chat"}, {"max_output_length": 4}, {"train_file": "other"}])
def test_a_changed_setup_rebuilds_the_cache(tiny_model_dir, tiny_train_file, tmp_path, change, caplog):
    if change.get("train_file") == "other":
        other = tmp_path / "other.jsonl"
        other.write_text(tiny_train_file.read_text() + json.dumps({"input": "Is 3 odd ?", "output": "yes"}) + "\n")
        change = {"train_file": other}
    directory = tmp_path / "cache"
    cache = FrozenMemoryCache(directory, _fingerprint(tiny_model_dir, tiny_train_file))
    mask = torch.ones(2, 5, dtype=torch.long)
    selected = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    cache.store(torch.tensor([3, 4]), mask, selected, torch.randn(2, 8), torch.randn(3, 8))
    cache.close()
    reused = FrozenMemoryCache(directory, _fingerprint(tiny_model_dir, tiny_train_file))
    assert len(reused) == 2 and not reused.read_only  # same: reused
    reused.close()
    with caplog.at_level(logging.WARNING):
        rebuilt = FrozenMemoryCache(directory, _fingerprint(tiny_model_dir, tiny_train_file, **change))
    assert len(rebuilt) == 0 and not list(directory.glob("*.safetensors"))
    assert "built for a different setup" in caplog.text and "rebuilding" in caplog.text


def test_expected_size_is_logged_and_a_full_disk_refused(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch,
                                                         caplog):
    class Free:
        free = 1000

    monkeypatch.setattr(frozen_cache.shutil, "disk_usage", lambda _: Free)
    with caplog.at_level(logging.INFO), pytest.raises(OSError, match="the cache needs .* GB and only .* free"):
        train.main(_args(tiny_model_dir, tiny_train_file, tmp_path / "run", "--frozen_memory_cache", "on"))
    # 32 examples x (2 answer tokens + 1 query mean) x d=32 x 4 bytes
    assert "d=32 x 64 answer tokens + 32 query means x float32" in caplog.text
    assert frozen_cache.expected_bytes(64, 32, 32, torch.float32) == 32 * 96 * 4


def test_killed_mid_first_epoch_resumes_onto_what_it_wrote(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    saving = ["--save_strategy", "steps", "--save_steps", "3", "--frozen_memory_cache", "on"]
    full = tmp_path / "full"
    train.main(_args(tiny_model_dir, tiny_train_file, full, *saving))

    part = tmp_path / "part"
    real_store, stores = FrozenMemoryCache.store, []

    def store_then_die(self, *a, **kw):
        stores.append(1)
        if len(stores) == 5:  # step 5 of 8 in epoch 1; checkpoint-3 is the latest
            raise KeyboardInterrupt
        real_store(self, *a, **kw)

    monkeypatch.setattr(FrozenMemoryCache, "store", store_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(tiny_model_dir, tiny_train_file, part, *saving))
    monkeypatch.setattr(FrozenMemoryCache, "store", real_store)
    assert len(_shard_indices(part / "frozen_memory_cache")) == 12  # flushed with checkpoint-3; step 4 lost
    trainer = train.main(_args(tiny_model_dir, tiny_train_file, part, *saving, "--resume_from_checkpoint", "latest"))
    assert (trainer.model.frozen_cache.hits, trainer.model.frozen_cache.misses) == (8, 5)
    assert sorted(_shard_indices(part / "frozen_memory_cache")) == list(range(32))
    _assert_same_state(part / "final", full / "final")


@pytest.mark.launch
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_deepspeed_two_ranks_cache_their_own_examples_and_match_one_process(tiny_model_dir, tiny_train_file,
                                                                             tmp_path, config):
    exact = ["--gate_dropout", "0", "--lora_dropout", "0"]  # ranks draw their own masks: compare without dropout
    out = tmp_path / "ds"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
           str(random.randint(20000, 40000)), str(ROOT / "train.py"), "--deepspeed",
           str(ROOT / "ds_configs" / config),
           *_args(tiny_model_dir, tiny_train_file, out, "--per_device_train_batch_size", "2", "--frozen_memory_cache",
                  "on", *exact)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (set(_shard_indices(out / "frozen_memory_cache", r)) for r in (0, 1))
    assert len(rank0) == len(rank1) == 16 and not rank0 & rank1 and rank0 | rank1 == set(range(32))
    assert "8 batches read, 8 computed on this rank" in proc.stdout  # rank 0: epoch 2 read every batch
    single = tmp_path / "single"
    train.main(_args(tiny_model_dir, tiny_train_file, single, *exact))
    _assert_same_state(out / "final", single / "final", atol=1e-5)


def test_a_validation_split_caches_the_training_part_under_its_dataset_indices(tiny_model_dir, tiny_train_file,
                                                                                tmp_path):
    out = tmp_path / "run"
    trainer = train.main(_args(tiny_model_dir, tiny_train_file, out, "--frozen_memory_cache", "on",
                               "--validation_fraction", "0.25"))
    train_indices = sorted(trainer.train_dataset.indices)
    assert len(train_indices) == 24 and train_indices != list(range(24))  # held-out examples leave gaps
    assert sorted(_shard_indices(out / "frozen_memory_cache")) == train_indices
    assert trainer.model.frozen_cache.hits == 6  # epoch 2 read every batch; validation ran uncached


def _store(cache: FrozenMemoryCache, indices: list[int], value: float) -> None:
    """Two answer tokens per example, every cached value ``value``."""
    n = len(indices)
    mask, selected = torch.ones(n, 4, dtype=torch.long), torch.tensor([[0, 0, 1, 1]] * n, dtype=torch.bool)
    cache.store(torch.tensor(indices), mask, selected, torch.full((n, 8), value), torch.full((2 * n, 8), value))
    cache.flush()


def _lookup(cache: FrozenMemoryCache, indices: list[int]):
    n = len(indices)
    return cache.lookup(torch.tensor(indices), torch.ones(n, 4, dtype=torch.long),
                        torch.tensor([[0, 0, 1, 1]] * n, dtype=torch.bool))


class _Examples:
    """What open_frozen_cache reads of a dataset: token ids and the query length of each example."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"input_ids": [1, 2, 3, 4], "query_length": 2}


def test_two_setups_started_together_on_one_folder_never_read_each_others_memory(tiny_model_dir, tiny_train_file,
                                                                                 tmp_path):
    """Issue 30: two runs on different base models sharing --frozen_memory_cache DIR, started together; one trained
    on the other's frozen memory. Each setup now has its own subfolder."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    first_fp = _fingerprint(tiny_model_dir, tiny_train_file)
    second_fp = _fingerprint(tiny_model_dir, tiny_train_file) | {"model_path": "another/base-model"}
    shared = str(tmp_path / "shared")
    first = frozen_cache.open_frozen_cache(shared, "unused", _Examples(), config, first_fp)
    second = frozen_cache.open_frozen_cache(shared, "unused", _Examples(), config, second_fp)
    _store(second, [0, 1, 2, 3], 2.0)
    first.refresh()  # at its epoch end
    assert _lookup(first, [0, 1]) is None and _lookup(first, [2, 3]) is None  # the other setup's are not its own
    _store(first, [0, 1], 1.0)
    q, h = _lookup(first, [0, 1])
    assert torch.equal(q, torch.full((2, 8), 1.0)) and torch.equal(h, torch.full((4, 8), 1.0))
    q, h = _lookup(second, [0, 1])
    assert torch.equal(q, torch.full((2, 8), 2.0))
    assert first.directory != second.directory and first.directory.parent == second.directory.parent
    assert not first.read_only and not second.read_only


def test_a_second_run_of_one_setup_reads_the_writers_shards_and_writes_none(tiny_model_dir, tiny_train_file,
                                                                            tmp_path, caplog):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    fingerprint = _fingerprint(tiny_model_dir, tiny_train_file)
    shared = str(tmp_path / "shared")
    writer = frozen_cache.open_frozen_cache(shared, "unused", _Examples(), config, fingerprint)
    with caplog.at_level(logging.WARNING):
        reader = frozen_cache.open_frozen_cache(shared, "unused", _Examples(), config, fingerprint)
    assert reader.read_only and f"pid {os.getpid()}" in caplog.text and "without storing" in caplog.text
    _store(reader, [0, 1], 5.0)  # a reader stores nothing
    assert _shard_indices(shared) == [] and _lookup(reader, [0, 1]) is None
    _store(writer, [0, 1], 1.0)
    reader.refresh()  # at its next epoch end
    q, _ = _lookup(reader, [0, 1])
    assert torch.equal(q, torch.full((2, 8), 1.0))
    writer.close()  # the writing run ended: the next run of this setup writes
    after = frozen_cache.open_frozen_cache(shared, "unused", _Examples(), config, fingerprint)
    assert not after.read_only and len(after) == 2
