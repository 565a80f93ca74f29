"""data.reset_at_documents: what the training loop hands the engines next to each micro-batch."""

from __future__ import annotations

import numpy as np
import pytest

from raytron.data_pipeline.indexed import IndexedDatasetWriter, IndexedTokens
from raytron.data_pipeline.packing import PackedDataset
from raytron.config.spec import spec_from_dict
from raytron.launcher.worker import _document_ids
from raytron.typed import ConfigError


def _spec(reset):
    data = {"sources": [{"uri": "builtin://python-stdlib"}]}
    if reset is not None:
        data["reset_at_documents"] = reset
    return spec_from_dict({"name": "docs", "checkpoint": {"uri": "/tmp/unused"}, "model": {"family": "hybrid"},
                           "train": {"steps": 1, "seq_len": 8, "micro_batch_size": 2, "global_batch_size": 4,
                                     "lr": 1e-3}, "data": data})


def test_document_ids_follow_the_option(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "docs")) as writer:
        for length in (3, 7, 2, 11, 5, 9):
            writer.add_document(np.arange(length, dtype=np.int64) + 1)
    data = PackedDataset(IndexedTokens(str(tmp_path / "docs")), np.arange(6), seq_len=8, seed=0)
    assert _spec(None).data.reset_at_documents is False  # default: one causal sequence per sample
    assert _document_ids(data, _spec(False), 0, 0, 2) is None
    docs = _document_ids(data, _spec(True), 0, 1, 2)
    micro = data.micro_batches(0, 4, 2, 1, 2)
    assert len(docs) == len(micro) == 1 and docs[0].shape == micro[0].shape
    for row, i in zip(docs[0], range(2, 4)):  # rank 1 of 2 holds samples 2 and 3 of the global batch
        np.testing.assert_array_equal(row.numpy(), data.document_ids(i))
    assert any(len(set(row.tolist())) > 1 for row in docs[0]), "samples must pack several documents"


def test_reset_at_documents_must_be_a_bool():
    with pytest.raises(ConfigError, match="reset_at_documents"):
        _spec("yes")
