"""Mamba2 SSD through the fused Triton kernels of ops/ssd_triton.py: autograd wiring and the kernel choice
(contract: ops/ssd.py ssd_chunked, same arguments and results; ops/ssd.py self-checks them against it).

Forward: 5 launches (preparation, C B^T, chunk states, state pass, outputs); C B^T is computed once per
batch in float32 and shared by all heads. Backward recomputes the states (besides the inputs only the
per-token decays and C B^T are saved: no [B, H, NC, N, P] tensor lives between forward and backward)
and takes 7 launches.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from . import ssd_triton as _k
from .state_scan_triton import DTYPES, triton_available

KERNELS = ("triton", "chunked")
log = logging.getLogger(__name__)


class _Prep(NamedTuple):
    g: torch.Tensor  # [B, H, T'] float32 within-chunk cumulative log-decay
    dt: torch.Tensor  # [B, H, T'] float32, zero after the end
    seg: torch.Tensor  # [B, T'] int32 document starts at chunk positions <= i
    decay: torch.Tensor  # [B, H, NC] float32 e^{G_last} if no document starts in the chunk, else 0
    cb: torch.Tensor  # [B, NC, C, C] float32 C B^T


def _prep(dt, a, b_in, c_in, starts, chunk: int) -> _Prep:
    return _Prep(*_k.chunk_prep(dt, a, starts, chunk), _k.chunk_cb(b_in, c_in, chunk))


def _same_dtype(x, b_in, c_in):
    """B and C in x's dtype (one dtype per tl.dot), unit stride along N (the kernels take the others)."""
    return tuple(y.to(x.dtype) if y.stride(-1) == 1 else y.to(x.dtype).contiguous() for y in (b_in, c_in))


class SSDTriton(torch.autograd.Function):
    """(x, dt, a, b_in, c_in, starts, initial_state, chunk) -> (y, final state [B, H, N, P] float32)."""

    @staticmethod
    def forward(ctx, x, dt, a, b_in, c_in, starts, initial_state, chunk: int):
        x = x if x.stride(-1) == 1 else x.contiguous()
        bk, cq = _same_dtype(x, b_in, c_in)
        pre = _prep(dt, a, bk, cq, starts, chunk)
        states = _k.chunk_states(bk, x, pre.g, pre.dt, pre.seg, chunk, to_end=True)
        final = _k.pass_fwd(states, pre.decay, initial_state)
        y = _k.chunk_out(x, cq, pre.cb, pre.g, pre.dt, pre.seg, states, chunk)
        ctx.save_for_backward(x, dt, a, b_in, c_in, initial_state, *pre)  # pre: [B, H, T'] and C B^T, small
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, d_final):
        x, dt, a, b_in, c_in, initial_state, *pre = ctx.saved_tensors
        chunk, t, pre = ctx.chunk, x.shape[1], _Prep(*pre)
        bk, cq = _same_dtype(x, b_in, c_in)
        states = _k.chunk_states(bk, x, pre.g, pre.dt, pre.seg, chunk, to_end=True)
        _k.pass_fwd(states, pre.decay, initial_state)
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        d_last = _k.chunk_states(cq, dy, pre.g, pre.dt, pre.seg, chunk, to_end=False)
        d_init, d_decay = _k.pass_bwd(d_last, states, pre.decay, d_final)
        dx, ddt, dg, dcb, db, dc = _k.chunk_bwd(x, dy, bk, cq, pre.cb, pre.g, pre.dt, pre.seg, states, d_last, chunk)
        ddt, da = _k.finish_dt(ddt, dg, d_decay, pre.decay, a, pre.dt, t, chunk, dt.dtype)
        db, dc = _k.finish_bc(dcb, bk, cq, db, dc, chunk)
        d_init = None if initial_state is None else d_init.to(initial_state.dtype)
        return dx, ddt, da.to(a.dtype), db.to(b_in.dtype), dc.to(c_in.dtype), None, d_init, None


def unsupported_reason(x: torch.Tensor, b_in: torch.Tensor, chunk: int) -> str | None:
    """Why the fused kernels cannot take these operands, or None."""
    if not triton_available():
        return "Triton or CUDA is not available on this machine"
    if x.device.type != "cuda":
        return f"operands are on {x.device}, the Triton kernels need CUDA"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}: expected one of {DTYPES}"
    if chunk not in (16, 32, 64):  # one C x C tile per program: larger chunks would spill registers
        return f"chunk size {chunk}: the Triton kernels take 16, 32 or 64 (tl.dot tiles of C x C)"
    return None


def choose_kernel(x: torch.Tensor, b_in: torch.Tensor, chunk: int, kernel: str | None = None) -> str:
    """`kernel` if given, else RAYTRON_SSD_KERNEL if set (a name from KERNELS), else `triton` (the fused
    kernels) on CUDA where Triton imports and takes these shapes, else `chunked` (ops/ssd.py ssd_chunked,
    whose scan kernel follows RAYTRON_SCAN_KERNEL). A kernel asked for by name that cannot run here is an
    error, never a silent fallback. The choice is logged once per (kernel, device type, dtype)."""
    asked = kernel or os.environ.get("RAYTRON_SSD_KERNEL") or None
    if asked is not None and asked not in KERNELS:
        raise ValueError(f"SSD kernel {asked!r} (argument or RAYTRON_SSD_KERNEL): expected one of "
                         f"{', '.join(KERNELS)}")
    reason = unsupported_reason(x, b_in, chunk)
    if asked == "triton" and reason:
        raise ValueError(f"SSD kernel 'triton' cannot run here: {reason}; use kernel 'chunked' "
                         "(or unset RAYTRON_SSD_KERNEL)")
    chosen = asked or ("chunked" if reason else "triton")
    _log_choice(chosen, x.device.type, x.dtype, "asked for" if asked else (reason or "CUDA with Triton"))
    return chosen


@functools.lru_cache(maxsize=None)
def _log_choice(kernel: str, device: str, dtype: torch.dtype, why: str) -> None:
    log.info("Mamba2 SSD kernel %r on %s (%s): %s", kernel, device, dtype, why)
