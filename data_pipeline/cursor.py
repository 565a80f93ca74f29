"""The data cursor: how far a run has read, in the one unit that survives any re-layout."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataCursor:
    """Global samples consumed so far (all DP ranks together).

    Not per-rank offsets and not steps: global step k always reads samples
    [k*gbs, (k+1)*gbs) of one global order, and each rank derives its slice from this count, so a
    run that resumes with another DP size (same global batch) continues with exactly the next
    sample: no duplicate, no skip. Stored in the checkpoint manifest via to_dict/from_dict.
    """

    samples_consumed: int = 0

    def __post_init__(self):
        if not isinstance(self.samples_consumed, int) or self.samples_consumed < 0:
            raise ValueError(f"samples_consumed must be an int >= 0, got {self.samples_consumed!r}")

    def advance(self, global_batch_size: int) -> "DataCursor":
        """The cursor after one more optimizer step of `global_batch_size` samples."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        return DataCursor(self.samples_consumed + global_batch_size)

    def __index__(self) -> int:
        return self.samples_consumed

    def to_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    @classmethod
    def from_dict(cls, d: dict) -> "DataCursor":
        return cls(int(d["samples_consumed"]))
