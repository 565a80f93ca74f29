"""Every check a job must pass in the driver before Ray starts or any resource is taken.

`validate_job(spec)` resolves the model from the registry and derives the ParallelLayout with all rules
(see parallelism/layout_rules.py); `check_paths=True` also verifies that data sources exist and that the
checkpoint root is writable, which `submit` wants and `plan` (offline, instant) does not.
"""

from __future__ import annotations

import os

import fsspec

from ..parallelism.layout import ParallelLayout, model_config_from_spec, model_facts_from_spec
from ..parallelism.layout_rules import engine_gaps
from ..data_pipeline.prepared import indexed_prefix
from .spec import JobSpec
from .strict_yaml import ConfigError
from .vocab import check_prepared_sources, job_tokenizer, with_tokenizer_vocab

BUILTIN_SCHEME = "builtin://"


def validate_job(spec: JobSpec, check_paths: bool = False, runnable: bool = False) -> ParallelLayout:
    """The validated layout of `spec`, or a ConfigError naming the first bad field. `runnable` also
    refuses what the chosen engine cannot run yet (`engine_gaps`), as `submit` must. The model's
    vocabulary is the tokenizer's (launcher/vocab.py); prepared sources must match that tokenizer."""
    tokenizer = job_tokenizer(spec)
    spec = with_tokenizer_vocab(spec, tokenizer)
    check_prepared_sources(spec, tokenizer, check_paths)
    layout = ParallelLayout.from_spec(spec, model_facts_from_spec(spec))
    if runnable:
        for field, reason in engine_gaps(spec, model_config_from_spec(spec))[:1]:
            raise ConfigError(field, f"engine {spec.engine} cannot run this job yet: {reason}")
    if check_paths:
        check_storage(spec)
    return layout


def check_storage(spec: JobSpec) -> None:
    """Data sources match at least one file; a local checkpoint root can be created."""
    for i, src in enumerate(spec.data.sources):
        if src.uri.startswith(BUILTIN_SCHEME) or indexed_prefix(src.uri, src.format):
            continue  # prepared prefixes: check_prepared_sources
        path = f"data.sources[{i}].uri"
        try:
            fs, root = fsspec.core.url_to_fs(src.uri)
            if not root.strip("/"):
                raise ConfigError(path, f"got {src.uri!r}, the root of a whole store; set a bucket and path, "
                                        "e.g. s3://bucket/corpus/")
            found = fs.glob(root) if any(c in root for c in "*?[") else ([root] if fs.exists(root) else [])
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any storage failure makes the source unreadable
            raise ConfigError(path, f"cannot read {src.uri!r}: {type(exc).__name__}: {exc}") from None
        if not found:
            raise ConfigError(path, f"no file or directory matches {src.uri!r}")
    _check_local_writable(spec.checkpoint.uri, "checkpoint.uri")


def _check_local_writable(uri: str, path: str) -> None:
    if "://" in uri and not uri.startswith("file://"):
        try:  # an unknown scheme, or one whose fsspec package is not installed
            fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as exc:
            raise ConfigError(path, f"got {uri!r}: {exc}; use a local path or the URI of an installed fsspec "
                                    "filesystem (s3:// needs s3fs, gs:// gcsfs)") from None
        return  # object stores: writability is only known by writing; the first save reports it
    local = uri.removeprefix("file://")
    probe = os.path.abspath(local)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(path, f"got {uri!r}; {probe} is not a writable directory: use one that is")
    try:  # access() says yes to root in places no directory can be made (/proc, read-only mounts)
        os.makedirs(local, exist_ok=True)
    except OSError as exc:
        raise ConfigError(path, f"got {uri!r}; cannot create it ({exc.strerror}): use a writable directory") from None


__all__ = ["validate_job", "check_storage"]
