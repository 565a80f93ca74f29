"""Streaming prepare: files far larger than the read chunk, the batch and the per-document limit give
the same dataset as tokenizing each document alone, for any batch size, worker count and pool."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytron.data_pipeline import IndexedTokens, get_tokenizer, prepare
from raytron.data_pipeline import limits
from raytron.data_pipeline.limits import MAX_FILE_BYTES_ENV

from tests.data.tokenizer_helpers import corpus_text, make_hf_json


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    make_hf_json(root / "tokenizer.json", corpus_text())
    return str(root / "tokenizer.json")


@pytest.fixture
def big_inputs(tmp_path):
    lines = corpus_text(2000, seed=7).splitlines()  # ~150 KB
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"text": line}) + "\n" if i % 97 else "not json\n")
    table = pa.table({"text": lines[:900]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100)  # 9 row groups
    return tmp_path, [line for i, line in enumerate(lines) if i % 97] + lines[:900]


def documents(prefix) -> list[np.ndarray]:
    ds = IndexedTokens(str(prefix))
    return [np.array(ds.document(i)) for i in range(len(ds))]


def test_large_files_stream_identically(bpe, big_inputs, monkeypatch):
    root, texts = big_inputs
    monkeypatch.setenv(MAX_FILE_BYTES_ENV, "20000")  # each file is many times this: only documents must fit
    monkeypatch.setattr(limits, "_CHUNK", 4096)
    tok = get_tokenizer(bpe)
    sources = [str(root / "big.jsonl"), str(root / "big.parquet")]
    runs = {"one-batch": dict(batch_bytes=1 << 30), "small": dict(batch_bytes=3000),
            "threads": dict(batch_bytes=3000, workers=3), "processes": dict(batch_bytes=5000, workers=2, pool="process")}
    for name, kw in runs.items():
        summary = prepare(sources, str(root / name), bpe, **kw)
        assert summary.stats.malformed_lines == 21 and summary.documents == len(texts), name
    want = [np.append(tok.encode(t), tok.eod_id) for t in texts]
    got = documents(root / "one-batch")
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    for name in runs:
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(root / f"one-batch{ext}", root / f"{name}{ext}", shallow=False), name


def test_max_documents_cuts_inside_a_batch(bpe, big_inputs):
    root, texts = big_inputs
    summary = prepare([str(root / "big.jsonl")], str(root / "cut"), bpe, batch_bytes=2000, max_documents=33)
    tok = get_tokenizer(bpe)
    assert summary.documents == summary.stats.documents == 33
    assert all(np.array_equal(a, np.append(tok.encode(t), tok.eod_id))
               for a, t in zip(documents(root / "cut"), texts[:33]))
