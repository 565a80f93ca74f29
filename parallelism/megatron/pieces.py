"""The pieces language of the megatron weight mapping: a megatron tensor of one rank is a list of
`Piece`s, slices of reference tensors concatenated along one dimension. The attention/MLP mapping
(parallelism/megatron/mapping.py) and the linear-sequence mixers' mapping
(parallelism/megatron/hybrid_mapping.py) both speak it; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    ref_name: str
    """Reference parameter name."""
    index: int | None
    """Leading index into a stacked reference tensor (expert id), or None."""
    dim: int
    """Dimension of the (indexed) reference tensor that is sliced."""
    start: int
    length: int


def shard(n: int, parts: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank `rank`'s equal share of `n` split into `parts`."""
    if n % parts:
        raise ValueError(f"dimension {n} does not split into {parts} shards")
    return rank * (n // parts), n // parts


def column(ref: str, n: int, parts: int, rank: int, index=None) -> Piece:
    """Rank's share of the rows (dim 0, output features) of `ref`: a column-parallel weight."""
    start, length = shard(n, parts, rank)
    return Piece(ref, index, 0, start, length)


def row(ref: str, n: int, parts: int, rank: int, index=None) -> Piece:
    """Rank's share of the columns (dim 1, input features) of `ref`: a row-parallel weight."""
    start, length = shard(n, parts, rank)
    return Piece(ref, index, 1, start, length)


def whole(ref: str, n: int) -> Piece:
    """All `n` rows of `ref` (a replicated tensor)."""
    return Piece(ref, None, 0, 0, n)
