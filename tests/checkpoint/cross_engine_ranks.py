"""Rank program for the cross-engine resume test (tests/checkpoint/test_cross_engine.py).

The deepspeed engine (CPU, gloo) trains a debug model `STEPS` steps and its state is gathered and merged as
a checkpoint save and restore do (StateOps, parallelism/engine_state.py); it then trains two more steps: the
reference curve. The megatron engine of the CPU harness (tests/parallelism/megatron_cpu_schedule.py: real
megatron-core GPTModel chunks and schedules, DDP over gloo) loads that state into its chunks and into
stand-ins of its distributed optimizer's shards (tests/parallelism/megatron_cpu_ranks.py ShardedOptimizer:
megatron's DistributedOptimizer is CUDA-only) and takes the forward and backward of the next step; its
loss and gradient norm must match the deepspeed engine's next step. What it saves (gather_state) must be
the deepspeed state bit for bit; a fresh deepspeed engine loads that megatron save and must train on along
the reference curve. The megatron optimizer update itself runs on GPU only (tests/gpu/test_cross_engine_resume.py).
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


def _merged(ops, engine) -> dict:
    """The engine's state as a restore reads it: every writer's shard, merged into the canonical form."""
    from raytron.parallelism.engine_state import merge_state

    tensors, writes = ops.gather(engine)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensors if writes else None)
    return merge_state([p for p in parts if p is not None], engine.model_cfg)


def _megatron(family: str, vocab: int, ep: int, world: int):
    """The CPU harness's MegatronEngine with distributed-optimizer stand-ins over megatron's DP groups."""
    from megatron.core import parallel_state as ps

    from raytron.parallelism.layout import ParallelLayout
    from tests.parallelism.megatron_cpu_ranks import ShardedOptimizer
    from tests.parallelism.megatron_cpu_schedule import GLOBAL, MICRO, cpu_engine

    layout = ParallelLayout(world_size=world, dp=world, ep=ep, zero_stage=1, micro_batch_size=MICRO,
                            global_batch_size=GLOBAL)
    engine = cpu_engine(family, {"vocab_size": vocab}, layout)
    params = [p for chunk in engine.chunks for p in chunk.module.parameters()]
    opts = [ShardedOptimizer([p for p in params if getattr(p, "allreduce", True)],
                             ps.get_data_parallel_group(with_context_parallel=True))]
    experts = [p for p in params if not getattr(p, "allreduce", True)]
    if experts:
        opts.append(ShardedOptimizer(experts, ps.get_expert_data_parallel_group()))
    engine.optimizer, engine.steps_done = SimpleNamespace(chained_optimizers=opts), 0
    engine.load_buffers = lambda chunks, named: type(engine).load_buffers(engine, chunks, named)
    return engine, layout


def _case(rank: int, world: int, root: str, family: str, ep: int) -> dict:
    from raytron.launcher.canary import state_digests
    from raytron.launcher.validate import validate_job
    from raytron.launcher.worker import build_engine
    from raytron.parallelism.engines import get_engine
    from raytron.parallelism.megatron import state as megatron_state
    from tests.parallelism.megatron_cpu_schedule import AUX_COEF, GLOBAL, MICRO, SEQ, distributed_optimizer_grad_norm

    spec = load_job(Path(root), f"ds-{family}", world, ep=ep, steps=10, **{
        "model.family": family, "train.seq_len": SEQ, "train.micro_batch_size": MICRO,
        "train.global_batch_size": GLOBAL, "train.aux_loss_coef": AUX_COEF})
    layout = validate_job(spec)
    ops = get_engine("deepspeed").state_ops()
    ds = build_engine(spec, layout, rank, world)
    vocab = ds.model_cfg.vocab_size
    for step in range(STEPS):
        ds.train_step(_micro_batches(step, vocab, layout))
    saved = _merged(ops, ds)
    continued = [ds.train_step(_micro_batches(step, vocab, layout)) for step in (STEPS, STEPS + 1)]

    mg, mg_layout = _megatron(family, vocab, ep, world)
    assert mg.model_cfg == ds.model_cfg, (mg.model_cfg, ds.model_cfg)
    megatron_state.load_state(mg, saved)
    loss = mg._mean_lm_loss(mg._run(_micro_batches(STEPS, vocab, mg_layout), forward_only=False))
    norm = distributed_optimizer_grad_norm(mg)
    mg_save, _ = megatron_state.gather_state(mg)  # rank 0 writes it
    shipped = [mg_save]
    dist.broadcast_object_list(shipped, src=0)

    resumed_ds = build_engine(spec, layout, rank, world)
    ops.load(resumed_ds, shipped[0])
    resumed = [resumed_ds.train_step(_micro_batches(step, vocab, layout)) for step in (STEPS, STEPS + 1)]
    want, got = state_digests(saved), state_digests(mg_save)
    return {"family": family, "ds_continued": [[m.loss, m.grad_norm, m.lr] for m in continued],
            "megatron_next": [loss, norm], "ds_from_megatron": [[m.loss, m.grad_norm, m.lr] for m in resumed],
            "tensors": len(want), "experts_split": sum("#" in k for k in want),
            "save_mismatch": sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k)),
            "meta": [saved["meta"], mg_save["meta"]] if rank == 0 else None}


def cross_engine_rank(rank: int, world: int, root: str, cases: list, out: str) -> None:
    """Each (family, ep) case of the module docstring; rank 0 writes the results as JSON."""
    from tests.parallelism.megatron_cpu_schedule import _cpu_shims

    _cpu_shims()
    results = [_case(rank, world, root, family, ep) for family, ep in cases]
    if rank == 0:
        write_json(out, results)
    dist.barrier()
