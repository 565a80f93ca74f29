"""`prepare_for_job`: a DataSpec -> train/valid datasets, built once and cached under cache_uri.

Cache layout, `<cache_uri>/<key>/` where key hashes everything that changes the samples
(sources, weights, formats, fields, tokenizer, seq_len, seed, valid_fraction, max_documents):
    source-<i>.bin/.idx                 megatron indexed dataset of source i (all its documents)
    source-<i>.summary.json             what prepare read and skipped
    source-<i>.<split>-docs.npy         document order of the split (seeded shuffle of documents)
    source-<i>.<split>-starts.npy       packed sample windows (see packing.py)
    blend-<split>.npy                   blend schedule (see blending.py), several sources only
    manifest.json                       written last: a directory without it is not a cache
Concurrency: the directory is built under a private temp name and renamed into place (atomic on a
local filesystem; the loser of a race discards its copy). On object storage files are uploaded
with the manifest last, and readers copy the directory to local disk to memory-map it.
The key covers the sources' files as listed (size and modification time, or the store's ETag), so
appending to a source builds a new cache instead of reusing the stale one. Loading verifies the cache
(`.bin`/`.idx` agree, every array loads); the driver also scans the token ids against the vocabulary
(`verify_ids`), so a damaged cache is refused naming the file before any worker starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .blending import BlendedDataset, blend_schedule
from .errors import DataError
from .indexed import IndexedDatasetWriter, IndexedTokens, check_prefix_files
from .packing import PackedDataset, hashed_permutation, sample_starts
from .prepare import PrepareSummary, prepare
from .prepared import check_ids_in_vocab, check_prefix_exists, check_recorded_tokenizer, indexed_prefix
from .skips import FixOptions, describe_skips
from .sources import BUILTIN_STDLIB, ReadStats, resolve_source, stamp
from .storage import download_dir, download_file, exists, info, join, local_path, local_scratch_root, read_bytes, \
    upload_file
from .tokenizer import BYTE, Tokenizer, get_tokenizer

CACHE_FORMAT = 2  # 2: the key covers the sources' size and modification time
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class TrainData:
    """What a training worker needs: datasets, vocabulary size, and what the cache holds."""

    train: PackedDataset | BlendedDataset
    valid: PackedDataset | BlendedDataset
    tokenizer: Tokenizer
    seq_len: int
    cache_uri: str
    manifest: dict = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eod_id(self) -> int:
        return self.tokenizer.eod_id

    def summary(self) -> str:
        """One paragraph for the driver log: per source documents/tokens/samples and skips."""
        lines = [f"data cache {self.cache_uri}: {len(self.train):,} train / {len(self.valid):,} valid samples "
                 f"of {self.seq_len + 1} tokens, vocab {self.vocab_size}"]
        for s in self.manifest["sources"]:
            skipped = {k: v for k, v in s["prepare"]["skipped"].items() if v}
            lines.append(f"  {s['uri']} (weight {s['weight']}): {s['documents']:,} docs, {s['tokens']:,} tokens, "
                         f"{s['train']['long_documents']} docs longer than a sample (split across samples), "
                         f"skipped {skipped or 'nothing'}")
        return "\n".join(lines)

    def skip_reports(self) -> list[str]:
        """Per source with skipped input: what was skipped, where (file and line) and the fix."""
        out = []
        for i, s in enumerate(self.manifest["sources"]):
            recorded = s["prepare"].get("stats", {})
            stats = ReadStats(**{f.name: recorded[f.name] for f in dataclasses.fields(ReadStats) if f.name in recorded})
            if stats.skipped:
                out.append(f"data.sources[{i}] {s['uri']}: {describe_skips(stats, FixOptions.job_source(i))}")
        return out


def cache_key(data_spec, seq_len: int, seed: int) -> str:
    """Hash of everything that determines the sample sequence (16 hex chars)."""
    tokenizer = data_spec.tokenizer
    if tokenizer != BYTE:  # byte's ids never change: its caches keep the keys they always had
        tokenizer = [tokenizer, get_tokenizer(tokenizer).fingerprint]
    inputs = {
        "format": CACHE_FORMAT, "tokenizer": tokenizer, "seq_len": seq_len, "seed": seed,
        "valid_fraction": data_spec.valid_fraction, "max_documents": data_spec.max_documents,
        "sources": [[s.uri, s.weight, s.format, s.field] for s in data_spec.sources],
        "files": [source_stamps(s) for s in data_spec.sources],
    }
    if any(s.uri == BUILTIN_STDLIB for s in data_spec.sources):
        inputs["python"] = sys.version  # the stdlib corpus differs between interpreters
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def source_stamps(src) -> list[list[str]]:
    """[file URI, size and modification stamp] of every file source `src` reads (both files of a prepared
    prefix); the built-in corpus is keyed by the interpreter's version instead."""
    if src.uri == BUILTIN_STDLIB:
        return []
    prefix = indexed_prefix(src.uri, src.format)
    if prefix is None:
        return [[f.uri, f.stamp] for f in resolve_source(src.uri, src.format, src.field)]
    out = []
    for uri in (prefix + ".bin", prefix + ".idx"):
        try:
            out.append([uri, stamp(info(uri))])
        except FileNotFoundError:
            raise DataError(f"prepared dataset file not found: {uri} (a prepared source is a prefix with .bin and "
                            f".idx, as `raytron data prepare --out PREFIX` writes)") from None
    return out


def prepare_for_job(data_spec, seq_len: int, seed: int, cache_uri: str | None = None,
                    *, workers: int = 1, verify_ids: bool = False) -> TrainData:
    """Build (first call) or load (every later call) the job's datasets; see module docstring.

    `cache_uri` overrides `data_spec.cache_uri`. Raises DataError naming the path for missing or
    unreadable sources, for sources too small to give one train and one valid sample, and for a
    damaged cache; `verify_ids` also scans the cached token ids against the vocabulary (the driver's
    check; the workers load what it verified).
    """
    root = cache_uri or data_spec.cache_uri
    if not root:
        raise DataError("no data cache location: set data.cache_uri or pass cache_uri")
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    tokenizer = get_tokenizer(data_spec.tokenizer)
    key = cache_key(data_spec, seq_len, seed)
    final_uri = join(root, key)
    if not exists(join(final_uri, MANIFEST)):
        _build(data_spec, seq_len, seed, tokenizer, final_uri, key, workers)
    return load_prepared(final_uri, data_spec, seq_len, seed, verify_ids=verify_ids)


def load_prepared(cache_dir: str, data_spec, seq_len: int, seed: int, *, verify_ids: bool = False) -> TrainData:
    """The datasets of one built cache directory `<cache_uri>/<key>` (what `prepare_for_job` returned as
    `cache_uri` in the driver): workers load exactly the cache the driver built and verified, even when a
    source changes while the job runs."""
    tokenizer = get_tokenizer(data_spec.tokenizer)
    key = cache_dir.rstrip("/").rsplit("/", 1)[-1]
    local_dir = local_path(cache_dir) or _localize(cache_dir, key)
    return _load(Path(local_dir), cache_dir, tokenizer, seq_len, seed, verify_ids)


def _build(spec, seq_len, seed, tokenizer, final_uri, key, workers) -> None:
    final_path = local_path(final_uri)
    parent = Path(final_path).parent if final_path is not None else local_scratch_root()
    staging = parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        sources = [_build_source(spec, i, seq_len, seed, tokenizer, staging, workers)
                   for i in range(len(spec.sources))]
        doc_offset = 0
        for s in sources:
            s["doc_id_offset"], doc_offset = doc_offset, doc_offset + s["documents"]
        if len(sources) > 1:
            weights = [s.weight for s in spec.sources]
            for split in SPLITS:
                n = sum(s[split]["samples"] for s in sources)
                np.save(staging / f"blend-{split}.npy", np.stack(blend_schedule(weights, n)).astype(np.int64))
        manifest = {"format": CACHE_FORMAT, "key": key, "seq_len": seq_len, "seed": seed,
                    "tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint,
                    "vocab_size": tokenizer.vocab_size, "sources": sources}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _publish(staging, final_uri, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_source(spec, i, seq_len, seed, tokenizer, staging: Path, workers) -> dict:
    """Prepare source i, split its documents into train/valid, pack both; return its manifest entry."""
    src = spec.sources[i]
    prefix = str(staging / f"source-{i}")
    options = FixOptions.job_source(i)
    prepared = indexed_prefix(src.uri, src.format)
    if prepared is not None:
        summary = _adopt_prefix(prepared, prefix, tokenizer, spec.max_documents, f"data.sources[{i}]")
    else:
        summary = prepare([src], prefix, tokenizer.name, workers, max_documents=spec.max_documents,
                          seq_len=seq_len, label=f"data source {src.uri} (data.sources[{i}])", options=options)
    tokens = IndexedTokens(prefix)
    n = len(tokens)
    if n < 2:
        raise DataError(f"data source {src.uri} (data.sources[{i}]) has {n} usable document(s); need >= 2 for "
                        f"a train/valid split; {describe_skips(summary.stats, options)}")
    perm = hashed_permutation(n, seed, "split", i)
    # valid_fraction of the documents, grown if needed so valid holds at least one full sample
    need = int(np.searchsorted(np.cumsum(tokens.lengths[perm]), seq_len + 1)) + 1
    n_valid = min(max(1, round(spec.valid_fraction * n), need), n - 1)
    entry = {"uri": src.uri, "weight": src.weight, "documents": n, "tokens": tokens.num_tokens,
             "valid_enlarged": n_valid > max(1, round(spec.valid_fraction * n)), "prepare": summary.to_dict()}
    for split, docs in (("valid", perm[:n_valid]), ("train", perm[n_valid:])):
        lengths = tokens.lengths[docs]
        starts = sample_starts(lengths, seq_len)
        if len(starts) == 0:
            raise DataError(f"data source {src.uri}: its {split} split ({len(docs)} documents, {int(lengths.sum())} "
                            f"tokens) is shorter than one sample ({seq_len + 1} tokens); add data, lower "
                            f"seq_len or raise valid_fraction")
        np.save(staging / f"source-{i}.{split}-docs.npy", docs)
        np.save(staging / f"source-{i}.{split}-starts.npy", starts)
        entry[split] = {"documents": len(docs), "samples": len(starts),
                        "long_documents": int((lengths > seq_len + 1).sum()),
                        "dropped_tail_tokens": int(lengths.sum()) - (len(starts) * seq_len + 1)}
    return entry


def _adopt_prefix(source: str, prefix: str, tokenizer, max_documents: int | None, where: str) -> PrepareSummary:
    """Bring an already prepared `source` prefix into the cache as `prefix` (hard link where possible,
    else a copy), after checking its tokenizer record, its two files and its ids."""
    check_prefix_exists(source, where)
    check_recorded_tokenizer(source, tokenizer, where)
    local = local_path(source) is not None
    for suffix in (".bin", ".idx"):
        if local:
            src_path = local_path(source + suffix)
            try:
                os.link(src_path, prefix + suffix)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src_path, prefix + suffix)
        else:
            download_file(source + suffix, prefix + suffix)
    tokens = IndexedTokens(prefix, fix=f"prepare {source} again (raytron data prepare)")
    check_ids_in_vocab(tokens, tokenizer, where, source)  # once per cache build: recorded or not, ids decide
    if max_documents is not None and max_documents < len(tokens):
        keep = tokens.lengths[:max_documents]
        with IndexedDatasetWriter(prefix + ".cut", tokens.dtype) as w:
            w.add_documents(tokens.tokens[: int(keep.sum())], keep)
        del tokens
        for suffix in (".bin", ".idx"):
            os.replace(prefix + ".cut" + suffix, prefix + suffix)
        tokens = IndexedTokens(prefix)
    summary = PrepareSummary(out_uri=source, files=1, documents=len(tokens), tokens=tokens.num_tokens,
                             tokenizer=tokenizer.record())
    summary.stats.documents = len(tokens)
    return summary


def _publish(staging: Path, final_uri: str, key: str) -> None:
    """Move a complete staging directory to final_uri (see module docstring for the race rule)."""
    final_path = local_path(final_uri)
    if final_path is not None:
        try:
            os.rename(staging, final_path)
        except OSError:
            if not os.path.exists(os.path.join(final_path, MANIFEST)):
                raise DataError(f"cannot publish data cache {final_path}: it exists without {MANIFEST} "
                                f"(left by an interrupted run?); delete it and retry") from None
        return
    names = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST) + [MANIFEST]
    for name in names:
        upload_file(str(staging / name), join(final_uri, name))
    _install_local(staging, key, copy=True)


def _install_local(src_dir: Path, key: str, copy: bool) -> Path:
    dest = local_scratch_root() / key
    if (dest / MANIFEST).exists():
        return dest
    tmp = dest.with_name(f".{key}.dl-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src_dir, tmp) if copy else os.rename(src_dir, tmp)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process installed it first
    return dest


def _localize(final_uri: str, key: str) -> Path:
    """A local copy of a remote cache directory (memory-mapping needs local files)."""
    dest = local_scratch_root() / key
    if (dest / MANIFEST).exists():
        return dest
    tmp = local_scratch_root() / f".{key}.get-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    download_dir(final_uri, str(tmp))
    return _install_local(tmp, key, copy=False)


def _load(local_dir: Path, cache_uri: str, tokenizer, seq_len: int, seed: int, verify_ids: bool) -> TrainData:
    copy = "" if str(local_dir) == local_path(cache_uri) else f" and its local copy {local_dir}"
    fix = f"delete {cache_uri}{copy} and submit again: the cache is rebuilt from the sources"
    manifest = _read_manifest(str(local_dir), fix)
    splits = {}
    for split in SPLITS:
        parts = []
        for i, s in enumerate(manifest["sources"]):
            tokens = IndexedTokens(str(local_dir / f"source-{i}"), fix=fix)
            if verify_ids and split == SPLITS[0]:
                check_ids_in_vocab(tokens, tokenizer, "data cache", str(local_dir / f"source-{i}"), fix=fix)
            docs = _array(local_dir / f"source-{i}.{split}-docs.npy", fix, len(tokens))
            starts = _array(local_dir / f"source-{i}.{split}-starts.npy", fix, len(docs))
            parts.append(PackedDataset(tokens, docs, seq_len, seed, salt=f"{split}-{i}", starts=starts,
                                       doc_id_offset=s["doc_id_offset"]))
        if len(parts) == 1:
            splits[split] = parts[0]
        else:
            schedule = _array(local_dir / f"blend-{split}.npy", fix, len(parts))
            splits[split] = BlendedDataset(parts, [s["weight"] for s in manifest["sources"]],
                                           (schedule[0].astype(np.int16), schedule[1]))
    return TrainData(splits["train"], splits["valid"], tokenizer, seq_len, cache_uri, manifest)


def _read_manifest(cache_dir: str, fix: str) -> dict:
    """The manifest of cache directory `cache_dir` (local path or URI), checked for shape."""
    try:
        manifest = json.loads(read_bytes(join(cache_dir, MANIFEST)))
        ok = isinstance(manifest, dict) and isinstance(manifest.get("sources"), list) and all(
            isinstance(s, dict) and isinstance(s.get("doc_id_offset"), int) and isinstance(s.get("prepare"), dict)
            for s in manifest["sources"])
    except FileNotFoundError:
        raise DataError(f"data cache {cache_dir} has no {MANIFEST} (not a data cache); {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{join(cache_dir, MANIFEST)} is not JSON ({exc}); {fix}") from None
    if not ok or manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"{join(cache_dir, MANIFEST)} is not a data cache manifest of format {CACHE_FORMAT}; {fix}")
    return manifest


def check_built_cache(data_spec, seq_len: int, seed: int, cache_uri: str) -> None:
    """plan's check of this job's cache, if one is built: its manifest and each source's .bin/.idx header and
    sizes (a few small reads; the ids and arrays are checked by submit). Local caches of local sources only:
    plan stays offline; and nothing when the sources cannot be listed (plan does not require them)."""
    uris = [cache_uri, *(s.uri for s in data_spec.sources if s.uri != BUILTIN_STDLIB)]
    if not all(local_path(u) is not None for u in uris) or not os.path.isdir(local_path(cache_uri)):
        return
    try:
        final = join(cache_uri, cache_key(data_spec, seq_len, seed))
    except (DataError, OSError):
        return
    if not exists(join(final, MANIFEST)):
        return
    fix = f"delete {final} and submit again: the cache is rebuilt from the sources"
    for i in range(len(_read_manifest(final, fix)["sources"])):
        check_prefix_files(join(final, f"source-{i}"), fix)


def _array(path: Path, fix: str, bound: int) -> np.ndarray:
    """One .npy of the cache whose first column indexes something of `bound` entries (documents of a source,
    documents of a split, sources of a blend), refused naming the file when unreadable or out of range."""
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"data cache file missing: {path}; {fix}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable array ({exc}); {fix}") from None
    first = None  # the index column: docs are 1-D, starts [n, 2] (document, offset), a blend [2, n] (source, sample)
    if a.ndim == 1:
        first = a
    elif a.ndim == 2:
        first = a[0] if path.name.startswith("blend-") else a[:, 0]
    if first is None or a.dtype.kind not in "iu" or (len(first) and (first.min() < 0 or first.max() >= bound)):
        raise DataError(f"{path} holds indices outside 0..{bound - 1} (or is not an index array); {fix}")
    return a
