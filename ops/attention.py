"""Attention kernels and their reference.

`attention(...)` is the fast path: plain causal goes to torch SDPA (flash / cuDNN on GPU, fused C++ on
CPU); sliding-window, block-sparse and document masks go to FlexAttention on GPU (compiled, block mask
skips empty tiles) and to SDPA with a dense boolean mask on CPU (FlexAttention has no CPU backward).
Every variant is one `mask_mod(b, h, q_idx, kv_idx) -> bool` so FlexAttention and the dense mask agree
by construction. `reference_attention(...)` is the explicit masked softmax every path is tested against.
Shapes: q [batch, heads, seq, head_dim]; k, v [batch, kv_heads, seq, head_dim] (GQA: heads % kv_heads == 0).
RoPE is relative, so packed documents need no position reset: the document mask alone makes a packed
row compute what each document would compute alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockSparse:
    """Static block pattern: query block i sees key blocks j <= i with i - j < local or j < global_."""

    block: int
    """Tokens per block."""
    local: int = 2
    """Nearest key blocks (including the diagonal one) every query block attends."""
    global_: int = 1
    """Leading key blocks every query block attends (attention sinks)."""


def document_offsets(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, S] (documents contiguous) -> [B, S] position of each token's document start."""
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(is_start, pos, 0).cummax(dim=1).values


def make_mask_mod(window: int = 0, doc_ids: torch.Tensor | None = None,
                  sparse: BlockSparse | None = None) -> MaskMod:
    """Causal mask, narrowed by a sliding window, a block-sparse pattern and/or documents (doc_ids [B, S]).
    With documents, sparse blocks are counted from each document's start (as if it were alone)."""
    offsets = document_offsets(doc_ids) if doc_ids is not None and sparse is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if window > 0:
            allowed = allowed & (kv_idx > q_idx - window)
        if sparse is not None:
            q_pos, kv_pos = q_idx, kv_idx
            if offsets is not None:
                q_pos, kv_pos = q_idx - offsets[b, q_idx], kv_idx - offsets[b, kv_idx]
            qb, kb = q_pos // sparse.block, kv_pos // sparse.block
            allowed = allowed & ((qb - kb < sparse.local) | (kb < sparse.global_))
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return allowed

    return mask_mod


def dense_mask(mask_mod: MaskMod, batch: int, seq: int, device=None, seq_k: int | None = None) -> torch.Tensor:
    """Materialize a mask_mod as boolean [batch, 1, seq, seq_k] (True = attend; seq_k defaults to seq)."""
    seq_k = seq if seq_k is None else seq_k
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(seq, device=device)[None, None, :, None]
    kv = torch.arange(seq_k, device=device)[None, None, None, :]
    return mask_mod(b, torch.zeros_like(b), q, kv).expand(batch, 1, seq, seq_k)


def causal_mask(seq_q: int, seq_k: int, window: int = 0, device=None) -> torch.Tensor:
    """Boolean [seq_q, seq_k] mask, True where attention is allowed (queries are the last seq_q keys)."""
    q_pos = torch.arange(seq_k - seq_q, seq_k, device=device)[:, None]
    k_pos = torch.arange(seq_k, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window > 0:
        allowed &= k_pos > q_pos - window
    return allowed


def _expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def reference_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d) + mask) v in float32 (float64 stays float64); mask is boolean,
    True = attend, broadcastable to [batch, heads, seq_q, seq_k]."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(dtype), k.to(dtype)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(dtype)).to(q.dtype)


_compiled_flex = None


def flex_attention(q, k, v, mask_mod: MaskMod, compiled: bool = True, scale: float | None = None) -> torch.Tensor:
    """FlexAttention with a block mask built from mask_mod. Compiled (Triton) on GPU; eager (forward
    only, materializes scores) elsewhere, which is only useful to test the mask semantics."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    b, _, sq, _ = q.shape
    block_mask = create_block_mask(mask_mod, b, None, sq, k.shape[2], device=q.device)
    fn = flex
    if compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def attention(q, k, v, window: int = 0, doc_ids: torch.Tensor | None = None,
              sparse: BlockSparse | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention, optionally sliding-window / block-sparse / document-masked (doc_ids [B, S]).
    scale: 1/sqrt(d) if None."""
    gqa = k.shape[1] != q.shape[1]
    if window <= 0 and doc_ids is None and sparse is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask_mod = make_mask_mod(window, doc_ids, sparse)
    if q.is_cuda:
        return flex_attention(q, k, v, mask_mod, scale=scale)
    mask = dense_mask(mask_mod, q.shape[0], q.shape[2], q.device, seq_k=k.shape[2])  # [B, 1, Sq, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
