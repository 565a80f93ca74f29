"""Routed-expert computation: a per-expert loop (the reference) and a grouped GEMM path.

All take x [tokens, dim], expert ids [tokens, k], combine weights [tokens, k] (zero for dropped
assignments) and stacked SwiGLU weights w_gate/w_up [experts, ffn, dim], w_down [experts, dim, ffn].
The grouped path sorts the (token, choice) assignments by expert, runs each weight as one grouped
GEMM over the contiguous per-expert segments (`torch._grouped_mm`, CPU and CUDA in torch >= 2.9),
and scatters the weighted results back. Where `_grouped_mm` does not apply (float64, rows whose byte
stride is not a multiple of 16, CUDA float32) the same segments go through one matmul per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_expert_swiglu(x, ids, weights, w_gate, w_up, w_down) -> torch.Tensor:
    """Obviously-correct loop: every (token, choice) pair through its expert, weighted, summed."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_gate.shape[0]):
        token, choice = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token]
        y = F.linear(F.silu(F.linear(h, w_gate[e])) * F.linear(h, w_up[e]), w_down[e])
        out.index_add_(0, token, y.float() * weights[token, choice, None].float())
    return out.to(x.dtype)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes x [rows, in] @ w[e]^T (w [experts, out, in]) here."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    allowed = (torch.bfloat16,) if x.is_cuda else (torch.float32, torch.bfloat16, torch.float16)
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
    return x.dtype in allowed and aligned


def segment_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [rows, in], rows grouped by expert (segment e ends at offsets[e]); w [experts, out, in]
    -> [rows, out] with segment e multiplied by w[e]^T."""
    if grouped_mm_supported(x, w):
        out = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
        if out.requires_grad:  # its backward refuses stride-0 (expanded) gradients
            out.register_hook(lambda grad: grad.contiguous())
        return out
    bounds = [0] + offsets.tolist()
    parts = [x[bounds[e]:bounds[e + 1]] @ w[e].T for e in range(w.shape[0])]
    return torch.cat(parts, dim=0)


def grouped_expert_swiglu(x, ids, weights, w_gate, w_up, w_down) -> torch.Tensor:
    """Sort assignments by expert, three grouped GEMMs, weighted scatter-add back to tokens."""
    tokens, k = ids.shape
    experts = w_gate.shape[0]
    flat_expert = ids.reshape(-1)  # [tokens * k], assignment a = token * k + choice
    order = torch.argsort(flat_expert, stable=True)
    token_of = order // k  # token of each sorted assignment
    counts = torch.bincount(flat_expert, minlength=experts)
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # [experts], end of each expert's segment
    h = x[token_of]  # [tokens * k, dim], grouped by expert
    h = F.silu(segment_mm(h, w_gate, offsets)) * segment_mm(h, w_up, offsets)  # [tokens * k, ffn]
    y = segment_mm(h, w_down, offsets)  # [tokens * k, dim]
    y = y.float() * weights.reshape(-1)[order, None].float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token_of, y).to(x.dtype)


def expert_swiglu(x, ids, weights, w_gate, w_up, w_down) -> torch.Tensor:
    """Default expert path: the grouped GEMM one."""
    return grouped_expert_swiglu(x, ids, weights, w_gate, w_up, w_down)
