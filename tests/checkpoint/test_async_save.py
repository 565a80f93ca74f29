"""Async save: training continues while shards are written, and the checkpoint is the same.

Two 2-rank runs through run_training with a storage that takes 0.5 s per shard write (each rank
writes 2 shards per save): synchronous and `checkpoint.async_save: true`. Training must be bitwise
identical, both must commit identical state, and the async run must be blocked only for the gather.
"""

from __future__ import annotations

import pytest
import torch

from tests.checkpoint.ckpt_helpers import load_job, losses, metrics, spawn_ranks
from tests.checkpoint.ckpt_ranks import train_ranks_in_turn
from raytron.data_pipeline import prepare_for_job
from raytron.parallelism.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow
SLOW_WRITE_S = 0.5  # per shard; rank 0 writes state + rng = 1 s per save


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    spec = load_job(root, "sync", 2, 2, 3)
    prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed, cache_uri=str(root / "_data_cache"))
    # both runs in one pair of rank processes, one after the other (one interpreter start, not two)
    spawn_ranks(train_ranks_in_turn, 2, str(root), [
        (name, {"ep": 2, "steps": 3, "every": 2, "checkpoint.async_save": is_async}, {"slow_write_s": SLOW_WRITE_S})
        for name, is_async in (("sync", False), ("async", True))])
    return root


def test_async_training_is_bitwise_identical(runs):
    assert losses(runs / "async") == losses(runs / "sync")


def test_async_commits_the_same_state(runs):
    sync, asy = CheckpointStore(f"{runs}/sync/checkpoints"), CheckpointStore(f"{runs}/async/checkpoints")
    assert asy.committed_steps() == sync.committed_steps() == [2, 3]
    for step in (2, 3):
        m_sync, m_async = sync.verify(step), asy.verify(step)
        assert sorted(m_sync["files"]) == sorted(m_async["files"])
        assert m_sync["data_cursor"] == m_async["data_cursor"] == {"samples_consumed": 8 * step}
        for name in m_sync["files"]:
            a, b = sync.read_shard(step, name, m_sync), asy.read_shard(step, name, m_async)
            for section in ("params", "exp_avg", "exp_avg_sq"):
                for key in a.get(section, {}):
                    assert torch.equal(a[section][key], b[section][key]), f"step {step}: {name} {section}/{key}"


def test_blocking_time_is_measured_and_async_does_not_block_on_writes(runs):
    sync, asy = metrics(runs / "sync"), metrics(runs / "async")
    for run in (sync, asy):
        for step in (2, 3):
            assert run[step]["checkpoint/blocking_s"] > 0 and run[step]["checkpoint/save_s"] > 0, run[step]
    # sync: training waits for the writes; async: released before them (the first save has nothing
    # pending before it, so the writes, >= 2 x SLOW_WRITE_S on rank 0, all happen after the release)
    assert sync[2]["checkpoint/blocking_s"] >= 2 * SLOW_WRITE_S, sync[2]
    assert sync[2]["checkpoint/blocking_s"] == pytest.approx(sync[2]["checkpoint/save_s"], abs=1e-3), sync[2]
    released_early = asy[2]["checkpoint/save_s"] - asy[2]["checkpoint/blocking_s"]
    assert released_early >= 2 * SLOW_WRITE_S, f"step 2: training was blocked until {released_early:.3f}s " \
        f"before the commit; the writes take >= {2 * SLOW_WRITE_S}s: {asy[2]}"


def test_blocking_time_is_a_tensorboard_scalar(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs / "async" / "tensorboard"))
    acc.Reload()
    assert "checkpoint/blocking_s" in acc.Tags()["scalars"], acc.Tags()["scalars"]
    assert sorted(e.step for e in acc.Scalars("checkpoint/blocking_s")) == [2, 3]
