"""Triton kernels for the chunked Gated DeltaNet (the math: ops/gated_delta.py's module docstring).

Per chunk of C tokens (one program per (chunk, batch*head); G the within-chunk cumulative log-decay,
D_ij = exp(G_i - G_j) when j <= i in the same document, fs_i = exp(G_i) when the entering state
reaches i, te_j = exp(G_last - G_j) when j reaches the chunk's end):

  prep   A = strictly-lower(diag(beta) D o K K^T), T = (I + A)^-1 (forward substitution in registers),
         W = T diag(beta fs) K, U_v = T diag(beta) V, K_t = diag(te) K, decay = exp(G_last) or 0.
         The scan of ops/state_scan.py turns these into the entering states S_0 and U = U_v - W S_0.
  output O = diag(fs) Q S_0 + (Q K^T o D) U.

The backward kernels take the gradients the other way through the same formulas, recomputing
everything but T (stored transposed, float32, [BH, N, C, C], by the forward). Inputs are read in place
through their strides (q/k/v [B, H, T, d] with unit last stride, g/beta [B, H, T], starts [B, T] int32);
time past T reads as zeros, so any length works and only the scan operands are chunk-padded. Sums are
float32. For bf16 inputs, products of inputs and scores take bf16 operands (the inputs' own precision)
and products through the WY inverse take float32 operands on TF32 tensor cores; float32 inputs use IEEE
dots throughout. Every tile dim is >= 16 (tl.dot's minimum).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the chunked PyTorch form is used
    triton = None


def blocks(dk: int, dv: int) -> tuple[int, int]:
    """(BK, BV): the whole key dim in one tile (the state rows), d_v walked in tiles of <= 64."""
    return max(16, triton.next_power_of_2(dk)), min(64, max(16, triton.next_power_of_2(dv)))


if triton is not None:
    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """Products of the inputs and of scores: bf16 operands (the inputs' own precision), float32 sums."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))

    @triton.jit
    def _mm32(a, b, IEEE: tl.constexpr):
        """Products through the WY inverse, where rounding compounds: float32 operands (TF32 for bf16 inputs)."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")

    @triton.jit
    def _seq_tile(ptr, off, T, D, st, n, c0, C: tl.constexpr, BD: tl.constexpr):
        """[C, BD] tile of a [T, D] (row stride st) matrix at chunk n, columns c0.."""
        return tl.make_block_ptr(ptr + off, (T, D), (st, 1), (n * C, c0), (C, BD), (1, 0))

    @triton.jit
    def _chunk_tile(ptr, base, R, D, c0, BR: tl.constexpr, BD: tl.constexpr):
        """[BR, BD] tile of the contiguous [R, D] matrix number `base`."""
        return tl.make_block_ptr(ptr + base * R * D, (R, D), (D, 1), (0, c0), (BR, BD), (1, 0))

    @triton.jit
    def _geometry(g_ptr, st_ptr, b, h, n, T, sgb, sgh, sgt, ssb, C: tl.constexpr, HAS_STARTS: tl.constexpr):
        """Cumulative log-decay G [C] (float32), document segment ids seg [C], and the time mask."""
        t = n * C + tl.arange(0, C)
        valid = t < T
        g = tl.load(g_ptr + b * sgb + h * sgh + t * sgt, mask=valid, other=0.0).to(tl.float32)
        G = tl.cumsum(g, 0)
        if HAS_STARTS:
            seg = tl.cumsum(tl.load(st_ptr + b * ssb + t, mask=valid, other=0), 0)
        else:
            seg = tl.zeros([C], dtype=tl.int32)
        return G, seg, valid

    @triton.jit
    def _decays(G, seg, C: tl.constexpr, STRICT: tl.constexpr):
        """D [C, C] (strictly lower if STRICT), fs [C], te [C], the chunk's state decay, G_last."""
        rows = tl.arange(0, C)
        last = rows == C - 1
        g_last = tl.sum(tl.where(last, G, 0.0), 0)
        seg_last = tl.sum(tl.where(last, seg, 0), 0)
        if STRICT:
            tri = rows[:, None] > rows[None, :]
        else:
            tri = rows[:, None] >= rows[None, :]
        keep = tri & (seg[:, None] == seg[None, :])
        D = tl.where(keep, tl.exp(tl.where(keep, G[:, None] - G[None, :], 0.0)), 0.0)
        fs = tl.where(seg == 0, tl.exp(G), 0.0)
        te = tl.where(seg == seg_last, tl.exp(g_last - G), 0.0)
        dec = tl.where(seg_last == 0, tl.exp(g_last), 0.0)
        return D, fs, te, dec, g_last

    @triton.jit
    def _unit_lower_inverse_t(A, a_ptr, C: tl.constexpr):
        """(I + A)^-T for strictly lower A [C, C] by forward substitution: column i of the result is
        e_i - sum_{j<i} A_ij (column j). A goes through a_ptr (a [C, C] row-major buffer of this program)
        so that each step reads row i of A with a load, and the step's sum runs along a tile row
        (within a warp) instead of across warps."""
        rows = tl.arange(0, C)
        tl.store(a_ptr + rows[:, None] * C + rows[None, :], A)
        tl.debug_barrier()
        inv_t = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
        for i in range(1, C):
            a_i = tl.load(a_ptr + i * C + rows)
            new = tl.sum(inv_t * a_i[None, :], 1)
            inv_t = tl.where(rows[None, :] == i, inv_t - new[:, None], inv_t)
        tl.debug_barrier()  # every row of A read before the caller overwrites the buffer
        return inv_t

    @triton.jit
    def _rev_cumsum(x):
        return tl.sum(x, 0) - tl.cumsum(x, 0) + x

    @triton.jit
    def _prep_fwd_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, st_ptr, w_ptr, uv_ptr, kt_ptr, dec_ptr, tinv_ptr,
                         T, H, N, skb, skh, skt, svb, svh, svt, sgb, sgh, sgt, ssb,
                         C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE: tl.constexpr):
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        base = bh * N + n
        G, seg, valid = _geometry(g_ptr, st_ptr, b, h, n, T, sgb, sgh, sgt, ssb, C, HAS_STARTS)
        D, fs, te, dec, _ = _decays(G, seg, C, True)
        beta = tl.load(beta_ptr + b * sgb + h * sgh + (n * C + tl.arange(0, C)) * sgt, mask=valid,
                       other=0.0).to(tl.float32)
        k = tl.load(_seq_tile(k_ptr, b * skb + h * skh, T, DK, skt, n, 0, C, BK), boundary_check=(0, 1))
        inv_t = _unit_lower_inverse_t(beta[:, None] * D * _mm(k, tl.trans(k), IEEE), tinv_ptr + base * C * C, C)
        tl.store(_chunk_tile(tinv_ptr, base, C, C, 0, C, C), inv_t)
        inv = tl.trans(inv_t)
        p_w = _chunk_tile(w_ptr, base, C, DK, 0, C, BK)
        tl.store(p_w, _mm32(inv, k * (beta * fs)[:, None], IEEE).to(p_w.dtype.element_ty), boundary_check=(0, 1))
        tl.store(_chunk_tile(kt_ptr, base, C, DK, 0, C, BK), (k * te[:, None]).to(p_w.dtype.element_ty),
                 boundary_check=(0, 1))
        tl.store(dec_ptr + base, dec)
        for iv in range(0, tl.cdiv(DV, BV)):
            v = tl.load(_seq_tile(v_ptr, b * svb + h * svh, T, DV, svt, n, iv * BV, C, BV), boundary_check=(0, 1))
            uv = _mm32(inv, v * beta[:, None], IEEE)
            p_uv = _chunk_tile(uv_ptr, base, C, DV, iv * BV, C, BV)
            tl.store(p_uv, uv.to(p_uv.dtype.element_ty), boundary_check=(0, 1))

    @triton.jit
    def _output_fwd_kernel(q_ptr, k_ptr, g_ptr, st_ptr, s_ptr, u_ptr, o_ptr,
                           T, H, N, sqb, sqh, sqt, skb, skh, skt, sgb, sgh, sgt, ssb, sob, soh, sot,
                           C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE: tl.constexpr):
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        base = bh * N + n
        G, seg, valid = _geometry(g_ptr, st_ptr, b, h, n, T, sgb, sgh, sgt, ssb, C, HAS_STARTS)
        D, fs, te, dec, _ = _decays(G, seg, C, False)
        q = tl.load(_seq_tile(q_ptr, b * sqb + h * sqh, T, DK, sqt, n, 0, C, BK), boundary_check=(0, 1))
        k = tl.load(_seq_tile(k_ptr, b * skb + h * skh, T, DK, skt, n, 0, C, BK), boundary_check=(0, 1))
        scores = _mm(q, tl.trans(k), IEEE) * D
        q = q * fs[:, None]
        for iv in range(0, tl.cdiv(DV, BV)):
            s0 = tl.load(_chunk_tile(s_ptr, base, DK, DV, iv * BV, BK, BV), boundary_check=(0, 1))
            u = tl.load(_chunk_tile(u_ptr, base, C, DV, iv * BV, C, BV), boundary_check=(0, 1))
            o = _mm(q, s0, IEEE) + _mm(scores, u, IEEE)
            p_o = _seq_tile(o_ptr, b * sob + h * soh, T, DV, sot, n, iv * BV, C, BV)
            tl.store(p_o, o.to(p_o.dtype.element_ty), boundary_check=(0, 1))

    @triton.jit
    def _output_bwd_kernel(q_ptr, k_ptr, g_ptr, st_ptr, s_ptr, u_ptr, do_ptr, dq_ptr, dk_ptr, dg_ptr, ds_ptr,
                           du_ptr, T, H, N, sqb, sqh, sqt, skb, skh, skt, sgb, sgh, sgt, ssb, sob, soh, sot,
                           C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE: tl.constexpr):
        """dQ, dK (contiguous), dg of the output's inputs and dS_0, dU for the scan's backward."""
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        base = bh * N + n
        G, seg, valid = _geometry(g_ptr, st_ptr, b, h, n, T, sgb, sgh, sgt, ssb, C, HAS_STARTS)
        D, fs, te, dec, _ = _decays(G, seg, C, False)
        q = tl.load(_seq_tile(q_ptr, b * sqb + h * sqh, T, DK, sqt, n, 0, C, BK), boundary_check=(0, 1))
        k = tl.load(_seq_tile(k_ptr, b * skb + h * skh, T, DK, skt, n, 0, C, BK), boundary_check=(0, 1))
        qk = _mm(q, tl.trans(k), IEEE)
        scores_t = tl.trans(qk * D)
        qs = tl.trans(q * fs[:, None])
        dq_state = tl.zeros([C, BK], dtype=tl.float32)  # dO S_0^T
        d_scores = tl.zeros([C, C], dtype=tl.float32)  # dO U^T
        for iv in range(0, tl.cdiv(DV, BV)):
            s0 = tl.load(_chunk_tile(s_ptr, base, DK, DV, iv * BV, BK, BV), boundary_check=(0, 1))
            u = tl.load(_chunk_tile(u_ptr, base, C, DV, iv * BV, C, BV), boundary_check=(0, 1))
            do = tl.load(_seq_tile(do_ptr, b * sob + h * soh, T, DV, sot, n, iv * BV, C, BV), boundary_check=(0, 1))
            dq_state += _mm(do, tl.trans(s0), IEEE)
            d_scores += _mm(do, tl.trans(u), IEEE)
            p_ds = _chunk_tile(ds_ptr, base, DK, DV, iv * BV, BK, BV)
            tl.store(p_ds, _mm(qs, do, IEEE).to(p_ds.dtype.element_ty), boundary_check=(0, 1))
            p_du = _chunk_tile(du_ptr, base, C, DV, iv * BV, C, BV)
            tl.store(p_du, _mm(scores_t, do, IEEE).to(p_du.dtype.element_ty), boundary_check=(0, 1))
        d_fs = tl.sum(q * dq_state, 1)
        d_scores = d_scores * D
        dq = dq_state * fs[:, None] + _mm(d_scores, k, IEEE)
        dk = _mm(tl.trans(d_scores), q, IEEE)
        e = d_scores * qk  # dL/dD o D: +row i, -column j of dG
        dG = tl.sum(e, 1) - tl.sum(e, 0) + d_fs * fs
        p_dq = _seq_tile(dq_ptr, bh * T * DK, T, DK, DK, n, 0, C, BK)
        tl.store(p_dq, dq.to(p_dq.dtype.element_ty), boundary_check=(0, 1))
        p_dk = _seq_tile(dk_ptr, bh * T * DK, T, DK, DK, n, 0, C, BK)
        tl.store(p_dk, dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))
        t = n * C + tl.arange(0, C)
        tl.store(dg_ptr + bh * T + t, _rev_cumsum(dG), mask=valid)

    @triton.jit
    def _prep_bwd_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, st_ptr, tinv_ptr, dw_ptr, duv_ptr, dkt_ptr, ddec_ptr,
                         dk_ptr, dv_ptr, dg_ptr, dbeta_ptr,
                         T, H, N, skb, skh, skt, svb, svh, svt, sgb, sgh, sgt, ssb,
                         C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, HAS_STARTS: tl.constexpr, IEEE: tl.constexpr):
        """dK, dV, dbeta, dg of the prep's inputs from the scan's dW, dU_v, dK_t, d decay.
        Gradients dK, dV are written contiguous [B, H, T, d]; dg, dbeta [B, H, T] float32."""
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        base = bh * N + n
        rows = tl.arange(0, C)
        G, seg, valid = _geometry(g_ptr, st_ptr, b, h, n, T, sgb, sgh, sgt, ssb, C, HAS_STARTS)
        D, fs, te, dec, _ = _decays(G, seg, C, True)
        beta = tl.load(beta_ptr + b * sgb + h * sgh + (n * C + rows) * sgt, mask=valid, other=0.0).to(tl.float32)
        k = tl.load(_seq_tile(k_ptr, b * skb + h * skh, T, DK, skt, n, 0, C, BK), boundary_check=(0, 1))
        inv_t = tl.load(_chunk_tile(tinv_ptr, base, C, C, 0, C, C))
        dw = tl.load(_chunk_tile(dw_ptr, base, C, DK, 0, C, BK), boundary_check=(0, 1))
        d_inv = _mm32(dw, tl.trans(k * (beta * fs)[:, None]), IEEE)  # W = inv diag(beta fs) K
        dkb = _mm32(inv_t, dw, IEEE)
        d_beta = tl.zeros([C], dtype=tl.float32)
        for iv in range(0, tl.cdiv(DV, BV)):  # U_v = inv diag(beta) V
            v = tl.load(_seq_tile(v_ptr, b * svb + h * svh, T, DV, svt, n, iv * BV, C, BV), boundary_check=(0, 1))
            duv = tl.load(_chunk_tile(duv_ptr, base, C, DV, iv * BV, C, BV), boundary_check=(0, 1))
            d_inv += _mm32(duv, tl.trans(v * beta[:, None]), IEEE)
            dvb = _mm32(inv_t, duv, IEEE)
            d_beta += tl.sum(dvb * v, 1)
            p_dv = _seq_tile(dv_ptr, bh * T * DV, T, DV, DV, n, iv * BV, C, BV)
            tl.store(p_dv, (dvb * beta[:, None]).to(p_dv.dtype.element_ty), boundary_check=(0, 1))
        kb_dot = tl.sum(dkb * k.to(tl.float32), 1)
        d_beta += kb_dot * fs
        dk = dkb * (beta * fs)[:, None]
        # inv = (I + A)^-1: dA = -inv^T d_inv inv^T on A's strictly lower support
        dA = -_mm32(_mm32(inv_t, d_inv, IEEE), inv_t, IEEE)
        kk = _mm(k, tl.trans(k), IEEE)
        da_d = dA * D  # D is 0 off the strictly lower same-document support
        d_beta += tl.sum(da_d * kk, 1)
        da_db = da_d * beta[:, None]
        dk += _mm(da_db, k, IEEE) + _mm(tl.trans(da_db), k, IEEE)
        e = da_db * kk
        dG = tl.sum(e, 1) - tl.sum(e, 0) + kb_dot * beta * fs
        dkt = tl.load(_chunk_tile(dkt_ptr, base, C, DK, 0, C, BK), boundary_check=(0, 1)).to(tl.float32)
        dk += dkt * te[:, None]  # K_t = diag(te) K
        e_te = tl.sum(dkt * k, 1) * te
        d_last = tl.sum(e_te, 0) + tl.load(ddec_ptr + base).to(tl.float32) * dec
        dG += tl.where(rows == C - 1, d_last, 0.0) - e_te
        p_dk = _seq_tile(dk_ptr, bh * T * DK, T, DK, DK, n, 0, C, BK)
        tl.store(p_dk, dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))
        t = n * C + rows
        tl.store(dg_ptr + bh * T + t, _rev_cumsum(dG), mask=valid)
        tl.store(dbeta_ptr + bh * T + t, d_beta, mask=valid)


def _meta(chunk: int, dk: int, dv: int, starts, dtype: torch.dtype) -> dict:
    """The kernels' compile-time arguments. Eight warps once a [C, d_k] float32 tile no longer fits four
    warps' registers next to the rest (the sm_90 build spills at four)."""
    bk, bv = blocks(dk, dv)
    if dtype == torch.float32 and bk >= 128:  # float32 dot operands: half the d_v tile fits shared memory
        bv = min(bv, 32)
    return dict(C=chunk, DK=dk, DV=dv, BK=bk, BV=bv, HAS_STARTS=starts is not None, IEEE=dtype == torch.float32,
                num_warps=8 if bk * chunk >= 8192 else 4)


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q_like, g, beta, starts, chunk):
    """Launch geometry shared by the kernels: (B, H, T, N, starts pointer, starts row stride)."""
    b, h, t, _ = q_like.shape
    if beta is not None and beta.stride() != g.stride():
        beta = beta.contiguous()  # g and beta share one set of strides in the kernels
        g = g.contiguous()
    st = starts if starts is not None else g
    return (b, h, t, -(-t // chunk)), g, beta, st, (starts.stride(0) if starts is not None else 0)


def prep_fwd(k, v, g, beta, starts, chunk: int):
    """(W, U_v, K_t [BH, N, C, d] in k's dtype, decay [BH, N] float32, T^T [BH, N, C, C] float32)."""
    k, v = _unit_last(k), _unit_last(v)
    (b, h, t, n), g, beta, st, ssb = _common(k, g, beta, starts, chunk)
    dk, dv = k.shape[-1], v.shape[-1]
    w, kt = k.new_empty(b * h, n, chunk, dk), k.new_empty(b * h, n, chunk, dk)
    uv = v.new_empty(b * h, n, chunk, dv)
    dec = k.new_empty(b * h, n, dtype=torch.float32)
    inv = k.new_empty(b * h, n, chunk, chunk, dtype=torch.float32)
    _prep_fwd_kernel[(n, b * h)](k, v, g, beta, st, w, uv, kt, dec, inv, t, h, n, *_strides3(k), *_strides3(v),
                                 *_strides3(g), ssb, **_meta(chunk, dk, dv, starts, k.dtype))
    return w, uv, kt, dec, inv


def output_fwd(q, k, g, starts, states, u, chunk: int):
    """O [B, H, T, d_v] (a [B, T, H, d_v] buffer seen through a transpose: what the layer reads next)."""
    q, k = _unit_last(q), _unit_last(k)
    (b, h, t, n), g, _, st, ssb = _common(q, g, None, starts, chunk)
    dk, dv = q.shape[-1], u.shape[-1]
    o = q.new_empty(b, t, h, dv).transpose(1, 2)
    _output_fwd_kernel[(n, b * h)](q, k, g, st, states.contiguous(), u.contiguous(), o, t, h, n, *_strides3(q),
                                   *_strides3(k), *_strides3(g), ssb, *_strides3(o),
                                   **_meta(chunk, dk, dv, starts, q.dtype))
    return o


def output_bwd(q, k, g, starts, states, u, do, chunk: int):
    """(dQ, dK [B, H, T, d_k] contiguous, dg [B, H, T] float32, dS_0 [BH, N, d_k, d_v] and dU [BH, N, C, d_v]
    in the dtypes of S_0 and U: what autograd hands the scan, written once instead of cast after)."""
    q, k, do = _unit_last(q), _unit_last(k), _unit_last(do)
    (b, h, t, n), g, _, st, ssb = _common(q, g, None, starts, chunk)
    dk, dv = q.shape[-1], u.shape[-1]
    dq, dkey = q.new_empty(b, h, t, dk), k.new_empty(b, h, t, dk)
    dg = q.new_empty(b, h, t, dtype=torch.float32)
    d_states, d_u = states.new_empty(states.shape), u.new_empty(u.shape)
    _output_bwd_kernel[(n, b * h)](q, k, g, st, states.contiguous(), u.contiguous(), do, dq, dkey, dg, d_states,
                                   d_u, t, h, n, *_strides3(q), *_strides3(k), *_strides3(g), ssb,
                                   *_strides3(do), **_meta(chunk, dk, dv, starts, q.dtype))
    return dq, dkey, dg, d_states, d_u


def prep_bwd(k, v, g, beta, starts, inv, dw, duv, dkt, ddec, chunk: int):
    """(dK [B, H, T, d_k], dV [B, H, T, d_v], dg, dbeta [B, H, T] float32)."""
    k, v = _unit_last(k), _unit_last(v)
    (b, h, t, n), g, beta, st, ssb = _common(k, g, beta, starts, chunk)
    dk, dv = k.shape[-1], v.shape[-1]
    d_k, d_v = k.new_empty(b, h, t, dk), v.new_empty(b, h, t, dv)
    dg, d_beta = (k.new_empty(b, h, t, dtype=torch.float32) for _ in range(2))
    _prep_bwd_kernel[(n, b * h)](k, v, g, beta, st, inv, dw.contiguous(), duv.contiguous(), dkt.contiguous(),
                                 ddec.contiguous(), d_k, d_v, dg, d_beta, t, h, n, *_strides3(k), *_strides3(v),
                                 *_strides3(g), ssb, **_meta(chunk, dk, dv, starts, k.dtype))
    return d_k, d_v, dg, d_beta
