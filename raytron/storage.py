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
"Local" is decided in one place, `_is_local`: the filesystem fsspec resolves the URI to is the local one.

Every function here takes URIs, never filesystem objects: the fsspec filesystem a URI resolves to stays
inside this module (the layering test refuses `_fs_and_path` and fsspec anywhere else).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

import fsspec
from fsspec.utils import infer_compression

__all__ = ["StorageError", "is_local_uri", "absolute_uri", "local_path", "store_path", "full_uri",
           "is_inside", "join", "exists", "isfile", "isdir", "islink", "size", "info", "modified", "glob", "list_files",
           "read_bytes", "open_file", "list_names", "makedirs", "remove", "rmdir", "move", "copy_tree", "write_bytes",
           "open_atomic", "write_bytes_atomic", "append_bytes", "staged_file", "create_exclusive", "upload_file",
           "upload_dir", "download_file", "download_dir", "pyarrow_filesystem", "local_scratch_root",
           "infer_compression"]


class StorageError(ValueError):
    """A URI no installed filesystem can open (unknown scheme, or its fsspec package is missing)."""

    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = uri, reason
        super().__init__(f"cannot open {uri!r}: {reason}")


def _fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI; StorageError when none opens it."""
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise StorageError(uri, str(exc)) from exc


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
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
    fs, path = _fs_and_path(uri)
    return path if _is_local(fs) else None


def store_path(uri: str) -> str:
    """The path of `uri` inside its filesystem (scheme dropped; a local path made absolute), for path rules
    and messages only: whatever reads or writes it is given the URI."""
    return _fs_and_path(uri)[1]


def full_uri(uri: str) -> str:
    """`uri` spelled the way `list_files` names files (`file:///abs/path` for a local path, the scheme
    always present), so that two spellings of one file compare equal."""
    fs, path = _fs_and_path(uri)
    return fs.unstrip_protocol(path)


def _location(uri: str) -> tuple[str, str]:
    """(protocol, normalized absolute path) of `uri`, to compare places: a local path with its symbolic
    links and `..` resolved, `file`; any other URI its filesystem's first protocol and path."""
    fs, path = _fs_and_path(uri)
    if _is_local(fs):
        return "file", os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, posixpath.normpath("/" + path.lstrip("/"))


def is_inside(uri: str, parent_uri: str) -> bool:
    """`uri` is `parent_uri` or lies under it (compared by `location`: symlinks and `..` count)."""
    child, parent = _location(uri), _location(parent_uri)
    if child[0] != parent[0]:
        return False
    return child[1] == parent[1] or child[1].startswith(parent[1].rstrip("/") + "/")


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended, `/`-separated (URIs use `/` on every platform)."""
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    """A file or directory is at `uri`."""
    fs, path = _fs_and_path(uri)
    return fs.exists(path)


def isfile(uri: str) -> bool:
    """`uri` is a file."""
    fs, path = _fs_and_path(uri)
    return fs.isfile(path)


def isdir(uri: str) -> bool:
    """`uri` is a directory (on object stores: a prefix that has objects under it)."""
    fs, path = _fs_and_path(uri)
    return fs.isdir(path)


def islink(uri: str) -> bool:
    """`uri` is a symbolic link on local disk (object stores have none: always False there)."""
    fs, path = _fs_and_path(uri)
    return _is_local(fs) and os.path.islink(path)


def size(uri: str) -> int:
    """Size of the file `uri` in bytes (FileNotFoundError when missing)."""
    fs, path = _fs_and_path(uri)
    return fs.size(path)


def info(uri: str) -> dict:
    """The filesystem's record of `uri`: `size`, `type` and what it knows of versions (local `mtime`,
    S3's `LastModified` and `ETag`, GCS's `updated` and `generation`). FileNotFoundError when missing."""
    fs, path = _fs_and_path(uri)
    return fs.info(path)


def modified(uri: str) -> float:
    """Last modification time (seconds since the epoch); not every filesystem knows it (then it raises)."""
    fs, path = _fs_and_path(uri)
    return fs.modified(path).timestamp()


def glob(uri: str) -> list[str]:
    """The full URIs (see `full_uri`) of the files and directories the pattern `uri` (`*`, `?`, `[`) matches."""
    fs, path = _fs_and_path(uri)
    return [fs.unstrip_protocol(p) for p in fs.glob(path)]


def list_files(uri: str) -> dict[str, dict]:
    """The files `uri` names as {full URI: `info` record}: the file itself, every file under a directory
    (recursively), or every file a pattern (`*`, `?`, `[`) matches, possibly none. FileNotFoundError when
    a URI without a pattern names nothing."""
    fs, path = _fs_and_path(uri)
    if any(c in path for c in "*?["):
        infos = fs.glob(path, detail=True)
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
    elif fs.exists(path):
        infos = {path: fs.info(path)}
    else:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), uri)
    return {fs.unstrip_protocol(p): i for p, i in infos.items() if i.get("type") != "directory"}


def read_bytes(uri: str) -> bytes:
    """The whole content of the file `uri`."""
    fs, path = _fs_and_path(uri)
    return fs.cat_file(path)


def open_file(uri: str, mode: str = "rb", **kwargs: Any) -> IO:
    """`uri` opened for reading (fsspec's file object; `compression="infer"` etc. pass through)."""
    fs, path = _fs_and_path(uri)
    return fs.open(path, mode, **kwargs)


def list_names(uri: str) -> list[str]:
    """Base names of the entries of directory `uri`, sorted; [] when it does not exist. Never a cached
    listing: other processes write the directories this is asked about."""
    fs, path = _fs_and_path(uri)
    fs.invalidate_cache()
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def makedirs(uri: str) -> None:
    """Create directory `uri` and its parents (nothing to do when it exists; object stores need none)."""
    fs, path = _fs_and_path(uri)
    fs.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = False, missing_ok: bool = True) -> None:
    """Delete the file `uri` (a directory and all under it with `recursive`); `missing_ok=False`:
    FileNotFoundError when it is not there. Listings made afterwards are fresh."""
    fs, path = _fs_and_path(uri)
    if missing_ok and not fs.exists(path):
        return
    try:
        fs.rm(path, recursive=recursive)
    finally:
        fs.invalidate_cache()


def rmdir(uri: str) -> None:
    """Remove the empty directory `uri` (an error if anything is in it)."""
    fs, path = _fs_and_path(uri)
    fs.rmdir(path)


def move(uri: str, dest_uri: str) -> None:
    """Move the file or directory `uri` to `dest_uri` on the same filesystem: one rename on local disk
    (atomic); object stores cannot rename, so every object is copied and then the source deleted (a
    reader may see both meanwhile). Listings made afterwards are fresh."""
    fs, path = _fs_and_path(uri)
    try:
        fs.mv(path, _fs_and_path(dest_uri)[1], recursive=True)
    finally:
        fs.invalidate_cache()


def copy_tree(uri: str, dest_uri: str) -> None:
    """Copy every file under directory `uri` to the same relative name under `dest_uri` (same filesystem;
    one server-side copy per object on object stores)."""
    fs, src = _fs_and_path(uri)
    dest = _fs_and_path(dest_uri)[1]
    src = src.rstrip("/")
    local = _is_local(fs)
    for path in fs.find(src):
        target = f"{dest}/{path[len(src):].lstrip('/')}"
        if local:  # object stores have no folders to create
            os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.copy(path, target)


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
    fs, path = _fs_and_path(uri)
    local = _is_local(fs)
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
    fs, path = _fs_and_path(uri)
    if _is_local(fs):
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


def write_bytes(uri: str, data: bytes) -> None:
    """`uri` holds `data`, written in place: a reader (or a crash) may see it half written on local disk.
    For bulk files that a marker written last commits (checkpoint shards); else use `write_bytes_atomic`."""
    fs, path = _fs_and_path(uri)
    fs.pipe_file(path, data)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """`uri` holds `data`, appearing whole or not at all (local: staged and renamed; else one PUT)."""
    fs, path = _fs_and_path(uri)
    if not _is_local(fs):
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
    fs, path = _fs_and_path(uri)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except (ValueError, NotImplementedError):
        if fs.exists(path):
            raise FileExistsError(uri) from None
        fs.pipe_file(path, data)


def upload_file(local_file: str, uri: str) -> None:
    """Copy the local file to `uri` (one upload to object storage; on local disk a plain, non-atomic copy:
    `staged_file` is the atomic way)."""
    fs, path = _fs_and_path(uri)
    fs.put_file(local_file, path)


def download_file(uri: str, local_file: str) -> None:
    """Copy the file `uri` to the local path `local_file`."""
    fs, path = _fs_and_path(uri)
    fs.get_file(path, local_file)


def download_dir(uri: str, local_dir: str) -> None:
    """Copy the files directly inside directory `uri` into the existing local directory `local_dir` (not
    recursive). FileNotFoundError when `uri` does not exist."""
    fs, path = _fs_and_path(uri)
    for entry in fs.ls(path, detail=False):
        fs.get_file(entry, os.path.join(local_dir, os.path.basename(entry.rstrip("/"))))


def pyarrow_filesystem(uri: str):
    """(path inside the filesystem, pyarrow filesystem) of `uri`, for libraries that take a pyarrow
    filesystem (Ray Train's storage): the same fsspec filesystem, with its storage options, behind
    pyarrow's interface."""
    import pyarrow.fs

    fs, path = _fs_and_path(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy the local directory's files into directory `uri` (overwriting what has the same name)."""
    fs, path = _fs_and_path(uri)
    fs.put(local_dir.rstrip("/") + "/", path, recursive=True)


def local_scratch_root() -> Path:
    """Where remote files are staged locally (memory-mapped caches, uploads): RAYTRON_DATA_LOCAL_CACHE,
    else the system temporary directory."""
    root = os.environ.get("RAYTRON_DATA_LOCAL_CACHE") or os.path.join(tempfile.gettempdir(), "raytron-data")
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)
