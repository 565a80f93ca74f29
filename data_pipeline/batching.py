"""Global batches and per-rank micro-batches, derived from a global sample cursor.

Split rule (contiguous): global batch g = samples cursor .. cursor+gbs-1. DP rank r owns the
contiguous slice [cursor + r*gbs/dp, cursor + (r+1)*gbs/dp), cut into micro-batches of mbs in
order. Concatenating every rank's micro-batches in rank order gives exactly global_batch(cursor),
whatever dp is; that is what makes a resume under another DP size exact.
"""

from __future__ import annotations

import operator

import numpy as np


def _cursor(cursor) -> int:
    c = operator.index(cursor)  # int or DataCursor
    if c < 0:
        raise ValueError(f"cursor must be >= 0, got {c}")
    return c


def rank_sample_indices(cursor, global_batch_size: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> list[range]:
    """The global sample indices of each micro-batch of `dp_rank` (see module docstring)."""
    gbs, mbs = global_batch_size, micro_batch_size
    if min(gbs, mbs, dp_size) < 1:
        raise ValueError(f"global_batch_size, micro_batch_size and dp_size must be >= 1, got {gbs}, {mbs}, {dp_size}")
    if gbs % (mbs * dp_size):
        raise ValueError(f"global_batch_size {gbs} is not divisible by micro_batch_size {mbs} x dp_size "
                         f"{dp_size} = {mbs * dp_size}; gradient accumulation needs a whole number of micro-batches")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
    per_rank = gbs // dp_size
    start = _cursor(cursor) + dp_rank * per_rank
    return [range(start + m * mbs, start + (m + 1) * mbs) for m in range(per_rank // mbs)]


class SampleBatcher:
    """Batching methods for any dataset with `sample(i)` and `document_ids(i)`."""

    def _stack(self, indices, fn) -> np.ndarray:
        return np.stack([fn(i) for i in indices])

    def global_batch(self, cursor, global_batch_size: int):
        """torch.LongTensor [gbs, seq_len+1]: samples cursor .. cursor+gbs-1."""
        import torch

        c = _cursor(cursor)
        return torch.from_numpy(self._stack(range(c, c + global_batch_size), self.sample))

    def micro_batches(self, cursor, global_batch_size: int, micro_batch_size: int,
                      dp_rank: int, dp_size: int) -> list:
        """This rank's micro-batches, each torch.LongTensor [mbs, seq_len+1] (contiguous split)."""
        import torch

        return [torch.from_numpy(self._stack(r, self.sample))
                for r in rank_sample_indices(cursor, global_batch_size, micro_batch_size, dp_rank, dp_size)]

    def micro_batch_document_ids(self, cursor, global_batch_size: int, micro_batch_size: int,
                                 dp_rank: int, dp_size: int) -> list:
        """Document ids matching `micro_batches`, each torch.IntTensor [mbs, seq_len+1]."""
        import torch

        return [torch.from_numpy(self._stack(r, self.document_ids))
                for r in rank_sample_indices(cursor, global_batch_size, micro_batch_size, dp_rank, dp_size)]
