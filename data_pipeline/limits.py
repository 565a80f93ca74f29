"""What one source file may be: a regular file whose documents each fit in one piece of memory.

jsonl and parquet files are streamed (in chunks, by row group), so their size does not matter; one
document is decoded and tokenized whole, so `/dev/zero`, one 50 GB text file (a text file is one
document), a 50 GB jsonl line or parquet row group would get the job OOM-killed without a word. We
refuse them, naming the file and its size: devices, FIFOs and sockets before anything is read
(reading /dev/zero never ends, a FIFO blocks); text files by their size on disk; compressed text,
jsonl lines and parquet row groups while reading, by bounded reads.
"""

from __future__ import annotations

import os
import stat

from .errors import DataError
from .storage import infer_compression

MAX_FILE_BYTES_ENV = "RAYTRON_DATA_MAX_FILE_BYTES"
_MIN_DEFAULT = 256 << 20
_CHUNK = 8 << 20


def limits_chunk() -> int:
    """Bytes read per call when streaming a file."""
    return _CHUNK


def max_file_bytes() -> int:
    """Largest document (a text file, a jsonl line, a parquet row group; after decompression) read at once: $RAYTRON_DATA_MAX_FILE_BYTES, else 1/16 of
    this machine's memory (at least 256 MiB), so that a few parallel workers still fit."""
    raw = os.environ.get(MAX_FILE_BYTES_ENV)
    if raw:
        value = int(raw) if raw.strip().isdigit() else 0
        if value < 1:
            raise DataError(f"{MAX_FILE_BYTES_ENV} must be a positive number of bytes, got {raw!r}")
        return value
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        memory = 16 << 30
    return max(_MIN_DEFAULT, memory // 16)


def human_bytes(n: int) -> str:
    """'3.0 GiB (3,221,225,472 bytes)', '1,000 bytes'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def too_large(uri: str, size_words: str, limit: int) -> DataError:
    """The refusal for a file over `limit`; `size_words` says how big ('is 3.0 GiB', ...)."""
    return DataError(
        f"data file {uri} {size_words}; one file may take at most {human_bytes(limit)} "
        f"because it is read and tokenized whole, in memory: split it into smaller files (for text/jsonl "
        f"`split -C 256M FILE part-` keeps lines whole) and give their directory as the source, or raise "
        f"{MAX_FILE_BYTES_ENV}")


def too_large_line(uri: str, limit: int) -> DataError:
    """The refusal for a jsonl line over `limit` (one line is one document, held whole)."""
    return DataError(f"data file {uri} holds more than {human_bytes(limit)} in one line (after decompression); "
                     f"one document may take at most that much because it is tokenized whole: split the record "
                     f"or raise {MAX_FILE_BYTES_ENV}")


def check_local_file(source_uri: str, path: str, format: str, limit: int) -> None:
    """Refuse a local path of `source_uri` that is not a regular file, or an uncompressed text file
    (one document) larger than `limit` (jsonl lines and parquet row groups are checked while reading)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"data source {source_uri}: cannot stat {path}: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"data source {source_uri}: {path} is a {_file_kind(st.st_mode)}, not a regular "
                        f"file; give files, a directory or a glob of files")
    if format == "text" and infer_compression(path) is None and st.st_size > limit:
        raise too_large(path, f"is {human_bytes(st.st_size)}", limit)


def read_bounded(f, uri: str, limit: int) -> bytes:
    """All of `f` (decompressed), refusing once it passes `limit` bytes. Read in chunks: one
    `read(limit + 1)` would allocate the whole limit up front for every small file."""
    parts, total = [], 0
    while chunk := f.read(min(_CHUNK, limit + 1 - total)):
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            raise too_large(uri, f"holds more than {human_bytes(limit)} (after decompression)", limit)
    return b"".join(parts)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
