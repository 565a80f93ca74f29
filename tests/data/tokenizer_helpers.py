"""Tiny tokenizers of every kind, made in the test from generated text (nothing downloaded)."""

from __future__ import annotations

import base64
import json
import random

WORDS = ["alpha", "beta", "gamma", "über", "naïve", "東京", "🙂", "it's", "12345", "they're", "x", "\tTab"]
PROBE = "über naïve 東京 🙂 it's 12345  they're\n\nalpha\tTab beta, gamma!"


def corpus_text(n_lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(n_lines))


def make_hf_json(path, text: str, vocab_size: int = 300) -> "object":
    """A byte-level BPE trained with the `tokenizers` library itself; writes tokenizer.json, returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def make_sentencepiece(prefix, text: str, eos_id: int = 2):
    """A SentencePiece BPE model trained on `text`; returns the library's processor for it."""
    import sentencepiece as spm

    src = f"{prefix}.txt"
    with open(src, "w", encoding="utf-8") as f:
        f.write(text)
    spm.SentencePieceTrainer.train(input=src, model_prefix=str(prefix), vocab_size=60, model_type="bpe",
                                   character_coverage=1.0, eos_id=eos_id, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


RANK_MERGES = [b"al", b"alp", b"ha", b"alpha", b" b", b"et", b"ta", b"ga", b"mm", b"gamma", b" g", b"12", b"123"]


def tiktoken_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for m in RANK_MERGES:
        ranks[m] = len(ranks)
    return ranks


def write_ranks(path, ranks: dict[bytes, int]) -> str:
    with open(path, "wb") as f:
        f.writelines(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items())
    return str(path)


def write_descriptor(path, ranks_name: str, specials: dict[str, int], eod: str, pattern: str | None = None) -> str:
    doc = {"tiktoken_ranks": ranks_name, "special_tokens": specials, "eod_token": eod}
    if pattern:
        doc["pattern"] = pattern
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)
