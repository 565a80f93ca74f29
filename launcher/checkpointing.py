"""Saving and restoring a running job: the commit protocol of CheckpointStore driven from every rank.

Save: every rank gathers its part of the engine state (collective), writers write shards, every rank
writes its RNG state, all ranks exchange file records and meet at a barrier, rank 0 writes the
manifest and the COMMITTED marker, then (only then) Ray is told of the checkpoint.
Restore: rank 0 picks the newest committed step that verifies and broadcasts it; every rank loads the
merged state (any layout), its RNG state when the world size is unchanged, and the data cursor.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..data_pipeline import DataCursor
from ..parallelism.checkpoint import CheckpointError, CheckpointStore
from ..parallelism.ds_state import gather_state, load_state, merge_shards


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def resume_hash(spec) -> str:
    """Hash of what a checkpoint must share with the job resuming it: model, data and sample shape.
    Layout, step count, learning-rate schedule and resources may change across a resume."""
    d = spec.to_dict()
    keep = {"engine": d["engine"], "model": d["model"], "data": d["data"],
            "seq_len": d["train"]["seq_len"], "seed": d["train"]["seed"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].copy()),
            "numpy_pos": int(np_state[2]),
            "numpy_gauss": [int(np_state[3]), float(np_state[4])], "python": repr(random.getstate())}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy(), state["numpy_pos"], has_gauss, gauss))
    random.setstate(ast.literal_eval(state["python"]))


def save_checkpoint(engine, store: CheckpointStore, spec, layout, step: int, cursor: DataCursor,
                    rank: int, world: int, report=None, metrics: dict | None = None) -> None:
    """Collective: every rank calls this at the same step."""
    tensors, writes = gather_state(engine)
    records = []
    if writes:
        records.append(store.write_shard(step, f"state-{rank:05d}.pt", tensors))
    records.append(store.write_shard(step, f"rng-{rank:05d}.pt", _rng_state()))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, records)
    dist.barrier()
    committed = None
    if rank == 0:
        manifest = {"engine": spec.engine, "layout": layout.to_dict(), "world_size": world,
                    "config_hash": resume_hash(spec), "code_version": code_version(),
                    "model": dataclasses.asdict(engine.model_cfg), "data_cursor": cursor.to_dict(),
                    "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}
        committed = store.commit(step, [r for rs in gathered for r in rs], manifest)
        print(f"[raytron] checkpoint step {step} committed at {store.uri}/step-{step:09d}", flush=True)
    dist.barrier()
    if report is not None:
        _report(report, metrics or {}, committed, store)


def _report(report, metrics: dict, committed, store: CheckpointStore) -> None:
    """Tell Ray Train of a committed checkpoint (rank 0) without copying it: it already lives inside
    the run directory, which is Ray Train's experiment directory. Every rank calls report, since it
    is a barrier in Ray Train."""
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if committed is None:
        report(clean)
        return
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/checkpoints/step-{committed.step:09d}"
    report(clean, checkpoint=Checkpoint(path=path, filesystem=storage.storage_filesystem),
           checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def restore_checkpoint(engine, store: CheckpointStore, spec, rank: int) -> tuple[int, DataCursor]:
    """(start step, data cursor): from the newest valid committed checkpoint, or (0, 0) for a new run."""
    choice = [None]
    if rank == 0:
        committed, skipped = store.latest(deep=True)
        for reason in skipped:
            print(f"[raytron] skipped checkpoint: {reason}", flush=True)
        choice = [None if committed is None else (committed.step, committed.manifest)]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return 0, DataCursor(0)
    step, manifest = choice[0]
    if manifest["config_hash"] != resume_hash(spec):
        raise CheckpointError(
            f"checkpoint step {step} was written by a different model/data config "
            f"(hash {manifest['config_hash']} != {resume_hash(spec)}); resume with the run's own config")
    shards = [store.read_shard(step, name, manifest) for name in sorted(manifest["files"])
              if name.startswith("state-")]
    load_state(engine, merge_shards(shards))
    rng_name = f"rng-{rank:05d}.pt"
    if manifest["world_size"] == dist.get_world_size() and rng_name in manifest["files"]:
        _set_rng_state(store.read_shard(step, rng_name, manifest))
    else:
        torch.manual_seed(spec.train.seed + 1000 * step + rank)
    if rank == 0:
        print(f"[raytron] resumed from step {step} ({store.uri}/step-{step:09d})", flush=True)
    return step, DataCursor.from_dict(manifest["data_cursor"])
