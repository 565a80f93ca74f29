"""Per-GPU memory estimate for a model under a ParallelLayout, one row per pipeline stage.

Model (each assumption is also returned as text, so `raytron plan` prints what it assumed):
- weights: dense parameters of the stage split by tp, routed experts split by ep*etp;
- precision on GPU: bf16 weights (2 B), fp32 gradients (4 B: Megatron's main_grad buffer, DeepSpeed's
  fp32 gradient partitions), Adam state 12 B (fp32 master copy, m, v); on CPU everything fp32 and Adam
  keeps m and v (8 B) plus, under DeepSpeed ZeRO >= 1, its fp32 flat partition copy (4 B);
- sharding over data parallel (dense: dp*cp ranks, experts: edp ranks): optimizer state from
  zero_stage 1 (Megatron: the distributed optimizer), gradients from 2, weights at 3;
- activations: `layer_activation_elements` per token per layer, split over tp (sequence parallel) and
  cp, bf16 on GPU; the first 1F1B stage holds min(pp, grad_accum) micro-batches in flight (interleaving
  multiplies that by 1 + (pp-1)/(pp*vpp)); the last stage adds fp32 logits. train.recompute: `full`
  keeps one hidden state (dim elements per token) per recomputed unit boundary (megatron: each
  TransformerLayer = mixer + ffn pair; deepspeed: each reference layer) and `selective` what
  `selective_activation_elements` says, per micro-batch in flight; both add, once, what backward needs
  beyond that while it rebuilds a unit (its activations, less the kept tensors of the units after it,
  already freed); on the last stage that is not added to the logits' tensors, which backward frees first.
Not included: CUDA context and NCCL buffers (~1-3 GiB per GPU), allocator fragmentation, temporary
buffers of fused kernels, DeepSpeed's communication buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .estimate import (ModelStats, head_activation_elements, layer_activation_elements,
                       selective_activation_elements)
from .engines import get_engine
from .layout import LINEAR_KINDS, ParallelLayout

GiB = float(1 << 30)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state."""

    weight: int
    """Bytes per weight."""
    grad: int
    """Bytes per gradient element kept between backward and the optimizer step."""
    optimizer: int
    """Optimizer bytes per parameter (master copy + Adam moments)."""
    activation: int
    """Bytes per saved activation element."""
    logits: int
    """Bytes per logit element (the loss runs in fp32)."""
    text: str
    """How it was chosen, for the printed assumptions."""


def precision_for(use_gpu: bool, engine: str, zero_stage: int) -> Precision:
    if use_gpu:
        return Precision(2, 4, 12, 2, 4, "bf16 weights/activations, fp32 grads, Adam 12 B/param "
                                           "(fp32 master + m + v), fp32 logits")
    master = 4 if get_engine(engine).memory.cpu_master_copy_with_zero and zero_stage >= 1 else 0
    why = " + ZeRO's fp32 flat partition copy" if master else ""
    return Precision(4, 4, 8 + master, 4, 4, f"fp32 everywhere (CPU), Adam m + v{why}")


@dataclass(frozen=True)
class StageMemory:
    """Bytes one GPU of a pipeline stage needs."""

    stage: int
    """Pipeline stage."""
    weights: float
    """Model weights held by the GPU."""
    grads: float
    """Gradient buffers."""
    optimizer: float
    """Optimizer state (master weights and moments)."""
    activations: float
    """Activations saved for backward at the peak (start of the first backward)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class MemoryEstimate:
    stages: tuple[StageMemory, ...]
    """One row per pipeline stage."""
    assumptions: tuple[str, ...]
    """What the numbers assume, in words."""

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)


def stage_layers(cfg: Any, stats: ModelStats, layout: ParallelLayout) -> list[list[int]]:
    """Layer indices held by each physical pipeline stage (virtual chunk j lives on stage j % pp)."""
    chunks = layout.pp * layout.vpp
    n = len(stats.layers)
    pattern = getattr(cfg, "pattern", "") or ""
    if "|" in pattern:
        sizes = [len(part) for part in pattern.split("|")]
    else:
        sizes = [n // chunks] * chunks
    stages: list[list[int]] = [[] for _ in range(layout.pp)]
    start = 0
    for j, size in enumerate(sizes):
        stages[j % layout.pp].extend(range(start, start + size))
        start += size
    return stages


def _in_flight(layout: ParallelLayout, stage: int) -> float:
    pp = layout.pp
    flight = float(min(pp - stage, layout.grad_accum))
    if layout.vpp > 1:
        flight *= 1 + (pp - 1) / (pp * layout.vpp)
    return flight


def stage_activation_elements(cfg: Any, layers: list[int], stats: ModelStats, seq_len: int, *, dense_mask: bool,
                              engine: str, recompute: str = "none") -> tuple[float, float]:
    """(elements per token each micro-batch in flight keeps for the stage's `layers`, elements per token
    more that backward needs while it rebuilds a recomputed unit) under train.recompute. Backward runs the
    units last to first, so while unit i is rebuilt only units 0..i still hold their kept tensors."""
    kinds = [stats.layers[i].kind for i in layers]
    per = [layer_activation_elements(cfg, k, seq_len, dense_mask) for k in kinds]
    if recompute == "none":
        return sum(per), 0.0
    if recompute == "full":
        unit = get_engine(engine).memory.recompute_unit_layers  # megatron: one TransformerLayer = 2 layers
        rebuilt = [sum(per[j:j + unit]) for j in range(0, len(per), unit)]
        kept = [float(cfg.dim)] * len(rebuilt)
    elif recompute == "selective":
        kept = [selective_activation_elements(cfg, k, seq_len, engine, dense_mask) for k in kinds]
        rebuilt = [p - k for p, k in zip(per, kept)]
    else:
        raise ValueError(f"train.recompute: got {recompute!r}; use none, selective or full")
    total, prefix, worst = sum(kept), 0.0, 0.0
    for k, r in zip(kept, rebuilt):
        prefix += k
        worst = max(worst, prefix + r)
    return total, max(0.0, worst - total)


def estimate_memory(cfg: Any, stats: ModelStats, layout: ParallelLayout, *, seq_len: int, use_gpu: bool,
                    engine: str, recompute: str = "none") -> MemoryEstimate:
    """Per-stage, per-GPU memory of training `cfg` under `layout` (see the module docstring)."""
    prec = precision_for(use_gpu, engine, layout.zero_stage)
    dense_shard, expert_shard = layout.dp * layout.cp, layout.edp
    tokens = layout.micro_batch_size * seq_len / layout.cp
    rows = []
    for stage, idx in enumerate(stage_layers(cfg, stats, layout)):
        dense = sum(stats.layers[i].params - stats.layers[i].expert_params for i in idx)
        if stage == 0:
            dense += stats.embedding_params
        if stage == layout.pp - 1:
            dense += stats.head_params + (stats.embedding_params if stats.tied and layout.pp > 1 else 0)
        dense_gpu = dense / layout.tp
        expert_gpu = sum(stats.layers[i].expert_params for i in idx) / (layout.ep * layout.etp)

        def sharded(bytes_per: int, from_stage: int) -> float:
            if layout.zero_stage >= from_stage:
                return bytes_per * (dense_gpu / dense_shard + expert_gpu / expert_shard)
            return bytes_per * (dense_gpu + expert_gpu)

        kept, rebuilt = stage_activation_elements(cfg, idx, stats, seq_len, dense_mask=not use_gpu, engine=engine,
                                                  recompute=recompute)
        act_bytes = tokens * kept * _in_flight(layout, stage) * prec.activation / layout.tp
        transient = tokens * rebuilt * prec.activation / layout.tp  # a recomputed unit, during backward
        if stage == layout.pp - 1:  # the logits' tensors are freed before the layers' backward begins
            norm, logits = head_activation_elements(cfg)
            transient = max(transient, tokens * (norm * prec.activation + logits * prec.logits) / layout.tp)
        act_bytes += transient
        rows.append(StageMemory(stage, sharded(prec.weight, 3), sharded(prec.grad, 2),
                                sharded(prec.optimizer, 1), act_bytes))
    has_linear = any(s.kind in LINEAR_KINDS for s in stats.layers)
    return MemoryEstimate(tuple(rows), _assumptions(prec, layout, engine, has_linear, recompute))


_RECOMPUTE_TEXT = {
    "none": "no recomputation; per-layer elements per token from the reference model's saved tensors",
    "selective": "selective recomputation (train.recompute): recomputed parts' tensors dropped per layer, "
                 "plus one layer's rebuilt part live in backward",
    "full": "full recomputation (train.recompute): one hidden state per layer boundary ({unit}), plus one "
            "{unit}'s activations rebuilt in backward",
}


def _assumptions(prec: Precision, layout: ParallelLayout, engine: str, has_linear: bool,
                 recompute: str = "none") -> tuple[str, ...]:
    shard = {0: "nothing sharded over DP", 1: "optimizer state sharded over DP",
             2: "optimizer state + gradients sharded over DP", 3: "optimizer, gradients and weights sharded over DP"}
    how = shard[layout.zero_stage]
    facts = get_engine(engine).memory
    if layout.zero_stage == 1:
        how += facts.zero1_note
    return (
        f"precision: {prec.text}",
        f"sharding: zero_stage {layout.zero_stage}: {how}; experts over edp={layout.edp}, dense over dp*cp",
        "activations: " + _RECOMPUTE_TEXT[recompute].format(
            unit=facts.recompute_unit)
        + "; split over tp (sequence parallel) and cp; 1F1B in-flight micro-batches on the first stage",
        "logits: 3 vocab-sized fp32 tensors per token on the last stage (log-softmax, its gradient, logit grad)",
        "not included: CUDA context/NCCL buffers (~1-3 GiB), fragmentation, fused-kernel workspaces",
    ) + (("linear-sequence layers: the reference chunked form's saved tensors (an upper end: fused "
          "kernels keep fewer chunk matrices)",) if has_linear else ())
