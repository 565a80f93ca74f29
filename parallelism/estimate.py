"""Parameter counts and activation sizes for planning, without GPUs and without weights.

Parameters are counted exactly by building the registry's model on the `meta` device (shapes only, no
storage), per layer, so memory can be split by pipeline stage and experts told apart from dense weights.
FLOPs per token come from the model registry (`raytron.models.flops_per_token`, Megatron's MFU
convention: 3 x forward, causal attention halved, logits counted, MoE active experts only).
Activation sizes are per layer kind, counted from what the reference model saves for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engines import get_engine
from .layout import ATTENTION_KINDS, LINEAR_KINDS


@dataclass(frozen=True)
class LayerStats:
    """Counts for one residual layer (its pre-norm included)."""

    kind: str
    """Layer-pattern character (`*`, `W`, `B`, `G`, `M`, `-`, `E`)."""
    params: int
    """All parameters of the layer."""
    expert_params: int
    """Routed-expert parameters (stacked [experts, ...] weights of an `E` layer); split by ep*etp."""


@dataclass(frozen=True)
class ModelStats:
    """Exact parameter counts of a model plus the per-layer breakdown the estimates need."""

    layers: tuple[LayerStats, ...]
    """One entry per residual layer, in order."""
    embedding_params: int
    """Input embedding (first pipeline stage)."""
    head_params: int
    """Final norm + output projection (last pipeline stage); 0 extra when tied and pp == 1."""
    tied: bool
    """Input embedding and output projection share one weight."""
    total_params: int
    """Every parameter once."""
    active_params: int
    """Parameters a token touches: routed experts scaled by top_k / num_experts."""


def model_stats(cfg: Any, build: Any = None) -> ModelStats:
    """Count parameters of the registry model for `cfg` on the meta device (no memory, exact shapes)."""
    import torch

    if build is None:
        from ..models import Transformer as build
    with torch.device("meta"):
        model = build(cfg)
    experts, top_k = cfg.num_experts, cfg.top_k
    layers = []
    for layer in model.layers:
        params = expert = 0
        for _, p in layer.named_parameters():
            params += p.numel()
            if layer.kind == "E" and p.dim() == 3 and p.shape[0] == experts:
                expert += p.numel()
        layers.append(LayerStats(layer.kind, params, expert))
    embed = model.embed.weight.numel()
    tied = model.output.weight is model.embed.weight
    head = model.norm.weight.numel() + (0 if tied else model.output.weight.numel())
    total = sum(p.numel() for p in model.parameters())
    routed = sum(s.expert_params for s in layers)
    active = total - routed + (routed * top_k // experts if experts else 0)
    return ModelStats(tuple(layers), embed, head, tied, total, active)


def flops_per_token(cfg: Any, seq_len: int, convention: str = "megatron") -> float:
    """Training (forward + backward) FLOPs per token from the model registry (`raytron.models.flops`):
    "megatron" for MFU (causal attention halved), "counted" as FlopCounterMode counts dense SDPA."""
    from ..models import flops_per_token as registry_flops

    return float(registry_flops(cfg, seq_len, convention)["total"])


def layer_activation_elements(cfg: Any, kind: str, seq_len: int, dense_mask: bool = False) -> float:
    """Elements per token one layer keeps for backward (no recomputation), counted from the tensors the
    reference model's autograd saves (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded.
    `dense_mask`: sliding-window / block-sparse attention builds a dense [b, 1, s, s] mask (the CPU
    path; FlexAttention on GPU does not)."""
    d, heads = cfg.dim, cfg.num_heads
    out = 3.0 * d + 1  # pre-norm: its input, x * rsqrt, the normalized output; rsqrt
    if kind in ATTENTION_KINDS and cfg.attention == "mla":
        latents, qkv, o = _mla_activation_elements(cfg)
        out += latents + qkv + 2 * o + heads  # + SDPA output, its copy and log-sum-exp as below
        if dense_mask and kind in "WB":
            out += seq_len
    elif kind in ATTENTION_KINDS:
        hd = cfg.attn_head_dim
        # q and k after RoPE, v, SDPA output and its [b, s, heads*hd] copy, one log-sum-exp per head
        out += 3 * heads * hd + 2 * cfg.num_kv_heads * hd + heads
        if dense_mask and kind in "WB":
            out += seq_len
    elif kind == "-":
        out += 4 * cfg.ffn_dim  # gate, up, silu(gate), their product
    elif kind == "E":
        k, f = cfg.top_k, cfg.moe_ffn_dim
        # per routed copy: gathered input, gate/up/silu/product, expert output and its weighted copy;
        # router probabilities; ids, weights and sort indices (int64 counted as two elements)
        out += k * (3 * d + 4 * f) + cfg.num_experts + 9 * k + 4 * f * cfg.shared_experts
    elif kind in LINEAR_KINDS:
        out += _linear_activation_elements(cfg, kind)
    return out


def selective_activation_elements(cfg: Any, kind: str, seq_len: int, engine: str, dense_mask: bool = False) -> float:
    """Elements per token one layer keeps for backward under train.recompute=selective (the tensors a
    checkpointed region keeps are its inputs; what it saves inside is rebuilt in backward).
    deepspeed: each attention / linear-sequence mixer is checkpointed whole, so only the pre-norm's
    tensors stay (the mixer's input is the norm's output). megatron: attention keeps q, k, v (the core's
    inputs) and the output projection's input, not the SDPA output, log-sum-exp or a dense mask; Gated
    DeltaNet keeps its in-projection and the core's output, Mamba2 everything but the chunk matrices and
    states. MLP and MoE layers are not recomputed by either engine."""
    full = layer_activation_elements(cfg, kind, seq_len, dense_mask)
    if kind in "-E":
        return full
    norm = 3.0 * cfg.dim + 1
    if not get_engine(engine).memory.selective_keeps_mixer_inputs:
        return norm
    if kind in ATTENTION_KINDS and cfg.attention == "mla":
        latents, qkv, o = _mla_activation_elements(cfg)
        return norm + latents + qkv + o
    if kind in ATTENTION_KINDS:
        return norm + 2 * cfg.num_heads * cfg.attn_head_dim + 2 * cfg.num_kv_heads * cfg.attn_head_dim
    h, inner = cfg.linear_heads, cfg.linear_heads * cfg.linear_head_dim
    if kind == "G":
        return norm + 5 * inner + 2 * h
    conv = inner + 2 * cfg.ssm_state_dim
    return norm + (inner + conv + h) + 2 * conv + 4 * inner + 4 * h


def _mla_activation_elements(cfg: Any) -> tuple[float, float, float]:
    """Multi-head latent attention (models/mla.py) per token: (latent tensors: the query latent, its norm's
    product and output, the down projection's [kv latent; RoPE key] output, the kv norm's product and
    output; q, k and v as the core attention takes them; one output-sized tensor, [heads * v_head_dim])."""
    h, qr, kvr, rope = cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    latents = (3 * qr + 1 if qr else 0) + (kvr + rope) + 2 * kvr + 1
    qk = h * (cfg.qk_nope_head_dim + rope)
    return float(latents), float(2 * qk + h * cfg.v_head_dim), float(h * cfg.v_head_dim)


def _linear_activation_elements(cfg: Any, kind: str) -> float:
    """Chunked linear-sequence layers as the reference computes them (ops/gated_delta.py, ops/ssd.py):
    projections and short-conv outputs, C x C matrices per chunk and head, a [dk, dv] state per chunk
    and head (fused GPU kernels save less: this is the upper end)."""
    h, c, hd = cfg.linear_heads, cfg.chunk_size, cfg.linear_head_dim
    inner = h * hd
    if kind == "G":
        # q/k/v before and after conv + normalization (9 inner), gated output path (6 inner), gates,
        # 13 chunk matrices (WY / UT transform), 6 chunk states, boolean chunk masks
        return 15 * inner + 8 * h + 13 * h * c + 6 * h * hd * hd / c + c / 4
    n = cfg.ssm_state_dim
    conv = inner + 2 * n
    # in_proj output, conv input/output, gated-norm path (4 inner), dt/A terms, 3 per-head and one shared
    # chunk matrix, 4 chunk states [P, N] per head
    return (inner + conv + h) + 2 * conv + 4 * inner + 4 * h + 3 * h * c + c * 1.25 + 4 * h * hd * n / c


HEAD_LOGIT_ELEMENTS = 3.0
"""Logit-sized tensors alive per token at the start of backward on the last stage: the log-softmax
output saved by the loss, its incoming gradient and the gradient of the logits."""


def head_activation_elements(cfg: Any) -> tuple[float, float]:
    """(final-norm elements, logit elements) per token on the last stage."""
    return 3.0 * cfg.dim + 1, HEAD_LOGIT_ELEMENTS * cfg.vocab_size
