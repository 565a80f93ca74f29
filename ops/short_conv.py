"""Causal depthwise short convolution (the kernel-4 conv before Gated DeltaNet / Mamba2 mixing).

x [B, T, C], weight [C, K] -> out [B, T, C] with out_t = sum_i weight[:, K-1-i] * x_{t-i}, i < K.
With doc_ids [B, T], taps reaching into a previous document are dropped (packed sequences behave as
if each document were alone). A `halo` [B, K-1, C] supplies the K-1 inputs before x (context
parallelism: the previous sequence chunk's last inputs, held by another rank) instead of zeros.
Reference: `F.conv1d` (no document support).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_short_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grouped conv1d with K - 1 left zero-padding."""
    c, k = weight.shape
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight[:, None, :], groups=c)
    return out.transpose(1, 2)


def short_conv(x: torch.Tensor, weight: torch.Tensor, doc_ids: torch.Tensor | None = None,
               halo: torch.Tensor | None = None, halo_doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """K shifted multiply-adds (K is ~4): cheap, and masking a tap per document is one comparison.
    halo [B, K-1, C] and, with doc_ids, halo_doc_ids [B, K-1]: the inputs before x (module docstring)."""
    if halo is not None:
        if (doc_ids is None) != (halo_doc_ids is None):
            raise ValueError("short_conv: doc_ids and halo_doc_ids go together (both or neither)")
        lead = halo.shape[1]
        ids = None if doc_ids is None else torch.cat([halo_doc_ids, doc_ids], dim=1)
        return short_conv(torch.cat([halo, x], dim=1), weight, ids)[:, lead:]
    t, k = x.shape[1], weight.shape[1]
    out = x * weight[:, k - 1]
    for shift in range(1, min(k, t)):
        tap = x[:, :-shift] * weight[:, k - 1 - shift]  # contribution of x_{t-shift} to out_t
        if doc_ids is not None:
            tap = tap * (doc_ids[:, shift:] == doc_ids[:, :-shift])[..., None].to(x.dtype)
        out = torch.cat([out[:, :shift], out[:, shift:] + tap], dim=1)
    return out
