"""Saving and restoring a running job: the commit protocol of CheckpointStore driven from every rank.

Save (`CheckpointSaver.save`, every rank at the same step): each rank gathers its part of the engine
state in reference names (collective, so synchronous) and its RNG state. Then, inline or on a
background thread when `checkpoint.async_save` is set, every rank writes its shards; the ranks
exchange file records (or write errors) over a dedicated gloo group; rank 0 writes the manifest and
the COMMITTED marker only when every rank's writes finished, and tells every rank the outcome. Ray is
told of a checkpoint only after its marker exists. The next save and the end of training wait for the
previous one. The time training was blocked is measured per save (`checkpoint/blocking_s`).
Restore: rank 0 picks the newest committed step that verifies and broadcasts it; every rank loads the
merged state (any layout), its RNG state when the world size is unchanged, and the data cursor; after
a layout change the canary restore compares tensor digests with the source before training continues.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import random
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..data_pipeline import DataCursor
from ..parallelism.checkpoint import CheckpointError, CheckpointStore
from ..parallelism.engine_state import canonical
from ..parallelism.engines import StateOps, engine_of
from ..parallelism.schedule import schedule_of
from ..run_dir import step_folder
from .canary import canary_restore, layout_changed


def state_ops(engine) -> StateOps:
    """How `engine` saves and loads its state (its EngineSupport says)."""
    return engine_of(engine).state_ops()


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def resume_fields(spec, engine: str | None = None) -> dict:
    """What a checkpoint must share with the job resuming it: model, data and sample shape, recorded with
    the engine that wrote it (`engine`: that engine in place of the job's, to compare across engines).
    Layout, engine, step count, learning-rate schedule and resources may change across a resume."""
    d = spec.to_dict()
    return {"engine": engine or d["engine"], "model": d["model"], "data": d["data"],
            "seq_len": d["train"]["seq_len"], "seed": d["train"]["seed"]}


def resume_hash(spec, engine: str | None = None) -> str:
    return hashlib.sha256(json.dumps(resume_fields(spec, engine), sort_keys=True).encode()).hexdigest()[:16]


def same_config(manifest: dict, spec) -> bool:
    """Whether `spec` trains the model/data config of the checkpoint `manifest`, under whichever engine:
    both engines' states convert into each other (parallelism/engine_state.py)."""
    return manifest.get("config_hash") == resume_hash(spec, manifest.get("engine"))


def build_manifest(spec, layout, world: int, model_cfg, cursor: DataCursor, metrics: dict | None) -> dict:
    """Everything but the file records, which CheckpointStore.commit adds."""
    return {"engine": spec.engine, "layout": layout.to_dict(), "world_size": world,
            "config_hash": resume_hash(spec), "resume_fields": resume_fields(spec),
            "code_version": code_version(), "model": dataclasses.asdict(model_cfg),
            "data_cursor": cursor.to_dict(), "schedule": schedule_of(spec.train),
            "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}


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


def write_and_commit(store: CheckpointStore, step: int, rank: int, world: int, shards: dict[str, dict],
                     manifest: dict | None, group=None):
    """Write this rank's `shards` ({file name: state}); then rank 0 commits once every rank's writes
    finished. Collective over `group`; a write error on any rank fails the save on every rank (named)."""
    records, error = [], None
    for name, state in shards.items():
        try:
            records.append(store.write_shard(step, name, state))
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, never a hang
            error = f"step {step}: rank {rank} could not write {name}: {type(exc).__name__}: {exc}"
            break
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (records, error), group=group)
    errors = [e for _, e in gathered if e]
    outcome = [None]
    if rank == 0:
        outcome = ["; ".join(errors)] if errors else [None]
        if not errors:
            try:
                store.commit(step, [r for rs, _ in gathered for r in rs], manifest)
            except Exception as exc:  # noqa: BLE001
                outcome = [f"step {step}: commit failed: {type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(outcome, src=0, group=group)
    if outcome[0]:
        raise CheckpointError(f"checkpoint not committed: {outcome[0]}")
    return step


class CheckpointSaver:
    """Saves on schedule, synchronously or in the background (`async_save`). Create it on every rank
    (it is collective when async: it makes a gloo group for the background writes)."""

    def __init__(self, store: CheckpointStore, spec, layout, rank: int, world: int, report=None,
                 async_save: bool | None = None):
        self.store, self.spec, self.layout, self.rank, self.world = store, spec, layout, rank, world
        self.report = report
        self.async_save = spec.checkpoint.async_save if async_save is None else async_save
        self.group = dist.new_group(backend="gloo") if self.async_save else None
        self._thread: threading.Thread | None = None
        self._pending: dict | None = None
        self.timings: list[tuple[int, dict]] = []  # (step, scalars) of finished saves, not yet logged

    def save(self, engine, step: int, cursor: DataCursor, metrics: dict | None = None) -> float:
        """Collective. Returns the seconds training was blocked by this save."""
        t0 = time.perf_counter()
        self.wait()
        ops = state_ops(engine)
        snapshot = ops.snapshot(engine)
        rng = _rng_state()
        manifest = (build_manifest(self.spec, self.layout, self.world, engine.model_cfg, cursor, metrics)
                    if self.rank == 0 else None)
        job = {"step": step, "t0": t0, "metrics": metrics or {}, "error": None, "end": None}
        self._pending = job
        args = (job, engine, ops, snapshot, rng, manifest)
        if self.async_save:
            self._thread = threading.Thread(target=self._write, args=args, name=f"raytron-ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            self._write(*args)
        job["blocking_s"] = time.perf_counter() - t0
        if not self.async_save:
            self.wait()
        return job["blocking_s"]

    def _write(self, job: dict, engine, ops: StateOps, snapshot, rng: dict, manifest: dict | None) -> None:
        try:
            tensors, writes = ops.assemble(engine, snapshot, self.group)
            shards = {f"state-{self.rank:05d}.pt": tensors} if writes else {}
            shards[f"rng-{self.rank:05d}.pt"] = rng
            del tensors  # `shards` holds the state alone: freed below, inside the timed save
            write_and_commit(self.store, job["step"], self.rank, self.world, shards, manifest, self.group)
            shards.clear()
        except Exception as exc:  # noqa: BLE001 - re-raised on the training thread by wait()
            job["error"] = exc
        job["end"] = time.perf_counter()

    def wait(self) -> None:
        """Block until the pending save is committed (every rank), then report it to Ray."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        job, self._pending = self._pending, None
        if job is None:
            return
        if job["error"] is not None:
            raise job["error"]
        step = job["step"]
        if self.rank == 0:
            print(f"[raytron] checkpoint step {step} committed at {self.store.uri}/step-{step:09d} "
                  f"(blocked {job['blocking_s']:.3f}s, save {job['end'] - job['t0']:.3f}s)", flush=True)
        self.timings.append((step, {"checkpoint/blocking_s": job["blocking_s"],
                                    "checkpoint/save_s": job["end"] - job["t0"]}))
        if self.report is not None:
            _report(self.report, job["metrics"], step if self.rank == 0 else None)

    def finish(self) -> None:
        self.wait()

    def log_timings(self, writer) -> None:
        """Write finished saves' timings as TensorBoard scalars and into metrics.jsonl (rank 0's writer)."""
        timings, self.timings = self.timings, []
        if writer is None:
            return
        for step, scalars in timings:
            writer.scalars(step, scalars)
            writer.annotate(step, scalars)


def save_checkpoint(engine, store: CheckpointStore, spec, layout, step: int, cursor: DataCursor,
                    rank: int, world: int, report=None, metrics: dict | None = None) -> float:
    """Collective, synchronous save (every rank at the same step). Returns the blocking seconds."""
    return CheckpointSaver(store, spec, layout, rank, world, report, async_save=False).save(
        engine, step, cursor, metrics)


def _report(report, metrics: dict, committed_step: int | None) -> None:
    """Tell Ray Train of a committed checkpoint (rank 0) without copying it: it already lives inside
    the run directory, which is Ray Train's experiment directory. Every rank calls report, since it
    is a barrier in Ray Train."""
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if committed_step is None:
        report(clean)
        return
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/checkpoints/{step_folder(committed_step)}"
    report(clean, checkpoint=Checkpoint(path=path, filesystem=storage.storage_filesystem),
           checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def choose_resume_step(store: CheckpointStore) -> tuple[int, dict] | str | None:
    """Rank 0's choice for a resume: (step, manifest) of the newest committed step that verifies, None for a
    run with no committed step, or the reason to stop when committed steps exist and none verifies (those
    are left as they are). Committed steps newer than the chosen one failed verification: they are set
    aside (CheckpointStore.set_aside), since training from the chosen step commits those numbers again."""
    committed, skipped = store.latest(deep=True)
    for reason in skipped:
        print(f"[raytron] skipped checkpoint: {reason}", flush=True)
    if committed is None:
        return None if not skipped else (
            f"no committed checkpoint under {store.uri} verifies ({'; '.join(skipped)}); they are left as they "
            f"are: restore the damaged files, or move {store.uri} aside to train this run from step 0")
    for step in store.committed_steps():
        if step > committed.step:
            print(f"[raytron] set aside step {step}, which failed verification: {store.set_aside(step)}", flush=True)
    return committed.step, committed.manifest


def restore_checkpoint(engine, store: CheckpointStore, spec, rank: int,
                       canary: str = "auto") -> tuple[int, DataCursor]:
    """(start step, data cursor): from the newest valid committed checkpoint, or (0, 0) for a new run.
    canary: "auto" checks digests after a layout change, "always" after every load, "never" skips."""
    choice = [choose_resume_step(store) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], str):
        raise CheckpointError(choice[0])
    if choice[0] is None:
        return 0, DataCursor(0)
    step, manifest = choice[0]
    if not same_config(manifest, spec):
        raise CheckpointError(
            f"checkpoint step {step} was written by a different model/data config "
            f"(hash {manifest['config_hash']} != {resume_hash(spec, manifest.get('engine'))}); resume with the "
            "run's own config")
    shards = [store.read_shard(step, name, manifest) for name in sorted(manifest["files"])
              if name.startswith("state-")]
    ops = state_ops(engine)
    state = canonical(ops.merge(shards), engine.model_cfg)  # either engine's checkpoint, in one form
    ops.load(engine, state)
    world = dist.get_world_size()
    if canary == "always" or (canary == "auto" and (layout_changed(manifest, engine.layout, world)
                                                    or manifest.get("engine") != spec.engine)):
        canary_restore(engine, state_ops(engine).gather(engine)[0], state, step, manifest, world)
    rng_name = f"rng-{rank:05d}.pt"
    if manifest["world_size"] == world and rng_name in manifest["files"]:
        _set_rng_state(store.read_shard(step, rng_name, manifest))
    else:
        torch.manual_seed(spec.train.seed + 1000 * step + rank)
    if rank == 0:
        print(f"[raytron] resumed from step {step} ({store.uri}/step-{step:09d})", flush=True)
    return step, DataCursor.from_dict(manifest["data_cursor"])
