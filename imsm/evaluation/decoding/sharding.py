"""Each rank's share of the examples (``shard``: strided, so ranks get nearly equal work) and rank 0 gathering them
back in input order (``gather_shards``), for evaluate.py under torchrun or deepspeed."""

from __future__ import annotations

from collections.abc import Sequence


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's strided share: items rank, rank + W, rank + 2W, ..."""
    return list(items[rank::world_size])


def gather_shards(local: list, total: int, rank: int, world_size: int) -> list | None:
    """Collect every rank's ``shard`` on rank 0, back in input order (None on other ranks); collective call."""
    if world_size == 1:
        return local
    import torch.distributed as dist

    gathered: list[list] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if rank != 0:
        return None
    return [gathered[i % world_size][i // world_size] for i in range(total)]
