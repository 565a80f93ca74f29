"""Mamba2 layer (Dao & Gu 2024) with one B/C group: in_proj -> [z, x, B, C, dt]; causal short conv +
SiLU on [x, B, C]; SSD scan with A = -exp(A_log), dt = softplus(dt + dt_bias); skip D x; RMSNorm of
y * SiLU(z) (norm after gate, as in mamba_ssm's RMSNormGated); output projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.chunking import doc_starts
from ..ops.short_conv import conv_silu
from ..ops.ssd import ssd
from .config import ModelConfig
from .layers import RMSNorm, init_decay_and_conv


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim, self.chunk = cfg.linear_heads, cfg.linear_head_dim, cfg.chunk_size
        self.state_dim = cfg.ssm_state_dim
        self.inner = self.heads * self.head_dim
        conv_channels = self.inner + 2 * self.state_dim
        self.in_proj = nn.Linear(cfg.dim, self.inner + conv_channels + self.heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(conv_channels, cfg.conv_size))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm = RMSNorm(self.inner, cfg.norm_eps)
        self.out_proj = nn.Linear(self.inner, cfg.dim, bias=False)
        self.reset_special_parameters()

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        init_decay_and_conv(self.A_log, self.dt_bias, self.conv_weight)
        self.D.fill_(1.0)  # the skip x * D starts as the identity (mamba_ssm)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]."""
        b, t, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * self.state_dim, self.heads], dim=-1)
        xbc = conv_silu(xbc, self.conv_weight.to(x.dtype), doc_ids)
        xs, b_in, c_in = xbc.split([self.inner, self.state_dim, self.state_dim], dim=-1)
        xs = xs.view(b, t, self.heads, self.head_dim)  # [B, T, H, P]
        y = ssd_mix(xs, b_in, c_in, dt, self.A_log, self.dt_bias, self.D, self.chunk, doc_ids)
        y = self.norm(y.reshape(b, t, self.inner) * F.silu(z))
        return self.out_proj(y)


def ssd_mix(xs, b_in, c_in, dt, A_log, dt_bias, D, chunk: int, doc_ids: torch.Tensor | None = None,
            initial_state: torch.Tensor | None = None, return_final_state: bool = False):
    """SSD scan plus the skip term for the heads given (heads are independent given the shared B/C, so a
    tensor-parallel rank calls it on its own heads: parallelism/megatron/hybrid.py).
    xs [B, T, H, P], b_in and c_in [B, T, N], dt [B, T, H] before softplus -> y [B, T, H, P]; the state
    options as ops.ssd.ssd_chunked (then -> (y, final state [B, H, N, P]))."""
    dt = F.softplus(dt + dt_bias)  # [B, T, H]
    y = ssd(xs, dt, -A_log.exp().to(xs.dtype), b_in, c_in, chunk, doc_starts(doc_ids), initial_state=initial_state,
            return_final_state=return_final_state)
    y, final = y if return_final_state else (y, None)
    y = y + D[:, None].to(xs.dtype) * xs
    return (y, final) if return_final_state else y
