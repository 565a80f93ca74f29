"""Gated DeltaNet layer (Yang, Kautz & Hatamizadeh 2024), as in the paper and flash-linear-attention:
q/k/v projections -> causal short conv + SiLU -> L2-normalized q, k -> gated delta rule with
alpha = exp(-exp(A_log) * softplus(a(x) + dt_bias)) and beta = sigmoid(b(x)) -> per-head RMSNorm
gated by SiLU(g(x)) -> output projection. Value heads have the key head size (expand_v = 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.chunking import Carry, doc_starts
from ..ops.gated_delta import gated_delta
from ..ops.short_conv import conv_silu
from .config import ModelConfig
from .layers import RMSNorm, init_decay_and_conv


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim, self.chunk = cfg.linear_heads, cfg.linear_head_dim, cfg.chunk_size
        inner = self.heads * self.head_dim
        self.q_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.k_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.v_proj = nn.Linear(cfg.dim, inner, bias=False)
        self.a_proj = nn.Linear(cfg.dim, self.heads, bias=False)  # decay rate (per head, per token)
        self.b_proj = nn.Linear(cfg.dim, self.heads, bias=False)  # write strength beta
        self.g_proj = nn.Linear(cfg.dim, inner, bias=False)  # output gate
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, cfg.conv_size))  # over [q, k, v] channels
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.o_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(inner, cfg.dim, bias=False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        init_decay_and_conv(self.A_log, self.dt_bias, self.conv_weight)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]."""
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        o = gated_deltanet_mix(qkv, self.a_proj(x), self.b_proj(x), self.g_proj(x), self.conv_weight, self.A_log,
                               self.dt_bias, self.o_norm, self.head_dim, self.chunk, doc_ids)
        return self.out_proj(o)


def gated_deltanet_mix(qkv, a, b_logit, gate, conv_weight, A_log, dt_bias, o_norm, head_dim: int, chunk: int,
                       doc_ids: torch.Tensor | None = None, carry: Carry | None = None):
    """The layer between its input and output projections, for the heads given (heads are independent
    here, so a tensor-parallel rank calls it on its own heads: parallelism/megatron/hybrid.py).
    qkv [B, T, 3*H*d] ([q; k; v] channels), a and b_logit [B, T, H], gate [B, T, H*d] -> [B, T, H*d];
    with a `carry` (ops/chunking.py) -> (that, final state [B, H, d, d])."""
    b, t, heads = a.shape
    halo = {} if carry is None else {"halo": carry.conv_halo, "halo_doc_ids": carry.halo_doc_ids}
    qkv = conv_silu(qkv, conv_weight.to(qkv.dtype), doc_ids, **halo)
    q, k, v = (y.view(b, t, heads, head_dim).transpose(1, 2) for y in qkv.chunk(3, dim=-1))
    q = F.normalize(q, dim=-1) / math.sqrt(head_dim)  # [B, H, T, d]
    k = F.normalize(k, dim=-1)
    beta = torch.sigmoid(b_logit).transpose(1, 2)  # [B, H, T]
    g = -A_log.exp() * F.softplus(a + dt_bias)  # [B, T, H] log-decay
    state = {} if carry is None else {"initial_state": carry.state, "return_final_state": True}
    o = gated_delta(q, k, v, g.transpose(1, 2), beta, chunk, doc_starts(doc_ids), **state)
    o, final = o if carry is not None else (o, None)
    o = o_norm(o.transpose(1, 2))  # [B, T, H, d]
    o = (o * F.silu(gate).view(b, t, heads, head_dim)).reshape(b, t, -1)
    return o if carry is None else (o, final)
