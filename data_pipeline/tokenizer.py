"""Offline tokenizers. Only the byte-level one exists: it needs no vocabulary file and nothing
downloaded, round-trips any UTF-8 text exactly, and is what the local demo and tests train on."""

from __future__ import annotations

import numpy as np

from .errors import DataError


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; `eod_id` (256) ends every document; `pad_id` (257) is reserved.

    `vocab_size` is padded from 258 to 264 (a multiple of 8) so the embedding and output layers
    have tensor-core friendly shapes; ids 258..263 never occur in data.
    """

    name = "byte"
    eod_id = 256
    pad_id = 257
    vocab_size = 264
    dtype = np.uint16  # what megatron's DType.optimal_dtype picks for vocabularies < 65500

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (no EOD: the packer appends it per document). uint16 [n_bytes]."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(self.dtype)

    def decode(self, ids) -> str:
        """Text of `ids`, skipping special tokens. Bytes cut mid-character (a sample boundary
        inside a multi-byte character) decode to U+FFFD rather than raising."""
        arr = np.asarray(ids)
        arr = arr[arr < 256].astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    """The tokenizer called `name`, or a DataError listing those that exist offline."""
    try:
        return TOKENIZERS[name]()
    except KeyError:
        raise DataError(f"unknown tokenizer {name!r}; available offline: {sorted(TOKENIZERS)}") from None
