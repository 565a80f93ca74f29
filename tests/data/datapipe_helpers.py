"""Helpers for data pipeline tests (a uniquely named module: tests/ folders are not packages)."""

from __future__ import annotations

import json
import os

from raytron.config.spec import DataSpec, SourceSpec


def make_text_corpus(root, n_docs=12, seed=0) -> dict[str, str]:
    """Write n_docs text files of varied length (some longer than a 64-token sample, some with
    multi-byte characters); return {path: text} as the reference."""
    os.makedirs(root, exist_ok=True)
    docs = {}
    for i in range(n_docs):
        body = f"doc {i} é✓ " + " ".join(f"w{(i * 7 + j) % 31}" for j in range(5 + (i * 13 + seed) % 60))
        path = os.path.join(root, f"doc{i:03d}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        docs[path] = body
    return docs


def write_jsonl(path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


def data_spec(*uris, weights=None, **kw) -> DataSpec:
    weights = weights or [1.0] * len(uris)
    return DataSpec(sources=[SourceSpec(u, weight=w) for u, w in zip(uris, weights)], **kw)




def load_job_data(corpus: str, cache: str, seq_len: int = 32, seed: int = 5) -> list[list[int]]:
    """Run prepare_for_job in a (spawned) process; return the first train samples as lists."""
    from raytron.data_pipeline import prepare_for_job

    data = prepare_for_job(data_spec(corpus), seq_len, seed, cache_uri=cache)
    return [data.train.sample(i).tolist() for i in range(4)]
