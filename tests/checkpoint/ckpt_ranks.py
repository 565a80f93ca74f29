"""Rank entry points for spawned checkpoint tests (importable by the spawned interpreters)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tests.checkpoint.ckpt_helpers import load_job, write_json

LOGIT_TOKENS = (2, 32)  # [batch, seq] of the fixed probe batch for logits comparisons


def probe_tokens(vocab: int = 264):
    import torch

    return torch.randint(vocab, LOGIT_TOKENS, generator=torch.Generator().manual_seed(7))


def train_rank(rank: int, world: int, root: str, name: str, job: dict, opts: dict) -> None:
    """run_training of the job on this rank, as Ray Train's worker would (report=None).
    opts: slow_write_s (sleep before every shard write), logits_out (engine logits on the probe batch
    after training, rank 0 writes them), canary_out (rank 0 records how many tensors the canary checked),
    export_out (the engine's export_reference after training, saved by rank 0).
    The hooks it installs are removed on return, so one process can train several jobs in turn."""
    import torch

    from raytron.launcher import checkpointing, worker
    from raytron.launcher.validate import validate_job
    from raytron.parallelism.checkpoint import CheckpointStore

    spec = load_job(Path(root), name, world, **job)
    layout = validate_job(spec)
    originals = (CheckpointStore.write_shard, worker.build_engine, checkpointing.canary_restore)
    write_shard, build, canary = originals
    if opts.get("slow_write_s"):
        def slow_write(self, *a, **k):
            time.sleep(opts["slow_write_s"])
            return write_shard(self, *a, **k)

        CheckpointStore.write_shard = slow_write
    captured: dict = {}
    worker.build_engine = lambda *a, **k: captured.setdefault("engine", build(*a, **k))

    def counting_canary(*a, **k):
        captured["canary"] = canary(*a, **k)
        return captured["canary"]

    checkpointing.canary_restore = counting_canary
    try:
        worker.run_training(spec, layout, rank, world)
    finally:
        CheckpointStore.write_shard, worker.build_engine, checkpointing.canary_restore = originals
    if opts.get("canary_out") and rank == 0:
        write_json(opts["canary_out"], {"tensors": captured.get("canary")})
    if opts.get("export_out"):  # collective: every rank joins, rank 0 keeps the full reference state
        exported = captured["engine"].export_reference()
        if rank == 0:
            torch.save(exported, opts["export_out"])
    if opts.get("logits_out"):
        engine = captured["engine"]
        engine.engine.eval()
        with torch.no_grad():
            logits = engine.engine(probe_tokens())
        if rank == 0:
            torch.save(logits, opts["logits_out"])


def train_ranks_in_turn(rank: int, world: int, root: str, runs: list) -> None:
    """train_rank for each (name, job, opts) of `runs`, one after the other in this process group: one
    interpreter start (torch, DeepSpeed imports, gloo rendezvous) serves several independent runs."""
    import gc

    for name, job, opts in runs:
        train_rank(rank, world, root, name, job, opts)
        gc.collect()


def corrupt_restore_rank(rank: int, world: int, root: str, name: str, job: dict, out: str) -> None:
    """Restore under this layout twice: first with one expert tensor altered while it is resharded into
    rank 0 (the canary must stop it, naming the tensor), then cleanly (the canary must pass)."""
    from raytron.launcher import checkpointing, worker
    from raytron.launcher.validate import validate_job
    from raytron.parallelism.checkpoint import CheckpointError, CheckpointStore

    spec = load_job(Path(root), name, world, **job)
    layout = validate_job(spec)
    engine = worker.build_engine(spec, layout, rank, world)
    store = CheckpointStore(f"{spec.run_uri}/checkpoints")
    real_ops = checkpointing.state_ops
    key = "layers.1.mixer.w_gate"  # layer 1 is the first MoE layer of moe/debug; experts stacked [E, ...]

    def corrupting_ops(eng):
        ops = real_ops(eng)

        def load(e, state):
            if rank == 0:  # expert 0 only: the canary names it `name#0`
                altered = state["params"][key].clone()
                altered[0] += 1e-3
                state = {**state, "params": {**state["params"], key: altered}}
            return ops.load(e, state)

        return dataclasses.replace(ops, load=load)

    checkpointing.state_ops = corrupting_ops
    try:
        checkpointing.restore_checkpoint(engine, store, spec, rank)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    checkpointing.state_ops = real_ops
    step, _ = checkpointing.restore_checkpoint(engine, store, spec, rank)
    if rank == 0:
        write_json(out, {"error": error, "clean_step": step})
