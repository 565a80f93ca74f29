"""The fused Gated DeltaNet path: Triton kernels for everything inside a chunk (ops/gated_delta_triton.py)
around the Triton state scan (ops/state_scan.py), with a hand-written backward for each piece.

Stored for backward: the inputs, the per-chunk inverses (I + A)^-1 in float32, and what the scan
keeps (its operands W, K_t, decay and the entering states S_0 / values U): no [B, H, N, C, C] decay or
score tensors and no per-op intermediates, which the chunked PyTorch form materializes.
"""

from __future__ import annotations

import functools
import os

import torch

from . import gated_delta_triton as _k
from .state_scan import final_state, state_scan

DTYPES = (torch.float32, torch.bfloat16)


def triton_version() -> str:
    return _k.triton.__version__ if _k.triton is not None else "not installed"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, chunk: int) -> str | None:
    """Why the fused kernels cannot take these operands here, or None."""
    if _k.triton is None:
        return "Triton is not installed"
    if q.device.type != "cuda" and not _interpreting():
        return f"operands are on {q.device}; the fused kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    if q.dtype not in DTYPES or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{v.dtype}: expected float32 or bfloat16, the same for q, k, v"
    if chunk not in (16, 32, 64):
        return f"chunk size {chunk}: the fused kernels take 16, 32 or 64 (tl.dot tiles; shared memory)"
    if q.shape[-1] > 128:
        return f"key dim {q.shape[-1]} > 128 does not fit the kernels' register and shared-memory tiles"
    return None


class _Prep(torch.autograd.Function):
    """(k, v, g, beta) -> the scan operands W, U_v, K_t, decay of every chunk."""

    @staticmethod
    def forward(ctx, k, v, g, beta, starts, chunk: int):
        w, uv, kt, dec, inv = _k.prep_fwd(k, v, g, beta, starts, chunk)
        ctx.chunk = chunk
        ctx.save_for_backward(k, v, g, beta, starts, inv)
        return w, uv, kt, dec

    @staticmethod
    def backward(ctx, dw, duv, dkt, ddec):
        k, v, g, beta, starts, inv = ctx.saved_tensors
        n, c = inv.shape[1], ctx.chunk
        bh = inv.shape[0]
        zeros = functools.partial(torch.zeros, device=k.device, dtype=torch.float32)
        dw = zeros(bh, n, c, k.shape[-1]) if dw is None else dw
        duv = zeros(bh, n, c, v.shape[-1]) if duv is None else duv
        dkt = zeros(bh, n, c, k.shape[-1]) if dkt is None else dkt
        ddec = zeros(bh, n) if ddec is None else ddec
        dk, dv, dg, dbeta = _k.prep_bwd(k, v, g, beta, starts, inv, dw, duv, dkt, ddec, c)
        return dk, dv, dg.to(g.dtype), dbeta.to(beta.dtype), None, None


class _Output(torch.autograd.Function):
    """(q, k, g, entering states S_0, values U) -> the layer's output."""

    @staticmethod
    def forward(ctx, q, k, g, starts, states, u, chunk: int):
        ctx.chunk = chunk
        ctx.save_for_backward(q, k, g, starts, states, u)
        return _k.output_fwd(q, k, g, starts, states, u, chunk)

    @staticmethod
    def backward(ctx, do):
        q, k, g, starts, states, u = ctx.saved_tensors
        dq, dk, dg, d_states, d_u = _k.output_bwd(q, k, g, starts, states, u, do, ctx.chunk)
        return dq, dk, dg.to(g.dtype), None, d_states, d_u, None


def gated_delta_fused(q, k, v, g, beta, chunk: int, starts: torch.Tensor | None = None,
                      initial_state: torch.Tensor | None = None, return_final_state: bool = False,
                      scan_kernel: str = "triton"):
    """gated_delta_chunked's contract (ops/gated_delta.py) on the fused kernels; `scan_kernel` is the
    state scan's (ops/state_scan.py; `torch` only to run the other kernels in the Triton interpreter)."""
    b, h, _, dk = q.shape
    dv = v.shape[-1]
    st = None if starts is None else starts.to(torch.int32).contiguous()
    w, uv, kt, dec = _Prep.apply(k, v, g, beta, st, chunk)
    if scan_kernel != "triton":  # the PyTorch scan multiplies the decay into states of the operands' dtype
        dec = dec.to(kt.dtype)
    initial = None if initial_state is None else initial_state.reshape(b * h, dk, dv)
    states, u = state_scan(w, uv, kt, dec, scan_kernel, initial=initial)
    out = _Output.apply(q, k, g, st, states, u, chunk)
    if not return_final_state:
        return out
    return out, final_state(states, u, kt, dec.to(states.dtype)).view(b, h, dk, dv)
