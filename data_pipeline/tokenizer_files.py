"""Tokenizers loaded from files: Hugging Face `tokenizers` JSON, SentencePiece, tiktoken ranks.

What a path may be (local or any fsspec URI; read once, nothing downloaded from a hub):
  * `tokenizer.json` (the `tokenizers` library's format), or a directory holding one, as
    transformers' `save_pretrained` writes it; its `tokenizer_config.json`, if present, names the
    eos/bos tokens.
  * a SentencePiece model (`*.model`, protobuf): EOD is its `eos_id()`, BOS its `bos_id()`.
  * a tiktoken ranks file (`<base64 token> <rank>` per line, e.g. Llama-3's original tokenizer.model):
    split pattern and special tokens are Llama-3's (LLAMA3_PATTERN; `<|begin_of_text|>`,
    `<|end_of_text|>` and reserved tokens, 256 specials from id len(ranks) on).
  * a tiktoken descriptor JSON, to name another pattern or special tokens:
    {"tiktoken_ranks": "cl100k_base.tiktoken",   (path relative to the JSON, or a URI)
     "pattern": "...", "special_tokens": {"<|endoftext|>": 100257, ...},
     "eod_token": "<|endoftext|>", "bos_token": null}
A directory may hold a SentencePiece or tiktoken `tokenizer.model` instead of a tokenizer.json.
EOD must exist: a tokenizer without an end-of-document token is refused, naming the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os

import numpy as np

from .errors import DataError
from .storage import exists, isfile, join, list_names, read_bytes
from .tokenizer import Tokenizer, native_threads

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]")
KINDS_HELP = ("use `byte`, a tokenizer.json, a directory holding one (transformers' save_pretrained), "
              "a SentencePiece .model or a tiktoken ranks file")


def load_tokenizer_file(uri: str) -> Tokenizer:
    try:
        if not exists(uri):
            raise DataError(f"tokenizer not found: {uri}; {KINDS_HELP}")
        if not isfile(uri):
            return _load_directory(uri)
        data = read_bytes(uri)
    except PermissionError as exc:
        raise DataError(f"no permission to read tokenizer {uri}: {exc}") from None
    return _load_bytes(uri, data, config={})


def _load_directory(uri: str) -> Tokenizer:
    names = set(list_names(uri))
    config = {}
    if "tokenizer_config.json" in names:
        config = _json(uri, read_bytes(join(uri, "tokenizer_config.json")), "tokenizer_config.json")
    for name in ("tokenizer.json", "tokenizer.model"):
        if name in names:
            return _load_bytes(join(uri, name), read_bytes(join(uri, name)), config)
    raise DataError(f"tokenizer directory {uri} holds neither tokenizer.json nor tokenizer.model; {KINDS_HELP}")


def _json(uri: str, data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {uri} is not valid JSON ({exc}); {KINDS_HELP}") from None
    if not isinstance(value, dict):
        raise DataError(f"{what} {uri} is not a JSON object; {KINDS_HELP}")
    return value


def _load_bytes(uri: str, data: bytes, config: dict) -> Tokenizer:
    if data.lstrip()[:1] == b"{":
        doc = _json(uri, data, "tokenizer file")
        if "tiktoken_ranks" in doc:
            return TiktokenTokenizer.from_descriptor(uri, doc)
        if "model" in doc:
            return HFTokenizer(uri, data, config)
        raise DataError(f"{uri} is JSON but neither a tokenizers tokenizer.json (no 'model') nor a tiktoken "
                        f"descriptor (no 'tiktoken_ranks'); {KINDS_HELP}")
    ranks = _parse_ranks(data)
    if ranks is not None:
        return TiktokenTokenizer(uri, ranks, LLAMA3_PATTERN, _llama3_specials(len(ranks)),
                                 "<|end_of_text|>", "<|begin_of_text|>")
    return SentencePieceTokenizer(uri, data)


def _special(config: dict, key: str):
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _no_eod(uri: str, what: str) -> DataError:
    return DataError(f"tokenizer {uri} has no usable end-of-document token ({what}); prepare ends every "
                     f"document with one: use a tokenizer that has an eos/end-of-text token")


def _fingerprint(kind: str, *parts) -> str:
    h = hashlib.sha256(kind.encode())
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()


class HFTokenizer(Tokenizer):
    """A `tokenizers` JSON: encode without added special tokens, decode skipping them."""

    kind = "hf"

    def __init__(self, uri: str, data: bytes, config: dict):
        from tokenizers import Tokenizer as HF

        try:
            self.hf = HF.from_str(data.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - the library's parse errors are plain Exceptions
            raise DataError(f"{uri} is not a loadable tokenizers JSON ({exc}); {KINDS_HELP}") from None
        self.name = uri
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.hf.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        eos, bos = _special(config, "eos_token"), _special(config, "bos_token")
        eos = eos if eos in vocab else next((t for t in EOD_NAMES if t in vocab), None)
        bos = bos if bos in vocab else next((t for t in BOS_NAMES if t in vocab), None)
        if eos is None:
            raise _no_eod(uri, f"no tokenizer_config.json eos_token and none of {', '.join(EOD_NAMES)}")
        self.eos_token, self.bos_token = eos, bos
        self.eod_id, self.bos_id = vocab[eos], (vocab[bos] if bos else None)
        self.fingerprint = _fingerprint(self.kind, data, [self.eod_id, self.bos_id])

    def _encode_batch(self, texts):
        dtype = self.dtype
        return [np.asarray(e.ids, dtype=dtype) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def hf_tokenizer(self):
        return self.hf, self.eos_token, self.bos_token


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, encoded by the sentencepiece library itself."""

    kind = "sentencepiece"

    def __init__(self, uri: str, data: bytes):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except Exception:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError for a bad proto
            raise DataError(f"{uri} is not a tokenizer: not JSON, not tiktoken ranks and not a SentencePiece "
                            f"model; {KINDS_HELP}") from None
        self.name, self.vocab_size = uri, self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id()
        bos = self.sp.bos_id()
        self.bos_id = bos if bos >= 0 else None
        if self.eod_id < 0:
            raise _no_eod(uri, "its eos_id is -1: train it with --eos_id set")
        self.fingerprint = _fingerprint(self.kind, data)

    def _encode_batch(self, texts):
        dtype = self.dtype
        return [np.asarray(ids, dtype=dtype) for ids in self.sp.encode(list(texts), out_type=int, num_threads=native_threads(-1))]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def hf_tokenizer(self):
        raise DataError(f"tokenizer {self.name}: a SentencePiece model is not written in transformers format "
                        f"(transformers' conversion does not reproduce every SentencePiece model's ids); "
                        f"save the tokenizer.json of the model's Hugging Face release instead")


def _parse_ranks(data: bytes) -> dict[bytes, int] | None:
    """tiktoken's format, or None if `data` is not in it (e.g. a binary SentencePiece model)."""
    ranks = {}
    try:
        for line in data.splitlines():
            if not line:
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
        return None
    return ranks or None


def _llama3_specials(n: int) -> dict[str, int]:
    return {t: n + i for i, t in enumerate(LLAMA3_SPECIALS)}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE (ranks + split pattern + special tokens), encoded by tiktoken itself."""

    kind = "tiktoken"

    def __init__(self, uri: str, ranks: dict[bytes, int], pattern: str, specials: dict[str, int],
                 eod_token: str, bos_token: str | None):
        import tiktoken

        self.name, self.ranks, self.pattern, self.specials = uri, ranks, pattern, dict(specials)
        self.enc = tiktoken.Encoding(name=os.path.basename(uri) or "tiktoken", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=self.specials)
        self.vocab_size = max([*ranks.values(), *self.specials.values()]) + 1
        if eod_token not in self.specials:
            raise _no_eod(uri, f"eod_token {eod_token!r} is not among its special tokens")
        if bos_token is not None and bos_token not in self.specials:
            raise DataError(f"tiktoken tokenizer {uri}: bos_token {bos_token!r} is not among its special tokens")
        self.eod_token, self.bos_token = eod_token, bos_token
        self.eod_id = self.specials[eod_token]
        self.bos_id = self.specials[bos_token] if bos_token else None
        body = b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1]))
        self.fingerprint = _fingerprint(self.kind, body, [pattern, self.specials, self.eod_id, self.bos_id])

    @classmethod
    def from_descriptor(cls, uri: str, doc: dict) -> "TiktokenTokenizer":
        ranks_uri = doc["tiktoken_ranks"]
        if "://" not in ranks_uri and not os.path.isabs(ranks_uri):
            ranks_uri = join(uri.rsplit("/", 1)[0], ranks_uri) if "/" in uri else ranks_uri
        if not exists(ranks_uri):
            raise DataError(f"tiktoken descriptor {uri}: tiktoken_ranks file not found: {ranks_uri}")
        ranks = _parse_ranks(read_bytes(ranks_uri))
        if ranks is None:
            raise DataError(f"tiktoken descriptor {uri}: {ranks_uri} is not a tiktoken ranks file "
                            f"(`<base64 token> <rank>` per line)")
        specials = doc.get("special_tokens")
        specials = _llama3_specials(len(ranks)) if specials is None else specials
        return cls(uri, ranks, doc.get("pattern", LLAMA3_PATTERN), specials,
                   doc.get("eod_token", "<|end_of_text|>"), doc.get("bos_token"))

    def _encode_batch(self, texts):
        dtype = self.dtype
        return [np.asarray(ids, dtype=dtype) for ids in self.enc.encode_ordinary_batch(list(texts), num_threads=native_threads(8))]

    def decode(self, ids) -> str:
        keep = [int(i) for i in ids if int(i) not in self.specials.values()]
        return self.enc.decode(keep)

    def hf_tokenizer(self):
        """transformers' TikTokenConverter; refused when it would renumber the special tokens (it appends
        them in order after the ranks, so they must be contiguous from len(ranks))."""
        from tokenizers import AddedToken

        order = sorted(self.specials, key=self.specials.get)
        if [self.specials[t] for t in order] != list(range(len(self.ranks), len(self.ranks) + len(order))):
            raise DataError(f"tokenizer {self.name}: its special tokens are not numbered contiguously after "
                            f"the {len(self.ranks)} ranks, so transformers format cannot keep their ids")
        from transformers.convert_slow_tokenizer import TikTokenConverter

        conv = TikTokenConverter(pattern=self.pattern)
        conv.load_tiktoken_bpe = lambda _url: self.ranks  # ranks already read (possibly from fsspec)
        hf = conv.converted()
        hf.post_processor = None
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in order])
        return hf, self.eod_token, self.bos_token
