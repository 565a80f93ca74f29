"""Megatron-core's indexed dataset format (`<prefix>.bin` + `<prefix>.idx`), written and read
without importing megatron (which pulls in torch, apex probes and logging on import).

Layout of `.idx`, as `megatron/core/datasets/indexed_dataset.py` (_IndexWriter) writes it:
    b"MMIDIDX\\x00\\x00"           9-byte magic
    <Q 1                          version
    <B dtype code                 DType enum: uint8=1 int8=2 int16=3 int32=4 int64=5 float64=6
                                  float32=7 uint16=8
    <Q sequence_count             n
    <Q document_count             len(document_indices) = n + 1 here
    int32[n]   sequence_lengths   tokens per sequence
    int64[n]   sequence_pointers  byte offset of each sequence in .bin
    int64[n+1] document_indices   sequence index where each document starts, then n
`.bin` is the sequences' tokens back to back. We write one sequence per document (as megatron's
preprocess_data.py does without sentence splitting), EOD included in the sequence.
"""

from __future__ import annotations

import struct

import numpy as np

from .errors import DataError
from .storage import open_atomic

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                np.float64: 6, np.float32: 7, np.uint16: 8}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class IndexedDatasetWriter:
    """Streams documents into `<prefix>.bin`, then writes `<prefix>.idx`. Use as a context manager:
    the `.idx` (the file readers look for) is written only after the `.bin` is complete, so an
    interrupted prepare never leaves a readable but truncated dataset."""

    def __init__(self, prefix: str, dtype=np.uint16):
        if dtype not in _DTYPE_CODES:
            raise DataError(f"unsupported token dtype {dtype}")
        self.prefix, self.dtype = prefix, dtype
        self._lengths: list[int] = []
        self._ctx = None
        self._bin = None

    def __enter__(self) -> "IndexedDatasetWriter":
        self._ctx = open_atomic(bin_path(self.prefix))
        self._bin = self._ctx.__enter__()
        return self

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (its EOD already included) as one sequence."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(len(tokens))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents given as one concatenated array and their lengths."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.extend(int(n) for n in lengths)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._ctx.__exit__(exc_type, exc, tb)
        if exc_type is None:
            with open_atomic(idx_path(self.prefix)) as f:
                f.write(encode_index(np.asarray(self._lengths, dtype=np.int64), self.dtype))

    @property
    def documents(self) -> int:
        return len(self._lengths)

    @property
    def num_tokens(self) -> int:
        return int(sum(self._lengths))


def encode_index(lengths: np.ndarray, dtype) -> bytes:
    """The bytes of a `.idx` for one-sequence-per-document data with these sequence lengths."""
    n = len(lengths)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * itemsize
    head = INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[dtype])
    head += struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    return b"".join([head, lengths.astype(np.int32).tobytes(), pointers.tobytes(),
                     np.arange(n + 1, dtype=np.int64).tobytes()])


class IndexedTokens:
    """Read-only, memory-mapped view of a local `<prefix>.bin/.idx` (ours or megatron's)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        try:
            raw = np.fromfile(idx_path(prefix), dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"indexed dataset index not found: {idx_path(prefix)}") from None
        buf = raw.tobytes()
        if buf[:9] != INDEX_HEADER or struct.unpack_from("<Q", buf, 9)[0] != 1:
            raise DataError(f"not a megatron indexed dataset (bad header/version): {idx_path(prefix)}")
        self.dtype = _CODE_DTYPES[struct.unpack_from("<B", buf, 17)[0]]
        n, n_doc_idx = struct.unpack_from("<QQ", buf, 18)
        off = 34
        self.lengths = np.frombuffer(buf, np.int32, n, off).astype(np.int64)
        self.pointers = np.frombuffer(buf, np.int64, n, off + 4 * n) // np.dtype(self.dtype).itemsize
        self.document_indices = np.frombuffer(buf, np.int64, n_doc_idx, off + 12 * n)
        total = int(self.lengths.sum())
        self.tokens = (np.memmap(bin_path(prefix), dtype=self.dtype, mode="r", shape=(total,))
                       if total else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int) -> np.ndarray:
        """Tokens of sequence `i` (a view into the memory map; copy before mutating)."""
        start = self.pointers[i]
        return self.tokens[start:start + self.lengths[i]]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())
