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

import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .storage import open_atomic, open_file, size as file_size

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


_HEADER_BYTES = 34


@dataclass(frozen=True)
class IndexHeader:
    """What the first 34 bytes of a `.idx` promise: token dtype, sequence and document-index counts."""

    dtype: type
    sequences: int
    document_indices: int

    @property
    def idx_bytes(self) -> int:
        return _HEADER_BYTES + 12 * self.sequences + 8 * self.document_indices


def parse_header(head: bytes, idx: str) -> IndexHeader:
    """The header of `.idx` file `idx` (its first bytes `head`), or a DataError naming the file and what is wrong."""
    if len(head) < _HEADER_BYTES:
        raise DataError(f"{idx} is truncated: {len(head)} bytes, shorter than the 34-byte header")
    if head[:9] != INDEX_HEADER or struct.unpack_from("<Q", head, 9)[0] != 1:
        raise DataError(f"{idx} is not a megatron indexed dataset index (bad header/version)")
    code = head[17]
    if code not in _CODE_DTYPES:
        raise DataError(f"{idx} has dtype byte {code} (offset 17), not one of megatron's codes "
                        f"{sorted(_CODE_DTYPES)}: the file is damaged")
    n, m = struct.unpack_from("<QQ", head, 18)
    return IndexHeader(_CODE_DTYPES[code], n, m)


def check_prefix_files(prefix: str, fix: str) -> IndexHeader:
    """The cheap consistency check of `<prefix>.bin/.idx` on any fsspec storage (a few small reads): the
    header, the `.idx` size it implies, and the `.bin` size the last sequence's pointer and length imply.
    A DataError names the file, what is wrong, and `fix`."""
    try:
        with open_file(idx_path(prefix)) as f:
            header = parse_header(f.read(_HEADER_BYTES), idx_path(prefix))
            size = file_size(idx_path(prefix))
            if size != header.idx_bytes:
                raise DataError(f"{idx_path(prefix)} is {size:,} bytes, its header promises {header.idx_bytes:,} "
                                f"({header.sequences:,} sequences): truncated or damaged")
            need = 0
            if header.sequences:
                f.seek(_HEADER_BYTES + 4 * (header.sequences - 1))
                last_len = struct.unpack("<i", f.read(4))[0]
                f.seek(_HEADER_BYTES + 4 * header.sequences + 8 * (header.sequences - 1))
                need = struct.unpack("<q", f.read(8))[0] + last_len * np.dtype(header.dtype).itemsize
        have = file_size(bin_path(prefix))
    except FileNotFoundError as exc:
        raise DataError(f"prepared dataset file not found: {exc.filename or prefix}; {fix}") from None
    except DataError as exc:
        raise DataError(f"{exc}; {fix}") from None
    if have != need:
        raise DataError(f"{bin_path(prefix)} is {have:,} bytes and its index {idx_path(prefix)} says {need:,}: "
                        f"{'truncated' if have < need else 'not the file this index was written for'}; {fix}")
    return header


class IndexedTokens:
    """Read-only, memory-mapped view of a local `<prefix>.bin/.idx` (ours or megatron's). Opening it
    verifies the two files agree (header, sizes, every sequence inside `.bin`): a damaged pair is a
    DataError naming the file and `fix`, never a buffer or mmap error later."""

    def __init__(self, prefix: str, fix: str = "prepare it again (raytron data prepare)"):
        self.prefix = prefix
        try:
            raw = np.fromfile(idx_path(prefix), dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"indexed dataset index not found: {idx_path(prefix)}; {fix}") from None
        buf = raw.tobytes()
        try:
            header = parse_header(buf[:_HEADER_BYTES], idx_path(prefix))
            if len(buf) != header.idx_bytes:
                raise DataError(f"{idx_path(prefix)} is {len(buf):,} bytes, its header promises "
                                f"{header.idx_bytes:,} ({header.sequences:,} sequences): truncated or damaged")
            self.dtype, n = header.dtype, header.sequences
            off, itemsize = _HEADER_BYTES, np.dtype(self.dtype).itemsize
            self.lengths = np.frombuffer(buf, np.int32, n, off).astype(np.int64)
            byte_pointers = np.frombuffer(buf, np.int64, n, off + 4 * n)
            self.pointers = byte_pointers // itemsize
            self.document_indices = np.frombuffer(buf, np.int64, header.document_indices, off + 12 * n)
            total = int(self.lengths.sum())
            self._check_bin(byte_pointers, total * itemsize)
        except DataError as exc:
            raise DataError(f"{exc}; {fix}") from None
        self.tokens = (np.memmap(bin_path(prefix), dtype=self.dtype, mode="r", shape=(total,))
                       if total else np.zeros(0, self.dtype))

    def _check_bin(self, byte_pointers: np.ndarray, need: int) -> None:
        try:
            have = os.path.getsize(bin_path(self.prefix))
        except FileNotFoundError:
            raise DataError(f"prepared dataset file not found: {bin_path(self.prefix)}") from None
        if have != need:
            raise DataError(f"{bin_path(self.prefix)} is {have:,} bytes and its index {idx_path(self.prefix)} says "
                            f"{need:,}: {'truncated' if have < need else 'not the file this index was written for'}")
        itemsize = np.dtype(self.dtype).itemsize
        ends = self.pointers + self.lengths
        if len(ends) and ((self.lengths < 0).any() or (byte_pointers < 0).any() or (byte_pointers % itemsize).any()
                          or int(ends.max()) * itemsize > have):
            raise DataError(f"{idx_path(self.prefix)} points outside {bin_path(self.prefix)} (negative or "
                            f"out-of-range sequence pointers): damaged")

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int) -> np.ndarray:
        """Tokens of sequence `i` (a view into the memory map; copy before mutating)."""
        start = self.pointers[i]
        return self.tokens[start:start + self.lengths[i]]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())
