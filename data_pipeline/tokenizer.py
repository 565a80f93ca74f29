"""Offline tokenizers behind one interface, from `byte` or a local path / fsspec URI (never downloaded).

    tok = get_tokenizer("byte" | "path/tokenizer.json" | "s3://b/tok/" | "sp.model" | "ranks.tiktoken")
    tok.encode(text) -> ids [n] (tok.dtype); tok.encode_batch(texts); tok.decode(ids)
    tok.vocab_size, tok.eod_id, tok.bos_id, tok.name, tok.fingerprint; tok.save_pretrained(dir)

The kinds (Hugging Face `tokenizers` JSON, SentencePiece, tiktoken ranks) live in tokenizer_files.py;
this module holds the interface, the byte tokenizer, the rules every kind shares (token dtype, the
model's padded vocabulary) and the per-process cache: a prepare worker tokenizes many files with one
loaded tokenizer.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import tempfile

import numpy as np

from .errors import DataError
from .storage import join, write_bytes_atomic

BYTE = "byte"
HF_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What save_pretrained writes."""
MEGATRON_VOCAB_MULTIPLE = 128
"""Real vocabularies are padded to a multiple of this (megatron's --make-vocab-size-divisible-by)."""
TOKENIZER_THREADS_ENV = "RAYTRON_TOKENIZER_THREADS"
"""Threads a native batch encoder may use (unset: the library's default); prepare's worker
processes set 1, so that N processes use N cores."""
SAVE_PROBE = "Hello, world! 12345  tabs\tand\nnew lines. Ünïcödé 漢字 🙂 it's they're   spaces"
"""Text that save_pretrained's check encodes with both the written tokenizer and this one."""


def native_threads(default: int) -> int:
    """Threads for a native batch encoder: $RAYTRON_TOKENIZER_THREADS, else `default`."""
    raw = os.environ.get(TOKENIZER_THREADS_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else default


def token_dtype(vocab_size: int):
    """megatron-core's `DType.optimal_dtype(vocab_size)`: what its preprocess_data.py writes and its
    IndexedDataset reads back."""
    return np.uint16 if vocab_size < 65500 else np.int32


class Tokenizer(abc.ABC):
    """The interface of every kind. Subclasses set the attributes and implement `_encode_batch`."""

    kind: str
    name: str
    """`byte`, or the path/URI the tokenizer was loaded from."""
    vocab_size: int
    """Ids are < vocab_size (special tokens included; before the model's padding)."""
    eod_id: int
    """End of document: appended after every document by prepare."""
    bos_id: int | None
    """Beginning of sequence, if the tokenizer has one (not added by prepare, like megatron's)."""
    fingerprint: str
    """sha256 of what defines the ids (vocabulary, merges, pattern, special tokens)."""
    pad_multiple: int = MEGATRON_VOCAB_MULTIPLE

    @property
    def dtype(self):
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, no special tokens added (the packer appends EOD per document)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text; kinds with a native batch encoder use it (parallel in Rust/C++)."""
        return self._encode_batch(texts)

    @abc.abstractmethod
    def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of each text, in `dtype`."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of `ids` (special tokens skipped)."""

    def record(self) -> dict:
        """What prepared data and caches store to say which tokenizer made them."""
        return {"name": self.name, "kind": self.kind, "fingerprint": self.fingerprint,
                "vocab_size": self.vocab_size, "eod_id": self.eod_id, "bos_id": self.bos_id}

    @abc.abstractmethod
    def hf_tokenizer(self):
        """(tokenizers.Tokenizer with the same ids, eos token, bos token) for save_pretrained,
        or a DataError saying why this tokenizer cannot be written in that format."""

    def save_pretrained(self, directory: str) -> None:
        """Write a directory that `transformers.AutoTokenizer.from_pretrained(directory)` loads and that
        encodes like this tokenizer (checked on a probe text before anything is written)."""
        hf, eos, bos = self.hf_tokenizer()
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30,
                  "add_bos_token": False, "add_eos_token": False}
        with tempfile.TemporaryDirectory() as tmp:
            hf.save(os.path.join(tmp, "tokenizer.json"))
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({k: v for k, v in config.items() if v is not None}, f, indent=1)
            self._check_saved(tmp)
            for name in HF_FILES:  # each appears whole or not at all
                with open(os.path.join(tmp, name), "rb") as f:
                    write_bytes_atomic(join(directory, name), f.read())

    def _check_saved(self, directory: str) -> None:
        from transformers import AutoTokenizer

        saved = AutoTokenizer.from_pretrained(directory)
        got = saved(SAVE_PROBE, add_special_tokens=False)["input_ids"]
        want = self.encode(SAVE_PROBE).tolist()
        if got != want or saved.convert_tokens_to_ids(saved.eos_token) != self.eod_id:
            raise DataError(f"tokenizer {self.name}: the Hugging Face conversion does not reproduce its ids "
                            f"(probe text gives {got[:8]}... instead of {want[:8]}...); it cannot be saved "
                            f"in transformers format")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; `eod_id` (256) ends every document; `pad_id` (257) is reserved.

    `vocab_size` is padded from 258 to 264 (a multiple of 8) so the embedding and output layers
    have tensor-core friendly shapes; ids 258..263 never occur in data.
    """

    kind = BYTE
    name = BYTE
    eod_id = 256
    pad_id = 257
    bos_id = None
    vocab_size = 264
    pad_multiple = 8
    fingerprint = hashlib.sha256(b"raytron byte tokenizer: utf-8 bytes 0-255, eod 256, pad 257, vocab 264")\
        .hexdigest()
    SPECIALS = ["<|endoftext|>", "<pad>"] + [f"<|reserved_{i}|>" for i in range(6)]

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (no EOD: the packer appends it per document). uint16 [n_bytes]."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(self.dtype)

    def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Text of `ids`, skipping special tokens. Bytes cut mid-character (a sample boundary
        inside a multi-byte character) decode to U+FFFD rather than raising."""
        arr = np.asarray(ids)
        arr = arr[arr < 256].astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")

    def hf_tokenizer(self):
        """A byte-level BPE without merges: each byte is its own token with the same id."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        byte_chars = _bytes_to_unicode()
        vocab = {byte_chars[b]: b for b in range(256)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.SPECIALS])
        return hf, self.SPECIALS[0], None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel pre-tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def padded_vocab_size(tokenizer: Tokenizer) -> int:
    """The model's vocabulary for `tokenizer`: its size rounded up to its pad multiple (the byte
    tokenizer's 264 is already padded; real vocabularies go to a multiple of 128, megatron's default),
    so the embedding and output layers have tensor-core friendly shapes."""
    m = tokenizer.pad_multiple
    return -(-tokenizer.vocab_size // m) * m


@functools.lru_cache(maxsize=8)
def get_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer `byte`, or one loaded from a local path or fsspec URI: a `tokenizer.json`, a
    directory holding one (transformers' save_pretrained), a SentencePiece `.model`, a tiktoken ranks
    file, or a tiktoken descriptor JSON (see tokenizer_files.py). Cached per process. DataError naming
    the path when it is missing or not a tokenizer."""
    if name_or_path == BYTE:
        return ByteTokenizer()
    from .tokenizer_files import load_tokenizer_file

    return load_tokenizer_file(name_or_path)
