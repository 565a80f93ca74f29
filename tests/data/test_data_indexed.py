"""Acceptance 1: what `prepare` writes is megatron-core's indexed format, read back by megatron's
own IndexedDataset with the same ids; and our reader reads files megatron's builder wrote."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from raytron.data_pipeline import ByteTokenizer, IndexedTokens, prepare

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron warns that Transformer Engine/Apex are absent
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


# megatron's builder converts torch tensors with numpy.array(copy=False): a numpy 2 deprecation
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def reference_ids(texts):
    tok = ByteTokenizer()
    return [np.append(tok.encode(t), tok.eod_id) for t in texts]


def test_byte_tokenizer_roundtrip_and_vocab():
    tok = ByteTokenizer()
    text = "héllo ✓ 🚀\n\ttabs"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and list(ids) == list(text.encode("utf-8"))
    assert tok.decode(np.append(ids, [tok.eod_id, tok.pad_id])) == text
    assert tok.vocab_size % 8 == 0 and tok.vocab_size > max(tok.eod_id, tok.pad_id)


def test_megatron_reads_prepared_dataset(text_corpus, tmp_path):
    root, docs = text_corpus
    summary = prepare([root], str(tmp_path / "out" / "ds"), seq_len=64)
    expected = reference_ids([docs[p] for p in sorted(docs)])
    ds = IndexedDataset(str(tmp_path / "out" / "ds"))
    assert len(ds) == len(expected) == summary.documents
    for i, ref in enumerate(expected):
        np.testing.assert_array_equal(ds[i], ref)
        assert ds[i].dtype == np.uint16
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(expected) + 1))
    assert summary.tokens == sum(len(r) for r in expected)
    assert summary.long_documents == sum(len(r) > 65 for r in expected) > 0


def test_our_reader_reads_megatron_builder_output(tmp_path):
    prefix = str(tmp_path / "mg")
    docs = [np.array([5, 6, 7, 256], np.uint16), np.array([1, 256], np.uint16), np.arange(300, dtype=np.uint16)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedTokens(prefix)
    assert len(ours) == 3 and ours.num_tokens == 306
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours.document(i), d)
    assert (tmp_path / "mg.idx").read_bytes()[:9] == b"MMIDIDX\x00\x00"


def test_idx_bytes_identical_to_megatron_builder(text_corpus, tmp_path):
    """Byte-for-byte: our .bin/.idx equal what megatron's builder writes for the same ids."""
    root, docs = text_corpus
    prepare([root], str(tmp_path / "ours"))
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for ids in reference_ids([docs[p] for p in sorted(docs)]):
        builder.add_document(torch.from_numpy(ids.astype(np.int64)), [len(ids)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_max_documents_truncates_deterministically(text_corpus, tmp_path):
    root, docs = text_corpus
    s = prepare([root], str(tmp_path / "five"), max_documents=5)
    assert s.documents == 5
    got = IndexedTokens(str(tmp_path / "five"))
    for i, ref in enumerate(reference_ids([docs[p] for p in sorted(docs)][:5])):
        np.testing.assert_array_equal(got.document(i), ref)


def test_bad_header_refused(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + b"\0" * 40)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a megatron indexed dataset"):
        IndexedTokens(str(tmp_path / "x"))
