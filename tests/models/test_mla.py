"""Multi-head latent attention (models/mla.py) against a direct einsum computation written from the
DeepSeek-V2 equations: latents, RMSNorm on them, per-head nope/RoPE query and key parts with one RoPE key
shared by all heads, RoPE as explicit 2x2 rotations per position, softmax scale 1/sqrt(nope + rope).
Plus the config rules and the parameter count `plan` reports for the MLA flavors."""

from __future__ import annotations

import math

import pytest
import torch

from raytron import models
from raytron.models.flops import param_counts
from raytron.models.mla import MultiLatentAttention


def _rms(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotations(seq: int, dim: int, theta: float) -> torch.Tensor:
    """[seq, dim, dim] rotation matrices: channels 2i and 2i+1 (DeepSeek's pairs) rotated by p * theta^(-2i/dim)."""
    rot = torch.zeros(seq, dim, dim, dtype=torch.float64)
    for p in range(seq):
        for i in range(dim // 2):
            angle = p * theta ** (-2 * i / dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = 2 * i, 2 * i + 1
            rot[p, a, a], rot[p, a, b], rot[p, b, a], rot[p, b, b] = c, -s, s, c
    return rot


def naive_mla(layer: MultiLatentAttention, cfg, x: torch.Tensor) -> torch.Tensor:
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    b, s, _ = x.shape
    h, nope, rope, vd, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        c_q = _rms(torch.einsum("bsd,rd->bsr", x, w["wq_a.weight"]), w["q_norm.weight"], cfg.norm_eps)
        q = torch.einsum("bsr,or->bso", c_q, w["wq_b.weight"])
    else:
        q = torch.einsum("bsd,od->bso", x, w["wq.weight"])
    q = q.view(b, s, h, nope + rope)
    down = torch.einsum("bsd,od->bso", x, w["wkv_a.weight"])
    c_kv, k_rope = down[..., :r], down[..., r:]  # latent [b, s, r]; one RoPE key per token [b, s, rope]
    kv = torch.einsum("bsr,or->bso", _rms(c_kv, w["kv_norm.weight"], cfg.norm_eps), w["wkv_b.weight"])
    kv = kv.view(b, s, h, nope + vd)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    rot = _rotations(s, rope, cfg.rope_theta)
    q_rope = torch.einsum("sij,bshj->bshi", rot, q[..., nope:])
    k_rope = torch.einsum("sij,bsj->bsi", rot, k_rope)
    scores = (torch.einsum("bqhc,bkhc->bhqk", q[..., :nope], k_nope)
              + torch.einsum("bqhc,bkc->bhqk", q_rope, k_rope)) / math.sqrt(nope + rope)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhv->bqhv", probs, v).reshape(b, s, h * vd)
    return torch.einsum("bsi,oi->bso", out, w["wo.weight"])


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 0}, {"qk_rope_head_dim": 4, "v_head_dim": 24}])
def test_mla_matches_naive_einsum(overrides):
    cfg = models.get_config("moe", "debug-mla", **overrides)
    torch.manual_seed(0)
    layer = MultiLatentAttention(cfg)
    for p in layer.parameters():  # norms away from 1 so their weights matter
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.1)
    x = torch.randn(2, 19, cfg.dim, dtype=torch.float64)
    got = layer.double()(x)
    # float64 throughout except RoPE, which rotates in float32 (models/layers.py apply_rope)
    torch.testing.assert_close(got, naive_mla(layer, cfg, x), rtol=1e-6, atol=1e-7)
    assert hasattr(layer, "wq") == (cfg.q_lora_rank == 0)


def test_rope_key_is_one_per_token_shared_by_heads():
    cfg = models.get_config("moe", "debug-mla")
    layer = MultiLatentAttention(cfg)
    assert layer.wkv_a.weight.shape == (cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.dim)
    assert layer.wkv_b.weight.shape == (cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)


@pytest.mark.parametrize("overrides,words", [
    ({"num_kv_heads": 2}, "set num_kv_heads = num_heads"),
    ({"qk_rope_head_dim": 5}, "qk_rope_head_dim 5 must be even"),
    ({"kv_lora_rank": 0}, "kv_lora_rank=0"),
    ({"attention": "mqa"}, "use 'gqa' or 'mla'"),
])
def test_bad_mla_config_is_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        models.get_config("moe", "debug-mla", **overrides)


@pytest.mark.parametrize("flavor", ["debug-mla", "deepseek-small-mla"])
def test_param_counts_of_mla_flavors(flavor):
    """param_counts (FLOPs/MFU, study) and plan's meta-device count agree, and equal the hand count."""
    from raytron.parallelism.estimate import model_stats

    cfg = models.get_config("moe", flavor)
    d, h, nope, rope, v = cfg.dim, cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * (nope + rope) if cfg.q_lora_rank else \
        d * h * (nope + rope)
    attn = q + d * (cfg.kv_lora_rank + rope) + cfg.kv_lora_rank + cfg.kv_lora_rank * h * (nope + v) + h * v * d + d
    base = models.get_config("moe", flavor, attention="gqa", num_kv_heads=cfg.num_heads)
    gqa_attn = 4 * d * h * base.attn_head_dim + d
    stats = model_stats(cfg)
    assert param_counts(cfg) == (stats.total_params, stats.active_params)
    assert stats.total_params - model_stats(base).total_params == cfg.num_layers * (attn - gqa_attn)
