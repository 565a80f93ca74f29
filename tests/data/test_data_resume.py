"""Acceptance 2: the sample sequence depends only on the global cursor, never on the DP size.

A run with dp=2 checkpoints its cursor (JSON round trip), resumes with dp=4 at the same global
batch, and must read exactly the samples of an uninterrupted run, in the same global order, across
an epoch boundary: no duplicate, no skip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raytron.data_pipeline import DataCursor, prepare_for_job

from tests.data.datapipe_helpers import data_spec

GBS, MBS, SEQ = 8, 2, 32


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    from tests.data.datapipe_helpers import make_text_corpus

    make_text_corpus(root / "corpus", n_docs=10)
    data = prepare_for_job(data_spec(str(root / "corpus")), SEQ, 99, cache_uri=str(root / "cache"))
    return data.train


def run_steps(ds, cursor: DataCursor, steps: int, dp: int) -> tuple[list[torch.Tensor], DataCursor]:
    """What the training workers do per step: each rank takes its micro-batches from the cursor;
    return the step's samples in global order (ranks concatenated) and the advanced cursor."""
    seen = []
    for _ in range(steps):
        per_rank = [torch.cat(ds.micro_batches(cursor, GBS, MBS, r, dp)) for r in range(dp)]
        seen.append(torch.cat(per_rank))
        cursor = cursor.advance(GBS)
    return seen, cursor


def test_union_of_ranks_is_the_global_batch(train):
    for dp in (1, 2, 4):
        for cursor in (0, 13, len(train) - 3):  # last one straddles an epoch boundary
            mbs = [train.micro_batches(cursor, GBS, MBS, r, dp) for r in range(dp)]
            assert all(len(m) == GBS // (MBS * dp) and m[0].shape == (MBS, SEQ + 1) for m in mbs)
            assert torch.equal(torch.cat([torch.cat(m) for m in mbs]), train.global_batch(cursor, GBS))


def test_dp2_then_dp4_equals_uninterrupted(train):
    steps = len(train) // GBS + 3  # crosses into the second epoch
    split = steps // 2
    reference, end_ref = run_steps(train, DataCursor(0), steps, dp=1)
    first, cursor = run_steps(train, DataCursor(0), split, dp=2)
    saved = json.dumps(cursor.to_dict())  # what the checkpoint manifest stores
    second, end = run_steps(train, DataCursor.from_dict(json.loads(saved)), steps - split, dp=4)
    got = first + second
    assert end == end_ref == DataCursor(steps * GBS)
    assert all(torch.equal(a, b) for a, b in zip(got, reference)) and len(got) == len(reference)
    # no duplicate and no skip within the first epoch: every packed window exactly once
    windows = [train.packed_index(i) for i in range(len(train))]
    assert sorted(windows) == list(range(len(train)))
    flat = torch.cat(got)
    for i in range(len(flat)):
        np.testing.assert_array_equal(flat[i].numpy(), train.sample(i))


def test_divisibility_and_rank_errors(train):
    with pytest.raises(ValueError, match="not divisible by micro_batch_size 3 x dp_size 2"):
        train.micro_batches(0, 8, 3, 0, 2)
    with pytest.raises(ValueError, match="dp_rank 2 out of range"):
        train.micro_batches(0, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="cursor must be >= 0"):
        train.global_batch(-1, 8)


def test_cursor_is_frozen_and_roundtrips():
    c = DataCursor(5).advance(8)
    assert c == DataCursor(13) and DataCursor.from_dict(c.to_dict()) == c
    with pytest.raises(Exception):
        c.samples_consumed = 0
    with pytest.raises(ValueError):
        DataCursor(-1)
    with pytest.raises(ValueError):
        c.advance(0)


def test_document_ids_follow_samples(train):
    ids = train.micro_batch_document_ids(4, GBS, MBS, 1, 2)
    toks = train.micro_batches(4, GBS, MBS, 1, 2)
    assert [t.shape for t in ids] == [t.shape for t in toks]
    eod = 256
    for t, d in zip(toks, ids):
        t, d = t.numpy(), d.numpy()
        # a document id changes only right after an EOD token
        changes = np.nonzero(d[:, 1:] != d[:, :-1])
        assert (t[changes] == eod).all()
