"""Packing, shuffling and blending against plain reference computations."""

from __future__ import annotations

import numpy as np
import pytest

from raytron.data_pipeline import BlendedDataset, ByteTokenizer, IndexedTokens, PackedDataset, blend_schedule, prepare
from raytron.data_pipeline.packing import hashed_permutation, sample_starts

SEQ = 64


@pytest.fixture
def packed(text_corpus, tmp_path):
    root, docs = text_corpus
    prepare([root], str(tmp_path / "ds"))
    tokens = IndexedTokens(str(tmp_path / "ds"))
    order = hashed_permutation(len(tokens), 7, "docs")
    return PackedDataset(tokens, order, SEQ, seed=7, salt="t"), tokens, order, docs


def reference_windows(tokens, order, seq_len):
    """Flat concatenation of documents in `order`, and its document id per token."""
    flat = np.concatenate([tokens.document(d) for d in order]).astype(np.int64)
    ids = np.concatenate([np.full(tokens.lengths[d], d, np.int32) for d in order])
    n = (len(flat) - 1) // seq_len
    return [(flat[k * seq_len:k * seq_len + seq_len + 1], ids[k * seq_len:k * seq_len + seq_len + 1]) for k in range(n)]


def test_windows_equal_reference_concatenation(packed):
    ds, tokens, order, _ = packed
    ref = reference_windows(tokens, order, SEQ)
    assert len(ds) == len(ref)
    for k, (toks, ids) in enumerate(ref):
        got_t, got_i = ds.window(k)
        np.testing.assert_array_equal(got_t, toks)
        np.testing.assert_array_equal(got_i, ids)


def test_epoch_is_a_permutation_and_next_epoch_reshuffles(packed):
    ds, *_ = packed
    n = len(ds)
    epoch0 = [ds.packed_index(i) for i in range(n)]
    epoch1 = [ds.packed_index(n + i) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    np.testing.assert_array_equal(ds.sample(n + 3), ds.window(epoch1[3])[0])
    assert ds.sample(5).shape == (SEQ + 1,) and ds.sample(5).dtype == np.int64
    with pytest.raises(IndexError):
        ds.sample(-1)


def test_every_document_byte_is_trained_once_per_epoch(packed):
    """Decoded bytes of all samples (minus the 1-token overlaps) equal the documents' text."""
    ds, tokens, order, docs = packed
    by_window = sorted(range(len(ds)), key=lambda i: ds.packed_index(i))
    stream = np.concatenate([ds.sample(by_window[0])] + [ds.sample(i)[1:] for i in by_window[1:]])
    ref = ByteTokenizer().decode(np.concatenate([tokens.document(d) for d in order]))
    text = ByteTokenizer().decode(stream)
    assert ref.startswith(text) and len(ref.encode()) - len(text.encode()) < SEQ  # only the tail is dropped
    texts = sorted(docs.values())
    assert sorted(ByteTokenizer().decode(tokens.document(d)) for d in order) == texts


def test_long_document_split_across_consecutive_windows(packed):
    ds, tokens, order, _ = packed
    long_docs = [d for d in order if tokens.lengths[d] > SEQ + 1]
    assert long_docs
    d = long_docs[0]
    windows = [k for k in range(len(ds)) if d in ds.window(k)[1]]
    assert len(windows) >= 2 and windows == list(range(windows[0], windows[-1] + 1))


def test_same_seed_same_order_other_seed_differs(packed):
    ds, tokens, order, _ = packed
    twin = PackedDataset(tokens, order, SEQ, seed=7, salt="t")
    other = PackedDataset(tokens, order, SEQ, seed=8, salt="t")
    a = [ds.packed_index(i) for i in range(len(ds))]
    assert a == [twin.packed_index(i) for i in range(len(ds))]
    assert a != [other.packed_index(i) for i in range(len(ds))]


def test_sample_starts_reference():
    lengths = np.array([5, 1, 12, 3])
    starts = sample_starts(lengths, 4)  # 21 tokens -> windows at 0,4,8,12,16
    np.testing.assert_array_equal(starts, [[0, 0], [0, 4], [2, 2], [2, 6], [2, 10]])


def test_blend_schedule_tracks_weights_in_every_prefix():
    src, idx = blend_schedule([3.0, 1.0, 1.0], 1000)
    for n in (5, 17, 100, 1000):
        counts = np.bincount(src[:n], minlength=3)
        np.testing.assert_allclose(counts, np.array([0.6, 0.2, 0.2]) * n, atol=1.0)
    for k in range(3):  # each source's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(idx[src == k], np.arange((src == k).sum()))


class FakeSource:
    """Sample i of source `name` is [name, i, ...] so the blend's picks are readable."""

    seq_len = 3

    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def sample(self, i):
        return np.array([self.name, i, 0, 0], np.int64)

    def document_ids(self, i):
        return np.full(4, self.name, np.int32)


def test_blended_dataset_wraps_sources_and_epochs():
    a, b = FakeSource(0, 10), FakeSource(1, 2)
    blend = BlendedDataset([a, b], [1.0, 1.0])
    assert len(blend) == 12
    picks = [tuple(blend.sample(i)[:2]) for i in range(24)]
    assert sorted(p for p in picks[:12] if p[0] == 1) == [(1, j) for j in range(6)]  # b oversampled: wraps
    assert picks[12:] != picks[:12]  # second blend epoch continues each source, not a replay
    assert {p[0] for p in picks} == {0, 1}
    np.testing.assert_array_equal(blend.document_ids(1), np.full(4, picks[1][0]))
