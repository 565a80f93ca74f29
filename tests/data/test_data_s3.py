"""Acceptance 3: s3:// sources and outputs against a moto S3 server on 127.0.0.1 (conftest)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from raytron.data_pipeline import ByteTokenizer, DataError, prepare, prepare_for_job

from tests.data.datapipe_helpers import data_spec, make_text_corpus

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset


@pytest.fixture
def bucket(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()  # endpoint and credentials from the environment (AWS_ENDPOINT_URL)
    name = f"raytron-{os.getpid()}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs.mkdir(name)
    docs = make_text_corpus(tmp_path / "src", n_docs=8)
    fs.put(str(tmp_path / "src") + "/", f"{name}/corpus/", recursive=True)
    fs.pipe(f"{name}/corpus/extra.jsonl", b'{"text": "from jsonl"}\n{broken\n')
    yield fs, name, docs
    fs.rm(name, recursive=True)


def test_prepare_s3_to_s3_read_by_megatron(bucket, tmp_path):
    fs, name, docs = bucket
    summary = prepare([f"s3://{name}/corpus"], f"s3://{name}/out/ds")
    assert summary.stats.malformed_lines == 1 and summary.documents == len(docs) + 1
    for ext in ("bin", "idx"):
        fs.get(f"{name}/out/ds.{ext}", str(tmp_path / f"ds.{ext}"))
    assert fs.exists(f"{name}/out/ds.summary.json")
    tok = ByteTokenizer()
    texts = [docs[p] for p in sorted(docs)] + ["from jsonl"]  # s3 keys sort like the local names
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == len(texts)
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(ds[i], np.append(tok.encode(t), tok.eod_id))


def test_prepare_for_job_with_s3_source_and_cache(bucket, tmp_path, monkeypatch):
    fs, name, docs = bucket
    spec = data_spec(f"s3://{name}/corpus/*.txt")
    monkeypatch.setenv("RAYTRON_DATA_LOCAL_CACHE", str(tmp_path / "node-a"))
    first = prepare_for_job(spec, 32, 7, cache_uri=f"s3://{name}/cache")
    keys = fs.ls(f"{name}/cache", detail=False)
    assert len(keys) == 1 and fs.exists(f"{keys[0]}/manifest.json")
    monkeypatch.setenv("RAYTRON_DATA_LOCAL_CACHE", str(tmp_path / "node-b"))  # a worker on another node
    second = prepare_for_job(spec, 32, 7, cache_uri=f"s3://{name}/cache")
    assert (tmp_path / "node-b").exists()
    for i in range(0, 3 * len(first.train), 5):
        np.testing.assert_array_equal(first.train.sample(i), second.train.sample(i))


def test_missing_s3_source_named(bucket):
    fs, name, _ = bucket
    with pytest.raises(DataError, match=f"data source not found: s3://{name}/nope"):
        prepare([f"s3://{name}/nope"], f"s3://{name}/out/x")


def test_zero_documents_to_s3_leave_no_object(bucket):
    """A refused prepare must not upload the (empty) .bin it had opened: closing an s3 file uploads it."""
    fs, name, _ = bucket
    fs.pipe(f"{name}/junk/blob.txt", bytes(range(256)))
    with pytest.raises(DataError, match=f"no usable documents found .*s3://{name}/junk/blob.txt \\(byte 128\\)"):
        prepare([f"s3://{name}/junk"], f"s3://{name}/out/none")
    assert fs.find(f"{name}/out") == []
