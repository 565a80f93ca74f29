"""Fused Triton kernels for silu(short_conv(x, weight, doc_ids)) (contract: ops/short_conv.py).

The PyTorch path runs K shifted multiply-adds with a full-tensor `torch.cat` per tap and a separate SiLU,
each a pass over [B, T, C] forward and more backward. Here one launch each way:

- forward: one program per (BT rows, BC channels, batch row) loads the K shifted x tiles (overlapping, so
  served from cache), accumulates in float32, applies SiLU and writes y in x.dtype.
- backward: nothing but x is saved; the pre-activation is recomputed. Program (BC channels, batch row, slice
  of ROWS rows) walks its rows BT at a time; for each forward shift i (unrolled, K static) it rebuilds the
  pre-activation of rows t + i from K - 1 shifted x tiles and x(t), takes dz = dy(t + i) silu'(z), and adds
      dx(t)         += w[:, K-1-i] dz(t + i)
      dw[:, K-1-i]  += sum_t dz(t + i) x(t)
  for the taps t -> t + i that short_conv keeps (t + i < T and, with doc_ids, doc(t) == doc(t + i): it drops
  taps per shift by that comparison). Loads per output row: K (K - 1) + K + 1 tiles, mostly cache hits, against
  x, dy read and dx written once from memory. dw partial sums stay in float32 registers over the slice and are
  written per program, then summed over (batch, slice) by one small torch reduction: deterministic, no atomics.

Tiles (rows, channels, warps) are powers of two, tails of T and C masked; at K = 4 they compile for sm_90
without register spills (tests/ops/test_short_conv_triton_compile.py), the benchmark sweeps alternatives.
Not the layers' default yet: ops/short_conv.py `conv_silu` runs these only with RAYTRON_CONV_KERNEL=triton until
they are measured on a GPU (benchmarks/models/bench_short_conv.py).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the PyTorch path is used
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 8
FWD_TILE = (32, 128, 4)  # (rows, channels, warps) of a forward program
BWD_TILE = (16, 64, 4)  # of a backward step; KP = next power of two of K rows of dw partials
ROWS = 256  # rows of T per backward program: dw partials are [B * cdiv(T, ROWS), KP, C] float32


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernels cannot take these operands here, or None."""
    if triton is None:
        return "Triton is not installed"
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"operands are on {x.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        return f"shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}: expected [B, T, C] and [C, K]"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}: expected one of {DTYPES}"
    if not 1 <= weight.shape[1] <= MAX_K:
        return f"kernel size {weight.shape[1]}: the Triton kernels take 1 to {MAX_K} taps"
    return None


if triton is not None:
    @triton.jit
    def _conv_silu_fwd_kernel(x_ptr, w_ptr, doc_ptr, y_ptr, T, C, sxb, sxt, sdb, sdt,
                              K: tl.constexpr, HAS_DOCS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        b = tl.program_id(2).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        rmask, cmask = rows < T, cols < C
        x_base, doc_base = x_ptr + b * sxb, doc_ptr + b * sdb
        if HAS_DOCS:
            doc = tl.load(doc_base + rows * sdt, mask=rmask, other=0)
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for i in tl.static_range(K):  # tap x(t - i) * w[:, K-1-i]
            src = rows - i
            keep = rmask & (src >= 0)
            if HAS_DOCS:
                keep = keep & (tl.load(doc_base + src * sdt, mask=keep, other=0) == doc)
            w = tl.load(w_ptr + cols * K + (K - 1 - i), mask=cmask, other=0.0).to(tl.float32)
            xv = tl.load(x_base + src[:, None] * sxt + cols[None, :], mask=keep[:, None] & cmask[None, :], other=0.0)
            acc += xv.to(tl.float32) * w[None, :]
        y = acc * tl.sigmoid(acc)
        tl.store(y_ptr + (b * T + rows[:, None]) * C + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _conv_silu_bwd_kernel(x_ptr, w_ptr, doc_ptr, dy_ptr, dx_ptr, dw_ptr, T, C, sxb, sxt, sdb, sdt, sgb, sgt,
                              K: tl.constexpr, KP: tl.constexpr, HAS_DOCS: tl.constexpr, ROWS: tl.constexpr,
                              BT: tl.constexpr, BC: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        part = tl.program_id(2)
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        cmask = cols < C
        shift = tl.arange(0, KP)  # row i of the dw partials: forward shift i, weight column K-1-i
        x_base, doc_base, dy_base = x_ptr + b * sxb, doc_ptr + b * sdb, dy_ptr + b * sgb
        dw_acc = tl.zeros([KP, BC], dtype=tl.float32)
        start = part.to(tl.int64) * ROWS
        for step in range(0, ROWS, BT):  # a static trip count (the last slice's tail is masked)
            rows = start + step + tl.arange(0, BT)
            rmask = rows < T
            tile = rmask[:, None] & cmask[None, :]
            xt = tl.load(x_base + rows[:, None] * sxt + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            if HAS_DOCS:
                doc_cur = tl.load(doc_base + rows * sdt, mask=rmask, other=0)
            dx = tl.zeros([BT, BC], dtype=tl.float32)
            for i in tl.static_range(K):  # output row t + i, which x(t) reaches through w[:, K-1-i]
                fwd = rows + i
                link = rmask & (fwd < T)
                if HAS_DOCS:
                    doc_fwd = tl.load(doc_base + fwd * sdt, mask=link, other=0)
                    link = link & (doc_fwd == doc_cur)
                z = tl.zeros([BT, BC], dtype=tl.float32)  # pre-activation at t + i (only where linked)
                for j in tl.static_range(K):
                    w = tl.load(w_ptr + cols * K + (K - 1 - j), mask=cmask, other=0.0).to(tl.float32)
                    if j == i:  # x(t) itself, linked by definition
                        z += tl.where(link[:, None], xt, 0.0) * w[None, :]
                    else:
                        src = fwd - j
                        keep = link & (src >= 0)
                        if HAS_DOCS:
                            keep = keep & (tl.load(doc_base + src * sdt, mask=keep, other=0) == doc_fwd)
                        xv = tl.load(x_base + src[:, None] * sxt + cols[None, :], mask=keep[:, None] & cmask[None, :],
                                     other=0.0)
                        z += xv.to(tl.float32) * w[None, :]
                dy = tl.load(dy_base + fwd[:, None] * sgt + cols[None, :], mask=link[:, None] & cmask[None, :],
                             other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                dz = dy * sig * (1.0 + z * (1.0 - sig))  # zero wherever the tap t -> t + i is dropped
                w_i = tl.load(w_ptr + cols * K + (K - 1 - i), mask=cmask, other=0.0).to(tl.float32)
                dx += dz * w_i[None, :]
                dw_acc += tl.where(shift[:, None] == i, tl.sum(dz * xt, axis=0)[None, :], 0.0)
            tl.store(dx_ptr + (b * T + rows[:, None]) * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile)
        slot = b * tl.num_programs(2) + part
        tl.store(dw_ptr + (slot * KP + shift[:, None]) * C + cols[None, :], dw_acc, mask=cmask[None, :])


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along channels (the kernels take any batch/time strides, e.g. a split of a projection)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _docs(doc_ids: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(pointer tensor, batch stride, time stride); x stands in when there are no documents (never read)."""
    return (x, 0, 0) if doc_ids is None else (doc_ids, doc_ids.stride(0), doc_ids.stride(1))


def conv_silu_fwd(x: torch.Tensor, weight: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, C] (unit channel stride), weight [C, K] contiguous -> silu(conv) [B, T, C] in x.dtype."""
    bsz, t, c = x.shape
    y = torch.empty(bsz, t, c, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    bt, bc = FWD_TILE[0], min(FWD_TILE[1], triton.next_power_of_2(c))
    docs, sdb, sdt = _docs(doc_ids, x)
    _conv_silu_fwd_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bc), bsz)](
        x, weight, docs, y, t, c, x.stride(0), x.stride(1), sdb, sdt,
        K=weight.shape[1], HAS_DOCS=doc_ids is not None, BT=bt, BC=bc, num_warps=FWD_TILE[2])
    return y


def conv_silu_bwd(x: torch.Tensor, weight: torch.Tensor, doc_ids: torch.Tensor | None,
                  dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [B, T, C] in x.dtype, dweight [C, K] in weight.dtype, summed in float32)."""
    bsz, t, c = x.shape
    k = weight.shape[1]
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(weight)
    kp = triton.next_power_of_2(k)
    bt, bc = BWD_TILE[0], min(BWD_TILE[1], triton.next_power_of_2(c))
    rows = min(ROWS, max(bt, triton.next_power_of_2(t)))  # short sequences: no all-masked steps
    parts = triton.cdiv(t, rows)
    dy = _unit_last(dy)
    dx = torch.empty(bsz, t, c, dtype=x.dtype, device=x.device)
    dw_parts = torch.empty(bsz * parts, kp, c, dtype=torch.float32, device=x.device)
    docs, sdb, sdt = _docs(doc_ids, x)
    _conv_silu_bwd_kernel[(triton.cdiv(c, bc), bsz, parts)](
        x, weight, docs, dy, dx, dw_parts, t, c, x.stride(0), x.stride(1), sdb, sdt, dy.stride(0), dy.stride(1),
        K=k, KP=kp, HAS_DOCS=doc_ids is not None, ROWS=rows, BT=bt, BC=bc, num_warps=BWD_TILE[2])
    dw = dw_parts.sum(0)[:k].flip(0).t()  # row i holds tap K-1-i
    return dx, dw.to(weight.dtype).contiguous()


class ShortConvSiLU(torch.autograd.Function):
    """(x [B, T, C], weight [C, K], doc_ids [B, T] or None) -> silu(short_conv(x, weight, doc_ids))."""

    @staticmethod
    def forward(ctx, x, weight, doc_ids):
        x, weight = _unit_last(x), weight.contiguous()
        ctx.save_for_backward(x, weight, doc_ids)
        return conv_silu_fwd(x, weight, doc_ids)

    @staticmethod
    def backward(ctx, dy):
        x, weight, doc_ids = ctx.saved_tensors
        dx, dw = conv_silu_bwd(x, weight, doc_ids, dy)
        return dx, dw, None


def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`F.silu(short_conv(x, weight, doc_ids))` through the Triton kernels (no halo: the context-parallel
    form stays on ops/short_conv.py). Refuses operands `unsupported_reason` names."""
    reason = unsupported_reason(x, weight)
    if reason:
        raise ValueError(f"short_conv_silu (Triton): {reason}")
    if doc_ids is not None and doc_ids.shape != x.shape[:2]:
        raise ValueError(f"short_conv_silu: doc_ids {tuple(doc_ids.shape)} must be [B, T] = {tuple(x.shape[:2])}")
    return ShortConvSiLU.apply(x, weight, doc_ids)
