"""Bad data never reaches a worker as a traceback: undecodable records are skipped and counted with file and
line, damaged .bin/.idx pairs and caches are refused naming the file and the fix, a changed source gets a
new cache, and `data prepare DIR` does not read its own outputs."""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytron.data_pipeline import DataError, IndexedDatasetWriter, IndexedTokens, ReadStats, cache_key, \
    get_tokenizer, prepare, prepare_for_job, resolve_source
from raytron.data_pipeline.cli import main as data_main
from raytron.data_pipeline.indexed import check_prefix_files
from raytron.data_pipeline.job import load_prepared
from raytron.data_pipeline.sources import read_documents

from tests.data.datapipe_helpers import data_spec, write_jsonl

SEQ = 16
TEXT = "a document long enough to fill a few samples of sixteen tokens each, " * 3


def _read(uri) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return [d for f in resolve_source(uri) for d in read_documents(f, stats)], stats


def test_lone_surrogates_are_skipped_with_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n{"text": "\\udc80"}\n'
                    '{"text": "pair \\ud83d\\ude00"}\n')
    docs, stats = _read(str(path))
    assert docs == ["fine", "pair \U0001F600"]  # an escaped pair is one character and is kept
    assert stats.invalid_utf8 == 2 and stats.documents == 2
    where = stats.first_examples["invalid_utf8"]
    assert where.endswith("s.jsonl:2 (lone surrogate '\\ud800' at character 4 of 'text')"), where
    with pytest.raises(UnicodeEncodeError):  # what every tokenizer did with it before
        get_tokenizer("byte").encode("bad \ud800 half")


def test_parquet_row_that_is_not_utf8_is_skipped_alone(tmp_path):
    good = pa.array(["alpha", "beta", "gamma"])
    raw = pa.array([b"alpha", b"caf\xe9", b"gamma"], pa.binary())
    bad = pa.StringArray.from_buffers(3, raw.buffers()[1], raw.buffers()[2])  # a writer that skipped validation
    pq.write_table(pa.table({"text": bad}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": good}), tmp_path / "c.parquet")
    docs, stats = _read(str(tmp_path))
    assert docs == ["alpha", "gamma", "alpha", "beta", "gamma"]
    assert stats.invalid_utf8 == 1 and stats.unreadable_files == 0
    assert stats.first_examples["invalid_utf8"].endswith("b.parquet row 1")


def test_prepare_cli_counts_them_and_strict_exits_1(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    write_jsonl(path, [{"text": TEXT}, '{"text": "x \\ud800"}', {"text": TEXT}])
    assert data_main(["data", "prepare", str(path), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "invalid_utf8 1" in out and "s.jsonl:2 (lone surrogate" in out and "documents 2" in out
    assert data_main(["data", "prepare", str(path), "--out", str(tmp_path / "p"), "--no-progress", "--force",
                      "--strict"]) == 1


def test_submit_preparation_reports_the_skips(tmp_path, capsys):
    from raytron.launcher.driver import prepare_data
    from raytron.config.spec import load_spec
    from tests.checkpoint.ckpt_helpers import CONFIG

    path = tmp_path / "s.jsonl"
    write_jsonl(path, [{"text": TEXT * 4} for _ in range(6)] + ['{"text": "x \\ud800"}'])
    spec = load_spec(CONFIG, [f"checkpoint.uri={tmp_path}/runs", f"data.cache_uri={tmp_path}/cache",
                              f"data.sources=[{{uri: '{path}'}}]", "train.seq_len=16", "train.eval_batches=1",
                              "train.global_batch_size=4", "train.micro_batch_size=2"])
    cache_dir = prepare_data(spec)
    out = capsys.readouterr().out
    assert f"[raytron] data.sources[0] {path}: skipped 1: 1 invalid UTF-8 (e.g. file://{path}:7 (lone surrogate" in out
    assert cache_dir.startswith(str(tmp_path / "cache") + "/")


# ---- .bin/.idx verification
@pytest.fixture
def prefix(tmp_path) -> str:
    p = str(tmp_path / "pre")
    with IndexedDatasetWriter(p, np.uint16) as w:
        for n in (5, 7, 3):
            w.add_document(np.arange(n, dtype=np.uint16))
    return p


def _damage(prefix: str, what: str) -> None:
    if what == "short-bin":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    elif what == "long-bin":
        with open(prefix + ".bin", "ab") as f:
            f.write(b"\0\0")
    elif what == "short-idx":
        os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    elif what == "header-only":
        os.truncate(prefix + ".idx", 20)
    elif what == "dtype":
        with open(prefix + ".idx", "r+b") as f:
            f.seek(17)
            f.write(b"\x63")
    elif what == "pointer":
        with open(prefix + ".idx", "r+b") as f:  # the last pointer (int64 after 3 int32 lengths) past the .bin
            f.seek(34 + 12 + 16)
            f.write(struct.pack("<q", 1 << 40))


@pytest.mark.parametrize("what, words", [
    ("short-bin", r"pre\.bin is 28 bytes and its index .*pre\.idx says 30: truncated"),
    ("long-bin", r"pre\.bin is 32 bytes .* says 30: not the file this index was written for"),
    ("short-idx", r"pre\.idx is 94 bytes, its header promises 102 \(3 sequences\): truncated"),
    ("header-only", r"pre\.idx is truncated: 20 bytes"),
    ("dtype", r"pre\.idx has dtype byte 99 \(offset 17\)"),
    ("pointer", r"pre\.(idx points outside|bin is 30 bytes and its index)"),
])
def test_damaged_pairs_are_refused_naming_the_file(prefix, what, words):
    IndexedTokens(prefix)
    check_prefix_files(prefix, "fix it")
    _damage(prefix, what)
    with pytest.raises(DataError, match=words + r".*; prepare it again"):
        IndexedTokens(prefix)
    with pytest.raises(DataError, match=r"pre\.(bin|idx).*; fix it$"):  # plan's check: a few small reads
        check_prefix_files(prefix, "fix it")


# ---- the job's cache
@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, [{"text": f"{i} {TEXT}"} for i in range(8)])
    return path


def test_appending_to_a_source_builds_a_new_cache(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    first = prepare_for_job(data_spec(str(corpus)), SEQ, 1, cache_uri=cache)
    assert prepare_for_job(data_spec(str(corpus)), SEQ, 1, cache_uri=cache).cache_uri == first.cache_uri
    with open(corpus, "a") as f:
        f.write('{"text": "one more document, appended after the cache was built"}\n')
    second = prepare_for_job(data_spec(str(corpus)), SEQ, 1, cache_uri=cache)
    assert second.cache_uri != first.cache_uri
    assert second.manifest["sources"][0]["documents"] == first.manifest["sources"][0]["documents"] + 1
    st = corpus.stat()
    key = cache_key(data_spec(str(corpus)), SEQ, 1)
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, rewritten later
    assert cache_key(data_spec(str(corpus)), SEQ, 1) != key
    assert load_prepared(first.cache_uri, data_spec(str(corpus)), SEQ, 1).manifest == first.manifest


def test_a_prepared_prefix_source_is_keyed_by_its_files(corpus, tmp_path):
    prepare([str(corpus)], str(tmp_path / "p"), "byte")
    key = cache_key(data_spec(str(tmp_path / "p")), SEQ, 1)
    prepare_for_job(data_spec(str(tmp_path / "p")), SEQ, 1, cache_uri=str(tmp_path / "cache"))  # hard-links it
    assert cache_key(data_spec(str(tmp_path / "p")), SEQ, 1) == key
    write_jsonl(corpus, [{"text": f"{i} {TEXT}"} for i in range(9)])
    prepare([str(corpus)], str(tmp_path / "p2"), "byte")
    for ext in (".bin", ".idx"):
        os.replace(tmp_path / f"p2{ext}", tmp_path / f"p{ext}")
    assert cache_key(data_spec(str(tmp_path / "p")), SEQ, 1) != key


@pytest.mark.parametrize("damage, words", [
    ("truncate", r"source-0\.bin is [\d,]+ bytes and its index .* truncated"),
    ("oov", r"data cache: .*source-0\.bin holds token id 4000, outside the vocabulary of tokenizer 'byte'"),
    ("docs", r"source-0\.train-docs\.npy holds indices outside"),
    ("manifest", r"manifest\.json is not a data cache manifest"),
])
def test_a_damaged_cache_is_refused_with_the_file_and_the_fix(corpus, tmp_path, damage, words):
    cache = str(tmp_path / "cache")
    built = prepare_for_job(data_spec(str(corpus)), SEQ, 1, cache_uri=cache).cache_uri
    d = built.removeprefix("file://")
    if damage == "truncate":
        os.truncate(f"{d}/source-0.bin", os.path.getsize(f"{d}/source-0.bin") - 2)
    elif damage == "oov":
        with open(f"{d}/source-0.bin", "r+b") as f:
            f.seek(10)
            f.write((4000).to_bytes(2, "little"))
    elif damage == "docs":
        np.save(f"{d}/source-0.train-docs.npy", np.array([0, 1, 99], np.int64))
    else:
        with open(f"{d}/manifest.json", "w") as f:
            f.write("[]")
    with pytest.raises(DataError, match=words + f".*delete {built} and submit again"):
        prepare_for_job(data_spec(str(corpus)), SEQ, 1, cache_uri=cache, verify_ids=True)
    if damage == "oov":  # the workers' load does not scan ids (the driver did)
        load_prepared(built, data_spec(str(corpus)), SEQ, 1)


def test_a_worker_stops_on_a_damaged_cache_without_a_restart(corpus, tmp_path):
    from raytron.launcher.health import StopTraining
    from raytron.config.spec import load_spec
    from raytron.launcher.worker import _load_data
    from tests.checkpoint.ckpt_helpers import CONFIG

    spec = load_spec(CONFIG, [f"checkpoint.uri={tmp_path}/runs", f"data.sources=[{{uri: '{corpus}'}}]",
                              f"train.seq_len={SEQ}"])
    built = prepare_for_job(spec.data, SEQ, spec.train.seed, cache_uri=str(tmp_path / "cache")).cache_uri
    assert len(_load_data(spec, built).train) > 0
    os.truncate(f"{built}/source-0.idx", 40)
    with pytest.raises(StopTraining, match=r"data: .*source-0\.idx is 40 bytes"):
        _load_data(spec, built)


# ---- data prepare DIR and its own outputs
def test_prepare_of_a_directory_skips_prepared_outputs(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXT)
    (src / "b.jsonl").write_text('{"text": "two"}\n')
    argv = ["data", "prepare", str(src), "--out", str(src / "corpus"), "--no-progress", "--force"]
    for _ in range(2):  # the second run finds the first one's corpus.bin/.idx/.summary.json in src/
        assert data_main(argv) == 0
        out = capsys.readouterr().out
        assert "files 2, documents 2" in out and "skipped: nothing" in out, out
    os.remove(src / "corpus.idx")  # half an output (an interrupted run): still this run's own
    assert data_main(argv) == 0
    assert "files 2, documents 2" in capsys.readouterr().out
    shutil.copy(src / "corpus.bin", src / "other.bin")  # a .bin of someone else's is read like any file
    assert [os.path.basename(f.uri) for f in resolve_source(str(src))] == ["a.txt", "b.jsonl", "other.bin"]
    with pytest.raises(DataError, match="only prepared .bin/.idx datasets"):
        resolve_source(str(src / "corpus.*"))
