"""Rank entry point for the kill-during-write test: two real processes save through the same code
the training loop uses (`write_and_commit` over gloo); rank 1 is SIGKILLed by the test mid-write."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def rank_state(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"params": {f"w{rank}": torch.randn(256, 64, generator=g)}}


def saving_rank(rank: int, world: int, uri: str, flag: str) -> None:
    import torch.distributed as dist

    from raytron import storage
    from raytron.launcher.checkpointing import write_and_commit
    from raytron.parallelism.checkpoint import CheckpointStore

    store = CheckpointStore(uri, keep=2)
    manifest = {"engine": "test", "data_cursor": {"samples_consumed": 8}} if rank == 0 else None
    write_and_commit(store, 1, rank, world, {f"state-{rank:05d}.pt": rank_state(1, rank)}, manifest)
    dist.barrier()
    if rank == 1:  # the next shard write stops halfway: half the bytes are out when the kill lands
        real_write = storage.write_bytes  # how the store writes shards (in place, not staged)

        def half_then_hang(uri, data):
            real_write(uri, data[: len(data) // 2])
            Path(flag).write_text(str(os.getpid()))
            time.sleep(600)

        storage.write_bytes = half_then_hang
    write_and_commit(store, 2, rank, world, {f"state-{rank:05d}.pt": rank_state(2, rank)}, manifest)


def failing_write_rank(rank: int, world: int, uri: str, out: str) -> None:
    """Rank 1's shard write fails (disk full); every rank must get the same named error, no hang,
    and rank 0 must not commit."""
    import json

    from raytron.launcher.checkpointing import write_and_commit
    from raytron.parallelism.checkpoint import CheckpointError, CheckpointStore

    store = CheckpointStore(uri)
    if rank == 1:
        def disk_full(*a, **k):
            raise OSError(28, "No space left on device")

        store.write_shard = disk_full
    manifest = {"engine": "test"} if rank == 0 else None
    try:
        write_and_commit(store, 3, rank, world, {f"state-{rank:05d}.pt": rank_state(3, rank)}, manifest)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    Path(f"{out}.{rank}").write_text(json.dumps(error))
