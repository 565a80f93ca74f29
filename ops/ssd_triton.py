"""Fused chunked Triton kernels for Mamba2 SSD (math and shapes: ops/ssd.py; wiring: ops/ssd_fused.py).

Per (batch, head) the sequence is cut into chunks of C tokens. With G the within-chunk cumulative
log-decay (G_i = sum_{k<=i} dt_k a), seg_i the number of document starts at chunk positions <= i,
"same_ij" = (j <= i and seg_i == seg_j), S_c the state entering chunk c [N, P]:

    y_i  = sum_j same_ij (C_i . B_j) e^{G_i - G_j} dt_j x_j  +  [seg_i == 0] e^{G_i} C_i S_c
    L_c  = sum_j [seg_j == seg_last] e^{G_last - G_j} dt_j B_j x_j^T        (chunk-local end state)
    S_{c+1} = D_c S_c + L_c,   D_c = [seg_last == 0] e^{G_last}

Kernels (one launch each, every chunk of every (batch, head) in parallel except the state pass):
  _chunk_prep:  dt (float32), G, the segment counts and D_c; _chunk_cb: C B^T per chunk (all heads share it)
  _chunk_state: L_c (forward) or, with the other weights, sum_i [seg_i == 0] e^{G_i} C_i dy_i^T (the
                gradient reaching S_c from the outputs, backward) -- one program per (N x P tile, chunk, b*h)
  _pass_fwd / _pass_bwd: the sequential recurrence over chunks, elementwise on [N*P] blocks, in place
  _chunk_out:   y, one program per (P block, chunk, b*h); C B^T comes precomputed (shared by all heads)
  _chunk_bwd:   dx, the direct part of d dt, the gradient of G, and (atomically summed over heads)
                d(C B^T), and the state-read/-write parts of dC / dB (float32 atomics: the order of the
                sum over heads varies from run to run, at float32 rounding)
  _finish_dt / _finish_bc: d dt (reverse cumulative sum of dG within the chunk), da; dB and dC
Exponentials are only taken of masked, non-positive arguments. Matmul operands take the input dtype
(bf16 in training) with float32 accumulation; states and all accumulators are float32; float32
inputs use IEEE dots so float32 results match the reference to rounding.
"""

from __future__ import annotations

import torch

from .state_scan_triton import _precision

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without Triton: ops/ssd.py uses the chunked PyTorch form
    triton = None


if triton is not None:
    @triton.jit
    def _chunk_prep(dt_ptr, a_ptr, st_ptr, g_ptr, dtp_ptr, seg_ptr, dec_ptr, T, H, NC, s_dtb, s_dtt, s_dth,
                    HAS_STARTS: tl.constexpr, C: tl.constexpr):
        """Per (chunk, b*h): dt (float32, zero past T) and G = cumsum(dt a) [B, H, T'], the chunk decay
        [B, H, NC], and (from the programs of head 0) the segment counts [B, T']."""
        c, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs = tl.arange(0, C)
        t = c * C + offs
        t_ok = t < T
        dt = tl.load(dt_ptr + b * s_dtb + t * s_dtt + h * s_dth, mask=t_ok, other=0.0).to(tl.float32)
        g = tl.cumsum(dt * tl.load(a_ptr + h).to(tl.float32), axis=0)
        if HAS_STARTS:
            seg = tl.cumsum(tl.load(st_ptr + b * T + t, mask=t_ok, other=0).to(tl.int32), axis=0)
        else:
            seg = tl.zeros([C], dtype=tl.int32)
        row = bh * NC * C + c * C
        tl.store(g_ptr + row + offs, g)
        tl.store(dtp_ptr + row + offs, dt)
        tl.store(seg_ptr + b * NC * C + c * C + offs, seg, mask=(offs >= 0) & (h == 0))
        last = offs == C - 1
        g_last, seg_last = tl.sum(tl.where(last, g, 0.0), axis=0), tl.sum(tl.where(last, seg, 0), axis=0)
        tl.store(dec_ptr + bh * NC + c, tl.where(seg_last == 0, tl.exp(g_last), 0.0))

    @triton.jit
    def _chunk_cb(b_ptr, c_ptr, cb_ptr, T, N, NC, s_bb, s_bt, s_cb, s_ct, C: tl.constexpr, BN: tl.constexpr,
                  PRECISION: tl.constexpr):
        """C B^T [C, C] float32 per (chunk, batch), shared by all heads."""
        c, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_c = tl.arange(0, C)
        t = c * C + offs_c
        t_ok = t < T
        acc = tl.zeros([C, C], dtype=tl.float32)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            tn_ok = t_ok[:, None] & (offs_n < N)[None, :]
            cq = tl.load(c_ptr + b * s_cb + t[:, None] * s_ct + offs_n[None, :], mask=tn_ok, other=0.0)
            bk = tl.load(b_ptr + b * s_bb + t[:, None] * s_bt + offs_n[None, :], mask=tn_ok, other=0.0)
            acc += tl.dot(cq, tl.trans(bk), input_precision=PRECISION)
        tl.store(cb_ptr + ((b * NC + c) * C + offs_c[:, None]) * C + offs_c[None, :], acc)

    @triton.jit
    def _chunk_state(k_ptr, v_ptr, g_ptr, dt_ptr, seg_ptr, out_ptr, T, H, N, P, NC,
                     s_kb, s_kt, s_vb, s_vt, s_vh, TO_END: tl.constexpr, C: tl.constexpr, BN: tl.constexpr,
                     BP: tl.constexpr, PRECISION: tl.constexpr):
        pid, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        n_pb = tl.cdiv(P, BP)
        offs_n, offs_p = (pid // n_pb) * BN + tl.arange(0, BN), (pid % n_pb) * BP + tl.arange(0, BP)
        b, h = bh // H, bh % H
        offs_c = tl.arange(0, C)
        t = c * C + offs_c
        t_ok, n_ok, p_ok = t < T, offs_n < N, offs_p < P
        k = tl.load(k_ptr + b * s_kb + t[:, None] * s_kt + offs_n[None, :], mask=t_ok[:, None] & n_ok[None, :],
                    other=0.0)
        v = tl.load(v_ptr + b * s_vb + t[:, None] * s_vt + h * s_vh + offs_p[None, :],
                    mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        row = bh * NC * C + c * C  # g, dt: [B, H, T'] contiguous; seg [B, T']
        g = tl.load(g_ptr + row + offs_c)
        seg = tl.load(seg_ptr + b * NC * C + c * C + offs_c)
        if TO_END:
            g_last = tl.load(g_ptr + row + C - 1)
            seg_last = tl.load(seg_ptr + b * NC * C + c * C + C - 1)
            dt = tl.load(dt_ptr + row + offs_c)
            w = tl.where(seg == seg_last, tl.exp(g_last - g) * dt, 0.0)
        else:
            w = tl.where(seg == 0, tl.exp(g), 0.0)
        kw = (k.to(tl.float32) * w[:, None]).to(v.dtype)
        out = tl.dot(tl.trans(kw), v, input_precision=PRECISION)  # [BN, BP]
        base = (bh * NC + c) * N * P
        tl.store(out_ptr + base + offs_n[:, None] * P + offs_p[None, :], out, mask=n_ok[:, None] & p_ok[None, :])

    @triton.jit
    def _pass_fwd(s_ptr, dec_ptr, init_ptr, final_ptr, NC, NP, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
        """s holds the chunk-local end states L_c on entry and the entering states S_c on exit."""
        blk, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        ok = offs < NP
        if HAS_INIT:
            s = tl.load(init_ptr + bh * NP + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            s = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.range(0, NC, num_stages=4):  # loads of later chunks in flight (cp.async): latency-bound loop
            p = s_ptr + (bh * NC + c) * NP + offs
            local = tl.load(p, mask=ok, other=0.0)
            tl.store(p, s, mask=ok)
            s = tl.load(dec_ptr + bh * NC + c) * s + local
        tl.store(final_ptr + bh * NP + offs, s, mask=ok)

    @triton.jit
    def _pass_bwd(d_ptr, s_ptr, dec_ptr, dfinal_ptr, dinit_ptr, ddec_ptr, NC, NP, BH,
                  HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
        """d holds the output-side gradients of S_c on entry and dL_c = dL/dS_{c+1} on exit."""
        blk, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        ok = offs < NP
        if HAS_DFINAL:
            grad = tl.load(dfinal_ptr + bh * NP + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            grad = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.range(0, NC, num_stages=4):
            c = NC - 1 - i
            base = (bh * NC + c) * NP
            d_out = tl.load(d_ptr + base + offs, mask=ok, other=0.0)
            tl.store(d_ptr + base + offs, grad, mask=ok)
            s = tl.load(s_ptr + base + offs, mask=ok, other=0.0)
            tl.store(ddec_ptr + (blk * BH + bh) * NC + c, tl.sum(grad * s, axis=0))
            grad = d_out + tl.load(dec_ptr + bh * NC + c) * grad
        tl.store(dinit_ptr + bh * NP + offs, grad, mask=ok)

    @triton.jit
    def _decays(cb_ptr, g_ptr, dt_ptr, seg_ptr, b, bh, c, NC, C: tl.constexpr):
        """This chunk's C B^T [C, C], within-chunk decays e^{G_i - G_j} masked to same_ij, and G, dt, seg."""
        offs_c = tl.arange(0, C)
        row = bh * NC * C + c * C
        g, dt = tl.load(g_ptr + row + offs_c), tl.load(dt_ptr + row + offs_c)
        seg = tl.load(seg_ptr + b * NC * C + c * C + offs_c)
        cb = tl.load(cb_ptr + ((b * NC + c) * C + offs_c[:, None]) * C + offs_c[None, :])
        same = (offs_c[:, None] >= offs_c[None, :]) & (seg[:, None] == seg[None, :])
        decay = tl.exp(tl.where(same, g[:, None] - g[None, :], float("-inf")))
        return cb, decay, g, dt, seg

    @triton.jit
    def _chunk_out(x_ptr, c_ptr, cb_ptr, g_ptr, dt_ptr, seg_ptr, s_ptr, y_ptr, T, H, N, P, NC,
                   s_xb, s_xt, s_xh, s_cb, s_ct, s_yb, s_yt, s_yh, C: tl.constexpr, BN: tl.constexpr,
                   BP: tl.constexpr, PRECISION: tl.constexpr):
        i_p, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        b, h = bh // H, bh % H
        offs_c, offs_p = tl.arange(0, C), i_p * BP + tl.arange(0, BP)
        t = c * C + offs_c
        t_ok, p_ok = t < T, offs_p < P
        cb, decay, g, dt, seg = _decays(cb_ptr, g_ptr, dt_ptr, seg_ptr, b, bh, c, NC, C)
        x = tl.load(x_ptr + b * s_xb + t[:, None] * s_xt + h * s_xh + offs_p[None, :],
                    mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        acc = tl.dot((cb * decay * dt[None, :]).to(x.dtype), x, input_precision=PRECISION)
        read = tl.zeros([C, BP], dtype=tl.float32)
        s_base = (bh * NC + c) * N * P
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_ok = offs_n < N
            cq = tl.load(c_ptr + b * s_cb + t[:, None] * s_ct + offs_n[None, :], mask=t_ok[:, None] & n_ok[None, :],
                         other=0.0)
            st = tl.load(s_ptr + s_base + offs_n[:, None] * P + offs_p[None, :], mask=n_ok[:, None] & p_ok[None, :],
                         other=0.0)
            read += tl.dot(cq, st.to(cq.dtype), input_precision=PRECISION)
        acc += tl.where(seg == 0, tl.exp(g), 0.0)[:, None] * read
        tl.store(y_ptr + b * s_yb + t[:, None] * s_yt + h * s_yh + offs_p[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & p_ok[None, :])

    @triton.jit
    def _chunk_bwd(x_ptr, dy_ptr, b_ptr, c_ptr, cb_ptr, g_ptr, dt_ptr, seg_ptr, s_ptr, dl_ptr,
                   dx_ptr, ddt_ptr, dg_ptr, dcb_ptr, db_ptr, dc_ptr, T, H, N, P, NC, BHT,
                   s_xb, s_xt, s_xh, s_dyb, s_dyt, s_dyh, s_bb, s_bt, s_cb, s_ct, s_dxb, s_dxt, s_dxh,
                   C: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, PRECISION: tl.constexpr):
        """One P block of one chunk of one (batch, head). Everything summed over P (d dt, dG, d C B^T, the
        state parts of dB / dC) is a partial sum: ddt / dg per P block, the rest atomically added."""
        i_p, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        b, h = bh // H, bh % H
        offs_c, offs_p = tl.arange(0, C), i_p * BP + tl.arange(0, BP)
        t = c * C + offs_c
        t_ok, p_ok = t < T, offs_p < P
        tp_ok = t_ok[:, None] & p_ok[None, :]
        cb, decay, g, dt, seg = _decays(cb_ptr, g_ptr, dt_ptr, seg_ptr, b, bh, c, NC, C)
        x = tl.load(x_ptr + b * s_xb + t[:, None] * s_xt + h * s_xh + offs_p[None, :], mask=tp_ok, other=0.0)
        dy = tl.load(dy_ptr + b * s_dyb + t[:, None] * s_dyt + h * s_dyh + offs_p[None, :], mask=tp_ok, other=0.0)
        # intra-chunk term: d(C B^T)_ij = same_ij e^{G_i - G_j} dt_j (dy_i . x_j)
        dcb = tl.dot(dy, tl.trans(x), input_precision=PRECISION) * decay * dt[None, :]
        cb_offs = ((b * NC + c) * C + offs_c[:, None]) * C + offs_c[None, :]
        tl.atomic_add(dcb_ptr + cb_offs, dcb, sem="relaxed")
        through_g = dcb * cb  # d/dG_i of the term, and minus d/dG_j
        dg = tl.sum(through_g, axis=1) - tl.sum(through_g, axis=0)
        bracket = tl.dot(tl.trans((cb * decay).to(dy.dtype)), dy, input_precision=PRECISION)  # [C, BP]
        # state read (S_c -> y) and state write (x -> L_c) terms, over N blocks
        g_last = tl.load(g_ptr + bh * NC * C + c * C + C - 1)
        seg_last = tl.load(seg_ptr + b * NC * C + c * C + C - 1)
        w_read = tl.where(seg == 0, tl.exp(g), 0.0)
        w_write = tl.where(seg == seg_last, tl.exp(g_last - g), 0.0)
        read = tl.zeros([C, BP], dtype=tl.float32)  # C_i S_c
        write = tl.zeros([C, BP], dtype=tl.float32)  # B_j dL_c
        s_base = (bh * NC + c) * N * P
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_ok = offs_n < N
            tn_ok, np_ok = t_ok[:, None] & n_ok[None, :], n_ok[:, None] & p_ok[None, :]
            cq = tl.load(c_ptr + b * s_cb + t[:, None] * s_ct + offs_n[None, :], mask=tn_ok, other=0.0)
            bk = tl.load(b_ptr + b * s_bb + t[:, None] * s_bt + offs_n[None, :], mask=tn_ok, other=0.0)
            st = tl.load(s_ptr + s_base + offs_n[:, None] * P + offs_p[None, :], mask=np_ok, other=0.0)
            dl = tl.load(dl_ptr + s_base + offs_n[:, None] * P + offs_p[None, :], mask=np_ok, other=0.0)
            read += tl.dot(cq, st.to(cq.dtype), input_precision=PRECISION)
            write += tl.dot(bk, dl.to(bk.dtype), input_precision=PRECISION)
            dc = w_read[:, None] * tl.dot(dy, tl.trans(st).to(dy.dtype), input_precision=PRECISION)
            db = (w_write * dt)[:, None] * tl.dot(x, tl.trans(dl).to(x.dtype), input_precision=PRECISION)
            bcn_offs = (b * NC * C + t[:, None]) * N + offs_n[None, :]  # [B, T', N] float32
            all_n = (offs_c[:, None] >= 0) & n_ok[None, :]  # the full tile's shape (rows past T add zeros)
            tl.atomic_add(dc_ptr + bcn_offs, dc, mask=all_n, sem="relaxed")
            tl.atomic_add(db_ptr + bcn_offs, db, mask=all_n, sem="relaxed")
        bracket += w_write[:, None] * write  # dL/d(dt_j x_j)
        tl.store(dx_ptr + b * s_dxb + t[:, None] * s_dxt + h * s_dxh + offs_p[None, :],
                 (dt[:, None] * bracket).to(dx_ptr.dtype.element_ty), mask=tp_ok)
        xf, dyf = x.to(tl.float32), dy.to(tl.float32)
        written = w_write * dt * tl.sum(write * xf, axis=1)
        dg += w_read * tl.sum(read * dyf, axis=1) - written
        dg += tl.where(offs_c == C - 1, tl.sum(written, axis=0), 0.0)
        part = i_p * BHT + bh * NC * C + c * C + offs_c  # [P blocks, B, H, T']
        tl.store(ddt_ptr + part, tl.sum(bracket * xf, axis=1))
        tl.store(dg_ptr + part, dg)


    @triton.jit
    def _finish_dt(ddt_ptr, dg_ptr, ddec_ptr, dec_ptr, a_ptr, dt_ptr, out_ptr, da_ptr, T, H, NC, NPB, BHT,
                   s_ob, s_ot, s_oh, C: tl.constexpr):
        """Per (chunk, b*h): the P-block partials summed, the chunk decay's gradient added at the chunk's
        last position, d(dt a) = reverse cumulative sum of dG; -> d dt [B, T, H] and da per chunk."""
        c, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs = tl.arange(0, C)
        row = bh * NC * C + c * C
        ddt, dg = tl.zeros([C], dtype=tl.float32), tl.zeros([C], dtype=tl.float32)
        for k in range(NPB):
            ddt += tl.load(ddt_ptr + k * BHT + row + offs)
            dg += tl.load(dg_ptr + k * BHT + row + offs)
        ddec = tl.load(ddec_ptr + bh * NC + c) * tl.load(dec_ptr + bh * NC + c)
        dg = tl.cumsum(tl.where(offs == C - 1, dg + ddec, dg), axis=0, reverse=True)
        t = c * C + offs
        tl.store(out_ptr + b * s_ob + t * s_ot + h * s_oh, ddt + dg * tl.load(a_ptr + h).to(tl.float32), mask=t < T)
        tl.store(da_ptr + bh * NC + c, tl.sum(dg * tl.load(dt_ptr + row + offs), axis=0))

    @triton.jit
    def _finish_bc(dcb_ptr, b_ptr, c_ptr, dbs_ptr, dcs_ptr, db_ptr, dc_ptr, T, N, NC, s_bb, s_bt, s_cb, s_ct,
                   C: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
        """Per (N block, chunk, batch): dC = dC_state + d(C B^T) B, dB = dB_state + d(C B^T)^T C."""
        i_n, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_c, offs_n = tl.arange(0, C), i_n * BN + tl.arange(0, BN)
        t = c * C + offs_c
        tn_ok = (t < T)[:, None] & (offs_n < N)[None, :]
        dcb = tl.load(dcb_ptr + ((b * NC + c) * C + offs_c[:, None]) * C + offs_c[None, :])
        cq = tl.load(c_ptr + b * s_cb + t[:, None] * s_ct + offs_n[None, :], mask=tn_ok, other=0.0).to(tl.float32)
        bk = tl.load(b_ptr + b * s_bb + t[:, None] * s_bt + offs_n[None, :], mask=tn_ok, other=0.0).to(tl.float32)
        state_offs = (b * NC * C + t[:, None]) * N + offs_n[None, :]
        dc = tl.load(dcs_ptr + state_offs, mask=tn_ok, other=0.0) + tl.dot(dcb, bk, input_precision=PRECISION)
        db = tl.load(dbs_ptr + state_offs, mask=tn_ok, other=0.0) + tl.dot(tl.trans(dcb), cq,
                                                                          input_precision=PRECISION)
        out_offs = (b * T + t[:, None]) * N + offs_n[None, :]
        tl.store(dc_ptr + out_offs, dc.to(dc_ptr.dtype.element_ty), mask=tn_ok)
        tl.store(db_ptr + out_offs, db.to(db_ptr.dtype.element_ty), mask=tn_ok)


def _pow2(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))  # tl.dot needs >= 16 in every dim


def _warps(chunk: int, bp: int) -> int:
    """8 warps for 64 x 64 tiles: with 4 the [C, C] and [C, BP] float32 tiles exceed 255 registers a thread."""
    return 8 if chunk * bp >= 4096 else 4


def chunk_prep(dt, a, starts, chunk: int):
    """dt [B, T, H], a [H], starts [B, T] bool or None -> (G, dt) [B, H, T'] float32, seg [B, T'] int32,
    decay [B, H, NC] float32 (module docstring)."""
    bsz, t, h = dt.shape
    nc = triton.cdiv(t, chunk)
    g = torch.empty(bsz, h, nc * chunk, device=dt.device, dtype=torch.float32)
    dtp, seg = torch.empty_like(g), torch.empty(bsz, nc * chunk, device=dt.device, dtype=torch.int32)
    decay = g.new_empty(bsz, h, nc)
    st = None if starts is None else starts.contiguous()
    _chunk_prep[(nc, bsz * h)](dt, a.contiguous(), seg if st is None else st, g, dtp, seg, decay, t, h, nc,
                               *dt.stride(), HAS_STARTS=st is not None, C=chunk, num_warps=1)
    return g, dtp, seg, decay


def chunk_cb(b_in, c_in, chunk: int) -> torch.Tensor:
    """b_in, c_in [B, T, N] -> C B^T per chunk [B, NC, C, C] float32."""
    bsz, t, n = b_in.shape
    nc = triton.cdiv(t, chunk)
    cb = torch.empty(bsz, nc, chunk, chunk, device=b_in.device, dtype=torch.float32)
    _chunk_cb[(nc, bsz)](b_in, c_in, cb, t, n, nc, *b_in.stride()[:2], *c_in.stride()[:2], C=chunk,
                         BN=_pow2(n, 64), PRECISION=_precision(b_in.dtype), num_warps=4)
    return cb


def chunk_states(k: torch.Tensor, v: torch.Tensor, g, dt, seg, chunk: int, to_end: bool) -> torch.Tensor:
    """k [B, T, N] (B or C), v [B, T, H, P] (x or dy); g, dt [B, H, T'] float32; seg [B, T'] int32 ->
    [B, H, NC, N, P] float32: L_c (to_end) or the output-side gradient of S_c (not to_end)."""
    bsz, t, h, p = v.shape
    n, nc = k.shape[-1], g.shape[-1] // chunk
    bn, bp = _pow2(n, 64), _pow2(p, 64)
    out = torch.empty(bsz, h, nc, n, p, device=v.device, dtype=torch.float32)
    grid = (triton.cdiv(n, bn) * triton.cdiv(p, bp), nc, bsz * h)
    _chunk_state[grid](k, v, g, dt, seg, out, t, h, n, p, nc, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       v.stride(2), TO_END=to_end, C=chunk, BN=bn, BP=bp, PRECISION=_precision(v.dtype),
                       num_warps=4)
    return out


def pass_fwd(states: torch.Tensor, decay: torch.Tensor, initial: torch.Tensor | None) -> torch.Tensor:
    """In place: states [B, H, NC, N, P] L_c -> S_c; decay [B, H, NC]; initial [B, H, N, P] or None.
    Returns the final state [B, H, N, P] float32."""
    bsz, h, nc, n, p = states.shape
    final = states.new_empty(bsz, h, n, p)
    block = min(1024, triton.next_power_of_2(n * p))
    init = None if initial is None else initial.contiguous()
    _pass_fwd[(triton.cdiv(n * p, block), bsz * h)](states, decay, final if init is None else init, final, nc,
                                                     n * p, HAS_INIT=init is not None, BLOCK=block, num_warps=4)
    return final


def pass_bwd(d_states, states, decay, d_final):
    """In place: d_states [B, H, NC, N, P] (gradient reaching S_c from the outputs) -> dL_c. Returns
    (d initial [B, H, N, P] float32, d decay [B, H, NC] float32)."""
    bsz, h, nc, n, p = states.shape
    block = min(1024, triton.next_power_of_2(n * p))
    n_blk = triton.cdiv(n * p, block)
    d_init = states.new_empty(bsz, h, n, p)
    d_decay = states.new_empty(n_blk, bsz, h, nc)
    d_final = None if d_final is None else d_final.contiguous()
    _pass_bwd[(n_blk, bsz * h)](d_states, states, decay, d_init if d_final is None else d_final, d_init, d_decay,
                                nc, n * p, bsz * h, HAS_DFINAL=d_final is not None, BLOCK=block, num_warps=4)
    return d_init, d_decay.sum(0)


def chunk_out(x, c_in, cb, g, dt, seg, states, chunk: int) -> torch.Tensor:
    """y [B, T, H, P] in x's dtype (inputs as the module docstring; cb [B, NC, C, C] float32)."""
    bsz, t, h, p = x.shape
    n, nc = c_in.shape[-1], g.shape[-1] // chunk
    bn, bp = _pow2(n, 64), _pow2(p, 64)
    y = torch.empty(bsz, t, h, p, device=x.device, dtype=x.dtype)
    _chunk_out[(triton.cdiv(p, bp), nc, bsz * h)](
        x, c_in, cb, g, dt, seg, states, y, t, h, n, p, nc, *x.stride()[:3], *c_in.stride()[:2], *y.stride()[:3],
        C=chunk, BN=bn, BP=bp, PRECISION=_precision(x.dtype), num_warps=_warps(chunk, bp))
    return y


def chunk_bwd(x, dy, b_in, c_in, cb, g, dt, seg, states, d_last, chunk: int):
    """-> dx [B, T, H, P], the direct d dt and dG [B, H, T'] float32 (summed over P blocks), d(C B^T)
    [B, NC, C, C] and the state parts of dB, dC [B, T', N], float32 summed over heads."""
    bsz, t, h, p = x.shape
    n, nc = c_in.shape[-1], g.shape[-1] // chunk
    bn, bp = _pow2(n, 32), _pow2(p, 64)  # N blocks of 32: fewer live registers beside the [C, C] tiles
    n_pb = triton.cdiv(p, bp)
    dx = torch.empty(bsz, t, h, p, device=x.device, dtype=x.dtype)
    ddt = g.new_empty(n_pb, *g.shape)
    dg = g.new_empty(n_pb, *g.shape)
    dcb = torch.zeros_like(cb)
    db = g.new_zeros(bsz, nc * chunk, n)
    dc = torch.zeros_like(db)
    _chunk_bwd[(n_pb, nc, bsz * h)](
        x, dy, b_in, c_in, cb, g, dt, seg, states, d_last, dx, ddt, dg, dcb, db, dc, t, h, n, p, nc, g.numel(),
        *x.stride()[:3], *dy.stride()[:3], *b_in.stride()[:2], *c_in.stride()[:2], *dx.stride()[:3],
        C=chunk, BN=bn, BP=bp, PRECISION=_precision(x.dtype), num_warps=_warps(chunk, bp))
    return dx, ddt, dg, dcb, db, dc


def finish_dt(ddt, dg, d_decay, decay, a, dt, t: int, chunk: int, out_dtype: torch.dtype):
    """chunk_bwd's partials [P blocks, B, H, T'] -> (d dt [B, t, H] in out_dtype, da [H] float32)."""
    n_pb, bsz, h, tp = ddt.shape
    nc = tp // chunk
    out = torch.empty(bsz, t, h, device=ddt.device, dtype=out_dtype)
    da = decay.new_empty(bsz, h, nc)
    _finish_dt[(nc, bsz * h)](ddt, dg, d_decay, decay, a.contiguous(), dt, out, da, t, h, nc, n_pb,
                              ddt[0].numel(), *out.stride(), C=chunk, num_warps=1)
    return out, da.sum((0, 2))


def finish_bc(dcb, b_in, c_in, db_state, dc_state, chunk: int):
    """dB, dC [B, T, N] in b_in's / c_in's dtype from d(C B^T) and the state parts (chunk_bwd)."""
    bsz, t, n = b_in.shape
    nc, bn = dcb.shape[1], _pow2(n, 64)
    db = torch.empty(bsz, t, n, device=b_in.device, dtype=b_in.dtype)
    dc = torch.empty(bsz, t, n, device=c_in.device, dtype=c_in.dtype)
    _finish_bc[(triton.cdiv(n, bn), nc, bsz)](dcb, b_in, c_in, db_state, dc_state, db, dc, t, n, nc,
                                              *b_in.stride()[:2], *c_in.stride()[:2], C=chunk, BN=bn,
                                              PRECISION=_precision(b_in.dtype), num_warps=4)
    return db, dc
