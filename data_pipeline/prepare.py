"""`prepare`: source files -> tokens (+EOD per document) -> one megatron `.bin/.idx`.

Streaming and parallel over batches of documents: the parent reads the files in order (jsonl in
chunks, parquet by row group, see sources.py) and cuts their documents into batches of about
`batch_bytes` of text; workers tokenize a batch with one `encode_batch` call and return one
concatenated token array plus document lengths; the parent writes results in batch order, so the
output is byte-identical for any number of workers and memory is bounded by the batches in flight
(2 per worker), never by file size. `pool="thread"` (default) suits the byte tokenizer, whose work
is in C and whose results need no pickling; `pool="process"` (spawned, not forked: s3fs keeps an
event-loop thread that a fork would copy broken; spawning needs an importable __main__) is for a
CPU-heavy tokenizer (BPE): each process encodes single-threaded, so N processes use N cores.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import DataError
from .indexed import IndexedDatasetWriter
from .skips import FixOptions, describe_skips
from .sources import ReadStats, SourceFile, read_documents, resolve_source
from .storage import full_uri, isdir, join, write_bytes_atomic
from .tokenizer import TOKENIZER_THREADS_ENV, get_tokenizer

BATCH_BYTES = 1 << 20
"""Text per tokenizer call: large enough to amortize a call and its transfer, small enough that
2 batches per worker stay a few MB."""


@dataclass(frozen=True)
class SourceSpecLike:
    """uri/format/field, like raytron.config.spec.SourceSpec, for callers without a JobSpec (the CLI)."""

    uri: str
    format: str = "auto"
    field: str = "text"


@dataclass
class BatchTokens:
    """One batch of documents, tokenized: `tokens` concatenated (EOD after each), `lengths` per doc,
    what reading them counted, and how many files were fully read once it was cut."""

    tokens: np.ndarray
    lengths: np.ndarray
    stats: ReadStats
    files_done: int = 0


@dataclass
class PrepareSummary:
    """What `prepare` did; printed by the CLI and stored as `<prefix>.summary.json`."""

    out_uri: str
    files: int = 0
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    workers: int = 1
    pool: str = "thread"
    long_documents: int = 0
    long_document_threshold: int | None = None
    tokenizer: dict = field(default_factory=dict)
    """Which tokenizer made the ids (name, kind, fingerprint, vocab_size, eod_id, bos_id)."""
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["skipped"] = {k: getattr(self.stats, k) for k in ReadStats.SKIP_KINDS}
        return d

    def format(self) -> str:
        lines = [f"prepared {self.out_uri}.bin/.idx",
                 f"  files {self.files}, documents {self.documents:,}, tokens {self.tokens:,}, "
                 f"read {self.bytes_read / 1e6:.2f} MB in {self.seconds:.2f} s "
                 f"({self.tokens_per_s / 1e6:.2f} M tokens/s, {self.workers} {self.pool} worker(s))"]
        skipped = {k: getattr(self.stats, k) for k in ReadStats.SKIP_KINDS if getattr(self.stats, k)}
        lines.append("  skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "nothing"))
        lines += [f"    {e}" for e in self.stats.examples]
        if skipped:
            lines.append(f"  why: {describe_skips(self.stats)}")
        if self.long_document_threshold:
            lines.append(f"  documents longer than one sample ({self.long_document_threshold} tokens): "
                         f"{self.long_documents} (kept; split across consecutive samples when packed)")
        return "\n".join(lines)


class _BatchStats:
    """The ReadStats of the batch being filled: readers keep one object for a whole file while its
    documents span batches, so each batch's skips and counts stay with that batch."""

    def __init__(self):
        object.__setattr__(self, "target", ReadStats())

    def __getattr__(self, name):
        return getattr(self.target, name)

    def __setattr__(self, name, value):
        setattr(self.target, name, value)

    def take(self) -> ReadStats:
        done = self.target
        object.__setattr__(self, "target", ReadStats())
        return done


@dataclass
class DocumentBatch:
    """Documents cut from the sources in order, with what reading them counted."""

    texts: list[str]
    stats: ReadStats
    files_done: int


def document_batches(files: Sequence[SourceFile], batch_bytes: int) -> Iterator[DocumentBatch]:
    """Documents of `files` in order, in batches of about `batch_bytes` UTF-8 bytes (at least one
    document each); the last batch also carries counts of trailing skips."""
    stats, texts, size = _BatchStats(), [], 0
    for done, src in enumerate(files):
        for text in read_documents(src, stats):
            texts.append(text)
            size += len(text)
            if size >= batch_bytes:
                yield DocumentBatch(texts, stats.take(), done)
                texts, size = [], 0
    yield DocumentBatch(texts, stats.take(), len(files))


def tokenize_batch(batch: DocumentBatch, tokenizer_name: str) -> BatchTokens:
    """Tokenize one batch (runs in a worker): ids with EOD after each document, and lengths."""
    tok = get_tokenizer(tokenizer_name)
    encoded = tok.encode_batch(batch.texts) if batch.texts else []
    eod = np.array([tok.eod_id], dtype=tok.dtype)
    parts = [x for ids in encoded for x in (ids, eod)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, tok.dtype)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), np.int64, len(encoded))
    return BatchTokens(tokens, lengths, batch.stats, batch.files_done)


def _tokenize_job(args: tuple[DocumentBatch, str]) -> BatchTokens:
    return tokenize_batch(*args)


def _single_threaded_worker() -> None:
    """Process-pool initializer: one core per worker process (tokenizers' own pools off)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ[TOKENIZER_THREADS_ENV] = "1"


def ordered_map(fn: Callable, items: Iterable, workers: int, pool: str = "thread") -> Iterator:
    """`map(fn, items)` over `workers` threads or spawned processes, in order, with a bounded
    look-ahead so memory stays at ~2 results per worker; stopping early cancels what is queued."""
    if workers <= 1:
        yield from map(fn, items)
        return
    ex = (ThreadPoolExecutor(workers, thread_name_prefix="prepare") if pool == "thread"
          else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_single_threaded_worker))
    try:
        it = iter(items)
        pending = collections.deque(ex.submit(fn, x) for x in itertools.islice(it, 2 * workers))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(fn, nxt))
            yield result
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def resolve_all(sources: Iterable) -> list[SourceFile]:
    """Resolve every source (URI str, SourceSpec-like or SourceFile) and report *all* bad paths in
    one error, so a user fixing a job config sees every typo at once."""
    files, errors = [], []
    for s in sources:
        if isinstance(s, SourceFile):  # already resolved (the CLI resolves first to size its progress bar)
            files.append(s)
            continue
        uri = s if isinstance(s, str) else s.uri
        fmt = "auto" if isinstance(s, str) else s.format
        fld = "text" if isinstance(s, str) else s.field
        try:
            files += resolve_source(uri, fmt, fld)
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        raise DataError("; ".join(errors))
    return files


def without_outputs(files: list[SourceFile], out_uri: str) -> list[SourceFile]:
    """`files` less what a prepare to `out_uri` writes (an earlier run's output in the source directory, or
    half of one left by an interrupted run: `resolve_source` already leaves out complete .bin/.idx pairs)."""
    own = {full_uri(out_uri + ext) for ext in (".bin", ".idx", ".summary.json")}
    return [f for f in files if f.uri not in own]


def output_prefix(out_uri: str) -> str:
    """`out_uri` without a `.bin`/`.idx` suffix. A directory is refused: `prep/` would write the
    hidden files `prep/.bin` and `prep/.idx`."""
    prefix = out_uri
    for suffix in (".bin", ".idx"):
        prefix = prefix[: -len(suffix)] if prefix.endswith(suffix) else prefix
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.basename(prefix) in ("", ".", "..") \
            or isdir(prefix):
        raise DataError(f"output prefix {out_uri!r} is a directory, not a file prefix: give a prefix inside "
                        f"it, like {join(prefix or '.', 'corpus')} (writes corpus.bin, corpus.idx, "
                        f"corpus.summary.json there)")
    return prefix


def check_counts(values: dict[str, tuple[int | None, int]]) -> None:
    """Refuse counts below their minimum: {name: (value, minimum)}; a None value means 'not given'."""
    for name, (value, minimum) in values.items():
        if value is not None and value < minimum:
            raise DataError(f"{name} must be >= {minimum}, got {value}")


def prepare(sources: Sequence, out_uri: str, tokenizer: str = "byte", workers: int = 1, *,
            pool: str = "thread", max_documents: int | None = None, seq_len: int | None = None,
            progress: Callable[[int, BatchTokens], None] | None = None, label: str | None = None,
            options: FixOptions = FixOptions(), batch_bytes: int = BATCH_BYTES) -> PrepareSummary:
    """Tokenize `sources` (URIs or SourceSpecs) into `<out_uri>.bin/.idx` (+ `.summary.json`).

    `max_documents` stops after that many documents (files are read in sorted order, so the
    result is deterministic). `seq_len`, when given, only counts documents longer than one sample
    (seq_len + 1 tokens) for the summary. `progress(files_done, batch_tokens)` is called per batch
    (`batch_bytes` of text; see the module docstring).
    No usable document at all is a DataError that says why (`label` names the sources in it,
    `options` the settings its fix names) and leaves no output behind.
    """
    if pool not in ("thread", "process"):
        raise DataError(f"pool must be 'thread' or 'process', got {pool!r}")
    check_counts({"workers": (workers, 1), "max_documents": (max_documents, 1), "seq_len": (seq_len, 1),
                  "batch_bytes": (batch_bytes, 1)})
    out_uri = output_prefix(out_uri)
    tok = get_tokenizer(tokenizer)
    files = without_outputs(resolve_all(sources), out_uri)
    summary = PrepareSummary(out_uri=out_uri, workers=workers, pool=pool, tokenizer=tok.record(),
                             long_document_threshold=seq_len + 1 if seq_len else None)
    start = time.perf_counter()
    with IndexedDatasetWriter(out_uri, tok.dtype) as writer:
        jobs = ((batch, tokenizer) for batch in document_batches(files, batch_bytes))
        for ft in ordered_map(_tokenize_job, jobs, workers, pool):
            if max_documents is not None and writer.documents + len(ft.lengths) > max_documents:
                keep = max_documents - writer.documents
                ft = BatchTokens(ft.tokens[: int(ft.lengths[:keep].sum())], ft.lengths[:keep], ft.stats)
                ft.stats.documents = keep
            writer.add_documents(ft.tokens, ft.lengths)
            summary.stats.merge(ft.stats)
            if seq_len:
                summary.long_documents += int((ft.lengths > seq_len + 1).sum())
            if progress:
                progress(ft.files_done, ft)
            if max_documents is not None and writer.documents >= max_documents:
                break
        if writer.documents == 0:  # raised inside the writer: its .bin is discarded, no .idx written
            raise DataError(f"no usable documents found in {label or f'{len(files)} file(s)'} "
                            f"({summary.stats.files} file(s) read): {describe_skips(summary.stats, options)}")
    summary.seconds = time.perf_counter() - start
    summary.files, summary.bytes_read = summary.stats.files, summary.stats.bytes_read
    summary.documents = writer.documents
    summary.tokens = writer.num_tokens
    write_bytes_atomic(out_uri + ".summary.json", json.dumps(summary.to_dict(), indent=1).encode())
    return summary
