"""`raytron data prepare SRC... --out URI` and `raytron tokenizer train SRC... --vocab-size N --out DIR`:
the command-line faces of `prepare` and `train_bpe`.

The launcher's CLI mounts this with `add_subparser(subparsers)` and calls `run(args)` (also set
as the `func` default on the parsed namespace). Exit codes: 0 done, 1 done but inputs were skipped
and --strict was given, 2 a DataError (bad path or flag, an existing output without --force, no
usable document: nothing is written then), printed without a trace.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DataError
from .prepare import SourceSpecLike, check_counts, output_prefix, prepare, resolve_all
from .sources import FORMATS
from .storage import exists


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add `data` (with its `prepare` subcommand) to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="prepare training data (tokenize to megatron .bin/.idx)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{prepare}")
    p = sub.add_parser("prepare", help="tokenize text/jsonl/parquet files into one .bin/.idx dataset",
                       description="Sources may be local paths or fsspec URIs (s3://, gs://, ...), files, "
                                   "directories (recursive) or globs, or builtin://python-stdlib. "
                                   "Credentials and endpoints come from the environment (AWS_*, "
                                   "AWS_ENDPOINT_URL, FSSPEC_<PROTOCOL>_<KEY>).")
    p.add_argument("sources", nargs="+", metavar="SRC", help="input file, directory, glob or URI")
    p.add_argument("--out", required=True, metavar="URI", help="output prefix: writes URI.bin, URI.idx, "
                   "URI.summary.json")
    p.add_argument("--tokenizer", default="byte", metavar="PATH",
                   help="byte (default), or a local path / URI of a tokenizer.json, a directory holding one, a "
                        "SentencePiece .model or a tiktoken ranks file (see docs/data.md)")
    p.add_argument("--workers", type=int, default=1, help="batches of documents tokenized in parallel")
    p.add_argument("--pool", default="thread", choices=["thread", "process"],
                   help="thread (default: best for the byte tokenizer) or spawned processes, one core each "
                        "(best for BPE / SentencePiece / tiktoken tokenizers)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="auto: by file extension")
    p.add_argument("--field", default="text", help="jsonl/parquet field holding the text")
    p.add_argument("--force", action="store_true", help="overwrite an existing URI.bin/.idx")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents (>= 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="also count documents longer than one sample of this length (>= 1)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any input was skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    data.set_defaults(func=run)
    return data


def add_tokenizer_subparser(subparsers) -> argparse.ArgumentParser:
    """Add `tokenizer` (with its `train` subcommand) to an argparse subparsers object."""
    tok = subparsers.add_parser("tokenizer", help="train a tokenizer on your corpus (offline)")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="{train}")
    p = sub.add_parser("train", help="train a byte-level BPE and write it in Hugging Face format",
                       description="Reads SRC like `data prepare` (text/jsonl/parquet, local or fsspec) and writes "
                                   "DIR/tokenizer.json + tokenizer_config.json (<|endoftext|> = id 0 ends documents, "
                                   "<|startoftext|> = id 1); use DIR as data.tokenizer or --tokenizer.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="input file, directory, glob or URI")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, specials included")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (local or fsspec URI)")
    p.add_argument("--force", action="store_true", help="overwrite a tokenizer already in DIR")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="auto: by file extension")
    p.add_argument("--field", default="text", help="jsonl/parquet field holding the text")
    p.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    tok.set_defaults(func=run_tokenizer)
    return tok


def run_tokenizer(args: argparse.Namespace) -> int:
    """Execute a parsed `raytron tokenizer train`; returns the process exit code."""
    from .tokenizer_train import train_bpe

    try:
        check_counts({"--max-documents": (args.max_documents, 1)})
        sources = [SourceSpecLike(uri, args.format, args.field) for uri in args.sources]
        tok, stats = train_bpe(sources, args.vocab_size, args.out, force=args.force, max_documents=args.max_documents)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write --out {args.out}: {exc}; choose a writable location", file=sys.stderr)
        return 2
    print(f"trained {tok.kind} tokenizer: {tok.vocab_size} ids (eod {tok.eod_id}, bos {tok.bos_id}) from "
          f"{stats.documents:,} documents in {stats.files} file(s); wrote {args.out}/tokenizer.json, "
          f"tokenizer_config.json\n  fingerprint {tok.fingerprint}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `raytron data ...` command; returns the process exit code."""
    if args.data_command != "prepare":
        print(f"error: unknown data command {args.data_command!r}", file=sys.stderr)
        return 2
    try:
        return _prepare(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output location that cannot be written (/proc, a read-only mount...)
        print(f"error: cannot write --out {args.out}: {exc}; choose a writable location", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    check_counts({"--workers": (args.workers, 1), "--max-documents": (args.max_documents, 1),
                  "--seq-len": (args.seq_len, 1)})
    out = output_prefix(args.out)
    existing = [out + ext for ext in (".bin", ".idx") if exists(out + ext)]
    if existing and not args.force:
        raise DataError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                        f"pass --force to overwrite, or give another --out prefix")
    files = resolve_all([SourceSpecLike(uri, args.format, args.field) for uri in args.sources])
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="prepare", file=sys.stderr, mininterval=0.5)
    tokens = 0

    def progress(done, ft):
        nonlocal tokens
        tokens += int(ft.lengths.sum())
        if bar is not None:
            bar.update(done - bar.n)
            bar.set_postfix(tokens=f"{tokens:,}", refresh=False)

    try:
        summary = prepare(files, out, args.tokenizer, args.workers, pool=args.pool, max_documents=args.max_documents,
                          seq_len=args.seq_len, progress=progress, label=" ".join(args.sources))
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(summary.to_dict(), indent=1) if args.json else summary.format())
    return 1 if args.strict and summary.stats.skipped else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m raytron.data_pipeline.cli data prepare ...`) for tests/benchmarks."""
    parser = argparse.ArgumentParser(prog="raytron")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparser(sub)
    add_tokenizer_subparser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
