"""Our ModelConfig -> the arguments of the TorchTitan 0.3.0 model that has its shape (no TorchTitan needed, so
tests/benchmarks checks the mapping on CPU; bench_torchtitan.py builds the models with TorchTitan's own code and
refuses a parameter count other than the one computed here).

- dense: its Llama 3 (`llama3_shape`), parameter for parameter ours;
- MoE: its Qwen3-MoE (`qwen3_moe_shape`), the MoE model it ships with softmax top-k routing. It always has
  per-head q/k RMSNorms (2 x head size parameters a layer more than ours: `qwen3_moe_param_count`), RMSNorm eps
  1e-6 and balances experts without an auxiliary loss (a per-expert routing bias updated before each optimizer
  step); `QWEN3_MOE_DIFFERENCES` says so in every record. The matmuls are the same as ours, FLOPs/token too.
"""

from __future__ import annotations

from raytron import models

POWERS_OF_TWO = tuple(2**k for k in range(10, -1, -1))  # multiple_of candidates, largest first
QWEN3_MOE_DIFFERENCES = (
    "per-head q/k RMSNorm (Qwen3; +2 x head size parameters a layer)",
    "RMSNorm eps 1e-6 (Qwen3's, fixed)",
    "balancing: aux-loss-free routing bias (load_balance_coeff 1e-3, updated before each optimizer step) "
    "instead of raytron's auxiliary loss",
)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """TorchTitan 0.3.0's compute_ffn_hidden_dim (models/common/feed_forward.py), restated so the mapping can be
    checked without it; the GPU run builds with its own function and checks the parameter count."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _refuse(model: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"TorchTitan's {model} cannot express " + "; ".join(problems))


def llama3_shape(cfg: models.ModelConfig) -> dict:
    """TorchTitan llama3 arguments that reproduce our dense ModelConfig; ValueError for what its Llama 3 cannot
    express (non-attention or MoE layers, head size other than dim / heads, RMSNorm eps other than 1e-5, a
    SwiGLU width that no multiple_of yields)."""
    pattern = cfg.layer_pattern()
    n_layers = len(pattern) // 2
    problems = []
    if pattern != "*-" * n_layers:
        problems.append(f"layer pattern {pattern!r} (llama3 blocks are causal attention + SwiGLU MLP)")
    if cfg.attn_head_dim * cfg.num_heads != cfg.dim:
        problems.append(f"head size {cfg.attn_head_dim} != dim / heads")
    if cfg.norm_eps != 1e-5:  # RMSNorm.Config's default, which _build_llama3_layers keeps
        problems.append(f"norm_eps {cfg.norm_eps}")
    multiple_of = next((m for m in POWERS_OF_TWO if ffn_hidden_dim(cfg.dim, m) == cfg.ffn_dim), None)
    if multiple_of is None:
        problems.append(f"ffn_dim {cfg.ffn_dim}: no multiple_of in {POWERS_OF_TWO} gives it from dim {cfg.dim}")
    _refuse("llama3", problems)
    return {"dim": cfg.dim, "n_layers": n_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
            "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": None,
            "rope_theta": cfg.rope_theta, "enable_weight_tying": cfg.tie_embeddings}


def llama3_param_count(shape: dict) -> int:
    """Parameters of TorchTitan's Llama3Model of `shape`, module by module: per block the fused wqkv
    ((heads + 2 kv heads) x head size x dim), wo, w1 / w3 / w2 and two RMSNorm weights; the token embedding, the
    final norm and lm_head (one matrix when tied). No biases (its Linear.Config default)."""
    d, heads, kv = shape["dim"], shape["n_heads"], shape["n_kv_heads"]
    head = d // heads
    hidden = ffn_hidden_dim(d, shape["multiple_of"], shape["ffn_dim_multiplier"])
    block = (heads + 2 * kv) * head * d + heads * head * d + 3 * d * hidden + 2 * d
    return shape["n_layers"] * block + shape["vocab_size"] * d * (1 if shape["enable_weight_tying"] else 2) + d


def qwen3_moe_shape(cfg: models.ModelConfig) -> dict:
    """TorchTitan qwen3 MoE arguments (its `_build_qwen3_moe_layers`) at our MoE ModelConfig's shape; ValueError
    for what its Qwen3-MoE cannot express: other layers than attention + MoE, shared experts, sigmoid routing,
    scores not renormalized over the top k (its route_norm=True), a capacity factor (it is dropless), tied
    embeddings (its MoE flavors keep lm_head apart)."""
    pattern = cfg.layer_pattern()
    n_layers = len(pattern) // 2
    problems = []
    if pattern != "*E" * n_layers:
        problems.append(f"layer pattern {pattern!r} (qwen3 MoE blocks are causal attention + MoE)")
    if cfg.shared_experts:
        problems.append(f"{cfg.shared_experts} shared experts")
    if cfg.router != "softmax" or not cfg.norm_topk:
        problems.append(f"router {cfg.router!r} with norm_topk={cfg.norm_topk} (it routes by softmax, renormalized)")
    if cfg.capacity_factor:
        problems.append(f"capacity_factor {cfg.capacity_factor} (it is dropless)")
    if cfg.tie_embeddings:
        problems.append("tied embeddings")
    _refuse("qwen3 MoE", problems)
    return {"dim": cfg.dim, "n_layers": n_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.attn_head_dim, "moe_hidden_dim": cfg.moe_ffn_dim, "num_experts": cfg.num_experts,
            "top_k": cfg.top_k, "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta}


def qwen3_moe_param_count(shape: dict) -> int:
    """Parameters of TorchTitan's Qwen3Model of a MoE `shape`: per block the fused wqkv, wo, the q and k norms
    (head size each), two RMSNorm weights, the router gate (experts x dim, no bias) and the grouped experts'
    w1 / w3 / w2; the token embedding, the final norm and lm_head. Its expert bias and token counts are buffers."""
    d, heads, kv, head = shape["dim"], shape["n_heads"], shape["n_kv_heads"], shape["head_dim"]
    experts, hidden = shape["num_experts"], shape["moe_hidden_dim"]
    block = (heads + 2 * kv) * head * d + heads * head * d + 2 * head + 2 * d + experts * d + 3 * experts * hidden * d
    return shape["n_layers"] * block + 2 * shape["vocab_size"] * d + d
