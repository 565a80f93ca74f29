"""The driver: validate, prepare, then run the job's worker group under Ray Train.

Same code for local and cluster runs: with no address Ray starts in-process (embedded), otherwise the
driver connects to the given cluster. Everything that can be refused is refused here, before Ray
starts and before any worker takes a resource.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import fsspec

from ..data_pipeline import prepare_for_job
from ..parallelism.checkpoint import CheckpointStore
from .spec import JobSpec, spec_to_yaml
from .strict_yaml import ConfigError
from .validate import validate_job
from .worker import data_cache_uri, train_worker


@dataclass(frozen=True)
class JobOutcome:
    status: str  # "completed" | "failed"
    run_uri: str
    last_checkpoint: int | None
    metrics: dict
    error: str | None = None


def _run_exists(spec: JobSpec) -> bool:
    fs, root = fsspec.core.url_to_fs(spec.run_uri)
    return fs.exists(f"{root}/config.yaml") or fs.exists(f"{root}/checkpoints")


def preflight(spec: JobSpec, resume: bool):
    """All checks that need no Ray: config and layout, paths, run-name policy, data preparation."""
    layout = validate_job(spec, check_paths=True)
    exists = _run_exists(spec)
    if exists and not resume:
        raise ConfigError("name", f"a run named {spec.name!r} already exists at {spec.run_uri}; pass --resume "
                          "to continue it, or choose another --name")
    if resume and not exists:
        raise ConfigError("name", f"--resume: no run named {spec.name!r} at {spec.run_uri} to resume")
    t0 = time.monotonic()
    data = prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed,
                           cache_uri=data_cache_uri(spec))
    print(f"[raytron] data ready in {time.monotonic() - t0:.1f}s: {len(data.train)} train / "
          f"{len(data.valid)} valid samples of {spec.train.seq_len} tokens at {data.cache_uri}", flush=True)
    return layout


def write_run_record(spec: JobSpec, layout, resume: bool) -> None:
    """The resolved config (config.yaml) and an append-only attempt log (attempts.jsonl)."""
    fs, root = fsspec.core.url_to_fs(spec.run_uri)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/config.yaml", spec_to_yaml(spec).encode())
    entry = {"time": time.time(), "resume": resume, "layout": layout.to_dict(), "steps": spec.train.steps}
    old = fs.cat_file(f"{root}/attempts.jsonl") if fs.exists(f"{root}/attempts.jsonl") else b""
    fs.pipe_file(f"{root}/attempts.jsonl", old + (json.dumps(entry) + "\n").encode())


def _init_ray(spec: JobSpec, address: str | None) -> None:
    import ray

    # Ray Train would re-route worker print() through its logger, which doubles every console line.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = spec.resources.workers * spec.resources.cpus_per_worker + 1
    # The dashboard serves Ray's state API, which Ray Train's controller watchdog polls; it is bound
    # to loopback so the embedded cluster's job API is never reachable from the network.
    ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=True, configure_logging=True, logging_level="WARNING")


def _storage(spec: JobSpec):
    """Ray Train's experiment directory is the run directory (storage = checkpoint.uri, name = run
    name), on the run's own filesystem, so our committed checkpoints are Ray-managed in place."""
    import pyarrow.fs

    fs, root = fsspec.core.url_to_fs(spec.checkpoint.uri)
    return root, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_job(spec: JobSpec, resume: bool = False, address: str | None = None) -> JobOutcome:
    """Run `spec` to completion under Ray Train; returns the outcome (never hangs on a failed group)."""
    layout = preflight(spec, resume)
    write_run_record(spec, layout, resume)
    _init_ray(spec, address)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = _storage(spec)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.to_dict(), "layout": layout.to_dict()},
        torch_config=TorchConfig(backend="nccl" if spec.resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.resources.workers, use_gpu=spec.resources.use_gpu,
                                     resources_per_worker={"CPU": spec.resources.cpus_per_worker}),
        run_config=RunConfig(name=spec.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=spec.fault.max_failures)),
    )
    store = CheckpointStore(f"{spec.run_uri}/checkpoints", keep=spec.checkpoint.keep)
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - every training failure becomes a typed outcome
        steps = store.committed_steps()
        return JobOutcome("failed", spec.run_uri, steps[-1] if steps else None, {}, f"{type(exc).__name__}: {exc}")
    steps = store.committed_steps()
    return JobOutcome("completed", spec.run_uri, steps[-1] if steps else None, dict(result.metrics or {}))
