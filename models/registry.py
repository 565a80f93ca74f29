"""Registry of families and their named flavors. Adding a family is one entry here plus its config;
no engine or launcher code changes."""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import ModelConfig
from .transformer import Transformer

# family -> flavor -> ModelConfig fields. Every family has `debug` (trains on CPU in seconds).
FLAVORS: dict[str, dict[str, dict]] = {
    "dense": {
        "debug": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=172),
        "1b": dict(vocab_size=32000, dim=2048, num_layers=16, num_heads=16, num_kv_heads=8, ffn_dim=5632),
        # Llama-3.2-3B's shape (GQA 24:8, SwiGLU 8192) at a 32000 vocabulary: 3.2B parameters untied
        "3b": dict(vocab_size=32000, dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_dim=8192,
                   rope_theta=500000.0),
    },
    "moe": {
        "debug": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                      moe_ffn_dim=96),
        "olmoe": dict(vocab_size=50304, dim=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                      num_experts=64, top_k=8, moe_ffn_dim=1024),
        "deepseek-small": dict(vocab_size=32000, dim=1024, num_layers=12, num_heads=16, num_kv_heads=16,
                               num_experts=64, top_k=6, moe_ffn_dim=352, shared_experts=2,
                               router="sigmoid", bias_update_rate=1e-3),
        # deepseek-small with DeepSeek-V2-Lite-style multi-head latent attention (no query latent)
        "deepseek-small-mla": dict(vocab_size=32000, dim=1024, num_layers=12, num_heads=16, num_kv_heads=16,
                                   num_experts=64, top_k=6, moe_ffn_dim=352, shared_experts=2,
                                   router="sigmoid", bias_update_rate=1e-3, attention="mla", kv_lora_rank=256,
                                   qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
        # same shape as `debug`, exercising the other router / balancing / capacity settings
        "debug-sigmoid": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2,
                              moe_ffn_dim=32, shared_experts=1, router="sigmoid", bias_update_rate=1e-2),
        "debug-capacity": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                               moe_ffn_dim=96, capacity_factor=1.25),
        # `debug` with multi-head latent attention (query and key/value latents)
        "debug-mla": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=4, num_experts=4, top_k=2, moe_ffn_dim=96,
                          attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16),
    },
    # 3:1 linear:attention hybrids (pattern chars in config.py); chunk_size 64 for real flavors
    "hybrid": {
        "debug": dict(dim=64, pattern="G-*-M-W-", num_heads=4, num_kv_heads=2, ffn_dim=172, window=16,
                      linear_heads=4, linear_head_dim=16, chunk_size=16),
        "debug-moe": dict(dim=64, pattern="GEBE|GE*E", num_heads=4, num_kv_heads=2, num_experts=8, top_k=2,
                          moe_ffn_dim=32, linear_heads=4, linear_head_dim=16, chunk_size=16, sparse_block=8),
        "1b": dict(vocab_size=32000, dim=2048, pattern="G-G-G-*-" * 4, num_heads=16, num_kv_heads=8,
                   ffn_dim=5632, linear_heads=16, linear_head_dim=128, chunk_size=64),
        "1b-mamba": dict(vocab_size=32000, dim=2048, pattern="M-M-M-*-" * 4, num_heads=16, num_kv_heads=8,
                         ffn_dim=5632, linear_heads=32, linear_head_dim=64, ssm_state_dim=128, chunk_size=64),
        # for TP2 / PP2 / EP8: 2 pipeline stages of 16 layers, 64 experts, heads and kv heads even
        "moe-hybrid": dict(vocab_size=50304, dim=2048, pattern="GEGEGE*E" * 2 + "|" + "GEGEGE*E" * 2,
                           num_heads=16, num_kv_heads=8, num_experts=64, top_k=8, moe_ffn_dim=1024,
                           linear_heads=16, linear_head_dim=128, chunk_size=64),
    },
}


def list_flavors() -> list[tuple[str, str]]:
    return [(family, flavor) for family, flavors in FLAVORS.items() for flavor in flavors]


def get_config(family: str, flavor: str, **overrides) -> ModelConfig:
    if family not in FLAVORS:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(FLAVORS)}")
    if flavor not in FLAVORS[family]:
        raise KeyError(f"unknown flavor {flavor!r} of {family!r}; known: {', '.join(FLAVORS[family])}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise KeyError(f"unknown model override(s) {bad}; fields: {', '.join(sorted(known))}")
    return ModelConfig(**{**FLAVORS[family][flavor], **overrides})


def build(family: str, flavor: str, **overrides) -> nn.Module:
    """A freshly initialized reference model (CPU, float32; seed with torch.manual_seed first)."""
    return Transformer(get_config(family, flavor, **overrides))
