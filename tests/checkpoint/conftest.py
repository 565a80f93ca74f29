"""Fixtures for checkpoint tests: one checkpoint root per storage backend (file, memory, s3)."""

from __future__ import annotations

import uuid

import pytest


def _s3_root(request) -> str:
    request.getfixturevalue("s3_server")
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"raytron-ckpt-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    request.addfinalizer(lambda: fs.rm(bucket, recursive=True))
    return f"s3://{bucket}/run/checkpoints"


def _memory_root(request) -> str:
    import fsspec

    root = f"memory://raytron-{uuid.uuid4().hex[:12]}/checkpoints"
    fs = fsspec.filesystem("memory")
    request.addfinalizer(lambda: fs.rm(root.removeprefix("memory://"), recursive=True)
                         if fs.exists(root.removeprefix("memory://")) else None)
    return root


def checkpoint_root(request, backend: str, tmp_path) -> str:
    if backend == "file":
        return f"file://{tmp_path}/checkpoints"
    if backend == "memory":
        return _memory_root(request)
    return _s3_root(request)


@pytest.fixture(params=["file", "memory", "s3"])
def ckpt_uri(request, tmp_path) -> str:
    """A fresh checkpoint root on each backend; memory:// is per-process (in-process tests only)."""
    return checkpoint_root(request, request.param, tmp_path)


@pytest.fixture(params=["file", "s3"])
def shared_ckpt_uri(request, tmp_path) -> str:
    """A fresh checkpoint root that several processes see (file:// and s3://)."""
    return checkpoint_root(request, request.param, tmp_path)
