"""Finding the files behind a source URI and reading documents out of them.

A *document* is the unit that gets one end-of-document token: a whole file for `text`, one line
for `jsonl`, one row for `parquet`. Bad content is counted in `ReadStats` (with a few examples
naming file and line) instead of raising, see `errors.DataError` for why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Iterator

from .errors import DataError
from .limits import check_local_file, human_bytes, limits_chunk, max_file_bytes, read_bounded, too_large, \
    too_large_line
from .storage import list_files, local_path, open_file

BUILTIN_STDLIB = "builtin://python-stdlib"
FORMATS = ("text", "jsonl", "parquet")
_JSONL_EXT = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".jsonl.zst", ".json.gz")
_PARQUET_EXT = (".parquet", ".pq")
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_MAX_EXAMPLES = 20


@dataclass(frozen=True)
class SourceFile:
    """One file to read: full URI (with protocol), its format and the jsonl/parquet text field."""

    uri: str
    format: str
    field: str = "text"
    stamp: str = ""
    """Size and modification time (or ETag/generation) as listed: the data cache key covers them, so
    a file that changes after a cache was built gets a new cache, not the stale one."""


@dataclass
class ReadStats:
    """What was read and what was skipped, per kind of problem (the summary prints all of it)."""

    files: int = 0
    bytes_read: int = 0
    documents: int = 0
    empty_files: int = 0
    empty_documents: int = 0
    invalid_utf8: int = 0
    malformed_lines: int = 0
    missing_field: int = 0
    unreadable_files: int = 0
    examples: list[str] = field(default_factory=list)
    first_examples: dict[str, str] = field(default_factory=dict)
    """The first example of each skip kind (`examples` may be all of one kind)."""
    string_fields: dict[str, int] = field(default_factory=dict)
    """Characters per string field in jsonl records that lack the text field: names the fix."""

    SKIP_KINDS = ("empty_files", "empty_documents", "invalid_utf8", "malformed_lines",
                  "missing_field", "unreadable_files")

    def skip(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.first_examples.setdefault(kind, where)
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{kind}: {where}")

    @property
    def skipped(self) -> int:
        return sum(getattr(self, k) for k in self.SKIP_KINDS)

    def merge(self, other: "ReadStats") -> None:
        for f in dataclasses.fields(self):
            if f.name == "examples":
                room = _MAX_EXAMPLES - len(self.examples)
                self.examples.extend(other.examples[:max(room, 0)])
            elif f.name == "first_examples":
                self.first_examples = {**other.first_examples, **self.first_examples}
            elif f.name == "string_fields":
                for name, chars in other.string_fields.items():
                    self.string_fields[name] = self.string_fields.get(name, 0) + chars
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def infer_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(_PARQUET_EXT):
        return "parquet"
    if lower.endswith(_JSONL_EXT):
        return "jsonl"
    return "text"


def stdlib_files() -> list[str]:
    """The .py files of this interpreter's stdlib, sorted: a corpus on every machine, no download.
    Test suites and site-packages are left out (third-party code; tests are mostly boilerplate)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        found.extend(os.path.join(dirpath, n) for n in filenames if n.endswith(".py"))
    return sorted(found)


def resolve_source(uri: str, format: str = "auto", field: str = "text") -> list[SourceFile]:
    """Expand a file, directory (recursive) or glob URI into its files, sorted; fail naming `uri`
    when it does not exist, is not readable or matches nothing, so bad paths stop the driver."""
    if format == "indexed" or (format == "auto" and uri.endswith((".bin", ".idx"))):
        raise DataError(f"source {uri!r} is a prepared .bin/.idx prefix (format indexed): train on it directly "
                        f"(data.sources), it is not tokenized again")
    if format not in ("auto", *FORMATS):
        raise DataError(f"source {uri!r}: unknown format {format!r}; use auto, {', '.join(FORMATS)}")
    if uri == BUILTIN_STDLIB:
        return [SourceFile("file://" + p, "text", field) for p in stdlib_files()]
    if uri.startswith("builtin://"):
        raise DataError(f"unknown builtin source {uri!r}; available: {BUILTIN_STDLIB}")
    try:
        infos = list_files(uri)
    except FileNotFoundError:
        raise DataError(f"data source not found: {uri}") from None
    except PermissionError as exc:
        raise DataError(f"no permission to read data source {uri}: {exc}") from exc
    infos = {p: i for p, i in infos.items() if not os.path.basename(p).startswith((".", "_"))}
    names = sorted(set(infos) - prepared_outputs(infos))
    if not names:
        raise DataError(f"data source matched no files: {uri}" + (
            " (only prepared .bin/.idx datasets, which are not text: give their prefix as a source)" if infos else ""))
    files = [SourceFile(p, format if format != "auto" else infer_format(p), field, stamp(infos[p])) for p in names]
    if local_path(uri) is not None:  # devices, FIFOs, oversized files: refused here, before anything is read
        limit = max_file_bytes()
        for f in files:
            check_local_file(uri, local_path(f.uri), f.format, limit)
    return files


def prepared_outputs(paths) -> set[str]:
    """The files among `paths` that `prepare` wrote: `P.bin` and `P.idx` when both are there, and
    `P.summary.json` beside either. A directory holding a corpus and its prepared copy is read as the
    corpus only (token ids read as text would be garbage documents)."""
    paths = set(paths)
    found = set()
    for p in paths:
        if p.endswith(".idx") and p[:-4] + ".bin" in paths:
            found |= {p, p[:-4] + ".bin"}
    prefixes = {p[:-4] for p in paths if p.endswith((".bin", ".idx"))}
    found |= {p for p in paths if p.endswith(".summary.json") and p[:-len(".summary.json")] in prefixes}
    return found


_TIME_KEYS = ("mtime", "LastModified", "updated", "created")  # the first one present
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash")


def stamp(info: dict) -> str:
    """A file's size and modification stamp from an fsspec info record (local mtime, S3's LastModified and
    ETag, GCS's updated and generation). Not a local file's ctime: hard-linking a prepared prefix into a
    cache changes it, and the key must not."""
    when = next((str(info[k]) for k in _TIME_KEYS if k in info), None)
    return json.dumps([info.get("size"), when, *(str(info[k]) for k in _VERSION_KEYS if k in info)])


def read_documents(src: SourceFile, stats: ReadStats) -> Iterator[str]:
    """Yield the documents of one file, counting every file/line/row that is skipped. Streams: jsonl
    is read in chunks and parquet by row group, so memory is bounded by the largest document (a text
    file, a line, a row group), never by the file (see limits.py)."""
    try:
        f = open_file(src.uri, "rb", compression="infer")
    except FileNotFoundError as exc:
        raise DataError(f"data file disappeared while reading: {src.uri}") from exc
    except PermissionError as exc:
        raise DataError(f"no permission to read data file {src.uri}: {exc}") from exc
    stats.files += 1
    with f:
        try:
            if src.format == "text":
                yield from _text_document(f, src, stats)
            elif src.format == "jsonl":
                yield from _jsonl_documents(f, src, stats)
            else:
                yield from _parquet_documents(f, src, stats)
        except DataError:
            raise
        except Exception as exc:  # corrupt parquet, truncated gzip, ...: count it, keep going
            stats.skip("unreadable_files", f"{src.uri} ({type(exc).__name__}: {exc})")


def _text_document(f, src: SourceFile, stats: ReadStats) -> Iterator[str]:
    data = read_bounded(f, src.uri, max_file_bytes())  # one document: tokenized whole
    stats.bytes_read += len(data)
    if not data:
        stats.skip("empty_files", src.uri)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        stats.skip("invalid_utf8", f"{src.uri} (byte {exc.start})")
        return
    stats.documents += 1
    yield text


def _lines(f, src: SourceFile, stats: ReadStats) -> Iterator[bytes]:
    """The lines of `f` (without their newline), read in chunks; a line over the limit is refused."""
    limit, rest = max_file_bytes(), b""
    while chunk := f.read(limits_chunk()):
        stats.bytes_read += len(chunk)
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            if len(line) >= limit:  # with its newline, over the limit
                raise too_large_line(src.uri, limit)
            yield line
        if len(rest) > limit:
            raise too_large_line(src.uri, limit)
    if rest:
        yield rest


def _jsonl_documents(f, src: SourceFile, stats: ReadStats) -> Iterator[str]:
    before = stats.bytes_read
    for lineno, raw in enumerate(_lines(f, src, stats), start=1):
        if not raw.strip():
            continue  # blank lines (and the final newline) are layout, not documents
        where = f"{src.uri}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("invalid_utf8", where)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            stats.skip("malformed_lines", f"{where} ({exc.msg})")
            continue
        text = record.get(src.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.skip("missing_field", f"{where} (no string field {src.field!r})")
            _count_string_fields(record, stats)
        elif not text:
            stats.skip("empty_documents", where)
        elif (bad := lone_surrogate(text)) is not None:
            stats.skip("invalid_utf8", f"{where} (lone surrogate {text[bad]!r} at character {bad} of {src.field!r})")
        else:
            stats.documents += 1
            yield text
    if stats.bytes_read == before:
        stats.skip("empty_files", src.uri)


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (U+D800-U+DFFF) in `text`, else None. JSON may escape one
    (`"\\ud800"`) and Python decodes it, but it is no character: it has no UTF-8 encoding, so every
    tokenizer fails on it."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _count_string_fields(record, stats: ReadStats) -> None:
    if isinstance(record, dict):
        for name, value in record.items():
            if isinstance(value, str) and value:
                stats.string_fields[name] = stats.string_fields.get(name, 0) + len(value)


def _parquet_documents(f, src: SourceFile, stats: ReadStats) -> Iterator[str]:
    """Rows of the text column, one row group at a time (a row group is the unit parquet decodes)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if src.field not in names:
        raise DataError(f"parquet file {src.uri} has no column {src.field!r} (columns: {names})")
    md, limit, row = pf.metadata, max_file_bytes(), 0
    if md.num_rows == 0:
        stats.skip("empty_files", src.uri)
        return
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        size = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                   if rg.column(c).path_in_schema == src.field)
        if size > limit:
            raise too_large(src.uri, f"holds {human_bytes(size)} of {src.field!r} text (uncompressed) in one row "
                                     f"group", limit)
        table = pf.read_row_group(g, columns=[src.field])
        stats.bytes_read += table.nbytes
        for text in _column_texts(table.column(src.field)):
            where = f"{src.uri} row {row}"
            row += 1
            if text is _UNDECODABLE:
                stats.skip("invalid_utf8", where)
            elif not isinstance(text, str):
                stats.skip("missing_field", f"{where} (null or non-string {src.field!r})")
            elif not text:
                stats.skip("empty_documents", where)
            else:
                stats.documents += 1
                yield text


_UNDECODABLE = object()


def _column_texts(column) -> list:
    """The values of a parquet text column; a row that is not UTF-8 (a writer that skipped arrow's
    validation) becomes `_UNDECODABLE` instead of failing its whole row group."""
    import pyarrow as pa

    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()).to_pylist()
        return [v if v is None else _decode_or_mark(v) for v in values]


def _decode_or_mark(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _UNDECODABLE
