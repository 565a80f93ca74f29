"""`train_bpe`: a byte-level BPE trained offline on the user's corpus, written in Hugging Face format.

The corpus is read with the same source readers as `prepare` (text/jsonl/parquet, local or fsspec,
the same skips). The result is GPT-2 style: byte-level pre-tokenization (every byte sequence
encodes, nothing is unknown), `<|endoftext|>` (id 0, the end-of-document token) and `<|startoftext|>`
(id 1, BOS) as special tokens, and written as tokenizer.json + tokenizer_config.json, which both
`get_tokenizer(DIR)` and `transformers.AutoTokenizer.from_pretrained(DIR)` load with equal ids.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .errors import DataError
from .prepare import resolve_all
from .sources import ReadStats, read_documents
from .storage import exists, join

EOD_TOKEN, BOS_TOKEN = "<|endoftext|>", "<|startoftext|>"
MIN_VOCAB = 256 + 2  # every byte, plus EOD and BOS


def _documents(files, stats: ReadStats) -> Iterator[str]:
    for f in files:
        yield from read_documents(f, stats)


def train_bpe(sources: Sequence, vocab_size: int, out_dir: str, *, force: bool = False,
              max_documents: int | None = None) -> tuple[object, ReadStats]:
    """Train on `sources` (URIs or SourceSpec-likes) and save to `out_dir` (local or fsspec).
    Returns (the saved tokenizer as get_tokenizer loads it, what was read and skipped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .tokenizer import HF_FILES, get_tokenizer

    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size must be >= {MIN_VOCAB} (256 bytes + EOD + BOS), got {vocab_size}")
    clash = [n for n in HF_FILES if exists(join(out_dir, n))]
    if clash and not force:
        raise DataError(f"{out_dir} already holds {', '.join(clash)}; pass --force to overwrite")
    files = resolve_all(sources)
    stats = ReadStats()
    docs = _documents(files, stats)
    if max_documents is not None:
        docs = (d for _, d in zip(range(max_documents), docs))
    tok = Tokenizer(models.BPE(fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN, BOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    if stats.documents == 0:
        raise DataError(f"no usable documents in {len(files)} file(s) to train a tokenizer on; "
                        f"skipped: {', '.join(f'{k} {getattr(stats, k)}' for k in stats.SKIP_KINDS if getattr(stats, k))}")
    from .tokenizer_files import HFTokenizer

    trained = HFTokenizer(out_dir, tok.to_str().encode(), {"eos_token": EOD_TOKEN, "bos_token": BOS_TOKEN})
    trained.save_pretrained(out_dir)
    get_tokenizer.cache_clear()  # a tokenizer cached from an earlier --force run at this path is stale
    return get_tokenizer(out_dir), stats
