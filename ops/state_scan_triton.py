"""Triton kernels for the inter-chunk state scan (contract and recurrences: ops/state_scan.py).

One program per (d_v block, batch*head) walks all N chunks of its sequence, keeping the state h (and,
backward, its gradient G) as a float32 [d_k, BV] tile in registers: the state never round-trips
through memory between chunks and there is one launch per layer, where the PyTorch loop issues a
handful of small kernels per chunk. Matmul operands take the input dtype (bf16 in training) with
float32 accumulation; float32 inputs use IEEE float32 dots (no TF32), so float32 results match the
PyTorch kernel to rounding.

Trust: the first use on a device and dtype runs a small forward+backward against the PyTorch kernel
(ops/state_scan.py `_self_check`) and raises if they disagree, so an unverified GPU/Triton combination
refuses instead of training on wrong gradients (the failure mode of fla's gated kernels on Hopper with Triton < 3.7.1).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the PyTorch kernel is used
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return triton is not None and torch.cuda.is_available()


def unsupported_reason(kt: torch.Tensor, uv: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these operands, or None."""
    c, dk = kt.shape[-2:]
    if not triton_available():
        return "Triton or CUDA is not available on this machine"
    if kt.device.type != "cuda":
        return f"operands are on {kt.device}, the Triton kernel needs CUDA"
    if kt.dtype not in DTYPES or uv.dtype != kt.dtype:
        return f"dtypes {kt.dtype}/{uv.dtype}: expected one of {DTYPES}, the same for all operands"
    if c < 16 or c & (c - 1):
        return f"chunk size {c}: the Triton kernel needs a power of two >= 16 (tl.dot tiles)"
    if dk > 256:
        return f"key/state dim {dk} > 256 does not fit the kernel's register tile"
    return None


def check_supported(kt: torch.Tensor, uv: torch.Tensor) -> None:
    """Refuse operands the kernel cannot take (the first-use self-check is ops/state_scan.py's)."""
    reason = unsupported_reason(kt, uv)
    if reason:
        raise ValueError(f"scan kernel 'triton' cannot run here: {reason}; use kernel 'torch' "
                         "(or unset RAYTRON_SCAN_KERNEL)")


if triton is not None:
    @triton.jit
    def _tile(ptr, base, rows, cols, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
        return tl.make_block_ptr(ptr + base * rows * cols, (rows, cols), (cols, 1), (r0, c0), (BR, BC), (1, 0))

    @triton.jit
    def _scan_fwd_kernel(w_ptr, uv_ptr, kt_ptr, dec_ptr, h_ptr, u_ptr, N, C: tl.constexpr, DK: tl.constexpr,
                         DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_W: tl.constexpr,
                         PRECISION: tl.constexpr):
        i_v, i_bh = tl.program_id(0), tl.program_id(1)
        h = tl.zeros([BK, BV], dtype=tl.float32)
        for c in range(N):
            base = i_bh.to(tl.int64) * N + c
            p_h = _tile(h_ptr, base, DK, DV, 0, i_v * BV, BK, BV)
            tl.store(p_h, h.to(p_h.dtype.element_ty), boundary_check=(0, 1))
            b_u = tl.load(_tile(uv_ptr, base, C, DV, 0, i_v * BV, C, BV), boundary_check=(0, 1)).to(tl.float32)
            b_kt = tl.load(_tile(kt_ptr, base, C, DK, 0, 0, C, BK), boundary_check=(0, 1))
            if HAS_W:
                b_w = tl.load(_tile(w_ptr, base, C, DK, 0, 0, C, BK), boundary_check=(0, 1))
                b_u -= tl.dot(b_w, h.to(b_w.dtype), input_precision=PRECISION)
                p_u = _tile(u_ptr, base, C, DV, 0, i_v * BV, C, BV)
                tl.store(p_u, b_u.to(p_u.dtype.element_ty), boundary_check=(0, 1))
            decay = tl.load(dec_ptr + base).to(tl.float32)
            h = h * decay + tl.dot(tl.trans(b_kt), b_u.to(b_kt.dtype), input_precision=PRECISION)

    @triton.jit
    def _scan_bwd_kernel(w_ptr, kt_ptr, dec_ptr, h_ptr, u_ptr, dh_ptr, du_ptr, duv_ptr, dw_ptr, dkt_ptr, ddec_ptr,
                         BH, N, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, HAS_W: tl.constexpr, PRECISION: tl.constexpr):
        i_v, i_bh = tl.program_id(0), tl.program_id(1)
        grad = tl.zeros([BK, BV], dtype=tl.float32)  # dL/dh_{c+1}
        for i in range(N):
            c = N - 1 - i
            base = i_bh.to(tl.int64) * N + c
            part = i_v.to(tl.int64) * BH * N + base  # this d_v block's partial sums over d_v
            b_kt = tl.load(_tile(kt_ptr, base, C, DK, 0, 0, C, BK), boundary_check=(0, 1))
            b_du = tl.load(_tile(du_ptr, base, C, DV, 0, i_v * BV, C, BV), boundary_check=(0, 1)).to(tl.float32)
            b_du += tl.dot(b_kt, grad.to(b_kt.dtype), input_precision=PRECISION)
            p_duv = _tile(duv_ptr, base, C, DV, 0, i_v * BV, C, BV)
            tl.store(p_duv, b_du.to(p_duv.dtype.element_ty), boundary_check=(0, 1))
            b_u = tl.load(_tile(u_ptr, base, C, DV, 0, i_v * BV, C, BV), boundary_check=(0, 1))
            b_dkt = tl.dot(b_u, tl.trans(grad).to(b_u.dtype), input_precision=PRECISION)
            tl.store(_tile(dkt_ptr, part, C, DK, 0, 0, C, BK), b_dkt, boundary_check=(0, 1))
            b_h = tl.load(_tile(h_ptr, base, DK, DV, 0, i_v * BV, BK, BV), boundary_check=(0, 1)).to(tl.float32)
            tl.store(ddec_ptr + part, tl.sum(tl.sum(grad * b_h, axis=1), axis=0))
            decay = tl.load(dec_ptr + base).to(tl.float32)
            new_grad = tl.load(_tile(dh_ptr, base, DK, DV, 0, i_v * BV, BK, BV), boundary_check=(0, 1)).to(tl.float32)
            new_grad += decay * grad
            if HAS_W:
                b_w = tl.load(_tile(w_ptr, base, C, DK, 0, 0, C, BK), boundary_check=(0, 1))
                b_dw = -tl.dot(b_du.to(b_w.dtype), tl.trans(b_h).to(b_w.dtype), input_precision=PRECISION)
                tl.store(_tile(dw_ptr, part, C, DK, 0, 0, C, BK), b_dw, boundary_check=(0, 1))
                new_grad -= tl.dot(tl.trans(b_w), b_du.to(b_w.dtype), input_precision=PRECISION)
            grad = new_grad


def _blocks(dk: int, dv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BK, BV, num_stages): float32 tiles with IEEE dots need half the d_v block and no software
    pipelining to fit Hopper's 227 KiB of shared memory at d_k = 128."""
    bk = max(16, triton.next_power_of_2(dk))
    wide = dtype == torch.float32 or bk > 128
    return bk, min(32 if wide else 64, max(16, triton.next_power_of_2(dv))), 1 if wide else 2


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def scan_fwd(w, uv, kt, decay):
    """Forward of StateScan on CUDA: (states [BH, N, dk, dv] in kt's dtype, U [BH, N, C, dv])."""
    bh, n, c, dk = kt.shape
    dv = uv.shape[-1]
    kt, uv, decay = kt.contiguous(), uv.contiguous(), decay.contiguous()
    w = None if w is None else w.contiguous()
    states = kt.new_empty(bh, n, dk, dv)
    u = uv if w is None else torch.empty_like(uv)
    bk, bv, stages = _blocks(dk, dv, kt.dtype)
    _scan_fwd_kernel[(triton.cdiv(dv, bv), bh)](
        kt if w is None else w, uv, kt, decay, states, u, n, C=c, DK=dk, DV=dv, BK=bk, BV=bv,
        HAS_W=w is not None, PRECISION=_precision(kt.dtype), num_warps=4, num_stages=stages)
    return states, u


def scan_bwd(w, kt, decay, states, u, d_states, d_u):
    """Backward of StateScan on CUDA: (dw or None, duv, dkt, ddecay)."""
    bh, n, c, dk = kt.shape
    dv = u.shape[-1]
    bk, bv, stages = _blocks(dk, dv, kt.dtype)
    nv = triton.cdiv(dv, bv)
    kt, u, decay, states = kt.contiguous(), u.contiguous(), decay.contiguous(), states.contiguous()
    d_states, d_u = d_states.contiguous(), d_u.contiguous()
    w = None if w is None else w.contiguous()
    d_uv = torch.empty_like(u)
    d_kt = kt.new_empty(nv, bh, n, c, dk, dtype=torch.float32)
    d_w = None if w is None else torch.empty_like(d_kt)
    d_decay = kt.new_empty(nv, bh, n, dtype=torch.float32)
    _scan_bwd_kernel[(nv, bh)](
        kt if w is None else w, kt, decay, states, u, d_states, d_u, d_uv, d_kt if d_w is None else d_w, d_kt,
        d_decay, bh, n, C=c, DK=dk, DV=dv, BK=bk, BV=bv, HAS_W=w is not None,
        PRECISION=_precision(kt.dtype), num_warps=4, num_stages=stages)
    d_w = None if d_w is None else d_w.sum(0).to(w.dtype)
    return d_w, d_uv, d_kt.sum(0).to(kt.dtype), d_decay.sum(0).to(decay.dtype)
