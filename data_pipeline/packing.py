"""Packing documents into fixed-length samples, and the seeded shuffle of those samples.

Packing follows megatron's GPTDataset: the split's documents are laid end to end (in a seeded,
shuffled document order) and sample k is the token window [k*seq_len, k*seq_len + seq_len + 1):
inputs are the first seq_len tokens, targets the last seq_len, and consecutive samples share one
token so no target is lost at a boundary. A document longer than a sample simply continues in the
next window (counted as `long_documents`); the final partial window is dropped (< seq_len tokens,
counted as `dropped_tail_tokens`). Each token also carries the id of its document, for masking
attention at document boundaries.

The sample order of epoch e is a permutation keyed by (seed, salt, e): every epoch is reshuffled,
and any process computes the same order from the seed alone.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .batching import SampleBatcher
from .indexed import IndexedTokens

_MASK64 = (1 << 64) - 1


def _splitmix64_scalar(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_key(*parts) -> int:
    """A 64-bit key from ints/strings, stable across processes (unlike hash()) and versions."""
    h = 0
    for p in parts:
        vals = [len(p.encode()), *p.encode()] if isinstance(p, str) else [int(p) & _MASK64]
        for v in vals:
            h = _splitmix64_scalar(h ^ v)
    return h


def hashed_permutation(n: int, *key) -> np.ndarray:
    """A permutation of range(n) determined by `key` alone. Not numpy's Generator: NEP 19 lets its
    streams change between numpy versions, and a resume must see the very same order."""
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(hash_key(*key)))
    return np.argsort(keys, kind="stable").astype(np.int64)


def sample_starts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """For documents of `lengths` laid end to end, the (document position, offset) where each
    sample window starts: int64 [num_samples, 2]."""
    total = int(lengths.sum())
    num_samples = max(total - 1, 0) // seq_len
    ends = np.cumsum(lengths)
    t = np.arange(num_samples, dtype=np.int64) * seq_len
    pos = np.searchsorted(ends, t, side="right")
    return np.stack([pos, t - (ends[pos] - lengths[pos])], axis=1) if num_samples else np.zeros((0, 2), np.int64)


class PackedDataset(SampleBatcher):
    """Fixed-length samples packed from the documents `doc_order` of one indexed dataset.

    `sample(i)` is the sample at position i of the shuffled order; i >= len wraps into the next
    epoch with a different shuffle, so a sampler never runs out.
    """

    def __init__(self, tokens: IndexedTokens, doc_order: np.ndarray, seq_len: int, seed: int,
                 salt: str = "", starts: np.ndarray | None = None, doc_id_offset: int = 0):
        self.tokens, self.doc_order, self.seq_len = tokens, np.asarray(doc_order, np.int64), seq_len
        self.seed, self.salt, self.doc_id_offset = seed, salt, doc_id_offset
        self.starts = starts if starts is not None else sample_starts(tokens.lengths[self.doc_order], seq_len)
        self._order = lru_cache(maxsize=2)(self._epoch_order)

    def __len__(self) -> int:
        return len(self.starts)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return hashed_permutation(len(self), self.seed, self.salt, epoch)

    def packed_index(self, i: int) -> int:
        """Which packed window sample i (in shuffled, epoch-wrapping order) is."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, j = divmod(int(i), len(self))
        return int(self._order(epoch)[j])

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens int64 [seq_len+1] and document ids int32 [seq_len+1] of packed window k."""
        pos, off = (int(v) for v in self.starts[k])
        need, toks, ids = self.seq_len + 1, [], []
        while need > 0:
            doc = int(self.doc_order[pos])
            part = self.tokens.document(doc)[off:off + need]
            toks.append(part)
            ids.append(np.full(len(part), doc + self.doc_id_offset, np.int32))
            need, pos, off = need - len(part), pos + 1, 0
        return np.concatenate(toks).astype(np.int64), np.concatenate(ids)

    def sample(self, i: int) -> np.ndarray:
        return self.window(self.packed_index(i))[0]

    def document_ids(self, i: int) -> np.ndarray:
        """For each token of sample(i), the index of its document in the source's `.bin`
        (plus the source's offset in a blend): equal ids = same document."""
        return self.window(self.packed_index(i))[1]
