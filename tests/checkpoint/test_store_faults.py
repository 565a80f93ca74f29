"""The commit protocol under faults, on file://, memory:// and s3:// (moto on loopback).

Every refusal must name the step and the file; resume (`latest`) must fall back to the newest older
committed step that verifies; retention must keep exactly `keep` committed steps.
"""

from __future__ import annotations

import pytest
import torch

from raytron import storage
from raytron.parallelism.checkpoint import MARKER, CheckpointError, CheckpointStore


def shards(step: int) -> dict[str, dict]:
    """What two ranks would write at `step` (values depend on the step, so a mix-up is visible)."""
    g = torch.Generator().manual_seed(step)
    return {f"state-{r:05d}.pt": {"params": {f"w{r}": torch.randn(64, 32, generator=g)}, "meta": {"step": step}}
            for r in range(2)}


def save(store: CheckpointStore, step: int) -> None:
    records = [store.write_shard(step, name, state) for name, state in shards(step).items()]
    store.commit(step, records, {"engine": "test", "data_cursor": {"samples_consumed": 8 * step}})


def shard_path(store: CheckpointStore, step: int, name: str = "state-00001.pt") -> str:
    return f"{store.step_path(step)}/{name}"


def truncate(store, path):
    storage.write_bytes(path, storage.read_bytes(path)[:-100])


def bit_flip(store, path):
    data = bytearray(storage.read_bytes(path))
    data[len(data) // 2] ^= 0x10
    storage.write_bytes(path, bytes(data))


def remove(store, path):
    storage.remove(path, missing_ok=False)


@pytest.mark.parametrize("damage, words", [(truncate, r"has \d+ bytes, manifest says"),
                                           (bit_flip, "fails its SHA-256"), (remove, "is missing")])
def test_damaged_shard_is_refused_and_previous_step_used(ckpt_uri, damage, words):
    store = CheckpointStore(ckpt_uri, keep=3)
    for step in (2, 4):
        save(store, step)
    damage(store, shard_path(store, 4))
    with pytest.raises(CheckpointError, match=r"step 4: shard state-00001\.pt " + words):
        store.verify(4)
    chosen, skipped = store.latest(deep=True)
    assert chosen.step == 2, f"resume must use step 2, got {chosen and chosen.step}"
    assert len(skipped) == 1 and "step 4" in skipped[0] and "state-00001.pt" in skipped[0], skipped
    loaded = store.read_shard(2, "state-00001.pt", chosen.manifest)
    assert torch.equal(loaded["params"]["w1"], shards(2)["state-00001.pt"]["params"]["w1"])


def test_bit_flip_caught_by_read_even_without_deep_verify(ckpt_uri):
    store = CheckpointStore(ckpt_uri)
    save(store, 1)
    bit_flip(store, shard_path(store, 1, "state-00000.pt"))
    chosen, _ = store.latest(deep=False)  # sizes match: only the hash can tell
    with pytest.raises(CheckpointError, match=r"step 1: shard state-00000\.pt fails its SHA-256"):
        store.read_shard(chosen.step, "state-00000.pt", chosen.manifest)


def test_missing_or_corrupt_manifest_is_refused(ckpt_uri):
    store = CheckpointStore(ckpt_uri, keep=3)
    for step in (1, 2, 3):
        save(store, step)
    storage.remove(f"{store.step_path(3)}/manifest.json", missing_ok=False)
    storage.write_bytes(f"{store.step_path(2)}/manifest.json", b"{not json")
    chosen, skipped = store.latest()
    assert chosen.step == 1
    assert "step 3: manifest.json is missing" in skipped[0] and "step 2: manifest.json is unreadable" in skipped[1]


def test_uncommitted_step_is_never_chosen(ckpt_uri):
    store = CheckpointStore(ckpt_uri)
    save(store, 1)
    for name, state in shards(2).items():  # every shard written, marker never written (crash)
        store.write_shard(2, name, state)
    assert store.committed_steps() == [1]
    assert store.latest()[0].step == 1


@pytest.mark.parametrize("keep", [2, 3])
def test_retention_keeps_exactly_k_committed(ckpt_uri, keep):
    store = CheckpointStore(ckpt_uri, keep=keep)
    store.write_shard(1, "state-00000.pt", {"x": torch.zeros(1)})  # an interrupted save, older than all
    for step in range(2, 8):
        save(store, step)
        assert store.committed_steps() == list(range(max(2, step - keep + 1), step + 1))
    assert store.listed_steps() == list(range(8 - keep, 8)), "old and interrupted steps are deleted"


def test_committed_step_is_write_once(ckpt_uri):
    store = CheckpointStore(ckpt_uri)
    save(store, 5)
    with pytest.raises(CheckpointError, match="step 5 is already committed"):
        store.write_shard(5, "state-00000.pt", {"x": torch.zeros(1)})


def test_commit_refuses_a_shard_that_changed_size(ckpt_uri):
    store = CheckpointStore(ckpt_uri)
    records = [store.write_shard(3, name, state) for name, state in shards(3).items()]
    truncate(store, shard_path(store, 3))
    with pytest.raises(CheckpointError, match=r"step 3: shard state-00001\.pt has \d+ bytes, writer wrote"):
        store.commit(3, records, {})
    assert not storage.exists(f"{store.step_path(3)}/{MARKER}")


def test_loading_never_unpickles_code(ckpt_uri):
    store = CheckpointStore(ckpt_uri)
    record = store.write_shard(1, "state-00000.pt", {"evil": _Evil()})
    store.commit(1, [record], {})
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        store.read_shard(1, "state-00000.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_resume_sets_aside_a_newer_damaged_step_so_it_can_be_committed_again(ckpt_uri, capsys):
    """Steps 2 and 4 committed, step 4 corrupted: resume picks 2 and moves 4 to rejected/ (kept, not deleted),
    so training on from 2 can commit step 4 again (write-once refused it before)."""
    from raytron.launcher.checkpointing import choose_resume_step

    store = CheckpointStore(ckpt_uri, keep=3)
    for step in (2, 4):
        save(store, step)
    bit_flip(store, shard_path(store, 4))
    step, manifest = choose_resume_step(store)
    assert step == 2 and manifest["step"] == 2
    assert store.committed_steps() == [2]
    rejected = [f"{store.uri}/rejected/{name}" for name in storage.list_names(f"{store.uri}/rejected")]
    assert len(rejected) == 1 and "step-000000004-" in rejected[0]
    assert storage.exists(f"{rejected[0]}/{MARKER}") and storage.exists(f"{rejected[0]}/state-00001.pt")
    save(store, 4)  # the run commits step 4 anew
    assert store.latest(deep=True)[0].step == 4 and store.apply_retention() == []
    out = capsys.readouterr().out
    assert "skipped checkpoint: step 4" in out and "set aside step 4" in out


def test_resume_refuses_when_no_committed_step_verifies_and_moves_nothing(ckpt_uri):
    from raytron.launcher.checkpointing import choose_resume_step

    store = CheckpointStore(ckpt_uri, keep=3)
    for step in (2, 4):
        save(store, step)
        bit_flip(store, shard_path(store, step))
    reason = choose_resume_step(store)
    assert isinstance(reason, str) and "no committed checkpoint" in reason and "step 2" in reason
    assert "move" in reason and store.committed_steps() == [2, 4]


def test_resume_of_a_run_without_checkpoints_starts_at_step_0(ckpt_uri):
    from raytron.launcher.checkpointing import choose_resume_step

    assert choose_resume_step(CheckpointStore(ckpt_uri)) is None
