"""The per-worker training loop that Ray Train runs on every rank.

Resume is automatic: the loop always continues from the newest committed checkpoint of its run, so a
worker-group restart by Ray Train and a `raytron submit --resume` take the same path.
"""

from __future__ import annotations

import time

import torch

from ..data_pipeline import DataError, load_prepared, prepare_for_job
from ..parallelism.checkpoint import CheckpointStore
from ..parallelism.engines import get_engine
from ..parallelism.estimate import flops_per_token
from ..parallelism.layout import ParallelLayout
from .checkpointing import CheckpointSaver, restore_checkpoint
from .metrics import MetricsWriter, device_peak_flops, mfu, model_flops_rate, peak_memory_gib
from .resilience import FaultGuard, NumericsError, StopTraining
from ..config.spec import JobSpec, spec_from_dict
from .vocab import with_tokenizer_vocab


def train_worker(config: dict) -> None:
    """Ray Train entry point: `config` = {"spec": JobSpec dict, "layout": ParallelLayout dict}."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = spec_from_dict(config["spec"])
    layout = ParallelLayout.from_dict(config["layout"])
    guard = FaultGuard.start(spec, rank, world, node_id=ray.get_runtime_context().get_node_id())
    try:
        result = run_training(spec, layout, rank, world, report=ray.train.report, guard=guard,
                              data_dir=config.get("data_dir"))
    except StopTraining as stop:
        # Every rank stops together and returns normally: Ray Train must not restart a job whose
        # next attempt would hit the same numbers; the driver reports it as failed.
        guard.record.failed(stop.cause or stop, guard.step, status="stopped")
        if rank == 0:
            print(f"[raytron] training stopped: {stop}", flush=True)
        return
    except BaseException as exc:
        guard.record.failed(exc, guard.step)
        raise
    finally:
        guard.__exit__(None, None, None)  # idempotent: watchdog off, SIGTERM back to Ray's meaning
    guard.finished(result.get("step"))
    if rank == 0:
        print(f"[raytron] rank 0 finished ({guard.status}): {result}", flush=True)


def run_training(spec: JobSpec, layout: ParallelLayout, rank: int, world: int, report=None,
                 guard: FaultGuard | None = None, data_dir: str | None = None) -> dict:
    """Train `spec` on this rank (torch.distributed already initialized). Returns final metrics.
    `guard` (launcher/resilience.py) handles preemption, hangs, NaN/spikes; one is made if not given.
    `data_dir`: the data cache directory the driver built and verified (else found by its key)."""
    guard = guard or FaultGuard.start(spec, rank, world)
    if not spec.resources.use_gpu:
        torch.set_num_threads(spec.resources.torch_threads)
    data = _load_data(spec, data_dir)
    engine = build_engine(spec, layout, rank, world, data.tokenizer)
    store = CheckpointStore(spec.run_dir.checkpoints, keep=spec.checkpoint.keep)
    guard.attach(engine)
    start_step, cursor = restore_checkpoint(engine, store, spec, rank)
    if start_step == 0 and spec.model.init_from:  # a run of its own is never overwritten by init_from
        from .init_from import reference_state

        engine.load_reference(reference_state(spec.model.init_from, engine.model_cfg))
        if rank == 0:
            print(f"[raytron] weights initialized from {spec.model.init_from}", flush=True)
    guard.resumed(start_step)
    saver = CheckpointSaver(store, spec, layout, rank, world, report)  # async per checkpoint.async_save
    writer = MetricsWriter(spec.run_dir, start_step, spec.train.steps) if rank == 0 else None
    # Ranks of one DP replica (its TP/PP/CP ranks) read the same samples; EP folds over DP.
    dp_rank, dp = layout.coords(rank)["dp"], layout.dp
    last: dict = {"step": start_step}
    flops = flops_per_token(engine.model_cfg, spec.train.seq_len)
    peak = device_peak_flops(torch.cuda.get_device_name() if spec.resources.use_gpu else None)
    step = start_step
    guard.__enter__()  # preemption flag + step watchdog, for the loop only
    while step < spec.train.steps:
        step += 1
        t0 = time.perf_counter()
        cursor = guard.skips.apply(cursor)  # data windows skipped by earlier rollbacks
        guard.begin_step(step, engine)
        micro = data.train.micro_batches(cursor.samples_consumed, spec.train.global_batch_size,
                                         spec.train.micro_batch_size, dp_rank, dp)
        m = engine.train_step(micro, _document_ids(data.train, spec, cursor.samples_consumed, dp_rank, dp))
        try:
            guard.end_step(step, m)
        except NumericsError as err:  # nothing of this step is kept: stop, or roll back and skip
            saver.finish()
            step, cursor = guard.roll_back(err, cursor, lambda: restore_checkpoint(engine, store, spec, rank))
            if writer:
                writer.close()
                writer = MetricsWriter(spec.run_dir, step, spec.train.steps)
            continue
        engine.after_step()
        cursor = cursor.advance(spec.train.global_batch_size)
        elapsed = time.perf_counter() - t0
        last = {"step": step, "loss": m.loss, "aux_loss": m.aux_loss, "z_loss": m.z_loss, "lr": m.lr, "grad_norm": m.grad_norm,
                "tokens_per_sec": m.tokens / elapsed, "step_time": elapsed, "val_loss": None,
                "mfu": mfu(flops, m.tokens / elapsed, world, peak),
                "model_tflops_per_device": model_flops_rate(flops, m.tokens / elapsed, world) / 1e12,
                "moe/router_entropy": m.router_entropy, "moe/load_max_over_mean": m.load_max_over_mean}
        if _due(step, spec.train.eval_every, spec.train.steps):
            last["val_loss"] = evaluate(engine, data.valid, spec, dp_rank, dp)
        if writer and (step % spec.train.log_every == 0 or step == spec.train.steps):
            _log_step(writer, step, {**last, **peak_memory_gib(spec.resources.use_gpu)}, m)
        if _due(step, spec.checkpoint.every, spec.train.steps):
            if writer:
                writer.flush()
            saver.save(engine, step, cursor, last)
            saver.log_timings(writer)
        if step < spec.train.steps and guard.preempt_agreed():  # SIGTERM on any rank: commit, leave
            if not _due(step, spec.checkpoint.every, spec.train.steps):
                if writer:
                    writer.flush()
                saver.save(engine, step, cursor, last)
            saver.finish()
            guard.preempted(step)
            if rank == 0:
                print(f"[raytron] preempted: checkpoint of step {step} committed; exiting", flush=True)
            break
    guard.__exit__(None, None, None)
    saver.finish()  # the end of training waits for the last (async) save to commit
    saver.log_timings(writer)
    if writer:
        writer.close()
    return last


def _load_data(spec: JobSpec, data_dir: str | None):
    """The job's datasets; a damaged cache stops the job (every rank loads the same cache, so all stop here
    together) with the file named, instead of a traceback and a restart that would meet it again."""
    try:
        if data_dir:
            return load_prepared(data_dir, spec.data, spec.train.seq_len, spec.train.seed)
        return prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed,
                               cache_uri=spec.data_cache_uri)
    except DataError as exc:
        raise StopTraining(f"data: {exc}", exc) from None


def _log_step(writer: MetricsWriter, step: int, last: dict, m) -> None:
    """TensorBoard scalars (and the MoE per-expert ones of StepMetrics `m`), the full-precision
    metrics.jsonl line and the console progress line."""
    scalars = {k: v for k, v in last.items() if k != "step"}
    expert_bias = getattr(m, "expert_bias", None)
    writer.scalars(step, scalars)
    writer.record(step, {**scalars, "expert_load": m.expert_load, "expert_bias": expert_bias})
    writer.moe(step, m.expert_load, expert_bias)
    print(writer.progress(step, last), flush=True)


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def evaluate(engine, valid, spec: JobSpec, dp_rank: int, dp: int) -> float:
    """Held-out loss over the first `eval_batches` global batches of the validation split."""
    gbs = spec.train.global_batch_size
    micro, docs = [], []
    for i in range(spec.train.eval_batches):
        micro += valid.micro_batches(i * gbs, gbs, spec.train.micro_batch_size, dp_rank, dp)
        docs += _document_ids(valid, spec, i * gbs, dp_rank, dp) or []
    return engine.eval_loss(micro, docs or None)


def _document_ids(dataset, spec: JobSpec, cursor: int, dp_rank: int, dp: int) -> list[torch.Tensor] | None:
    """The document ids matching this rank's micro-batches when data.reset_at_documents asks the engines
    to keep packed documents apart, else None (one causal sequence per sample)."""
    if not spec.data.reset_at_documents:
        return None
    return dataset.micro_batch_document_ids(cursor, spec.train.global_batch_size, spec.train.micro_batch_size,
                                            dp_rank, dp)


def build_engine(spec: JobSpec, layout: ParallelLayout, rank: int, world: int, tokenizer=None):
    """The engine named by the spec. The model's vocabulary comes from the tokenizer (the job's, if
    not given), by the rule plan and submit used (launcher/vocab.py)."""
    return get_engine(spec.engine).build(with_tokenizer_vocab(spec, tokenizer), layout, rank, world)

