"""Prepared prefixes as data sources: a corpus tokenized once (by `raytron data prepare` or megatron's
preprocess_data.py) is trained on many times without tokenizing again.

A source is a prefix when its format is `indexed`, or (format `auto`) when its URI ends in `.bin`/`.idx`
or `<uri>.idx` exists. raytron's prefixes carry `<prefix>.summary.json`, whose `tokenizer` record
(name + fingerprint) must match the job's tokenizer: `check_recorded_tokenizer` refuses a mismatch
(plan and submit call it). Megatron's carry no record: their ids are checked against the vocabulary
when the job's data cache is built (`check_ids_in_vocab`).
"""

from __future__ import annotations

import json

import numpy as np

from .errors import DataError
from .indexed import IndexedTokens, bin_path, idx_path
from .storage import exists, read_bytes

INDEXED = "indexed"
_SCAN_CHUNK = 1 << 24  # tokens per max() pass: bounded memory on a multi-GB .bin


def strip_suffix(uri: str) -> str:
    for suffix in (".bin", ".idx"):
        if uri.endswith(suffix):
            return uri[: -len(suffix)]
    return uri


def indexed_prefix(uri: str, format: str) -> str | None:
    """The prefix if source (`uri`, `format`) is a prepared .bin/.idx pair, else None."""
    if format == INDEXED or (format == "auto" and uri.endswith((".bin", ".idx"))):
        return strip_suffix(uri)
    if format != "auto" or any(c in uri for c in "*?[") or uri.startswith("builtin://"):
        return None
    try:
        return uri if exists(idx_path(uri)) else None
    except DataError:
        raise  # no filesystem opens this URI (an unknown scheme): named here, against the source
    except Exception:  # noqa: BLE001 - an unreachable store: the source check names it later
        return None


def check_prefix_exists(prefix: str, where: str) -> None:
    for path in (idx_path(prefix), bin_path(prefix)):
        if not exists(path):
            raise DataError(f"{where}: prepared dataset file not found: {path} (a prepared source is a prefix "
                            f"with .bin and .idx, as `raytron data prepare --out PREFIX` writes)")


def recorded_tokenizer(prefix: str) -> dict | None:
    """The tokenizer record of `<prefix>.summary.json`, or None when there is none (megatron's prefixes)."""
    summary = prefix + ".summary.json"
    if not exists(summary):
        return None
    try:
        record = json.loads(read_bytes(summary)).get("tokenizer")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise DataError(f"{prefix}.summary.json is not a prepare summary ({exc}); delete it to have the ids "
                        f"checked against the vocabulary instead") from None
    return record if isinstance(record, dict) else None


def check_recorded_tokenizer(prefix: str, tokenizer, where: str) -> bool:
    """Refuse a prefix prepared with another tokenizer, naming both. True if a record was checked."""
    record = recorded_tokenizer(prefix)
    if record is None:
        return False
    if record.get("fingerprint") != tokenizer.fingerprint:
        raise DataError(f"{where}: {prefix} was prepared with tokenizer {record.get('name')!r} (fingerprint "
                        f"{str(record.get('fingerprint'))[:12]}) but the job's tokenizer is {tokenizer.name!r} "
                        f"(fingerprint {tokenizer.fingerprint[:12]}); prepare it again with this tokenizer or set "
                        f"data.tokenizer to the one it was prepared with")
    return True


def check_ids_in_vocab(tokens: IndexedTokens, tokenizer, where: str, source: str, fix: str | None = None) -> None:
    """Every id of `tokens` (a copy of prefix `source`) in 0..vocabulary-1 (a scan in bounded chunks)."""
    top, low = -1, 0
    signed = np.dtype(tokens.dtype).kind == "i"
    for start in range(0, len(tokens.tokens), _SCAN_CHUNK):
        chunk = tokens.tokens[start:start + _SCAN_CHUNK]
        top = max(top, int(np.max(chunk)))
        low = min(low, int(np.min(chunk))) if signed else 0
    if top >= tokenizer.vocab_size or low < 0:
        bad = top if top >= tokenizer.vocab_size else low
        raise DataError(f"{where}: {bin_path(source)} holds token id {bad}, outside the vocabulary of "
                        f"tokenizer {tokenizer.name!r} ({tokenizer.vocab_size} ids): "
                        + (fix or "it was tokenized with another tokenizer; set data.tokenizer to that one"))
