"""prepare_for_job: built once, loaded from cache by everyone after, safe under races, and
failing early (in the driver) with the path named."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from raytron.data_pipeline import BlendedDataset, ByteTokenizer, DataError, PackedDataset, cache_key, prepare_for_job
from raytron.data_pipeline import job as job_mod
from raytron.config.spec import DataSpec, SourceSpec

from tests.data.datapipe_helpers import data_spec, load_job_data, make_text_corpus, write_jsonl

SEQ = 32


def test_builds_then_loads_cache_without_reading_sources(text_corpus, tmp_path, monkeypatch):
    root, docs = text_corpus
    cache = f"file://{tmp_path}/cache"
    first = prepare_for_job(data_spec(root), SEQ, 1, cache_uri=cache)
    monkeypatch.setattr(job_mod, "prepare", lambda *a, **k: pytest.fail("cache hit must not re-prepare"))
    second = prepare_for_job(data_spec(root), SEQ, 1, cache_uri=cache)
    assert isinstance(second.train, PackedDataset) and second.vocab_size == ByteTokenizer.vocab_size
    assert len(first.train) == len(second.train) > 0
    for i in (0, 7, len(first.train) + 2):
        np.testing.assert_array_equal(first.train.sample(i), second.train.sample(i))
    key = cache_key(data_spec(root), SEQ, 1)
    assert sorted(os.listdir(tmp_path / "cache")) == [key]  # no temp dirs left behind
    assert cache_key(data_spec(root), SEQ, 2) != key and cache_key(data_spec(root), SEQ + 1, 1) != key


def test_train_valid_disjoint_documents_and_summary(text_corpus, tmp_path):
    root, docs = text_corpus
    data = prepare_for_job(data_spec(root, valid_fraction=0.25), SEQ, 1, cache_uri=str(tmp_path / "c"))
    train_docs = {int(d) for i in range(len(data.train)) for d in data.train.document_ids(i)}
    valid_docs = {int(d) for i in range(len(data.valid)) for d in data.valid.document_ids(i)}
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert len(train_docs | valid_docs) <= len(docs)
    src = data.manifest["sources"][0]
    assert src["valid"]["documents"] == 3 and src["train"]["documents"] == 9
    assert src["train"]["long_documents"] > 0
    assert "docs longer than a sample (split across samples)" in data.summary()


def test_decoded_samples_are_source_text(text_corpus, tmp_path):
    root, docs = text_corpus
    data = prepare_for_job(data_spec(root), SEQ, 3, cache_uri=str(tmp_path / "c"))
    tok = data.tokenizer
    corpus = "\x00".join(docs.values())
    for i in range(len(data.train)):
        s = data.train.sample(i)
        pieces = [tok.decode(p) for p in np.split(s, np.nonzero(s == tok.eod_id)[0])]
        for piece in pieces:  # each EOD-free piece is a substring of one document (edges may cut a char)
            clean = piece.strip("\ufffd")
            assert clean in corpus


def test_blend_of_two_sources_follows_weights(tmp_path):
    make_text_corpus(tmp_path / "a", n_docs=10, seed=0)
    write_jsonl(tmp_path / "b.jsonl", [{"text": "B" * (50 + i)} for i in range(20)])
    spec = data_spec(str(tmp_path / "a"), str(tmp_path / "b.jsonl"), weights=[1.0, 3.0])
    data = prepare_for_job(spec, SEQ, 1, cache_uri=str(tmp_path / "c"))
    assert isinstance(data.train, BlendedDataset)
    n = 40
    from_b = sum(set(data.train.sample(i).tolist()) <= {ord("B"), 256} for i in range(n))
    assert abs(from_b - 0.75 * n) <= 1
    ids_a = data.train.datasets[0].document_ids(0)
    ids_b = data.train.datasets[1].document_ids(0)
    assert ids_b.min() >= 10 > ids_a.max()  # document ids stay unique across sources


def test_missing_source_fails_before_any_cache_is_written(tmp_path):
    spec = data_spec(str(tmp_path / "missing-dir"))
    with pytest.raises(DataError, match=f"data source not found: {tmp_path}/missing-dir"):
        prepare_for_job(spec, SEQ, 1, cache_uri=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists() or not [p for p in os.listdir(tmp_path / "c") if not p.startswith(".")]


def test_too_small_or_misconfigured_refused(tmp_path):
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(DataError, match="has 1 usable document"):
        prepare_for_job(data_spec(str(tmp_path / "one.txt")), SEQ, 1, cache_uri=str(tmp_path / "c"))
    write_jsonl(tmp_path / "tiny.jsonl", [{"text": "ab"}, {"text": "cd"}, {"text": "x" * 200}])
    with pytest.raises(DataError, match="shorter than one sample"):
        prepare_for_job(data_spec(str(tmp_path / "tiny.jsonl")), SEQ, 1, cache_uri=str(tmp_path / "c"))
    with pytest.raises(DataError, match="tokenizer not found: gpt2"):
        prepare_for_job(data_spec(str(tmp_path), tokenizer="gpt2"), SEQ, 1, cache_uri=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no data cache location"):
        prepare_for_job(data_spec(str(tmp_path)), SEQ, 1)


def test_losing_a_build_race_keeps_the_winner(text_corpus, tmp_path):
    """Two builders that both saw no manifest: the second rename fails, its copy is discarded."""
    root, _ = text_corpus
    spec, cache = data_spec(root), str(tmp_path / "c")
    key = cache_key(spec, SEQ, 1)
    final = f"{cache}/{key}"
    tok = ByteTokenizer()
    job_mod._build(spec, SEQ, 1, tok, final, key, 1)
    before = {p: os.path.getmtime(os.path.join(final, p)) for p in os.listdir(final)}
    job_mod._build(spec, SEQ, 1, tok, final, key, 1)
    assert {p: os.path.getmtime(os.path.join(final, p)) for p in os.listdir(final)} == before
    assert os.listdir(cache) == [key]


def test_concurrent_processes_get_identical_data(text_corpus, tmp_path):
    root, _ = text_corpus
    cache = str(tmp_path / "c")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        results = list(ex.map(load_job_data, [root, root], [cache, cache]))
    assert results[0] == results[1] == load_job_data(root, cache)
    assert len(os.listdir(cache)) == 1


def test_stdlib_demo_source_is_fast(tmp_path):
    import time

    spec = DataSpec(sources=[SourceSpec("builtin://python-stdlib")], max_documents=100)
    t0 = time.perf_counter()
    data = prepare_for_job(spec, 256, 1234, cache_uri=str(tmp_path / "c"))
    assert time.perf_counter() - t0 < 10
    assert data.manifest["sources"][0]["documents"] == 100
    assert data.train.global_batch(0, 4).shape == (4, 257)
