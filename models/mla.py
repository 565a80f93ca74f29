"""Multi-head latent attention (MLA, DeepSeek-V2/V3), the `attention: mla` kind of the attention layers.

Keys and values of every head are expanded from one shared low-rank latent per token (kv_lora_rank,
RMS-normalised), queries optionally from their own latent (q_lora_rank, RMS-normalised; 0 projects them
from the hidden state directly). Each head's query and key are [nope part, RoPE part]: the nope parts
come from the latents, the RoPE part of the key (qk_rope_head_dim) is projected from the hidden state
once and shared by all heads ("decoupled RoPE"). Values have their own width v_head_dim, and the softmax
scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim).

Parameter names follow DeepSeek's reference code: `wq` or (`wq_a`, `q_norm`, `wq_b`), `wkv_a` (rows:
[kv latent; shared RoPE key]), `kv_norm`, `wkv_b` (rows per head: [key nope; value]), `wo`. RoPE rotates
adjacent channel pairs (DeepSeek's layout, models/layers.py apply_rope_interleaved; megatron-core's MLA
and transformers' DeepSeek-V3 with rope_interleave do the same), unlike the rotate-half form of `*` GQA.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import BlockSparse, attention
from .config import ModelConfig
from .layers import RMSNorm, apply_rope_interleaved, rope_tables


class MultiLatentAttention(nn.Module):
    """MLA with causal, sliding-window (`window` > 0) or block-sparse (`sparse`) masks; `doc_ids` [B, S]
    in forward confines it to each packed document (as models.layers.Attention)."""

    def __init__(self, cfg: ModelConfig, window: int = 0, sparse: BlockSparse | None = None):
        super().__init__()
        self.heads, self.theta = cfg.num_heads, cfg.rope_theta
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.window, self.sparse = cfg.kv_lora_rank, window, sparse
        q_out = self.heads * (self.nope + self.rope)
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, q_out, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.heads * self.v_dim, cfg.dim, bias=False)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, dim] -> per-head queries [b, s, heads, nope + rope] (before RoPE)."""
        b, s, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        return q.view(b, s, self.heads, self.nope + self.rope)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.project_q(x).transpose(1, 2)  # [b, heads, s, nope + rope]
        latent, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(b, s, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        cos, sin = rope_tables(s, self.rope, self.theta, x.device)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q = torch.cat([q_nope, apply_rope_interleaved(q_rope, cos, sin)], dim=-1)
        k_rope = apply_rope_interleaved(k_rope[:, None], cos, sin).expand(b, self.heads, s, self.rope)  # shared
        k = torch.cat([k_nope, k_rope], dim=-1)
        # SDPA's default scale 1/sqrt(q.shape[-1]) is MLA's 1/sqrt(nope + rope)
        out = attention(q, k, v.contiguous(), window=self.window, doc_ids=doc_ids, sparse=self.sparse)
        return self.wo(out.transpose(1, 2).reshape(b, s, self.heads * self.v_dim))
