"""Readers and path resolution: documents read equal the reference text; every bad input is
either a DataError naming the path (unusable source) or counted in ReadStats (bad content)."""

from __future__ import annotations

import builtins
import gzip
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytron.data_pipeline import BUILTIN_STDLIB, DataError, ReadStats, resolve_source
from raytron.data_pipeline.prepare import resolve_all
from raytron.data_pipeline.sources import read_documents, stdlib_files

from tests.data.datapipe_helpers import write_jsonl


def read_all(uri, fmt="auto", field="text"):
    stats = ReadStats()
    docs = [d for f in resolve_source(uri, fmt, field) for d in read_documents(f, stats)]
    return docs, stats


def test_directory_glob_and_file_resolve_sorted(text_corpus):
    root, docs = text_corpus
    by_dir = resolve_source(root)
    assert [f.uri for f in by_dir] == ["file://" + p for p in sorted(docs)]
    assert {f.format for f in by_dir} == {"text"}
    assert resolve_source(root + "/doc00*.txt") == by_dir[:10]
    assert resolve_source(sorted(docs)[3]) == [by_dir[3]]


def test_text_documents_equal_files(text_corpus):
    root, docs = text_corpus
    got, stats = read_all(root)
    assert got == [docs[p] for p in sorted(docs)]
    assert (stats.files, stats.documents, stats.skipped) == (len(docs), len(docs), 0)


def test_jsonl_field_and_bad_lines_counted(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"body": "first"}, "{not json", {"text": "wrong field"}, {"body": ""},
                       {"body": 3}, "", {"body": "last ✓"}])
    with open(path, "ab") as f:
        f.write(b'{"body": "bad \xff utf8"}\n')
    got, stats = read_all(str(path), field="body")
    assert got == ["first", "last ✓"]
    assert (stats.malformed_lines, stats.missing_field, stats.empty_documents, stats.invalid_utf8) == (1, 2, 1, 1)
    assert any(e.startswith("malformed_lines: file://") and "a.jsonl:2" in e for e in stats.examples)


def test_gzip_jsonl_inferred(tmp_path):
    path = tmp_path / "b.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"text": "zipped"}\n{"text": "two"}\n')
    assert read_all(str(path))[0] == ["zipped", "two"]


def test_parquet_field_nulls_and_missing_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "", "beta"], "n": [1, 2, 3, 4]}), path)
    got, stats = read_all(str(path), field="content")
    assert got == ["alpha", "beta"]
    assert (stats.missing_field, stats.empty_documents) == (1, 1)
    with pytest.raises(DataError, match=r"c\.parquet has no column 'text'"):
        read_all(str(path))


def test_empty_invalid_utf8_and_corrupt_files_counted(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    got, stats = read_all(str(tmp_path))
    assert got == ["fine"]
    assert (stats.empty_files, stats.invalid_utf8, stats.unreadable_files, stats.files) == (1, 1, 1, 4)
    assert stats.skipped == 3


def test_missing_paths_all_named_in_one_error(tmp_path):
    with pytest.raises(DataError) as err:
        resolve_all([str(tmp_path / "nope"), str(tmp_path / "also-missing.jsonl"), str(tmp_path)])
    assert "not found" in str(err.value)
    assert str(tmp_path / "nope") in str(err.value) and "also-missing.jsonl" in str(err.value)
    assert "matched no files" in str(err.value)  # the empty tmp_path directory
    assert isinstance(err.value, ValueError)


def test_no_permission_names_path(tmp_path, monkeypatch):
    # We run as root in CI, so chmod 000 would still be readable: make open() refuse instead.
    path = tmp_path / "secret.txt"
    path.write_text("x")
    real_open = builtins.open

    def deny(file, *a, **kw):
        if str(file).endswith("secret.txt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(DataError, match=r"no permission to read data file file://.*secret\.txt"):
        read_all(str(path))


def test_unknown_format_and_builtin_rejected():
    with pytest.raises(DataError, match="unknown format 'csv'"):
        resolve_source("x.csv", "csv")
    with pytest.raises(DataError, match="builtin://nope"):
        resolve_source("builtin://nope")


def test_stdlib_builtin_is_deterministic_py_without_tests():
    files = resolve_source(BUILTIN_STDLIB)
    paths = [f.uri[len("file://"):] for f in files]
    assert paths == sorted(paths) == stdlib_files()
    assert len(paths) > 300 and all(p.endswith(".py") for p in paths)
    assert not any(f"{os.sep}test{os.sep}" in p or "site-packages" in p for p in paths)
