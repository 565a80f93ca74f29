"""The storage layer (raytron/storage.py) and the run-directory layout (raytron/run_dir.py) on local disk
and on fsspec's in-memory filesystem (the object-store path: no rename, one write per object)."""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from raytron import storage
from raytron.run_dir import RunDir, step_folder


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "file" else f"memory://storage-test-{uuid.uuid4().hex[:8]}"


def test_atomic_write_leaves_only_the_file(root):
    uri = storage.join(root, "d", "x.json")
    storage.makedirs(storage.join(root, "d"))
    storage.write_bytes_atomic(uri, b"one")
    storage.write_bytes_atomic(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert storage.list_names(storage.join(root, "d")) == ["x.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    """(Local disk: fsspec's memory:// publishes a file when it is opened, unlike an object store.)"""
    root = str(tmp_path)
    uri = storage.join(root, "x.bin")
    storage.write_bytes_atomic(uri, b"old")
    with pytest.raises(RuntimeError), storage.open_atomic(uri) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert storage.read_bytes(uri) == b"old"
    assert storage.list_names(root) == ["x.bin"]


def test_staged_file_refuses_a_file_that_appeared_unless_replacing(root):
    uri = storage.join(root, "w.bin")
    with pytest.raises(FileExistsError), storage.staged_file(uri, replace=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"mine")
        storage.write_bytes_atomic(uri, b"theirs")  # another writer, meanwhile
    assert storage.read_bytes(uri) == b"theirs"
    with storage.staged_file(uri) as tmp, open(tmp, "wb") as f:
        f.write(b"mine")
    assert storage.read_bytes(uri) == b"mine" and storage.list_names(root) == ["w.bin"]


def test_staged_file_keeps_the_replaced_mode(tmp_path):
    path = tmp_path / "w.bin"
    with storage.staged_file(str(path)) as tmp, open(tmp, "wb") as f:
        f.write(b"a")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o640)
    with storage.staged_file(str(path)) as tmp, open(tmp, "wb") as f:
        f.write(b"b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"b"


def test_exclusive_create_and_append(root):
    claim = storage.join(root, ".claim")
    storage.create_exclusive(claim, b"first")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(claim, b"second")
    assert storage.read_bytes(claim) == b"first"
    log = storage.join(root, "log.jsonl")
    storage.append_bytes(log, b"a\n")
    storage.append_bytes(log, b"b\n")
    assert storage.read_bytes(log) == b"a\nb\n"


def test_listing_and_removal_of_missing_things(root):
    assert storage.list_names(storage.join(root, "nothing")) == []
    storage.remove(storage.join(root, "nothing"))  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.remove(storage.join(root, "nothing"), missing_ok=False)


def test_local_is_decided_one_way(tmp_path):
    assert storage.local_path(str(tmp_path)) == str(tmp_path)
    assert storage.local_path(f"file://{tmp_path}") == str(tmp_path)
    assert storage.local_path("memory://x") is None
    assert storage.is_local_uri("runs") and storage.is_local_uri("file:///a") and storage.is_local_uri("local:///a")
    assert not storage.is_local_uri("s3://b/runs") and not storage.is_local_uri("memory://x")
    assert storage.absolute_uri("file:///a/b") == "/a/b" and storage.absolute_uri("s3://b/x") == "s3://b/x"
    assert storage.absolute_uri("runs") == os.path.abspath("runs")


def test_unknown_scheme_names_the_uri():
    with pytest.raises(storage.StorageError, match="nosuchscheme://x") as info:
        storage.exists("nosuchscheme://x")
    assert isinstance(info.value, ValueError) and info.value.uri == "nosuchscheme://x"


def test_run_dir_layout():
    run = RunDir.under("s3://bucket/runs/", "job")
    assert run.uri == "s3://bucket/runs/job" and run.name == "job"
    assert run.step_dir(7) == "s3://bucket/runs/job/checkpoints/step-000000007" and step_folder(7) == "step-000000007"
    assert run.rank_record(2, 3) == "s3://bucket/runs/job/worker_groups/0002/rank-00003.json"
    assert run.rejected == "s3://bucket/runs/job/checkpoints/rejected"
    assert RunDir.given("s3://bucket/runs/job/checkpoints/") == run == RunDir.given("s3://bucket/runs/job")
