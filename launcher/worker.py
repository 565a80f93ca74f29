"""The per-worker training loop that Ray Train runs on every rank.

Resume is automatic: the loop always continues from the newest committed checkpoint of its run, so a
worker-group restart by Ray Train and a `raytron submit --resume` take the same path.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..data_pipeline import prepare_for_job
from ..parallelism.checkpoint import CheckpointStore
from ..parallelism.layout import ParallelLayout
from .checkpointing import restore_checkpoint, save_checkpoint
from .metrics import MetricsWriter
from .spec import JobSpec, ModelSpec, spec_from_dict


def data_cache_uri(spec: JobSpec) -> str:
    return spec.data.cache_uri or f"{spec.checkpoint.uri.rstrip('/')}/_data_cache"


def train_worker(config: dict) -> None:
    """Ray Train entry point: `config` = {"spec": JobSpec dict, "layout": ParallelLayout dict}."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = spec_from_dict(config["spec"])
    layout = ParallelLayout.from_dict(config["layout"])
    result = run_training(spec, layout, rank, world, report=ray.train.report)
    if rank == 0:
        print(f"[raytron] rank 0 finished: {result}", flush=True)


def run_training(spec: JobSpec, layout: ParallelLayout, rank: int, world: int, report=None) -> dict:
    """Train `spec` on this rank (torch.distributed already initialized). Returns final metrics."""
    if not spec.resources.use_gpu:
        torch.set_num_threads(spec.resources.torch_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    data = prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed,
                           cache_uri=data_cache_uri(spec))
    engine = build_engine(spec, layout, rank, world, data.vocab_size)
    store = CheckpointStore(f"{spec.run_uri}/checkpoints", keep=spec.checkpoint.keep)
    start_step, cursor = restore_checkpoint(engine, store, spec, rank)
    writer = MetricsWriter(f"{spec.run_uri}/tensorboard", start_step, spec.train.steps) if rank == 0 else None
    dp_rank, dp = rank, layout.dp  # the deepspeed engine folds EP over DP: every rank is a DP rank
    last: dict = {"step": start_step}
    for step in range(start_step + 1, spec.train.steps + 1):
        t0 = time.perf_counter()
        micro = data.train.micro_batches(cursor.samples_consumed, spec.train.global_batch_size,
                                         spec.train.micro_batch_size, dp_rank, dp)
        m = engine.train_step(micro)
        engine.after_step()
        cursor = cursor.advance(spec.train.global_batch_size)
        elapsed = time.perf_counter() - t0
        last = {"step": step, "loss": m.loss, "aux_loss": m.aux_loss, "lr": m.lr, "grad_norm": m.grad_norm,
                "tokens_per_sec": m.tokens / elapsed, "step_time": elapsed, "val_loss": None}
        if _due(step, spec.train.eval_every, spec.train.steps):
            last["val_loss"] = evaluate(engine, data.valid, spec, dp_rank, dp)
        if writer and (step % spec.train.log_every == 0 or step == spec.train.steps):
            scalars = {k: v for k, v in last.items() if k != "step"}
            writer.scalars(step, scalars)
            writer.record(step, {**scalars, "expert_load": m.expert_load})
            if m.expert_load:
                writer.scalars(step, {f"moe/expert_load/{i}": v for i, v in enumerate(m.expert_load)})
            print(writer.progress(step, last), flush=True)
        if _due(step, spec.checkpoint.every, spec.train.steps):
            if writer:
                writer.flush()
            save_checkpoint(engine, store, spec, layout, step, cursor, rank, world, report, last)
    if writer:
        writer.close()
    return last


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def evaluate(engine, valid, spec: JobSpec, dp_rank: int, dp: int) -> float:
    """Held-out loss over the first `eval_batches` global batches of the validation split."""
    gbs = spec.train.global_batch_size
    micro = []
    for i in range(spec.train.eval_batches):
        micro += valid.micro_batches(i * gbs, gbs, spec.train.micro_batch_size, dp_rank, dp)
    return engine.eval_loss(micro)


def build_engine(spec: JobSpec, layout: ParallelLayout, rank: int, world: int, vocab_size: int):
    """The engine named by the spec. The model's vocabulary comes from the tokenizer."""
    overrides = dict(spec.model.overrides)
    overrides.setdefault("vocab_size", vocab_size)
    if overrides["vocab_size"] < vocab_size:
        raise ValueError(f"model.overrides.vocab_size={overrides['vocab_size']} < tokenizer's {vocab_size}")
    spec = dataclasses.replace(spec, model=ModelSpec(spec.model.family, spec.model.flavor, overrides))
    if spec.engine == "deepspeed":
        from ..parallelism.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(spec, layout, rank, world)
    raise ValueError(f"engine {spec.engine!r} is not available in this build; use engine: deepspeed")

