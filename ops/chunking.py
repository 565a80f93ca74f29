"""Chunk geometry shared by the chunked linear-sequence kernels (Gated DeltaNet, Mamba2 SSD).

A linear-sequence layer carries a state S [d_k, d_v] that decays by alpha_t = exp(g_t) each step.
Inside a chunk of C tokens with cumulative log-decay G_i = g_1 + ... + g_i, a contribution made at j
reaches i >= j scaled by exp(G_i - G_j), and the state entering the chunk reaches i scaled by exp(G_i).
Document boundaries (packed sequences) reset the state: alpha = 0 at the first token of a document,
which in chunk form is a mask "no document start in (j, i]" on those factors (never -inf in G, which
would turn into inf - inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def doc_starts(doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """doc_ids [B, T] -> bool [B, T], True where a new document begins (never at t = 0)."""
    if doc_ids is None:
        return None
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def pad_to_chunks(x: torch.Tensor, chunk: int, dim: int) -> torch.Tensor:
    """Zero-pad dimension `dim` (time) up to a multiple of chunk. Zero k, v, g, beta after the end
    leave every earlier output unchanged."""
    pad = (-x.shape[dim]) % chunk
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, pad]
    return F.pad(x, widths)


@dataclass
class ChunkDecays:
    """Per-chunk decay factors; N chunks of C tokens; heads H (documents broadcast over heads)."""

    within: torch.Tensor  # [B, H, N, C, C]  exp(G_i - G_j) for j <= i in the same document, else 0
    from_state: torch.Tensor  # [B, H, N, C]  exp(G_i) if the entering state reaches i, else 0
    to_end: torch.Tensor  # [B, H, N, C]  exp(G_C - G_j) if j reaches the chunk's last token, else 0
    state: torch.Tensor  # [B, H, N]  exp(G_C) if the entering state survives the chunk, else 0


def chunk_decays(g: torch.Tensor, starts: torch.Tensor | None, chunk: int,
                 dtype: torch.dtype | None = None) -> ChunkDecays:
    """g [B, H, T] log-decays (<= 0), T a multiple of chunk; starts [B, T] bool or None. The cumulative
    sums and exponentials are taken in float32 at least (a bf16 cumsum loses the decays' precision);
    the factors come back in `dtype` (default g's)."""
    b, h, t = g.shape
    n = t // chunk
    dtype = dtype or g.dtype
    G = g.to(torch.promote_types(dtype, torch.float32)).reshape(b, h, n, chunk).cumsum(-1)  # [B, H, N, C]
    if starts is None:
        seg = torch.zeros(b, 1, n, chunk, dtype=torch.long, device=g.device)
    else:  # seg_i = document starts at chunk positions <= i
        seg = starts.reshape(b, 1, n, chunk).long().cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=g.device).tril()
    same = (seg[..., :, None] == seg[..., None, :]) & causal  # [B, 1, N, C, C]
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~same, float("-inf"))
    last = G[..., -1:]  # [B, H, N, 1]
    return ChunkDecays(
        within=diff.exp().to(dtype),
        from_state=(G.exp() * (seg == 0)).to(dtype),
        to_end=((last - G).exp() * (seg == seg[..., -1:])).to(dtype),
        state=(last[..., 0].exp() * (seg[..., -1] == 0)).to(dtype),
    )


@dataclass
class Carry:
    """What a linear-sequence layer takes from the part of the sequence before its input when that part
    runs elsewhere (context parallelism: the previous chunk of the sequence, on another rank). A layer
    given a Carry also returns its final state, for the part after it."""

    conv_halo: torch.Tensor  # [B, K-1, conv channels]: the short convolution's inputs before the first token
    halo_doc_ids: torch.Tensor | None  # [B, K-1] document ids of those inputs (None without documents)
    state: torch.Tensor | None  # [B, H, d_k, d_v] state before the first token (None: zero)
