"""Every check a job must pass in the driver before Ray starts or any resource is taken.

`validate_job(spec)` resolves the model from the registry and derives the ParallelLayout with all rules
(see parallelism/layout_rules.py); `check_paths=True` also verifies that data sources exist and that the
checkpoint root is writable, which `submit` wants and `plan` (offline, instant) does not.
"""

from __future__ import annotations

import os

from .. import storage
from ..parallelism.layout import ParallelLayout, model_config_from_spec, model_facts_from_spec
from ..parallelism.engines import engine_names, get_engine
from ..parallelism.layout_rules import engine_gaps
from ..data_pipeline.prepared import indexed_prefix
from ..config.spec import JobSpec
from ..config.strict_yaml import ConfigError
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
    check_kinds(spec, layout)
    check_host_memory(spec, layout)
    if runnable:
        for field, reason in engine_gaps(spec, model_config_from_spec(spec))[:1]:
            raise ConfigError(field, f"engine {spec.engine} cannot run this job yet: {reason}")
    if spec.model.init_from is not None:
        from .init_from import check_init_from

        check_init_from(spec, resolved_model_config(spec))
    if check_paths:
        check_storage(spec)
    return layout


def check_kinds(spec: JobSpec, layout: ParallelLayout) -> None:
    """Fields that are each in range but cannot work together with the layout or the engine."""
    inject = spec.fault.inject
    if inject is not None and inject.rank >= layout.world_size:
        raise ConfigError("fault.inject.rank", f"got {inject.rank}; the job has {layout.world_size} ranks "
                          f"(0..{layout.world_size - 1}): use one of them")
    if get_engine(spec.engine).needs_gpu and not spec.resources.use_gpu:
        on_cpu = [name for name in engine_names() if not get_engine(name).needs_gpu]
        raise ConfigError("engine", f"got {spec.engine} with resources.use_gpu: false; the {spec.engine} engine runs "
                          "on GPUs only: set resources.use_gpu: true on a GPU machine, or use engine: "
                          f"{' or '.join(on_cpu)} on CPU")


def host_memory(spec: JobSpec, layout: ParallelLayout) -> tuple[float, float, object]:
    """(bytes the CPU workers of one node need by the plan's estimate, this machine's RAM, the estimate)."""
    import psutil

    from ..parallelism.estimate import model_stats
    from ..parallelism.memory import estimate_memory

    cfg = model_config_from_spec(spec)
    memory = estimate_memory(cfg, model_stats(cfg), layout, seq_len=spec.train.seq_len, use_gpu=False,
                             engine=spec.engine)
    per_node = spec.resources.workers // spec.resources.nodes
    return per_node * memory.worst.total, float(psutil.virtual_memory().total), memory


def check_host_memory(spec: JobSpec, layout: ParallelLayout) -> None:
    """CPU workers whose estimated memory (weights, gradients, optimizer, activations) cannot fit in this
    machine's RAM are refused with the numbers, unless resources.allow_oversubscribe is set. GPU memory
    is not checked here (the GPUs are not known to the plan)."""
    if spec.resources.use_gpu or spec.resources.allow_oversubscribe:
        return
    need, have, memory = host_memory(spec, layout)
    if need <= have:
        return
    worst = memory.worst
    per_node = spec.resources.workers // spec.resources.nodes
    states = worst.weights + worst.grads + worst.optimizer
    field = "train.micro_batch_size" if worst.activations > states else "model"
    cause = (f"activations {_size(worst.activations)} for micro_batch_size {spec.train.micro_batch_size} x "
             f"seq_len {spec.train.seq_len}" if field != "model" else f"weights+grads+optimizer {_size(states)}")
    raise ConfigError(field, f"the memory estimate is {_size(worst.total)} per CPU worker ({cause}); {per_node} "
                      f"workers per node need {_size(need)} and this machine has {_size(have)} of RAM: lower "
                      "train.micro_batch_size or train.seq_len, use a smaller model or more nodes, or set "
                      "resources.allow_oversubscribe: true to run anyway")


def _size(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB" if n >= (1 << 30) else f"{n / (1 << 20):,.1f} MiB"


def check_local_gpus(spec: JobSpec, address: str | None) -> None:
    """An embedded (local) run with resources.use_gpu needs that many GPUs on this machine; on a cluster
    the placement check counts them."""
    if address or os.environ.get("RAY_ADDRESS") or not spec.resources.use_gpu:
        return
    import torch

    have = torch.cuda.device_count()
    if have < spec.resources.workers:
        raise ConfigError("resources.use_gpu", f"got true with {spec.resources.workers} workers, and this machine "
                          f"has {have} GPUs visible to torch: run on a machine with {spec.resources.workers} GPUs "
                          "(or pass --address of a GPU cluster)"
                          + ("" if get_engine(spec.engine).needs_gpu else ", or set use_gpu: false"))


def check_eval_split(spec: JobSpec, valid_samples: int) -> None:
    """Each evaluation reads `train.eval_batches` global batches of the validation split: more than the split
    holds would evaluate the same samples again (the split wraps), so it is refused once the data is known."""
    gbs = spec.train.global_batch_size
    need = spec.train.eval_batches * gbs
    if need <= valid_samples:
        return
    fix = (f"set train.eval_batches to at most {valid_samples // gbs}" if valid_samples >= gbs else
           "the split is smaller than one global batch: raise data.valid_fraction or add data")
    raise ConfigError("train.eval_batches", f"got {spec.train.eval_batches} global batches of {gbs} samples = {need} "
                      f"samples per evaluation, and the validation split has {valid_samples} samples of "
                      f"{spec.train.seq_len} tokens: {fix}")


def check_data_cache(spec: JobSpec) -> None:
    """plan: a data cache this job already built, checked cheaply (manifest, each .bin/.idx header and sizes);
    `submit` verifies it in full (arrays, token ids) before Ray starts."""
    from ..data_pipeline import DataError
    from ..data_pipeline.job import check_built_cache

    try:
        check_built_cache(spec.data, spec.train.seq_len, spec.train.seed, spec.data_cache_uri)
    except DataError as exc:
        raise ConfigError("data.cache_uri", f"the job's data cache is damaged: {exc}") from None


def resolved_model_config(spec: JobSpec):
    """The ModelConfig the workers build: the registry's, its vocabulary the tokenizer's (launcher/vocab.py)."""
    return model_config_from_spec(with_tokenizer_vocab(spec))


def check_storage(spec: JobSpec) -> None:
    """Data sources match at least one file; a local checkpoint root can be created."""
    for i, src in enumerate(spec.data.sources):
        if src.uri.startswith(BUILTIN_SCHEME) or indexed_prefix(src.uri, src.format):
            continue  # prepared prefixes: check_prepared_sources
        path = f"data.sources[{i}].uri"
        try:
            root = storage.store_path(src.uri)
            if not root.strip("/"):
                raise ConfigError(path, f"got {src.uri!r}, the root of a whole store; set a bucket and path, "
                                        "e.g. s3://bucket/corpus/")
            found = storage.glob(src.uri) if any(c in root for c in "*?[") else storage.exists(src.uri)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any storage failure makes the source unreadable
            raise ConfigError(path, f"cannot read {src.uri!r}: {type(exc).__name__}: {exc}") from None
        if not found:
            raise ConfigError(path, f"no file or directory matches {src.uri!r}")
    _check_local_writable(spec.checkpoint.uri, "checkpoint.uri")
    if spec.data.cache_uri is not None:
        _check_not_a_file(spec.data.cache_uri, "data.cache_uri")


def _check_not_a_file(uri: str, path: str) -> None:
    """A folder setting that names an existing file (prepared data would be written inside it)."""
    try:
        is_file = storage.isfile(uri)
    except Exception as exc:  # noqa: BLE001 - any storage failure: the folder cannot be used
        raise ConfigError(path, f"cannot read {uri!r}: {type(exc).__name__}: {exc}; use a directory "
                                "you can write") from None
    if is_file:
        raise ConfigError(path, f"got {uri!r}, an existing file; it names a directory for the prepared data: "
                                "use a directory path (or leave it null for <checkpoint.uri>/_data_cache)")


def _check_local_writable(uri: str, path: str) -> None:
    try:  # an unknown scheme, or one whose fsspec package is not installed
        local = storage.local_path(uri)
    except storage.StorageError as exc:
        raise ConfigError(path, f"got {uri!r}: {exc.reason}; use a local path or the URI of an installed fsspec "
                                "filesystem (s3:// needs s3fs, gs:// gcsfs)") from None
    if local is None:
        return  # object stores: writability is only known by writing; the first save reports it
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


__all__ = ["validate_job", "check_storage", "check_kinds", "check_local_gpus", "check_host_memory",
           "check_eval_split", "check_data_cache", "host_memory", "resolved_model_config"]
