"""fsspec helpers: one place that decides how URIs become filesystems and how writes commit.

How storage options reach fsspec: only through the environment, never through job configs (secrets
must not live there) and never through function arguments (worker processes would not see them).
  * s3:// uses s3fs/botocore, which read AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (botocore's standard variable: point it at MinIO, moto or
    any S3-compatible server). The tests run a moto server on 127.0.0.1 this way.
  * Any other fsspec option can be given as FSSPEC_<PROTOCOL>_<KEY>=value or
    FSSPEC_<PROTOCOL>='{json}' (fsspec's own convention, read when fsspec is imported, so spawned
    prepare workers inherit it too).

Commit rule: a reader must never see a half-written file. Locally we write a temp file and
os.replace it; on object stores one PUT is atomic, so we write the final key directly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import IO, Iterator

import fsspec

from .errors import DataError


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise DataError(f"cannot open {uri!r}: {exc}") from exc


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


@contextlib.contextmanager
def open_atomic(uri: str) -> Iterator[IO[bytes]]:
    """Open `uri` for binary writing; the file appears under its name only if the block succeeds."""
    fs, path = fs_and_path(uri)
    if not is_local(fs):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            _abandon(f)
            raise
        f.close()
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _abandon(f) -> None:
    """Drop an object-store write without committing it: closing would upload what was written."""
    discard = getattr(f, "discard", None)
    if discard is None:  # cannot abort this kind of file
        f.close()
        return
    discard()  # fsspec buffered files: drops the buffer, aborts a multipart upload
    f.closed = True  # so that neither we nor __del__ close (= upload) it


def write_bytes_atomic(uri: str, data: bytes) -> None:
    with open_atomic(uri) as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def local_scratch_root() -> Path:
    """Where remote caches are copied for memory-mapping (RAYTRON_DATA_LOCAL_CACHE, else /tmp)."""
    root = os.environ.get("RAYTRON_DATA_LOCAL_CACHE") or os.path.join(tempfile.gettempdir(), "raytron-data")
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)
