"""The storage layer: the one module that talks to fsspec. Everything else names files by URI and calls
the functions here (the layering test, tests/test_layering.py, refuses an fsspec import anywhere else).

How storage options reach fsspec: only through the environment, never through job configs (secrets
must not live there) and never through function arguments (worker processes would not see them).
  * s3:// uses s3fs/botocore, which read AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (botocore's standard variable: point it at MinIO, moto or
    any S3-compatible server). The tests run a moto server on 127.0.0.1 this way.
  * Any other fsspec option can be given as FSSPEC_<PROTOCOL>_<KEY>=value or
    FSSPEC_<PROTOCOL>='{json}' (fsspec's own convention, read when fsspec is imported, so spawned
    processes inherit it too).

Commit rule: a reader must never see a half-written file. On local disk we write a temporary file
beside the target and rename it; on object stores one PUT is atomic, so we write the final key directly.
"Local" is decided in one place, `is_local`: the filesystem fsspec resolves the URI to is the local one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

import fsspec
from fsspec.utils import infer_compression

__all__ = ["StorageError", "fs_and_path", "is_local", "is_local_uri", "absolute_uri", "local_path", "join", "exists",
           "isfile", "modified", "read_bytes", "open_file", "list_names", "makedirs", "remove", "rmdir", "open_atomic",
           "write_bytes_atomic", "append_bytes", "staged_file", "create_exclusive", "upload_dir", "local_scratch_root",
           "infer_compression"]


class StorageError(ValueError):
    """A URI no installed filesystem can open (unknown scheme, or its fsspec package is missing)."""

    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = uri, reason
        super().__init__(f"cannot open {uri!r}: {reason}")


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise StorageError(uri, str(exc)) from exc


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """The filesystem is this machine's own disk (renames are atomic, paths work with `open`)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def is_local_uri(uri: str) -> bool:
    """`uri` names a local path (no scheme, or file:// / local://), decided from the text alone: for
    settings checked before any filesystem is resolved (an s3:// URI must not need s3fs to be read)."""
    return "://" not in uri or uri.startswith(("file://", "local://"))


def absolute_uri(uri: str) -> str:
    """A local path made absolute against this process's directory (scheme dropped); URIs unchanged."""
    if not is_local_uri(uri):
        return uri
    return os.path.abspath(uri.removeprefix("file://").removeprefix("local://"))


def local_path(uri: str) -> str | None:
    """The absolute local path `uri` names, or None when it lives on another filesystem."""
    fs, path = fs_and_path(uri)
    return path if is_local(fs) else None


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def isfile(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.isfile(path)


def modified(uri: str) -> float:
    """Last modification time (seconds since the epoch); not every filesystem knows it (then it raises)."""
    fs, path = fs_and_path(uri)
    return fs.modified(path).timestamp()


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    return fs.cat_file(path)


def open_file(uri: str, mode: str = "rb", **kwargs: Any) -> IO:
    """`uri` opened for reading (fsspec's file object; `compression="infer"` etc. pass through)."""
    fs, path = fs_and_path(uri)
    return fs.open(path, mode, **kwargs)


def list_names(uri: str) -> list[str]:
    """Base names of the entries of directory `uri`, sorted; [] when it does not exist. Never a cached
    listing: other processes write the directories this is asked about."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache()
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def makedirs(uri: str) -> None:
    fs, path = fs_and_path(uri)
    fs.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = False, missing_ok: bool = True) -> None:
    fs, path = fs_and_path(uri)
    if missing_ok and not fs.exists(path):
        return
    fs.rm(path, recursive=recursive)


def rmdir(uri: str) -> None:
    """Remove the empty directory `uri` (an error if anything is in it)."""
    fs, path = fs_and_path(uri)
    fs.rmdir(path)


def _file_mode(path: str) -> int:
    """The mode of the file `path` replaces, else what a new file gets under this process's umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def staged_file(uri: str, replace: bool = True) -> Iterator[str]:
    """A local path to write `uri`'s content to with any library; when the block succeeds it becomes
    `uri` in one step (a rename beside the target locally, one upload to object storage), keeping the
    mode of the file it replaces. `replace=False`: FileExistsError if `uri` appeared meanwhile (nothing
    is written). On any failure the temporary file is removed."""
    fs, path = fs_and_path(uri)
    local = is_local(fs)
    if local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    else:
        fd, tmp = tempfile.mkstemp(prefix="raytron-upload-", dir=local_scratch_root())
        os.close(fd)
    try:
        yield tmp
        if not replace and fs.exists(path):
            raise FileExistsError(f"{uri} appeared while it was being written")
        if local:
            os.chmod(tmp, _file_mode(path))
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def open_atomic(uri: str) -> Iterator[IO[bytes]]:
    """Open `uri` for binary writing; the file appears under its name only if the block succeeds."""
    fs, path = fs_and_path(uri)
    if is_local(fs):
        with staged_file(uri) as tmp, open(tmp, "wb") as f:
            yield f
        return
    f = fs.open(path, "wb")  # streamed: an object appears only when its upload completes
    try:
        yield f
    except BaseException:
        _abandon(f)
        raise
    f.close()


def _abandon(f) -> None:
    """Drop an object-store write without committing it: closing would upload what was written."""
    discard = getattr(f, "discard", None)
    if discard is None:  # cannot abort this kind of file
        f.close()
        return
    discard()  # fsspec buffered files: drops the buffer, aborts a multipart upload
    try:
        f.closed = True  # so that neither we nor __del__ close (= upload) it
    except AttributeError:  # a file whose close() uploads nothing (memory:// commits when opened)
        pass


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """`uri` holds `data`, appearing whole or not at all (local: staged and renamed; else one PUT)."""
    fs, path = fs_and_path(uri)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    with staged_file(uri) as tmp, open(tmp, "wb") as f:
        f.write(data)


def append_bytes(uri: str, data: bytes) -> None:
    """Add `data` at the end of `uri` (created if missing). Object stores cannot append, so the whole
    (small) file is rewritten; the writer must be the only one (a run's records have one writer)."""
    old = read_bytes(uri) if exists(uri) else b""
    write_bytes_atomic(uri, old + data)


def create_exclusive(uri: str, data: bytes) -> None:
    """Create `uri` holding `data` only if it does not exist, else FileExistsError. Atomic on local and
    shared filesystems and on object stores with conditional writes (s3fs, memory); a filesystem whose
    open() rejects mode "x" falls back to check-then-write, which narrows the race to one round trip."""
    fs, path = fs_and_path(uri)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except (ValueError, NotImplementedError):
        if fs.exists(path):
            raise FileExistsError(uri) from None
        fs.pipe_file(path, data)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy the local directory's files into directory `uri` (overwriting what has the same name)."""
    fs, path = fs_and_path(uri)
    fs.put(local_dir.rstrip("/") + "/", path, recursive=True)


def local_scratch_root() -> Path:
    """Where remote files are staged locally (memory-mapped caches, uploads): RAYTRON_DATA_LOCAL_CACHE,
    else the system temporary directory."""
    root = os.environ.get("RAYTRON_DATA_LOCAL_CACHE") or os.path.join(tempfile.gettempdir(), "raytron-data")
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)
