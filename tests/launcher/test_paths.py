"""Relative local paths are pinned to the driver's directory before workers (other cwd) see them."""

from __future__ import annotations

import os

from raytron.config.spec import resolve_local_paths, spec_from_dict


def _spec(ckpt: str, source: str, cache: str | None = None):
    return spec_from_dict({
        "name": "p", "checkpoint": {"uri": ckpt},
        "train": {"steps": 1, "seq_len": 8, "micro_batch_size": 1, "global_batch_size": 2, "lr": 1e-3},
        "data": {"sources": [{"uri": source}, {"uri": "builtin://python-stdlib"}], "cache_uri": cache}})


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = resolve_local_paths(_spec("./runs", "corpus/*.txt", "cache"))
    assert spec.checkpoint.uri == os.path.join(str(tmp_path), "runs")
    assert spec.data.sources[0].uri == os.path.join(str(tmp_path), "corpus/*.txt")
    assert spec.data.sources[1].uri == "builtin://python-stdlib"
    assert spec.data.cache_uri == os.path.join(str(tmp_path), "cache")
    assert spec.run_uri == os.path.join(str(tmp_path), "runs", "p")


def test_remote_uris_are_untouched():
    spec = resolve_local_paths(_spec("s3://bucket/runs", "s3://bucket/data/*.jsonl", "gs://b/c"))
    assert (spec.checkpoint.uri, spec.data.sources[0].uri, spec.data.cache_uri) == (
        "s3://bucket/runs", "s3://bucket/data/*.jsonl", "gs://b/c")
    assert resolve_local_paths(_spec("file:///abs/runs", "/abs/x.txt")).checkpoint.uri == "/abs/runs"
