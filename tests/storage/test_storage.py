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


def _tree(root: str) -> str:
    """root/src/{a.txt, sub/b.txt} (write_bytes: the in-place write)."""
    src = storage.join(root, "src")
    storage.makedirs(storage.join(src, "sub"))
    storage.write_bytes(storage.join(src, "a.txt"), b"aa")
    storage.write_bytes(storage.join(src, "sub", "b.txt"), b"bbb")
    return src


def test_files_of_a_file_a_directory_and_a_pattern(root):
    src = _tree(root)
    a, b = storage.join(src, "a.txt"), storage.join(src, "sub", "b.txt")
    files = storage.list_files(src)
    assert sorted(files) == sorted([storage.full_uri(a), storage.full_uri(b)])
    assert {files[storage.full_uri(b)]["size"]} == {storage.size(b)} == {3}
    assert list(storage.list_files(a)) == [storage.full_uri(a)]
    assert list(storage.list_files(storage.join(src, "*.txt"))) == [storage.full_uri(a)]
    assert storage.list_files(storage.join(src, "*.none")) == {}
    assert storage.glob(storage.join(src, "s*")) == [storage.full_uri(storage.join(src, "sub"))]
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.list_files(storage.join(src, "missing"))
    assert storage.isdir(src) and not storage.isdir(a) and storage.isfile(a) and not storage.islink(a)
    assert storage.info(a)["size"] == 2 and storage.full_uri(a).startswith(("file://", "memory://"))


def test_copy_move_and_transfers(root, tmp_path):
    src = _tree(root)
    storage.copy_tree(src, storage.join(root, "copy"))
    storage.move(src, storage.join(root, "moved"))
    assert not storage.exists(src)
    for tree in ("copy", "moved"):
        assert storage.read_bytes(storage.join(root, tree, "sub", "b.txt")) == b"bbb"
        assert storage.list_names(storage.join(root, tree)) == ["a.txt", "sub"]
    local = tmp_path / "local"
    local.mkdir()
    storage.download_file(storage.join(root, "copy", "a.txt"), str(local / "x"))
    storage.upload_file(str(local / "x"), storage.join(root, "up.txt"))
    assert storage.read_bytes(storage.join(root, "up.txt")) == b"aa"
    storage.download_dir(storage.join(root, "copy", "sub"), str(local))
    assert sorted(os.listdir(local)) == ["b.txt", "x"]
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(root, "gone"), str(local))


def test_inside_compares_places_not_spellings(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    os.symlink(tmp_path / "run", tmp_path / "alias")
    ck = str(tmp_path / "run" / "checkpoints")
    assert storage.is_inside(str(tmp_path / "alias" / "checkpoints" / "w.bin"), ck)
    assert storage.is_inside(f"file://{tmp_path}/run/x/../checkpoints", ck)
    assert not storage.is_inside(str(tmp_path / "run" / "checkpoints2"), ck)
    assert storage.islink(str(tmp_path / "alias")) and not storage.islink("memory://alias")
    assert storage.is_inside("memory://b/run/checkpoints/x/../y", "memory://b/run/checkpoints")
    assert not storage.is_inside("memory://b/run/checkpoints", ck)
    assert storage.store_path("s3://bucket/x") == "bucket/x" and storage.store_path(f"file://{tmp_path}") == str(tmp_path)


def test_pyarrow_view_of_the_same_files(root):
    import pyarrow.fs

    storage.write_bytes_atomic(storage.join(root, "r", "x.bin"), b"xyz")
    path, fs = storage.pyarrow_filesystem(storage.join(root, "r"))
    assert fs.get_file_info(f"{path}/x.bin").size == 3
    assert fs.get_file_info(f"{path}/x.bin").type == pyarrow.fs.FileType.File
