"""Weighted blending of several packed datasets.

The blend is a deterministic interleave, not a random draw: source k's c-th sample is placed at
"ideal time" (c + 0.5) / w_k and all sources are merged by that time. Every prefix of the blend
then holds each source within one sample of its share (megatron's BlendedDataset greedy rule has
the same property), and no RNG is involved, so nothing can differ between processes. Each source
is already shuffled by its own seeded order; a source drawn more often than its size wraps into
its next epoch (a fresh shuffle), one drawn less often is sub-sampled.
"""

from __future__ import annotations

import numpy as np

from .batching import SampleBatcher


def blend_schedule(weights, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index int16 [n], sample index within that source int64 [n]) for n blended samples."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, owners, ranks = [], [], []
    for k, wk in enumerate(w):
        count = int(np.ceil(n * wk)) + 1
        c = np.arange(count, dtype=np.int64)
        times.append((c + 0.5) / wk)
        owners.append(np.full(count, k, np.int16))
        ranks.append(c)
    times, owners, ranks = (np.concatenate(a) for a in (times, owners, ranks))
    order = np.lexsort((owners, times))[:n]
    return owners[order], ranks[order]


class BlendedDataset(SampleBatcher):
    """Samples drawn from `datasets` in proportion to `weights`; same interface as PackedDataset."""

    def __init__(self, datasets: list, weights, schedule: tuple[np.ndarray, np.ndarray] | None = None):
        self.datasets, self.weights = list(datasets), list(weights)
        self.seq_len = self.datasets[0].seq_len
        n = sum(len(d) for d in self.datasets)
        self.source_index, self.source_sample = schedule if schedule is not None else blend_schedule(weights, n)
        self.per_epoch = np.bincount(self.source_index, minlength=len(self.datasets)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.source_index)

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index into that source) of blended sample i; epochs wrap like PackedDataset."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, j = divmod(int(i), len(self))
        k = int(self.source_index[j])
        return k, int(self.source_sample[j]) + epoch * int(self.per_epoch[k])

    def sample(self, i: int) -> np.ndarray:
        k, j = self.locate(i)
        return self.datasets[k].sample(j)

    def document_ids(self, i: int) -> np.ndarray:
        k, j = self.locate(i)
        return self.datasets[k].document_ids(j)
