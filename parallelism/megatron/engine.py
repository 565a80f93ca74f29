"""The megatron engine: the reference architecture on megatron-core 0.16.1 (TP+SP, PP/VPP, EP, CP, DP
with the distributed optimizer), bf16 compute (or FP8 GEMMs, train.precision) with fp32 master weights,
GPUs over NCCL.

Same interface as DeepSpeedEngine: `MegatronEngine(spec, layout, rank, world)`, `train_step(micro_batches)
-> StepMetrics`, `eval_loss`, `after_step`, `model_cfg`. Parallel groups come from megatron's
parallel_state initialized with the layout's order (`tp-cp-ep-dp-pp`) and are checked against
`ParallelLayout.groups`, so the launcher's placement and megatron agree. Weights start from the
reference model (same seed => same weights as every other engine) through parallelism/megatron/mapping.py.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ... import models
from ..engines import Engine, StepMetrics, paired_document_ids
from ..layout_rules import engine_gaps
from .kernels import install_multi_tensor_kernels, use_fused_adam
from .mapping import (ChunkCoords, buffer_pieces, chunk_buffers, chunk_pieces, from_megatron, tied_aliases,
                      to_megatron, unwrapped_buffers)
from .cp import split_for_context_parallel
from .modules import ReferenceRouter
from .spec import build_model_chunks, transformer_config
from ..schedule import lr_multiplier


def init_parallel_state(layout, rank: int) -> None:
    """torch.distributed (NCCL; kept if Ray Train or torchrun already set it up) + megatron groups."""
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    init_megatron_groups(layout, rank)


def init_megatron_groups(layout, rank: int, **options) -> None:
    """Megatron's process groups for `layout` (any left from an earlier build are destroyed first), checked
    against the layout's own coordinates. `options` go to initialize_model_parallel (the CPU test harness
    passes create_gloo_process_groups=False)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp, order="tp-cp-ep-dp-pp", **options)
    check_groups(layout, rank)


def attach_grad_sync(tcfg, chunks: list) -> None:
    """With overlap_grad_reduce, megatron's DDP launches a bucket's reduction from the backward hooks once
    all its parameters are ready in the last micro-batch. Like Megatron-LM's training loop, the schedule
    gets DDP's `no_sync` for the other micro-batches (megatron-core 0.16.1 would also count right without
    it: its bucket groups learn the per-step hook counts on the first step). pp == 1 only: one chunk, the
    no-pipelining schedule (engine_gaps refuses pp > 1 with overlap; PP would need grad_sync_func too)."""
    if len(chunks) != 1:
        raise ValueError(f"overlap_grad_reduce: {len(chunks)} model chunks (pp > 1) are not supported; use pp=1")
    tcfg.no_sync_func = chunks[0].no_sync


def check_groups(layout, rank: int) -> None:
    """Megatron's groups for this rank must be the layout's (placement relies on it)."""
    from megatron.core import parallel_state as ps

    mine = {
        "tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
        "cp": ps.get_context_parallel_group(), "dp": ps.get_data_parallel_group(),
        "ep": ps.get_expert_model_parallel_group(), "etp": ps.get_expert_tensor_parallel_group(),
        "edp": ps.get_expert_data_parallel_group()}
    for kind, group in mine.items():
        expected = next(g for g in layout.groups(kind) if rank in g)
        actual = sorted(dist.get_process_group_ranks(group))
        if actual != expected:
            raise RuntimeError(f"rank {rank}: megatron's {kind} group is {actual}, the layout says {expected}")


def chunk_coords(chunk, layout) -> ChunkCoords:
    """Shard coordinates of one GPTModel chunk on this rank (global layer indices from layer_number)."""
    from megatron.core import parallel_state as ps

    blocks = tuple(layer.layer_number - 1 for layer in chunk.decoder.layers)
    return ChunkCoords(blocks=blocks, pre_process=chunk.pre_process, post_process=chunk.post_process,
                       tp=layout.tp, tp_rank=ps.get_tensor_model_parallel_rank(),
                       ep=layout.ep, ep_rank=ps.get_expert_model_parallel_rank(),
                       etp=layout.etp, etp_rank=ps.get_expert_tensor_parallel_rank())


class MegatronEngine(Engine):
    """build(spec, layout) -> engine; train_step(micro_batches) -> StepMetrics; eval_loss(batches)."""

    def __init__(self, spec, layout, rank: int, world_size: int, init_from_reference: bool = True):
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        if not spec.resources.use_gpu:
            raise ValueError("engine: megatron runs on GPUs only (resources.use_gpu: true); "
                             "use engine: deepspeed on CPU")
        self.spec, self.layout, self.rank, self.world = spec, layout, rank, world_size
        self.model_cfg = models.get_config(spec.model.family, spec.model.flavor, **spec.model.overrides)
        gaps = engine_gaps(spec, self.model_cfg, layout, "megatron")  # the limits plan lists, submit refuses
        if gaps:
            field, reason = gaps[0]
            raise ValueError(f"{field}: the megatron engine cannot run this job yet: {reason}")
        init_parallel_state(layout, rank)
        self.device = torch.device("cuda", torch.cuda.current_device())
        # perform_initialization stays on even when the reference weights overwrite it: megatron-core
        # sets the tensor-parallel attributes (used by grad-norm and clipping) only in its init path
        self.tcfg = transformer_config(self.model_cfg, layout, aux_loss_coef=spec.train.aux_loss_coef,
                                       z_loss_coef=getattr(spec.train, "router_z_loss_coef", 0.0),
                                       perform_initialization=True,
                                       overlap_moe_comm=bool(getattr(spec.train, "overlap_moe_comm", False)),
                                       recompute=getattr(spec.train, "recompute", "none"))
        model_parallel_cuda_manual_seed(spec.train.seed)
        precision = "fp8" if getattr(spec.train, "precision", "auto") == "fp8" else "bf16"  # linear-layer GEMMs
        if precision == "fp8":
            from ...ops.fp8 import check_fast_path

            check_fast_path(self.device)  # plan cannot see the GPUs: refuse pre-Ada ones before building
        chunks = build_model_chunks(self.model_cfg, self.tcfg, spec.train.seq_len, precision)
        self.pieces = [chunk_pieces(self.model_cfg, chunk_coords(c, layout)) for c in chunks]
        self.buffers = [chunk_buffers(self.model_cfg, chunk_coords(c, layout)) for c in chunks]
        if init_from_reference:
            torch.manual_seed(spec.train.seed)  # identical reference weights on every rank
            ref_sd = models.build(spec.model.family, spec.model.flavor, **spec.model.overrides).state_dict()
            self._load_chunks(chunks, ref_sd)
        self.chunks, self.optimizer = self._wrap(chunks)
        self.routers = [m for c in self.chunks for m in c.modules() if isinstance(m, ReferenceRouter)]
        self._lr = lr_multiplier(spec.train)
        self.steps_done = 0

    # ---- construction ------------------------------------------------------------------------------
    def _load_chunks(self, chunks, ref_sd: dict) -> None:
        for chunk, pieces in zip(chunks, self.pieces):
            params = dict(chunk.named_parameters())
            if set(params) != set(pieces):
                raise RuntimeError(f"megatron parameters and mapping disagree: only in model "
                                   f"{sorted(set(params) - set(pieces))}, only in mapping {sorted(set(pieces) - set(params))}")
            with torch.no_grad():
                for name, value in to_megatron(ref_sd, pieces).items():
                    if params[name].shape != value.shape:
                        raise RuntimeError(f"{name}: megatron shape {tuple(params[name].shape)}, mapped {tuple(value.shape)}")
                    params[name].copy_(value)
        self.load_buffers(chunks, ref_sd)

    @torch.no_grad()
    def load_buffers(self, chunks, ref_named: dict) -> None:
        """Routing biases from reference-named tensors (a reference state dict or a checkpoint's buffers)."""
        for chunk, names in zip(chunks, self.buffers):
            buffers = unwrapped_buffers(chunk)
            for name, ref in names.items():
                if ref in ref_named:
                    buffers[name].copy_(ref_named[ref].to(buffers[name].device, buffers[name].dtype))

    def _wrap(self, chunks):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        overlap = bool(getattr(self.spec.train, "overlap_grad_reduce", False))
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                                   use_distributed_optimizer=True)
        wrapped = [DistributedDataParallel(config=self.tcfg, ddp_config=ddp_config,
                                           module=Float16Module(self.tcfg, c), disable_bucketing=i > 0)
                   for i, c in enumerate(chunks)]
        if overlap:
            attach_grad_sync(self.tcfg, wrapped)
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        train = self.spec.train
        opt_config = OptimizerConfig(optimizer="adam", lr=train.lr, weight_decay=train.weight_decay,
                                     adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, bf16=True,
                                     params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                                     clip_grad=train.grad_clip)
        install_multi_tensor_kernels()  # no per-parameter host syncs in gradient clipping
        optimizer = get_megatron_optimizer(opt_config, wrapped)
        use_fused_adam(optimizer)
        return wrapped, optimizer

    # ---- steps ---------------------------------------------------------------------------------------
    def _prepare(self, batch: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """[mbs, seq+1] -> (tokens, labels) of this CP rank's part, on the GPU, and the document ids of the
        inputs over the whole sequence [mbs, seq] (or None): every mixer takes them as megatron's
        `attention_mask` and cuts its own CP part (parallelism/megatron/hybrid.py)."""
        from megatron.core import parallel_state as ps

        batch = batch.to(self.device, non_blocking=True)
        cp, cp_rank = self.layout.cp, ps.get_context_parallel_rank()
        docs = None if doc_ids is None else doc_ids[:, :-1].to(self.device, non_blocking=True).contiguous()
        return (split_for_context_parallel(batch[:, :-1], cp, cp_rank).contiguous(),
                split_for_context_parallel(batch[:, 1:], cp, cp_rank).contiguous(), docs)

    @staticmethod
    def _loss_func(per_token: torch.Tensor):
        total = per_token.float().sum()
        count = torch.full((), per_token.numel(), device=per_token.device, dtype=torch.int)  # no host sync
        return total, count, {"lm": torch.stack([total.detach(), count.float()])}

    def _forward_step(self, data_iterator, model, return_schedule_plan: bool = False):
        """megatron's forward_step_func. With train.overlap_moe_comm, training steps run megatron's combined
        1F1B schedule, which passes the unwrapped GPTModel and `return_schedule_plan=True` and runs the
        returned per-layer plan itself (the loss function is the same); eval runs the plain forward."""
        tokens, labels, doc_ids = next(data_iterator)
        if return_schedule_plan:
            return model.build_schedule_plan(tokens, None, doc_ids, labels=labels), self._loss_func
        return model(tokens, None, doc_ids, labels=labels), self._loss_func

    def _run(self, micro_batches: list[torch.Tensor], forward_only: bool,
             document_ids: list[torch.Tensor] | None = None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        data = [self._prepare(b, d) for b, d in zip(micro_batches, paired_document_ids(micro_batches, document_ids))]
        iterators = [iter(data) for _ in self.chunks]
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0], model=self.chunks,
            num_microbatches=len(micro_batches), seq_length=self.spec.train.seq_len,
            micro_batch_size=micro_batches[0].shape[0], forward_only=forward_only)

    def _mean_lm_loss(self, outputs: list[dict]) -> float:
        """Token-mean LM loss over every rank's micro-batches (last stage, first TP rank contributes)."""
        from megatron.core import parallel_state as ps

        stats = torch.zeros(2, device=self.device, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            for out in outputs:
                stats += out["lm"].double()
        dist.all_reduce(stats)
        return float(stats[0] / stats[1].clamp_min(1))

    def train_step(self, micro_batches: list[torch.Tensor], document_ids: list[torch.Tensor] | None = None) -> StepMetrics:
        """One optimizer step over this rank's micro-batches (len == grad_accum); `document_ids` (one per
        micro-batch, or None) keeps packed documents apart (data.reset_at_documents)."""
        if len(micro_batches) != self.layout.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches, layout needs {self.layout.grad_accum}")
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.spec.train.lr * self._lr(self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        outputs = self._run(micro_batches, forward_only=False, document_ids=document_ids)
        _, grad_norm, _ = self.optimizer.step()
        self.steps_done += 1
        router = {"aux_loss": 0.0, **self._router_stats(len(micro_batches))}
        tokens = self.spec.train.global_batch_size * self.spec.train.seq_len
        return StepMetrics(loss=self._mean_lm_loss(outputs), lr=lr, tokens=tokens,
                           grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), **router)

    def _router_stats(self, num_micro: int) -> dict:
        """StepMetrics' router fields: aux_loss and z_loss (means over micro-batches of the per-layer sums),
        expert_load fractions, token-mean router_entropy, expert_bias per MoE layer. Every MoE layer routes
        the same tokens (TP/SP copies count alike on every layer), so the entropy pooled over all ranks'
        routers is the mean over layers of each layer's mean. Collective."""
        if not self.model_cfg.num_experts:
            return {}
        e = self.model_cfg.num_experts
        stats = torch.zeros(4 + e, device=self.device, dtype=torch.float64)
        for router in self.routers:
            aux, load, entropy, z = router.pop_records()
            for value, at in ((aux, slice(0, 1)), (z, slice(1, 2)), (load, slice(2, 2 + e)), (entropy, slice(2 + e, None))):
                if value is not None:
                    stats[at] += value.double()
        dist.all_reduce(stats)
        load = stats[2:2 + e] / stats[2:2 + e].sum().clamp_min(1)
        per_step = self.layout.dp * num_micro
        return {"aux_loss": float(stats[0] / per_step), "z_loss": float(stats[1] / per_step),
                "expert_load": load.tolist(), "router_entropy": float(stats[2 + e] / stats[3 + e].clamp_min(1)),
                "expert_bias": self._expert_bias()}

    def _expert_bias(self) -> list[list[float]] | None:
        """Routing bias per MoE layer (in layer order) gathered from the pipeline stages holding them; the
        copies on TP/DP/EP ranks are equal (megatron-core updates them from all-reduced counts). Collective."""
        if self.model_cfg.router != "sigmoid":
            return None
        pattern = self.model_cfg.layer_pattern()
        moe_blocks = [g for g in range(len(pattern) // 2) if pattern[2 * g + 1] == "E"]
        e = self.model_cfg.num_experts
        sums = torch.zeros(len(moe_blocks), e + 1, device=self.device, dtype=torch.float64)
        for router in self.routers:
            row = moe_blocks.index(router.layer_number - 1)
            sums[row, :e] += router.expert_bias.double()
            sums[row, e] += 1
        dist.all_reduce(sums)
        return (sums[:, :e] / sums[:, e:].clamp_min(1)).tolist()

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor], document_ids: list[torch.Tensor] | None = None) -> float:
        """Mean LM loss over this rank's held-out micro-batches, averaged over all ranks (`document_ids` as
        in train_step)."""
        for chunk in self.chunks:
            chunk.eval()
        loss = self._mean_lm_loss(self._run(micro_batches, forward_only=True, document_ids=document_ids))
        for router in self.routers:
            router.pop_records()
        return loss

    def after_step(self) -> None:
        """Nothing to do: megatron-core updates the routing biases in finalize_model_grads, each step."""

    # ---- weights in reference form ----------------------------------------------------------------------
    def export_reference(self) -> dict[str, torch.Tensor]:
        """Full reference state dict (the model's bf16 weights, as fp32) on every rank. Collective; gathers every
        shard through all_gather_object, so meant for tests and debug-to-1B scales, not for checkpoints."""
        params = [{**dict(self._master_params(c)), **unwrapped_buffers(c)} for c in self.chunks]
        mine = [({**pieces, **buffer_pieces(self.model_cfg, names)}, {n: params_[n].detach().float().cpu()
                                                                       for n in [*pieces, *names]})
                for pieces, names, params_ in zip(self.pieces, self.buffers, params)]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in models.build(self.spec.model.family, self.spec.model.flavor,
                                                          **self.spec.model.overrides).state_dict().items()}
        return from_megatron([part for rank_parts in everyone for part in rank_parts], shapes,
                             aliases=tied_aliases(self.model_cfg))

    def _master_params(self, chunk):
        """(name inside the GPTModel, parameter) pairs of one wrapped chunk (DDP -> Float16Module -> GPTModel)."""
        return chunk.module.module.named_parameters()

    def load_reference(self, ref_sd: dict[str, torch.Tensor]) -> None:
        """Load reference weights into the model; the optimizer's fp32 masters follow them."""
        self._load_chunks([c.module.module for c in self.chunks], ref_sd)
        self.optimizer.reload_model_params()
