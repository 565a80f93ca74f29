"""Building blocks shared by every family: RMSNorm, RoPE, grouped-query attention, SwiGLU, and the init of the
linear-sequence layers' decay and short convolution (Gated DeltaNet, Mamba2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import BlockSparse, attention
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


@torch.no_grad()
def init_decay_and_conv(A_log: torch.Tensor, dt_bias: torch.Tensor, conv_weight: torch.Tensor) -> None:
    """The Mamba2 / Gated DeltaNet init (mamba_ssm's defaults): A in [1, 16], dt in [1e-3, 0.1] log-uniform and
    stored as its inverse softplus, the depthwise conv [channels, kernel] uniform like nn.Conv1d's. In this order:
    the random draws of a seeded model depend on it."""
    A_log.copy_(torch.empty_like(A_log).uniform_(1, 16).log())
    dt = torch.exp(torch.empty_like(dt_bias).uniform_(math.log(1e-3), math.log(0.1)))
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    bound = 1 / math.sqrt(conv_weight.shape[1])
    conv_weight.uniform_(-bound, bound)


def rope_tables(seq: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq, head_dim // 2] for rotary embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x [batch, heads, seq, head_dim] (NeoX layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[..., 2i], x[..., 2i+1]) of x [batch, heads, seq, d] by frequency i: DeepSeek's
    layout for latent attention's RoPE channels (megatron-core's MLA applies it the same way)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal attention with RoPE; `window` > 0 makes it sliding-window, `sparse` gives it
    a static block-sparse pattern; `doc_ids` [B, S] in forward confines it to each packed document."""

    def __init__(self, cfg: ModelConfig, window: int = 0, sparse: BlockSparse | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.attn_head_dim
        self.window, self.sparse, self.theta = window, sparse, cfg.rope_theta
        self.wq = nn.Linear(cfg.dim, self.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_tables(s, self.head_dim, self.theta, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, window=self.window, doc_ids=doc_ids, sparse=self.sparse)  # [b, heads, s, head_dim]
        return self.wo(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
