"""The model: token embedding, a stack of pre-norm residual layers given by the layer pattern, final
norm and output projection. One class serves dense, MoE and hybrid families."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from ..ops.attention import BlockSparse
from .layers import Attention, RMSNorm, SwiGLU
from .mla import MultiLatentAttention
from .moe import MoE


def make_mixer(kind: str, cfg: ModelConfig) -> nn.Module:
    """The module for one layer-pattern character (attention layers of the kind cfg.attention selects)."""
    attn = MultiLatentAttention if cfg.attention == "mla" else Attention
    if kind == "*":
        return attn(cfg)
    if kind == "W":
        return attn(cfg, window=cfg.window)
    if kind == "B":
        return attn(cfg, sparse=BlockSparse(cfg.sparse_block, cfg.sparse_local_blocks, cfg.sparse_global_blocks))
    if kind == "-":
        return SwiGLU(cfg.dim, cfg.ffn_dim)
    if kind == "E":
        return MoE(cfg)
    if kind == "G":
        from .gated_deltanet import GatedDeltaNet

        return GatedDeltaNet(cfg)
    if kind == "M":
        from .mamba2 import Mamba2

        return Mamba2(cfg)
    raise ValueError(f"unknown layer kind {kind!r}")


SEQUENCE_MIXERS = "*WBGM"  # kinds that mix across positions (and so take doc_ids)


class Layer(nn.Module):
    """x + mixer(norm(x))."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = make_mixer(kind, cfg)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind in SEQUENCE_MIXERS:
            return x + self.mixer(self.norm(x), doc_ids=doc_ids)
        return x + self.mixer(self.norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Layer(kind, cfg) for kind in cfg.layer_pattern())
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, ones for norms; output projections scaled by depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or p.dim() == 1:
                nn.init.ones_(p) if "norm" in name else nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w_down.weight", "w_down", "out_proj.weight")):
                nn.init.normal_(p, std=std / (2 * len(self.layers)) ** 0.5)
            else:
                nn.init.normal_(p, std=std)
        for module in self.modules():  # layer-specific parameters (decay rates, conv kernels, ...)
            if hasattr(module, "reset_special_parameters"):
                module.reset_special_parameters()

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [batch, seq] int64 -> logits [batch, seq, vocab].

        doc_ids [batch, seq] (optional, any integers, equal within a packed document and documents
        contiguous): attention stays inside each document and linear layers restart their state and
        short convolutions at each document start. None = one causal sequence per row."""
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, doc_ids)
        return self.output(self.norm(h))

    def aux_losses(self) -> list[torch.Tensor]:
        """MoE load-balancing losses of the last forward, one per MoE layer."""
        return [m.last_aux_loss for m in self.modules() if isinstance(m, MoE) and m.last_aux_loss is not None]

    def z_losses(self) -> list[torch.Tensor]:
        """Router z-losses of the last forward (unweighted), one per MoE layer."""
        return [m.last_z_loss for m in self.modules() if isinstance(m, MoE) and m.last_z_loss is not None]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]
