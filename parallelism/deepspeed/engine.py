"""The deepspeed engine: the reference model (DeepSpeed-MoE for its MoE layers) under ZeRO 0-3, in fp32 or
bf16 (fp32 master weights), optionally with ZeRO-Offload.

Runs on CPU over gloo (DS_ACCELERATOR=cpu) as well as on GPUs over NCCL. Expert parallelism folds over
data parallelism the DeepSpeed way: EP groups are consecutive ranks, rank r holds the experts of EP
rank r % ep. The engine's checkpoint state is expressed in *reference parameter names* with full
(unsharded) tensors, so it loads under any DP/EP layout (see parallelism/deepspeed/state.py).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ... import models
from ...models.transformer import SEQUENCE_MIXERS
from ..engines import Engine, StepMetrics, paired_document_ids
from .moe import DeepSpeedMoE, swap_moe_layers
from ..layout_rules import engine_gaps, resolved_precision
from ..schedule import lr_multiplier


def _ds_config(spec, layout) -> dict:
    """DeepSpeed's config. bf16 keeps fp32 master weights and Adam state in ZeRO's partitions. ZeRO-Offload
    moves those partitions to host memory (and the parameters under ZeRO-3); the host step runs the same
    torch AdamW (zero_force_ds_cpu_optimizer off) rather than DeepSpeedCPUAdam, so every layout computes
    the reference optimizer and needs no compiled op. engine_gaps refuses what this cannot run."""
    train, offload = spec.train, spec.layout.offload
    zero: dict = {"stage": layout.zero_stage}
    host = {"device": "cpu", "pin_memory": spec.resources.use_gpu}  # pinned: faster GPU <-> host copies
    if offload != "none":
        zero["offload_optimizer"] = host
    if offload == "optimizer+params":
        zero["offload_param"] = host
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        # ZeRO-0 in fp32 steps the bare torch optimizer, whose DeepSpeed clipping neither reports the norm
        # nor sums expert gradients over the EP group: the engine clips it itself (_clip_replicated)
        "gradient_clipping": train.grad_clip if _zero_clips(layout) else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": resolved_precision(spec) == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def apply_recompute(model: torch.nn.Module, mode: str) -> int:
    """train.recompute on the reference model, from outside it (models/ knows no engines): `full` wraps
    each reference layer's forward, `selective` the mixer of each attention / linear-sequence layer (norms,
    MLP and MoE layers keep their activations), in torch.utils.checkpoint (non-reentrant, so MoE side
    outputs such as the aux loss keep their graph). Returns how many modules were wrapped."""
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"train.recompute: got {mode!r}; use none, selective or full")
    if mode == "none":
        return 0
    targets = [layer if mode == "full" else layer.mixer for layer in model.layers
               if mode == "full" or layer.kind in SEQUENCE_MIXERS]
    for module in targets:
        module.forward = _checkpointed(module.forward)
    return len(targets)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run

def _skip_shm_build() -> None:
    """DeepSpeed's communication backend loads its shared-memory kernels when it starts, and on a CPU
    accelerator that is a C++ build on first use (about a minute, and a compiler the machine may lack).
    Those kernels serve only `inference_all_reduce`; training's all-reduces go to torch.distributed
    (gloo / NCCL), so the backend starts without them."""
    import importlib

    # By module path: `import deepspeed.comm.torch as m` binds the attribute `deepspeed.comm.torch`,
    # which is the torch package that deepspeed.comm re-exports.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _zero_clips(layout) -> bool:
    """ZeRO 1-3 clip inside DeepSpeed's optimizer and report the norm; ZeRO-0 is clipped by the engine."""
    return layout.zero_stage > 0


class DeepSpeedEngine(Engine):
    """build(spec, layout) -> engine; train_step(micro_batches) -> StepMetrics; eval_loss(batches)."""

    def __init__(self, spec, layout, rank: int, world_size: int):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.resources.use_gpu else "cpu")
        import deepspeed
        import deepspeed.comm as ds_dist
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.spec, self.layout, self.rank, self.world = spec, layout, rank, world_size
        cfg = models.get_config(spec.model.family, spec.model.flavor, **spec.model.overrides)
        gaps = engine_gaps(spec, cfg, layout, "deepspeed")  # the limits plan lists, submit refuses
        if gaps:
            raise ValueError(f"{gaps[0][0]}: the deepspeed engine cannot run this job: {gaps[0][1]}")
        _skip_shm_build()
        ds_dist.init_distributed(dist_backend="nccl" if spec.resources.use_gpu else "gloo",
                                 dist_init_required=False, verbose=False)
        self.device = torch.device("cuda", torch.cuda.current_device()) if spec.resources.use_gpu else torch.device("cpu")
        torch.manual_seed(spec.train.seed)  # identical reference weights on every rank
        model = models.build(spec.model.family, spec.model.flavor, **spec.model.overrides)
        self.model_cfg = model.cfg
        self.ep_size = layout.ep
        self.ep_rank = rank % layout.ep
        self.num_moe_layers = swap_moe_layers(model, layout.ep, self.ep_rank)
        apply_recompute(model, getattr(spec.train, "recompute", "none"))
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": spec.train.weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        optimizer = torch.optim.AdamW(groups, lr=spec.train.lr, betas=(0.9, 0.95), eps=1e-8)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(spec.train))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=_ds_config(spec, layout))
        self._check_ep_groups()
        for m in self.module.modules():  # before any checkpoint loads a routing bias into them
            if isinstance(m, DeepSpeedMoE):
                m.router.keep_fp32()
        # Optional callback(local_loss_sum) run at the gradient-accumulation boundary, after the last
        # backward and before the optimizer update (launcher/health.py: NaN/Inf check, fault injection).
        self.before_optimizer_step = None

    def _check_ep_groups(self) -> None:
        if not self.num_moe_layers:
            return
        import torch.distributed as dist
        from deepspeed.utils import groups

        ep_group = groups._get_expert_parallel_group(f"ep_size_{self.ep_size}")
        actual = dist.get_rank(group=ep_group)
        if actual != self.ep_rank:
            raise RuntimeError(f"rank {self.rank}: DeepSpeed placed it at EP rank {actual}, expected {self.ep_rank}")

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _forward_loss(self, batch: torch.Tensor, doc_ids: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """batch [mbs, seq+1] -> (LM loss, aux loss, router z-loss) for this micro-batch (MoE losses summed
        over layers, unweighted); doc_ids [mbs, seq+1] (or None) keeps its packed documents apart
        (models.Transformer.forward)."""
        batch = batch.to(self.device)
        tokens, targets = batch[:, :-1], batch[:, 1:]
        docs = None if doc_ids is None else doc_ids[:, :-1].to(self.device)
        logits = self.engine(tokens, doc_ids=docs)
        lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux, z = (torch.stack(v).sum() if v else torch.zeros((), device=lm.device)
                  for v in (self._side_losses("last_aux_loss"), self._side_losses("last_z_loss")))
        return lm, aux, z

    def _side_losses(self, attr: str) -> list[torch.Tensor]:
        return [getattr(m, attr) for m in self.module.modules()
                if getattr(m, attr, None) is not None and m is not self.module]

    def train_step(self, micro_batches: list[torch.Tensor], document_ids: list[torch.Tensor] | None = None) -> StepMetrics:
        """One optimizer step over this rank's micro-batches (len == grad_accum); `document_ids` (one per
        micro-batch, or None) keeps packed documents apart (data.reset_at_documents)."""
        docs = paired_document_ids(micro_batches, document_ids)
        if len(micro_batches) != self.layout.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches, layout needs {self.layout.grad_accum}")
        self.engine.train()
        sums = torch.zeros(3, dtype=torch.float64)  # LM loss, aux loss, z-loss
        load = entropy = grad_norm = None
        lr = self.scheduler.get_last_lr()[0]
        train = self.spec.train
        for i, batch in enumerate(micro_batches):
            lm, aux, z = self._forward_loss(batch, docs[i])
            # all-reduces at the GA boundary
            self.engine.backward(lm + train.aux_loss_coef * aux + getattr(train, "router_z_loss_coef", 0.0) * z)
            sums += torch.stack([lm.detach(), aux.detach(), z.detach()]).double().cpu()
            if i == len(micro_batches) - 1:  # GA boundary: the next step() updates
                if not _zero_clips(self.layout):
                    grad_norm = self._clip_replicated()
                if self.before_optimizer_step is not None:
                    self.before_optimizer_step(sums[0] + sums[1])
            self.engine.step()
            load = self._accumulate(load, "last_load")
            entropy = self._accumulate(entropy, "last_entropy")
        for m in self.module.modules():  # aux-loss-free bias updates (collective: load summed over ranks)
            if isinstance(m, DeepSpeedMoE):
                m.update_bias()
        stats = self._all_reduce(sums / len(micro_batches)) / self.world
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        tokens = self.spec.train.global_batch_size * self.spec.train.seq_len
        return StepMetrics(loss=float(stats[0]), aux_loss=float(stats[1]), z_loss=float(stats[2]), tokens=tokens,
                           lr=lr, grad_norm=float(grad_norm if grad_norm is not None else float("nan")),
                           expert_load=self._global_load(load), router_entropy=self._global_entropy(entropy),
                           expert_bias=self.expert_bias())

    def _accumulate(self, total, attr: str):
        """`total` plus the sum over MoE layers of their `attr` tensor from the last forward."""
        values = [getattr(m, attr).double().cpu() for m in self.module.modules()
                  if getattr(m, attr, None) is not None and m is not self.module]
        if not values:
            return total
        summed = torch.stack(values).sum(0)
        return summed if total is None else total + summed

    def _all_reduce(self, host: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks of a host-side statistic, sent through this engine's device (NCCL reduces GPU
        tensors only); returned on the host."""
        out = host.to(self.device)
        torch.distributed.all_reduce(out)
        return out.cpu()

    def _global_entropy(self, entropy) -> float | None:
        """Token-mean routing entropy over every rank; every MoE layer routes the same tokens, so this
        pooled mean is the mean over layers of each layer's token mean."""
        if entropy is None:
            return None
        entropy = self._all_reduce(entropy)
        return float(entropy[0] / entropy[1].clamp_min(1))

    @torch.no_grad()
    def _clip_replicated(self) -> float:
        """Global gradient norm of a replicated (ZeRO-0) model, clipped as torch's clip_grad_norm_ does.
        Non-expert gradients are already identical on every rank; each expert's gradient lives on its EP
        rank only, so the expert part of the squared norm is summed over the EP group."""
        from deepspeed.moe.utils import is_moe_param

        sq = {False: [], True: []}
        for p in self.module.parameters():
            if p.grad is not None:
                sq[is_moe_param(p)].append(torch.linalg.vector_norm(p.grad.float()).square())
        dense, expert = (torch.stack(v).sum() if v else torch.zeros((), device=self.device) for v in sq.values())
        if self.num_moe_layers and self.ep_size > 1:
            from deepspeed.utils import groups

            torch.distributed.all_reduce(expert, group=groups._get_expert_parallel_group(f"ep_size_{self.ep_size}"))
        norm = (dense + expert).sqrt()
        clip = self.spec.train.grad_clip
        if clip > 0:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return float(norm)

    def _global_load(self, load) -> list[float] | None:
        if load is None:
            return None
        load = self._all_reduce(load)
        return (load / load.sum().clamp_min(1)).tolist()

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor], document_ids: list[torch.Tensor] | None = None) -> float:
        """Mean LM loss over this rank's held-out micro-batches, averaged over all ranks (`document_ids` as
        in train_step)."""
        self.engine.eval()
        local = torch.zeros((), dtype=torch.float64)
        for batch, docs in zip(micro_batches, paired_document_ids(micro_batches, document_ids)):
            local += self._forward_loss(batch, docs)[0].double().cpu()
        return float(self._all_reduce(local / max(1, len(micro_batches))) / self.world)

    @torch.no_grad()
    def load_reference(self, ref_sd: dict[str, torch.Tensor]) -> None:
        """Load a reference state dict (stacked experts, as models.Transformer.state_dict()) into the
        model and ZeRO's fp32 masters; this rank keeps its experts. Buffers of the same name follow."""
        from .state import load_params, split_experts

        load_params(self, split_experts(ref_sd))
        for name, buf in self.module.named_buffers():
            if name in ref_sd:
                buf.copy_(ref_sd[name])

    def export_reference(self) -> dict[str, torch.Tensor]:
        """Full reference state dict (fp32 masters, stacked experts) on every rank. Collective."""
        from .state import export_reference

        return export_reference(self)

    def after_step(self) -> None:
        """Nothing to do: the routing biases are updated at the end of train_step, as megatron-core does."""

    def expert_bias(self) -> list[list[float]] | None:
        """Routing bias of each MoE layer (every rank holds the same), for the metrics; None without any."""
        biases = [m.router.expert_bias.tolist() for m in self.module.modules()
                  if isinstance(m, DeepSpeedMoE) and m.cfg.router == "sigmoid"]
        return biases or None
