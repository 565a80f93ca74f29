"""Rank programs for CPU tests of one megatron engine training step (tests/parallelism/test_megatron_step.py).

What runs is the engine's own path without the GPU: megatron-core GPTModel chunks from
parallelism/megatron/spec.py loaded with the reference weights (MegatronEngine._load_chunks), wrapped in
megatron's DistributedDataParallel, stepped by MegatronEngine._run (megatron's get_forward_backward_func:
no-pipelining, 1F1B or interleaved schedule, P2P over gloo) with finalize_model_grads, all in fp32. After
one forward/backward of a global batch it is compared with the reference model on the same batch: the LM
loss (MegatronEngine._mean_lm_loss), every parameter's reduced gradient on every rank, the global gradient
norm as megatron's distributed optimizer computes it, and MegatronEngine.export_reference.

Differences from the GPU engine: fp32 without Float16Module; DDP all-reduces gradients where the
distributed optimizer (CUDA-only) reduce-scatters them (same sums; its norm is rebuilt below from
megatron's own partitioning and filters); the all-gather token dispatcher instead of all-to-all.
CPU shims, test-only, in the rank processes (`_cpu_shims`): `torch.cuda.current_device` -> "cpu", RoPE's
per-CP-rank table rows picked without a pinned CUDA index,
`torch.cuda.synchronize` -> no-op; megatron's schedules, clip_grads and utils modules see a `torch` whose `zeros`/`tensor` put
device="cuda" scalars on the CPU; the CUDA RNG tracker's `fork` is a no-op (dropout is 0 here, so
there is no randomness to track). For train.overlap_moe_comm cases also `_cpu_stream_shims`: CUDA streams,
events and NVTX ranges are no-ops (one CPU stream runs everything in program order, so this proves the
schedule's arithmetic, not its stream synchronization) and the all-to-all dispatcher is used as on GPU.
For train.recompute cases `_cpu_rng_shims`: megatron's checkpoint saves and restores the CUDA RNG state,
which is a no-op here (no dropout, nothing random to replay).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEED, AUX_COEF, SEQ, MICRO, GLOBAL = 0, 0.01, 32, 2, 8


class _CudaScalarsOnCpu:
    """The `torch` module, except that zeros/tensor asked for on "cuda" are made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(kwargs: dict) -> dict:
        return {**kwargs, "device": "cpu"} if str(kwargs.get("device")) == "cuda" else kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._cpu(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._cpu(kwargs))


def _cpu_shims() -> None:
    """See the module docstring."""
    import megatron.core.utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None  # megatron's batched P2P syncs after each batch
    for module in (schedules, clip_grads, mutils):
        module.torch = _CudaScalarsOnCpu()
    mrandom.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_cp_rank


def _pos_emb_on_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """megatron's get_pos_emb_on_this_cp_rank (RoPE table rows of this CP rank's chunks r and 2cp-1-r)
    without its pinned-memory index tensor copied to the GPU."""
    cp, rank = cp_group.size(), cp_group.rank()
    split = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    mine = split.index_select(seq_dim, torch.tensor([rank, 2 * cp - rank - 1], device=pos_emb.device))
    return mine.view(*mine.shape[:seq_dim], -1, *mine.shape[seq_dim + 2:])


class _OneStream:
    """CUDA stream and event stand-in for megatron's EP-overlap schedule on CPU: there is one CPU "stream",
    work runs in program order, so waits, records and synchronizations have nothing to do."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None):
        return self

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _cpu_stream_shims() -> None:
    """For train.overlap_moe_comm (megatron's combined 1F1B schedule and the all-to-all dispatcher): CUDA
    streams, events, stream contexts, record_stream and NVTX ranges become no-ops on CPU, and the
    dispatcher's all-to-all split sizes become the host arrays its device-to-host copy makes on GPU."""
    from megatron.core.transformer.moe import token_dispatcher

    def to_host(tensor, as_numpy=False, record_stream=False):
        return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor

    token_dispatcher.maybe_move_tensor_to_cpu = to_host
    one = _OneStream()
    torch.cuda.Stream = lambda *args, **kwargs: one
    torch.cuda.Event = lambda *args, **kwargs: one
    torch.cuda.current_stream = lambda *args, **kwargs: one
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = torch.cuda.nvtx.range_pop = lambda *args, **kwargs: None
    torch.Tensor.record_stream = lambda self, stream: None


def _cpu_rng_shims() -> None:
    """See the module docstring."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def cpu_engine(family: str, overrides: dict, layout, overlap: str = "", overlap_moe: bool = False,
               recompute: str = "none", z_coef: float = 0.0, flavor: str = "debug"):
    """A MegatronEngine on CPU (see the module docstring): megatron's groups for `layout`, the reference's
    weights in this rank's chunks, chunks wrapped in megatron DDP; no optimizer. `overlap`: "" (off) or
    "wired" (overlap_grad_reduce, with the engine's attach_grad_sync). `overlap_moe`: train.overlap_moe_comm,
    i.e. megatron's combined 1F1B schedule over the engine's schedule plans, with the GPU's all-to-all token
    dispatcher (megatron-core's bf16 precondition is bypassed: set after the config's checks, fp32 here)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from raytron import models
    from raytron.parallelism.megatron.engine import MegatronEngine, attach_grad_sync, chunk_coords, init_megatron_groups
    from raytron.parallelism.megatron.mapping import chunk_buffers, chunk_pieces
    from raytron.parallelism.megatron.spec import build_model_chunks, transformer_config

    init_megatron_groups(layout, dist.get_rank(), create_gloo_process_groups=False)
    engine = object.__new__(MegatronEngine)
    engine.layout, engine.device = layout, torch.device("cpu")
    engine.spec = SimpleNamespace(model=SimpleNamespace(family=family, flavor=flavor, overrides=overrides),
                                  train=SimpleNamespace(seq_len=SEQ, aux_loss_coef=AUX_COEF))
    engine.model_cfg = models.get_config(family, flavor, **overrides)
    tcfg = transformer_config(engine.model_cfg, layout, aux_loss_coef=AUX_COEF, z_loss_coef=z_coef, on_gpu=False,
                              recompute=recompute)
    if overlap_moe:
        _cpu_stream_shims()
        tcfg.moe_token_dispatcher_type, tcfg.overlap_moe_expert_parallel_comm = "alltoall", True
    chunks = build_model_chunks(engine.model_cfg, tcfg, SEQ)
    engine.pieces = [chunk_pieces(engine.model_cfg, chunk_coords(c, layout)) for c in chunks]
    engine.buffers = [chunk_buffers(engine.model_cfg, chunk_coords(c, layout)) for c in chunks]
    engine._load_chunks(chunks, build_reference(family, overrides, flavor).state_dict())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=bool(overlap))
    engine.chunks = [DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
                     for i, c in enumerate(chunks)]
    if overlap == "wired":
        attach_grad_sync(tcfg, engine.chunks)
    tcfg.finalize_model_grads_func = finalize_model_grads
    engine._master_params = lambda chunk: chunk.module.named_parameters()  # no Float16Module in between
    return engine


def global_batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(SEED + 1))


def build_reference(family: str, overrides: dict, flavor: str = "debug"):
    """The seeded reference model; sigmoid routers start from a nonzero routing bias (as after some
    training), so that the bias's effect on routing is compared too."""
    from raytron import models

    torch.manual_seed(SEED)
    model = models.build(family, flavor, **overrides)
    g = torch.Generator().manual_seed(SEED + 2)
    for moe in model.moe_layers():
        if moe.cfg.router == "sigmoid":
            moe.router.expert_bias.copy_(0.05 * torch.randn(moe.cfg.num_experts, generator=g))
    return model


def global_document_ids() -> torch.Tensor:
    """Document ids [GLOBAL, SEQ + 1] of packed samples: documents start between tokens and on the chunk edges
    of context parallelism (SEQ / 4 and 3 SEQ / 4 are CP2 chunk starts), differently in every sample."""
    ids = torch.zeros(GLOBAL, SEQ + 1, dtype=torch.int32)
    for i in range(GLOBAL):
        for start in (3 + i, SEQ // 4, 13 + 2 * i % 7, 3 * SEQ // 4):
            ids[i, start:] += 1
    return ids


def reference_step(family: str, overrides: dict, z_coef: float = 0.0, flavor: str = "debug",
                   docs: bool = False) -> dict:
    """The reference model's loss, gradients and gradient norm over the global batch (mean over micro-batches
    of LM loss + AUX_COEF * aux loss + z_coef * z-loss: the engine's objective), and its state after the
    step's aux-loss-free bias update; `docs`: packed documents of global_document_ids kept apart."""
    model = build_reference(family, overrides, flavor)
    micro = global_batch(model.cfg.vocab_size).split(MICRO)
    doc_micro = global_document_ids().split(MICRO) if docs else [None] * len(micro)
    lm_losses = []
    for mb, ids in zip(micro, doc_micro):
        logits = model(mb[:, :-1], doc_ids=None if ids is None else ids[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb[:, 1:].reshape(-1))
        aux = torch.stack(model.aux_losses()).sum() if model.aux_losses() else torch.zeros(())
        z = torch.stack(model.z_losses()).sum() if model.z_losses() else torch.zeros(())
        ((lm + AUX_COEF * aux + z_coef * z) / len(micro)).backward()
        lm_losses.append(lm.item())
    bias_delta = 0.0  # largest change of a routing bias by the step's update
    for moe in model.moe_layers():
        before = moe.router.expert_bias.clone()
        moe.update_bias()
        bias_delta = max(bias_delta, float((moe.router.expert_bias - before).abs().max()))
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"state": model.state_dict(), "grads": grads, "loss": sum(lm_losses) / len(lm_losses),
            "grad_norm": float(torch.nn.utils.get_total_norm(list(grads.values()))), "bias_delta": bias_delta}


def distributed_optimizer_grad_norm(engine) -> float:
    """The norm megatron's DistributedOptimizer clips with: each parameter's reduced gradient split over its
    optimizer's DP group (dense: DP x CP, experts: expert-DP, by the `allreduce` mark) with megatron's
    partitioning (ShardedOptimizer), filtered by megatron's param_is_not_shared and
    param_is_not_tensor_parallel_duplicate, summed over the world by megatron's get_grad_norm_fp32."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared
    from tests.parallelism.megatron_cpu_ranks import ShardedOptimizer

    params = [p for c in engine.chunks for _, p in engine._master_params(c)]
    grads = []
    for expert, group in ((False, ps.get_data_parallel_group(with_context_parallel=True)),
                          (True, ps.get_expert_data_parallel_group())):
        mine = [p for p in params if getattr(p, "allreduce", True) != expert]
        if not mine:
            continue
        for param, ranges in ShardedOptimizer(mine, group).gbuf_ranges[0][torch.float32][0]["param_map"].items():
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
                grads.append(param.main_grad.view(-1)[ranges["param"].start:ranges["param"].end])
    return get_grad_norm_fp32(grads, grad_stats_parallel_group=dist.group.WORLD)


def _gradient_errors(engine, ref_grads: dict) -> dict[str, float]:
    """megatron parameter (chunk-qualified) -> max |megatron grad - reference grad| / max |reference grad|."""
    from raytron.parallelism.megatron.mapping import to_megatron

    errors = {}
    for i, (chunk, pieces) in enumerate(zip(engine.chunks, engine.pieces)):
        want = to_megatron(ref_grads, pieces)
        for name, param in engine._master_params(chunk):
            scale = want[name].abs().max().clamp_min(1e-12)
            errors[f"chunk{i}.{name}"] = float((param.main_grad - want[name]).abs().max() / scale)
    return errors


def _record_launches(chunk, launched: list) -> None:
    """Wrap this DDP chunk's finish_grad_sync to note, per bucket group, whether its reduction was already
    launched from the backward hooks (the overlap) when the schedule's finalize step comes to wait for it."""
    finish = chunk.finish_grad_sync

    def recording_finish(*args, **kwargs):
        groups = chunk.bucket_groups + chunk.expert_parallel_bucket_groups
        launched.extend(g.grad_reduce_handle is not None for g in groups)
        return finish(*args, **kwargs)

    chunk.finish_grad_sync = recording_finish


@contextlib.contextmanager
def _record_schedule_plans(plans: list, runs: list):
    """Note what megatron's combined 1F1B schedule (train.overlap_moe_comm) gets from the engine: per
    GPTModel.build_schedule_plan call, its arguments (shapes; None stays None); per plan run, whether a
    forward and a backward micro-batch ran together (the overlap) or one alone (first and last)."""
    from megatron.core.models.common.model_chunk_schedule_plan import TransformerModelChunkSchedulePlan
    from megatron.core.models.gpt import GPTModel

    build, run = GPTModel.build_schedule_plan, TransformerModelChunkSchedulePlan.run

    def shape(t):
        return None if t is None else list(t.shape)

    def recording_build(model, input_ids, position_ids, attention_mask, *args, **kwargs):
        plans.append({"input_ids": shape(input_ids), "position_ids": shape(position_ids),
                      "attention_mask": shape(attention_mask), "labels": shape(kwargs.get("labels")),
                      "others": len(args) + len(set(kwargs) - {"labels"})})  # decoder_input, loss_mask, ...
        return build(model, input_ids, position_ids, attention_mask, *args, **kwargs)

    def recording_run(f_plan, b_plan, *args, **kwargs):
        runs.append([f_plan is not None, b_plan is not None])
        return run(f_plan, b_plan, *args, **kwargs)

    GPTModel.build_schedule_plan = recording_build
    TransformerModelChunkSchedulePlan.run = staticmethod(recording_run)
    try:
        yield
    finally:
        GPTModel.build_schedule_plan, TransformerModelChunkSchedulePlan.run = build, staticmethod(run)


def _one_case(rank: int, world: int, family: str, overrides: dict, fields: dict) -> dict:
    from raytron.parallelism.layout import ParallelLayout
    from raytron.parallelism.megatron.engine import chunk_coords

    fields = dict(fields)
    overlap, overlap_moe = fields.pop("overlap", ""), fields.pop("overlap_moe", False)
    z_coef = fields.pop("z_loss", 0.0)  # train.router_z_loss_coef
    flavor, docs = fields.pop("flavor", "debug"), fields.pop("docs", False)
    dp = world // (fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1))
    layout = ParallelLayout(world_size=world, micro_batch_size=MICRO, global_batch_size=GLOBAL, **{"dp": dp, **fields})
    engine = cpu_engine(family, overrides, layout, overlap, overlap_moe, z_coef=z_coef, flavor=flavor)
    ref = reference_step(family, overrides, z_coef, flavor, docs)
    micro = global_batch(engine.model_cfg.vocab_size).split(MICRO)
    dp_rank, ga = layout.coords(rank)["dp"], layout.grad_accum
    doc_ids = list(global_document_ids().split(MICRO)[dp_rank * ga:(dp_rank + 1) * ga]) if docs else None
    launched: list[bool] = []  # per bucket group at finish_grad_sync: was its reduction already in flight?
    if overlap:  # a discarded first step: megatron learns each bucket's readiness counts on the first step
        engine._run(list(micro[dp_rank * ga:(dp_rank + 1) * ga]), forward_only=False)
        for chunk in engine.chunks:
            chunk.zero_grad_buffer()
    for chunk in engine.chunks:
        _record_launches(chunk, launched)
    plans: list[dict] = []  # per schedule plan built for the combined 1F1B schedule: its arguments
    runs: list[list[bool]] = []  # per plan run: [with a forward micro-batch, with a backward one]
    with _record_schedule_plans(plans, runs) if overlap_moe else contextlib.nullcontext():
        loss = engine._mean_lm_loss(engine._run(list(micro[dp_rank * ga:(dp_rank + 1) * ga]), forward_only=False,
                                                document_ids=doc_ids))
    norm = distributed_optimizer_grad_norm(engine)
    errors = _gradient_errors(engine, ref["grads"])
    exported = engine.export_reference()
    mine = {"errors": errors, "blocks": [list(chunk_coords(c.module, layout).blocks) for c in engine.chunks]}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return {"loss": [loss, ref["loss"]], "grad_norm": [norm, ref["grad_norm"]], "launched_early": launched,
            "schedule_plans": plans, "plan_runs": runs, "chunks": len(engine.chunks), "grad_accum": ga,
            "worst_grad_error": max(e for r in everyone for e in r["errors"].values()),
            "bad_grads": {r: sorted(n for n, e in got["errors"].items() if e > 1e-4) for r, got in enumerate(everyone)
                          if any(e > 1e-4 for e in got["errors"].values())},
            "export_mismatch": sorted(n for n, v in ref["state"].items() if not torch.equal(exported[n], v)),
            "bias_delta": ref["bias_delta"],
            "blocks": [r["blocks"] for r in everyone]}


def step_matches_reference(rank: int, world: int, cases: list, out: str) -> None:
    """For each (family, model overrides, layout fields): one step compared with the reference; rank 0
    writes the list of results as JSON."""
    torch.set_num_threads(1)
    _cpu_shims()
    results = [_one_case(rank, world, family, overrides, fields) for family, overrides, fields in cases]
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()


def reference_router_stats(family: str, overrides: dict) -> list:
    """[aux loss (mean over micro-batches of the per-layer sum), expert load fractions, token-mean routing
    entropy computed from the reference routers' probabilities] of the reference model over the global batch
    (the order of MegatronEngine._router_stats)."""
    from raytron.models.moe import MoE

    model = build_reference(family, overrides)
    entropy, load, aux = [0.0, 0], 0, 0.0

    def on_moe(module, inputs, output):
        _, _, probs = module.router(inputs[0].reshape(-1, inputs[0].shape[-1]))
        entropy[0] += float(-(probs * probs.log()).sum())
        entropy[1] += probs.shape[0]

    for m in model.modules():
        if isinstance(m, MoE):
            m.register_forward_hook(on_moe)
    micro = global_batch(model.cfg.vocab_size).split(MICRO)
    with torch.no_grad():
        for mb in micro:
            model(mb[:, :-1])
            aux += float(torch.stack(model.aux_losses()).sum())
            load = load + sum(m.last_load.double() for m in model.modules() if isinstance(m, MoE))
    return [aux / len(micro), (load / load.sum()).tolist(), entropy[0] / entropy[1]]


def recompute_matches_none(rank: int, world: int, cases: list, out: str) -> None:
    """For each (family, model overrides, layout fields): one forward/backward per train.recompute mode on the
    same weights and batch; rank 0 writes per case {mode: [loss, worst |grad - grad without recompute|
    over every rank's parameters, parameters compared, elements rank 0 saved for backward, and the engine's
    _router_stats: aux loss, expert load, routing entropy]}, and for MoE "reference": reference_router_stats.
    Layout field "overlap_moe": train.overlap_moe_comm (no `full` then: megatron-core refuses it)."""
    from raytron.parallelism.layout import ParallelLayout
    from raytron.parallelism.megatron.modules import ReferenceRouter

    torch.set_num_threads(1)
    _cpu_shims()
    _cpu_rng_shims()
    results = []
    for family, overrides, fields in cases:
        fields = dict(fields)
        overlap_moe = fields.pop("overlap_moe", False)  # megatron-core refuses full recompute with it
        dp = world // (fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1))
        layout = ParallelLayout(world_size=world, micro_batch_size=MICRO, global_batch_size=GLOBAL,
                                **{"dp": dp, **fields})
        dp_rank, ga = layout.coords(rank)["dp"], layout.grad_accum
        grads, case = {}, {}
        for mode in ("none", "selective") if overlap_moe else ("none", "selective", "full"):
            engine = cpu_engine(family, overrides, layout, overlap_moe=overlap_moe, recompute=mode)
            micro = global_batch(engine.model_cfg.vocab_size).split(MICRO)
            saved = [0]  # elements the forwards keep for backward outside checkpointed regions

            def pack(t, saved=saved):
                if torch._C._current_graph_task_id() == -1:  # not a backward's recomputation
                    saved[0] += t.numel()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outputs = engine._run(list(micro[dp_rank * ga:(dp_rank + 1) * ga]), forward_only=False)
            loss = engine._mean_lm_loss(outputs)
            grads[mode] = {f"{i}.{n}": p.main_grad.clone() for i, c in enumerate(engine.chunks)
                           for n, p in engine._master_params(c)}
            worst = max(float((grads[mode][n] - g).abs().max()) for n, g in grads["none"].items())
            stats = torch.tensor([worst], dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            engine.routers = [m for c in engine.chunks for m in c.modules() if isinstance(m, ReferenceRouter)]
            router = engine._router_stats(ga)
            case[mode] = [loss, float(stats[0]), len(grads[mode]), saved[0],
                          router.get("aux_loss", 0.0), router.get("expert_load"), router.get("router_entropy")]
        if engine.routers:
            case["reference"] = reference_router_stats(family, overrides)
        results.append(case)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
