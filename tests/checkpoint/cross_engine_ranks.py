"""Rank program for the cross-engine resume test (tests/checkpoint/test_cross_engine.py).

The deepspeed engine (CPU, gloo) trains a debug model `STEPS` steps and saves a checkpoint through the
launcher's own save (save_checkpoint: StateOps, manifest, commit); it then trains two more steps: the
reference curve. The megatron engine of the CPU harness (tests/parallelism/megatron_cpu_schedule.py: real
megatron-core GPTModel chunks and schedules, DDP over gloo; its distributed optimizer, CUDA-only, stood in
for by tests/parallelism/megatron_cpu_ranks.py ShardedOptimizer) resumes from it through the launcher's own
restore (restore_checkpoint: resume hash across engines, conversion to the canonical state, canary restore)
and takes the forward and backward of the next step: its loss and gradient norm must match the deepspeed
engine's next step. It then saves (save_checkpoint) and a fresh deepspeed engine restores that megatron
checkpoint and must train on along the reference curve. The megatron optimizer update itself runs on GPU
only (tests/gpu/test_cross_engine_resume.py).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from tests.checkpoint.ckpt_helpers import load_job, write_json

STEPS = 2


def _micro_batches(step: int, vocab: int, layout) -> list[torch.Tensor]:
    """This rank's micro-batches of global batch `step` (the same tokens for every engine)."""
    from tests.parallelism.megatron_cpu_schedule import GLOBAL, MICRO, SEQ

    batch = torch.randint(0, vocab, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    dp_rank, ga = layout.coords(dist.get_rank())["dp"], layout.grad_accum
    return list(batch.split(MICRO)[dp_rank * ga:(dp_rank + 1) * ga])


def _saved_state(store, step: int, model_cfg) -> dict:
    """A committed step's state as written, in the canonical form."""
    from raytron.parallelism.engine_state import merge_state

    manifest = store.verify(step)
    shards = [store.read_shard(step, n, manifest) for n in sorted(manifest["files"]) if n.startswith("state-")]
    return merge_state(shards, model_cfg)


def _megatron(spec, layout, vocab: int):
    """The CPU harness's MegatronEngine for `spec`, with distributed-optimizer stand-ins over megatron's DP groups."""
    from megatron.core import parallel_state as ps

    from tests.parallelism.megatron_cpu_ranks import ShardedOptimizer
    from tests.parallelism.megatron_cpu_schedule import cpu_engine

    engine = cpu_engine(spec.model.family, {"vocab_size": vocab}, layout)
    engine.spec.engine = "megatron"  # what restore_checkpoint asks of an engine: its EngineSupport
    params = [p for chunk in engine.chunks for p in chunk.module.parameters()]
    opts = [ShardedOptimizer([p for p in params if getattr(p, "allreduce", True)],
                             ps.get_data_parallel_group(with_context_parallel=True))]
    experts = [p for p in params if not getattr(p, "allreduce", True)]
    if experts:
        opts.append(ShardedOptimizer(experts, ps.get_expert_data_parallel_group()))
    engine.optimizer, engine.steps_done = SimpleNamespace(chained_optimizers=opts), 0
    return engine


def _specs(root: str, family: str, ep: int, world: int):
    """The deepspeed job and the same job under the megatron engine (its zero stage; use_gpu, which only
    the launcher reads), each with its validated layout."""
    from raytron.launcher.validate import validate_job
    from tests.parallelism.megatron_cpu_schedule import AUX_COEF, GLOBAL, MICRO, SEQ

    common = {"model.family": family, "train.seq_len": SEQ, "train.micro_batch_size": MICRO,
              "train.global_batch_size": GLOBAL, "train.aux_loss_coef": AUX_COEF}
    ds = load_job(Path(root), f"ds-{family}", world, ep=ep, steps=10, **common)
    mg = load_job(Path(root), f"mg-{family}", world, ep=ep, steps=10, **common, **{
        "engine": "megatron", "resources.use_gpu": True, "layout.zero_stage": 1})
    return (ds, validate_job(ds)), (mg, validate_job(mg))


def _case(rank: int, world: int, root: str, family: str, ep: int) -> dict:
    from raytron.data_pipeline import DataCursor
    from raytron.launcher.canary import state_digests
    from raytron.launcher.checkpointing import restore_checkpoint, save_checkpoint
    from raytron.launcher.worker import build_engine
    from raytron.parallelism.checkpoint import CheckpointStore
    from tests.parallelism.megatron_cpu_schedule import GLOBAL, distributed_optimizer_grad_norm

    (ds_spec, ds_layout), (mg_spec, mg_layout) = _specs(root, family, ep, world)
    ds_store, mg_store = (CheckpointStore(f"{root}/{family}-{e}/checkpoints") for e in ("ds", "mg"))
    ds = build_engine(ds_spec, ds_layout, rank, world)
    vocab = ds.model_cfg.vocab_size
    for step in range(STEPS):
        ds.train_step(_micro_batches(step, vocab, ds_layout))
    save_checkpoint(ds, ds_store, ds_spec, ds_layout, STEPS, DataCursor(STEPS * GLOBAL), rank, world)
    continued = [ds.train_step(_micro_batches(step, vocab, ds_layout)) for step in (STEPS, STEPS + 1)]

    mg = _megatron(mg_spec, mg_layout, vocab)
    assert mg.model_cfg == ds.model_cfg, (mg.model_cfg, ds.model_cfg)
    start, cursor = restore_checkpoint(mg, ds_store, mg_spec, rank)  # canary: the engine changed
    loss = mg._mean_lm_loss(mg._run(_micro_batches(start, vocab, mg_layout), forward_only=False))
    norm = distributed_optimizer_grad_norm(mg)
    save_checkpoint(mg, mg_store, mg_spec, mg_layout, start, cursor, rank, world)

    resumed_ds = build_engine(ds_spec, ds_layout, rank, world)
    again, again_cursor = restore_checkpoint(resumed_ds, mg_store, ds_spec, rank)
    resumed = [resumed_ds.train_step(_micro_batches(step, vocab, ds_layout)) for step in (again, again + 1)]
    ds_saved, mg_saved = (_saved_state(s, STEPS, ds.model_cfg) for s in (ds_store, mg_store))
    want, got = state_digests(ds_saved), state_digests(mg_saved)
    return {"family": family, "ds_continued": [[m.loss, m.grad_norm, m.lr] for m in continued],
            "megatron_next": [loss, norm], "ds_from_megatron": [[m.loss, m.grad_norm, m.lr] for m in resumed],
            "steps": [start, again], "cursors": [cursor.samples_consumed, again_cursor.samples_consumed],
            "tensors": len(want), "experts_split": sum("#" in k for k in want),
            "save_mismatch": sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k)),
            "meta": [ds_saved["meta"], mg_saved["meta"]]}


def cross_engine_rank(rank: int, world: int, root: str, cases: list, out: str) -> None:
    """Each (family, ep) case of the module docstring; rank 0 writes the results as JSON."""
    from tests.parallelism.megatron_cpu_schedule import _cpu_shims

    _cpu_shims()
    results = [_case(rank, world, root, family, ep) for family, ep in cases]
    if rank == 0:
        write_json(out, results)
    dist.barrier()
