"""FLOPs per token and parameter counts for every layer kind, for MFU and for planning.

Only matrix products are counted (2 FLOPs per multiply-add); norms, activations, gates, the short
convolution and softmax are not (the usual MFU convention, and what torch's FlopCounterMode counts).
Backward is counted as twice forward, so every figure is fwd + bwd = 3 x forward.

Two conventions for attention's score and value products:
- "megatron" (for MFU): each query attends the keys its mask allows; plain causal counts S/2 keys
  per query as Megatron does, sliding-window and block-sparse the mean number their masks allow.
- "counted": every query meets all S keys, as a dense SDPA (or a masked one) computes and as
  FlopCounterMode counts it; this is what the tests compare with a counted forward + backward.
Multi-head latent attention (`attention: mla`) counts its down/up projections and scores over
qk_nope_head_dim + qk_rope_head_dim channels, values over v_head_dim.
Linear-sequence layers count their chunked form (intra-chunk C x C products, the triangular solve of
Gated DeltaNet as C^2 FLOPs per right-hand side column, the state carried between chunks), in both
conventions. MoE counts the router and the top_k routed plus shared experts a token activates.
Document masks are data-dependent and not reflected (a packed row counts as one sequence).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig


def _mean_keys(cfg: ModelConfig, kind: str, seq: int) -> float:
    """Mean keys a query attends under the mask of attention kind `kind` ("megatron" convention)."""
    if kind == "*":
        return seq / 2
    if kind == "W":
        w = min(cfg.window, seq)
        return (w * (w + 1) / 2 + (seq - w) * w) / seq
    block, total = cfg.sparse_block, 0
    for qb in range(math.ceil(seq / block)):
        rows = min(block, seq - qb * block)
        full = sum(1 for kb in range(qb) if qb - kb < cfg.sparse_local_blocks or kb < cfg.sparse_global_blocks)
        total += full * block * rows + rows * (rows + 1) / 2  # full earlier blocks + causal diagonal block
    return total / seq


def _mla_matrix_params(cfg: ModelConfig) -> int:
    """Weights of one multi-head latent attention layer's projections (models/mla.py); each is used once
    per token, so they are also its projection multiply-adds per token."""
    d, h, qr, kvr = cfg.dim, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    qk, rope, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = d * qr + qr * h * qk if qr else d * h * qk
    return q + d * (kvr + rope) + kvr * h * (cfg.qk_nope_head_dim + v) + h * v * d


def _layer_forward_flops(kind: str, cfg: ModelConfig, seq: int, counted: bool) -> float:
    """Forward matmul FLOPs per token of one layer of `kind`."""
    d = cfg.dim
    if kind in "*WB" and cfg.attention == "mla":  # scores over nope + rope channels, values over v_head_dim
        keys = seq if counted else _mean_keys(cfg, kind, seq)
        channels = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        return 2 * _mla_matrix_params(cfg) + 2 * cfg.num_heads * channels * keys
    if kind in "*WB":
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.attn_head_dim
        keys = seq if counted else _mean_keys(cfg, kind, seq)
        return 2 * d * (h + 2 * kv) * hd + 2 * h * hd * d + 4 * h * hd * keys
    if kind == "-":
        return 6 * d * cfg.ffn_dim
    if kind == "E":
        return 2 * d * cfg.num_experts + 6 * d * cfg.moe_ffn_dim * (cfg.top_k + cfg.shared_experts)
    h, hd = cfg.linear_heads, cfg.linear_head_dim
    inner, c = h * hd, cfg.chunk_size
    padded = math.ceil(seq / c) * c / seq  # the chunked form computes padded tokens too
    if kind == "G":
        proj = 2 * d * (4 * inner + 2 * h) + 2 * inner * d
        # K K^T, Q K^T (4 C d), triangular solves for U and W (2 C d), scores @ U (2 C d),
        # W S, Q S, state update (6 d^2)
        core = h * (4 * c * hd + 2 * c * hd + 2 * c * hd + 6 * hd * hd)
        return proj + core * padded
    if kind == "M":
        n = cfg.ssm_state_dim
        proj = 2 * d * (2 * inner + 2 * n + h) + 2 * inner * d
        core = 2 * c * n + h * (2 * c * hd + 4 * n * hd)  # C B^T once; scores @ x, C S, state update
        return proj + core * padded
    raise ValueError(f"unknown layer kind {kind!r}")


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "megatron") -> dict[str, float]:
    """fwd + bwd FLOPs per token: one entry per layer kind present (summed over its layers), `output`
    (the logits projection) and `total`. convention: "megatron" (MFU) or "counted" (see module doc)."""
    if convention not in ("megatron", "counted"):
        raise ValueError(f"convention must be 'megatron' or 'counted', not {convention!r}")
    result: dict[str, float] = {}
    for kind in cfg.layer_pattern():
        fwd = _layer_forward_flops(kind, cfg, seq_len, convention == "counted")
        result[kind] = result.get(kind, 0.0) + 3 * fwd
    result["output"] = 3 * 2 * cfg.dim * cfg.vocab_size
    result["total"] = sum(result.values())
    return result


def _layer_params(kind: str, cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of one layer of `kind`, its pre-norm included."""
    d = cfg.dim
    if kind in "*WB" and cfg.attention == "mla":
        norms = cfg.q_lora_rank + cfg.kv_lora_rank + d  # latent norms, pre-norm
        return _mla_matrix_params(cfg) + norms, _mla_matrix_params(cfg) + norms
    if kind in "*WB":
        n = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.attn_head_dim + cfg.num_heads * cfg.attn_head_dim * d
        return n + d, n + d
    if kind == "-":
        return 3 * d * cfg.ffn_dim + d, 3 * d * cfg.ffn_dim + d
    if kind == "E":
        expert = 3 * d * cfg.moe_ffn_dim
        common = d * cfg.num_experts + expert * cfg.shared_experts + d
        return common + expert * cfg.num_experts, common + expert * cfg.top_k
    h, hd, k = cfg.linear_heads, cfg.linear_head_dim, cfg.conv_size
    inner = h * hd
    if kind == "G":  # q k v g projections, a b, conv, A_log dt_bias, o_norm, out_proj, pre-norm
        n = 4 * d * inner + 2 * d * h + 3 * inner * k + 2 * h + hd + inner * d + d
        return n, n
    if kind == "M":  # in_proj, conv, A_log dt_bias D, norm, out_proj, pre-norm
        conv = inner + 2 * cfg.ssm_state_dim
        n = d * (inner + conv + h) + conv * k + 3 * h + inner + inner * d + d
        return n, n
    raise ValueError(f"unknown layer kind {kind!r}")


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters, embeddings and output projection included."""
    io = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.dim  # + final norm
    layers = [_layer_params(kind, cfg) for kind in cfg.layer_pattern()]
    return io + sum(t for t, _ in layers), io + sum(a for _, a in layers)


def _sdpa_cpu_fwd(query, key, value, *args, **kwargs) -> int:
    b, h, sq, d = query
    return 2 * b * h * sq * key[2] * (d + value[-1])


def _sdpa_cpu_bwd(grad_out, query, key, value, *args, **kwargs) -> int:
    return 2 * _sdpa_cpu_fwd(query, key, value)


def _grouped_mm(a, b, *args, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[-1]  # [rows, in] x [groups, in, out] or [in, rows] x [rows, out]


def _solve_triangular(a, b, *args, **kwargs) -> int:
    return math.prod(b[:-2]) * a[-1] * a[-1] * b[-1]


def counting_mode() -> FlopCounterMode:
    """FlopCounterMode that also counts the ops torch's counter skips on CPU here: the CPU flash SDPA
    (counted like the GPU ones: all S x S scores), `_grouped_mm`, and triangular solves."""
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd,
        aten._grouped_mm: _grouped_mm,
        aten.linalg_solve_triangular: _solve_triangular,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)
