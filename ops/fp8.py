"""FP8 linear layers without Transformer Engine: dense (`torch._scaled_mm`) and grouped MoE experts
(`torch._scaled_grouped_mm`), each with a fake-quantised float reference of the same math.

Recipe (dense, `fp8_linear`): current per-tensor scaling. Each operand is quantised right before its GEMM
with scale = fp8_max / max(amax, 1e-12), amax and scale in fp32; the GEMM gets the inverse scales and
writes bf16 (the weight gradient fp32 when it accumulates into megatron's fp32 main_grad).
- forward y = x @ w^T: x and w in e4m3 (3 mantissa bits, range 448): activations and weights have a
  narrow dynamic range, so precision matters more than range.
- backward: the output gradient in e5m2 (range 57344, 2 mantissa bits), as torchao's and Transformer
  Engine's default recipes do: gradients span far more orders of magnitude than activations.
  dgrad dy @ w and wgrad dy^T @ x are FP8 GEMMs too (e5m2 x e4m3 is a supported cuBLASLt pair).
- the forward GEMM uses fast accumulation, the gradient GEMMs do not (torchao's default: fast
  accumulation loses precision over the long token reduction of wgrad).
- master weights are untouched: w is quantised afresh on every call from the (bf16) parameter.
- saved for backward are the FP8 copies already transposed for the gradient GEMMs (x^T and w^T, 1 byte
  per element, half of what a bf16 linear keeps), so backward does not quantise them again.
Current scaling (no amax history) needs no state, so checkpoints and resumption are those of bf16.

`torch._scaled_mm` takes the left operand row-major and the right one column-major, every dimension a
multiple of 16. Quantisation emits both the row-major tensor and its transpose in one compiled kernel
(amax reduction + scale + cast + transposed write fuse under torch.compile on CUDA).

Grouped experts (`fp8_segment_mm`): torch 2.11's `_scaled_grouped_mm` on Hopper takes e4m3 operands
with rowwise fp32 scales only, so the forward and dgrad quantise per row (per token, per expert output
or input channel) in e4m3; the weight gradient (ragged token reduction per expert) stays a bf16 grouped
GEMM, like the rest of the backward of ops/moe.py's grouped path. Where the grouped kernel does not exist
(Ada, compute capability 8.9) the same rowwise GEMMs run as one torch._scaled_mm per expert.

Implementations: "scaled_mm" (the fast path; CUDA with compute capability >= 8.9, refused elsewhere on
CUDA) and "reference" (same quantised tensors and scales, dequantised and multiplied in fp32): the CPU
path and the yardstick the GPU tests hold the fast path to.
"""

from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_EPS = 1e-12  # an all-zero tensor gets a finite scale (and quantises to zeros)
ALIGN = 16  # every _scaled_mm dimension


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scale mapping |values| <= amax onto the full range of `dtype`."""
    return torch.finfo(dtype).max / amax.float().clamp_min(AMAX_EPS)


def quantise(t: torch.Tensor, dtype: torch.dtype, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t * scale saturated to the fp8 range, cast to `dtype`; 1/scale in fp32). Per-tensor scale when
    `dim` is None, else one scale per slice along the other dims (amax over `dim`, kept as size 1)."""
    wide = t.float()
    amax = wide.abs().amax() if dim is None else wide.abs().amax(dim=dim, keepdim=True)
    scale = fp8_scale(amax, dtype)
    fmax = torch.finfo(dtype).max
    return (wide * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def dequantise(q: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    return q.float() * inv_scale


def _quantise_pair(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor quantised t, its contiguous transpose and 1/scale (t 2-D)."""
    q, inv = quantise(t, dtype)
    return q.contiguous(), q.t().contiguous(), inv  # elementwise ops keep a transposed input's strides


# dynamic: one graph for every linear's shape (QKV, proj, fc1, fc2 and their gradients)
_compiled_pair = torch.compile(_quantise_pair, dynamic=True)


def quantise_pair(t: torch.Tensor, dtype: torch.dtype):
    # detached: a weight arrives as an nn.Parameter, and a compiled graph guards on the input's type
    # (Parameter vs Tensor recompiled until dynamo's limit, then ran eager)
    return (_compiled_pair if t.is_cuda else _quantise_pair)(t.detach(), dtype)


def check_fast_path(device: torch.device) -> None:
    """Refuse the FP8 GEMMs where the hardware has none (CPU tests choose the reference explicitly)."""
    if device.type != "cuda":
        raise RuntimeError(f"FP8 GEMMs (torch._scaled_mm) run on CUDA only, got a tensor on {device}; "
                           "use impl='reference' for the fake-quantised CPU path")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(f"FP8 GEMMs need CUDA compute capability >= 8.9 (Ada/Hopper), "
                           f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use train.precision: bf16")


def default_impl(t: torch.Tensor) -> str:
    """'scaled_mm' on CUDA (after the capability check), 'reference' on CPU."""
    if t.is_cuda:
        check_fast_path(t.device)
        return "scaled_mm"
    return "reference"


def check_dims(**dims: int) -> None:
    bad = {k: v for k, v in dims.items() if v % ALIGN}
    if bad:
        raise ValueError(f"FP8 linear: torch._scaled_mm needs every GEMM dimension to be a multiple of {ALIGN}, "
                         f"got {bad} (tokens = sequence x micro-batch on this rank; features = the layer's "
                         f"per-TP-rank width): adjust them or use train.precision: bf16")


def gemm(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
         out_dtype: torch.dtype, impl: str, fast_accum: bool = False) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) -> out_dtype, a [M, K] row-major and b [K, N] column-major fp8."""
    if impl == "scaled_mm":
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    if impl == "reference":
        return (dequantise(a, scale_a) @ dequantise(b, scale_b)).to(out_dtype)
    raise ValueError(f"FP8 gemm: impl must be 'scaled_mm' or 'reference', got {impl!r}")


def fp8_linear_forward(x: torch.Tensor, w: torch.Tensor, impl: str):
    """y = x @ w^T for x [tokens, in], w [out, in]; returns (y in x.dtype, tensors kept for backward)."""
    check_dims(tokens=x.shape[0], in_features=x.shape[1], out_features=w.shape[0])
    x8, x8t, x_inv = quantise_pair(x, E4M3)
    w8, w8t, w_inv = quantise_pair(w, E4M3)
    y = gemm(x8, x_inv, w8.t(), w_inv, x.dtype, impl, fast_accum=True)
    return y, (x8t, x_inv, w8t, w_inv)


def fp8_linear_backward(dy: torch.Tensor, saved, impl: str, wgrad_dtype: torch.dtype):
    """(dx [tokens, in] in dy.dtype, dw [out, in] in wgrad_dtype) from dy [tokens, out]."""
    x8t, x_inv, w8t, w_inv = saved
    g8, g8t, g_inv = quantise_pair(dy, E5M2)
    dx = gemm(g8, g_inv, w8t.t(), w_inv, dy.dtype, impl)  # [T, N] @ [N, K]
    dw = gemm(g8t, g_inv, x8t.t(), x_inv, wgrad_dtype, impl)  # [N, T] @ [T, K]
    return dx, dw


class FP8Linear(torch.autograd.Function):
    """y = x @ w^T (x [..., in], w [out, in]) with FP8 GEMMs each way; gradients in x's/w's dtypes."""

    @staticmethod
    def forward(ctx, x, w, impl):
        y, saved = fp8_linear_forward(x.reshape(-1, x.shape[-1]), w, impl)
        ctx.save_for_backward(*saved)
        ctx.impl, ctx.x_shape, ctx.w_dtype = impl, x.shape, w.dtype
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        dx, dw = fp8_linear_backward(dy.reshape(-1, dy.shape[-1]).contiguous(), ctx.saved_tensors, ctx.impl,
                                     ctx.w_dtype)
        return dx.view(ctx.x_shape), dw, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """FP8 y = x @ w^T; impl None picks the fast path on CUDA (refusing GPUs without FP8), the
    reference on CPU."""
    return FP8Linear.apply(x, w, impl or default_impl(x))


# ---- grouped experts -------------------------------------------------------------------------------
def _quantise_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one scale per row (amax over the last dim): contiguous q, 1/scale with the last dim dropped."""
    q, inv = quantise(t, E4M3, dim=-1)
    return q.contiguous(), inv.squeeze(-1).contiguous()


_compiled_rows = torch.compile(_quantise_rows, dynamic=True)


def quantise_rows(t: torch.Tensor):
    return (_compiled_rows if t.is_cuda else _quantise_rows)(t.detach())  # detached: see quantise_pair


def _segments(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = [0] + offsets.tolist()
    return list(zip(ends[:-1], ends[1:]))


def grouped_kernel_available(device: torch.device) -> bool:
    """torch._scaled_grouped_mm's rowwise FP8 kernel exists for compute capability 9.x / 10.x only."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_gemm(a8, a_inv, b8, b_inv, offsets, out_dtype: torch.dtype, impl: str,
                 fast_accum: bool = False) -> torch.Tensor:
    """Rows of segment e of a [rows, K] (row-major, 1/scale per row) times b[e] ([E, K, N] column-major,
    1/scale per (e, column)) -> [rows, N] in out_dtype (bf16 on the fast paths). impl 'scaled_mm': one
    grouped kernel where it exists, else (Ada) the per-expert loop; 'scaled_mm_loop': one rowwise
    torch._scaled_mm per non-empty expert (a host sync for the segment bounds)."""
    if impl == "scaled_mm" and grouped_kernel_available(a8.device):
        return torch._scaled_grouped_mm(a8, b8, a_inv, b_inv, offs=offsets, out_dtype=out_dtype,
                                        use_fast_accum=fast_accum)
    if impl in ("scaled_mm", "scaled_mm_loop"):
        # each segment's row scales are copied: a slice starting at a row that is not a multiple of 4
        # leaves the fp32 scale pointer off cuBLASLt's 16-byte alignment (CUBLAS_STATUS_NOT_SUPPORTED)
        parts = [torch._scaled_mm(a8[lo:hi], b8[e], scale_a=a_inv[lo:hi, None].clone(),
                                  scale_b=b_inv[e, None, :], out_dtype=out_dtype, use_fast_accum=fast_accum)
                 for e, (lo, hi) in enumerate(_segments(offsets)) if hi > lo]
        return torch.cat(parts, dim=0) if parts else a8.new_empty((0, b8.shape[-1]), dtype=out_dtype)
    if impl != "reference":
        raise ValueError(f"FP8 grouped gemm: impl must be 'scaled_mm', 'scaled_mm_loop' or 'reference', "
                         f"got {impl!r}")
    a, b = dequantise(a8, a_inv[:, None]), dequantise(b8, b_inv[:, None, :])
    parts = [a[lo:hi] @ b[e] for e, (lo, hi) in enumerate(_segments(offsets))]
    return torch.cat(parts, dim=0).to(out_dtype)


def segment_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, experts: int, impl: str):
    """[E, out, in]: segment e's dy^T @ x, in bf16 (a bf16 grouped GEMM on the fast path)."""
    if impl in ("scaled_mm", "scaled_mm_loop"):
        return torch._grouped_mm(dy.t(), x, offs=offsets)
    parts = [dy[lo:hi].float().t() @ x[lo:hi].float() for lo, hi in _segments(offsets)]
    return torch.stack(parts).to(dy.dtype) if parts else dy.new_zeros(experts, dy.shape[1], x.shape[1])


class FP8SegmentMM(torch.autograd.Function):
    """x [rows, in] grouped by expert (segment e ends at offsets[e]) times w[e]^T (w [E, out, in])."""

    @staticmethod
    def forward(ctx, x, w, offsets, impl):
        x8, x_inv = quantise_rows(x)
        w8, w_inv = quantise_rows(w)  # scale per (expert, output channel)
        ctx.save_for_backward(x, w, offsets)
        ctx.impl = impl
        return grouped_gemm(x8, x_inv, w8.transpose(-2, -1), w_inv, offsets, x.dtype, impl, fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        g8, g_inv = quantise_rows(dy)
        wt8, wt_inv = quantise_rows(w.transpose(-2, -1))  # [E, in, out]: scale per (expert, input channel)
        dx = grouped_gemm(g8, g_inv, wt8.transpose(-2, -1), wt_inv, offsets, dy.dtype, ctx.impl)
        dw = segment_wgrad(dy, x, offsets, w.shape[0], ctx.impl)
        return dx, dw.to(w.dtype), None, None


def check_grouped_dims(x: torch.Tensor, w: torch.Tensor) -> None:
    bad = {k: v for k, v in (("in_features", w.shape[2]), ("out_features", w.shape[1])) if v % ALIGN}
    if x.dtype != torch.bfloat16 or bad:
        raise ValueError(f"FP8 experts: torch._scaled_grouped_mm needs bf16 activations (got {x.dtype}) and "
                         f"expert widths that are multiples of {ALIGN} (got {bad or 'aligned'}): "
                         "use train.precision: bf16")


def fp8_segment_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """ops/moe.py's segment_mm (x [rows, in], w [E, out, in], int32 segment ends) with FP8 forward and
    input-gradient GEMMs; impl as for fp8_linear."""
    impl = impl or default_impl(x)
    if impl != "reference":
        check_grouped_dims(x, w)
    return FP8SegmentMM.apply(x, w, offsets, impl)
