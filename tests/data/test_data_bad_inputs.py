"""Bad input to `raytron data prepare` and to job data sources: refused with exit 2 / DataError that
says what is wrong and how to fix it, and nothing (not even an empty .bin/.idx) left behind."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytron.data_pipeline import DataError, IndexedTokens, prepare, prepare_for_job
from raytron.data_pipeline.cli import main
from raytron.data_pipeline.limits import MAX_FILE_BYTES_ENV, max_file_bytes
from raytron.data_pipeline.prepare import resolve_all

from tests.data.datapipe_helpers import data_spec, write_jsonl

JUNK = bytes(range(256)) * 4  # first invalid UTF-8 byte: 0x80 at offset 128


def cli(*argv) -> int:
    return main(["data", "prepare", *map(str, argv), "--no-progress"])


def decoded(prefix) -> list[bytes]:
    ds = IndexedTokens(str(prefix))
    return [bytes(ds.document(i)[:-1].astype(np.uint8)) for i in range(len(ds))]


def test_existing_output_refused_unless_force(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first corpus")
    (tmp_path / "b.txt").write_text("second")
    out = tmp_path / "o" / "ds"
    assert cli(tmp_path / "a.txt", "--out", out) == 0
    before = {ext: (tmp_path / "o" / f"ds.{ext}").read_bytes() for ext in ("bin", "idx")}
    capsys.readouterr()
    for given in (out, f"{out}.bin"):
        assert cli(tmp_path / "b.txt", "--out", given) == 2
        err = capsys.readouterr().err
        assert f"{out}.bin and {out}.idx already exist" in err and "--force" in err
        assert {ext: (tmp_path / "o" / f"ds.{ext}").read_bytes() for ext in ("bin", "idx")} == before
    assert cli(tmp_path / "b.txt", "--out", out, "--force") == 0
    assert decoded(out) == [b"second"]


@pytest.mark.parametrize("make_dir", [False, True])
def test_directory_as_out_prefix_refused(tmp_path, capsys, make_dir):
    (tmp_path / "a.txt").write_text("text")
    if make_dir:
        (tmp_path / "prep").mkdir()
    given = str(tmp_path / "prep") + ("" if make_dir else "/")
    assert cli(tmp_path / "a.txt", "--out", given) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and f"like {tmp_path}/prep/corpus" in err
    assert not any(p.name.endswith((".bin", ".idx")) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("name,content,reason", [
    ("empty.txt", b"", "1 empty file(s) (e.g. file://{d}/empty.txt)"),
    ("junk.dat", JUNK, "1 invalid UTF-8 (e.g. file://{d}/junk.dat (byte 128)); documents must be UTF-8"),
    ("bad.parquet", b"PAR1 not a parquet file", "1 unreadable file(s) (e.g. file://{d}/bad.parquet (Arrow"),
], ids=["empty", "binary", "corrupt-parquet"])
def test_zero_documents_exit_2_and_write_nothing(tmp_path, capsys, name, content, reason):
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(content)
    assert cli(src / name, "--out", tmp_path / "out" / "ds") == 2
    err = capsys.readouterr().err
    assert f"error: no usable documents found in {src / name} (1 file(s) read): skipped 1: " in err
    assert reason.format(d=src) in err
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("flag,value", [("--max-documents", 0), ("--seq-len", 0), ("--seq-len", -5),
                                        ("--workers", 0)])
def test_numeric_flags_below_minimum_named(tmp_path, capsys, flag, value):
    (tmp_path / "a.txt").write_text("text")
    assert cli(tmp_path / "a.txt", "--out", tmp_path / "ds", flag, value) == 2
    assert capsys.readouterr().err == f"error: {flag} must be >= 1, got {value}\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
    with pytest.raises(DataError, match="max_documents must be >= 1, got 0"):
        prepare([str(tmp_path / "a.txt")], str(tmp_path / "lib"), max_documents=0)


def test_max_documents_1_and_seq_len_1_accepted(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    assert cli(tmp_path / "a.jsonl", "--out", tmp_path / "ds", "--max-documents", 1, "--seq-len", 1) == 0
    assert decoded(tmp_path / "ds") == [b"one"]


def test_cli_names_the_field_flag_and_the_string_fields_seen(tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", [{"id": str(i), "content": f"document number {i}"} for i in range(300)])
    assert cli(tmp_path / "docs.jsonl", "--out", tmp_path / "ds") == 2
    err = capsys.readouterr().err
    assert (f"skipped 300: 300 record(s) without the text field (e.g. file://{tmp_path}/docs.jsonl:1 "
            f"(no string field 'text')); the records have string field(s) 'content', 'id': use --field content") in err
    assert cli(tmp_path / "docs.jsonl", "--out", tmp_path / "ds", "--field", "content") == 0
    assert decoded(tmp_path / "ds")[299] == b"document number 299"


def test_summary_explains_partial_skips(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "not json", "{also not"])
    assert cli(tmp_path / "a.jsonl", "--out", tmp_path / "ds") == 0
    out = capsys.readouterr().out
    assert f"why: skipped 2: 2 line(s) not JSON (e.g. file://{tmp_path}/a.jsonl:2 (" in out
    assert "for plain text files use --format text" in out


def test_job_refusal_points_at_its_source_field(tmp_path):
    (tmp_path / "good").mkdir()
    for i in range(3):
        (tmp_path / "good" / f"{i}.txt").write_text("x" * 100)
    write_jsonl(tmp_path / "docs.jsonl", [{"content": "long text " * 5, "lang": "en"}] * 300)
    spec = data_spec(str(tmp_path / "good"), str(tmp_path / "docs.jsonl"))
    with pytest.raises(DataError) as err:
        prepare_for_job(spec, 32, 1, cache_uri=str(tmp_path / "c"))
    msg = str(err.value)
    assert msg.startswith(f"no usable documents found in data source {tmp_path}/docs.jsonl (data.sources[1])")
    assert f"300 record(s) without the text field (e.g. file://{tmp_path}/docs.jsonl:1 " in msg
    assert msg.endswith("the records have string field(s) 'content', 'lang': set data.sources[1].field: content")
    assert not (tmp_path / "c").exists() or not [p for p in os.listdir(tmp_path / "c") if not p.startswith(".")]


def test_job_with_one_document_says_why_the_rest_was_skipped(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("the one good document")
    (tmp_path / "src" / "b.bin").write_bytes(JUNK)
    with pytest.raises(DataError) as err:
        prepare_for_job(data_spec(str(tmp_path / "src")), 32, 1, cache_uri=str(tmp_path / "c"))
    assert str(err.value).startswith(f"data source {tmp_path}/src (data.sources[0]) has 1 usable document(s); "
                                     f"need >= 2 for a train/valid split; skipped 1: 1 invalid UTF-8 "
                                     f"(e.g. file://{tmp_path}/src/b.bin (byte 128))")


def test_devices_and_fifos_refused_before_reading(tmp_path):
    with pytest.raises(DataError, match="data source /dev/zero: /dev/zero is a character device, not a regular file"):
        resolve_all(["/dev/zero"])
    (tmp_path / "ok.txt").write_text("fine")
    os.mkfifo(tmp_path / "pipe")
    for uri in (str(tmp_path), str(tmp_path / "pipe"), str(tmp_path / "*")):
        with pytest.raises(DataError, match=f"{tmp_path}/pipe is a FIFO \\(named pipe\\), not a regular file"):
            resolve_all([uri])


def test_oversized_files_refused_with_size_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_FILE_BYTES_ENV, "1000")
    (tmp_path / "fits.txt").write_bytes(b"a" * 1000)
    (tmp_path / "big.txt").write_bytes(b"b" * 1001)
    assert resolve_all([str(tmp_path / "fits.txt")])  # the limit itself is allowed
    with pytest.raises(DataError) as err:
        prepare_for_job(data_spec(str(tmp_path)), 32, 1, cache_uri=str(tmp_path / "c"))
    assert str(err.value).startswith(f"data file {tmp_path}/big.txt is 1,001 bytes; one file may take at most "
                                     f"1,000 bytes because it is read and tokenized whole")
    assert "split -C 256M" in str(err.value) and MAX_FILE_BYTES_ENV in str(err.value)
    assert not (tmp_path / "c").exists()  # refused while keying the cache: nothing written
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:  # ~50 bytes on disk, 2,556 decompressed: streamed
        f.write('{"text": "%s"}\n' % ("z" * 200) * 12)
    summary = prepare([str(tmp_path / "z.jsonl.gz")], str(tmp_path / "z"))
    assert (summary.bytes_read, decoded(tmp_path / "z")) == (2556, [b"z" * 200] * 12)
    with gzip.open(tmp_path / "one.jsonl.gz", "wt") as f:  # one line (one document) over the limit
        f.write('{"text": "ok"}\n{"text": "%s"}\n' % ("z" * 1000))
    with pytest.raises(DataError, match=r"one\.jsonl\.gz holds more than 1,000 bytes in one line \(after decompression\)"):
        prepare([str(tmp_path / "one.jsonl.gz")], str(tmp_path / "out"))
    pq.write_table(pa.table({"id": ["i" * 900] * 2, "text": ["p" * 600, "q" * 600]}), tmp_path / "t.parquet")
    meta = pq.read_metadata(tmp_path / "t.parquet").row_group(0)
    size = meta.column(1).total_uncompressed_size  # the text column only, not "id"
    assert meta.column(1).path_in_schema == "text" and 1200 < size < 1200 + meta.column(0).total_uncompressed_size
    with pytest.raises(DataError, match=rf"t\.parquet holds \d\.\d KiB \({size:,} bytes\) of 'text' text \(uncompressed\)"):
        prepare([str(tmp_path / "t.parquet")], str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))


def test_max_file_bytes_default_and_bad_env(monkeypatch):
    monkeypatch.delenv(MAX_FILE_BYTES_ENV, raising=False)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert max_file_bytes() == max(256 << 20, memory // 16)
    monkeypatch.setenv(MAX_FILE_BYTES_ENV, "12k")
    with pytest.raises(DataError, match=f"{MAX_FILE_BYTES_ENV} must be a positive number of bytes, got '12k'"):
        max_file_bytes()


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_bounded_read_boundary_in_chunks(tmp_path, monkeypatch, chunk):
    from raytron.data_pipeline import limits

    monkeypatch.setenv(MAX_FILE_BYTES_ENV, "1000")
    monkeypatch.setattr(limits, "_CHUNK", chunk)
    for name, n in (("fits", 987), ("over", 988)):  # 13 bytes of JSON around n characters
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt") as f:
            f.write('{"text": "%s"}\n' % ("z" * n))
    assert os.path.getsize(tmp_path / "fits.jsonl.gz") < 100
    summary = prepare([str(tmp_path / "fits.jsonl.gz")], str(tmp_path / "fits"))
    assert (summary.bytes_read, decoded(tmp_path / "fits")) == (1000, [b"z" * 987])
    with pytest.raises(DataError, match=r"over\.jsonl\.gz holds more than 1,000 bytes"):
        prepare([str(tmp_path / "over.jsonl.gz")], str(tmp_path / "over"))
