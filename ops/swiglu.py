"""SwiGLU on a fused gate/up projection: y = [a | b] along the last dim -> silu(a) * b.

`swiglu_reference` / `swiglu_backward_reference` are the obviously correct forms (float32 math or
wider, one rounding at the end). `swiglu` is the training path: on CUDA with Triton, one Triton kernel each way; the
backward reads a, b and the output gradient once and writes both halves of the input gradient in the same
program (a pointwise `torch.cat` of the two halves, as compiled by Inductor, reads a and the output gradient
twice: ~7 vs 5 activation passes). Elsewhere the reference forms run under autograd.

Trust: the first Triton use per dtype runs forward+backward on a small tensor against the reference and
raises if they disagree, so an unverified GPU/Triton combination refuses instead of training on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the reference forms are used
    triton = None

_verified: dict[torch.dtype, bool] = {}


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    a, b = _wide(y).chunk(2, dim=-1)
    return (F.silu(a) * b).to(y.dtype)


def swiglu_backward_reference(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dy of sum(g * silu(a) * b): [g * b * sig(a) * (1 + a * (1 - sig(a))) | g * silu(a)]."""
    a, b = _wide(y).chunk(2, dim=-1)
    gf, s = _wide(g), torch.sigmoid(a)
    return torch.cat((gf * b * s * (1 + a * (1 - s)), gf * a * s), dim=-1).to(y.dtype)


if triton is not None:
    @triton.jit
    def _swiglu_fwd_kernel(y_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        a = tl.load(y_ptr + row * 2 * width + cols, mask=mask).to(tl.float32)
        b = tl.load(y_ptr + row * 2 * width + width + cols, mask=mask).to(tl.float32)
        out = a * tl.sigmoid(a) * b
        tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, y_ptr, dy_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        a = tl.load(y_ptr + row * 2 * width + cols, mask=mask).to(tl.float32)
        b = tl.load(y_ptr + row * 2 * width + width + cols, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + row * width + cols, mask=mask).to(tl.float32)
        s = tl.sigmoid(a)
        da = g * b * s * (1 + a * (1 - s))
        db = g * a * s
        tl.store(dy_ptr + row * 2 * width + cols, da.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + row * 2 * width + width + cols, db.to(dy_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, width: int) -> tuple[tuple[int, int], int]:
    block = min(1024, triton.next_power_of_2(width))
    return (rows, triton.cdiv(width, block)), block


def _fwd_triton(y: torch.Tensor) -> torch.Tensor:
    width = y.shape[-1] // 2
    out = torch.empty(*y.shape[:-1], width, dtype=y.dtype, device=y.device)
    grid, block = _grid(y.numel() // (2 * width), width)
    _swiglu_fwd_kernel[grid](y, out, width, BLOCK=block, num_warps=4)
    return out


def _bwd_triton(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    width = y.shape[-1] // 2
    dy = torch.empty_like(y)
    grid, block = _grid(y.numel() // (2 * width), width)
    _swiglu_bwd_kernel[grid](g.contiguous(), y, dy, width, BLOCK=block, num_warps=4)
    return dy


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        y = y.contiguous()
        ctx.save_for_backward(y)
        return _fwd_triton(y)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _bwd_triton(g, y)


def triton_supported(y: torch.Tensor) -> bool:
    return (triton is not None and y.is_cuda and y.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and y.shape[-1] % 2 == 0 and y.numel() > 0)


def _check_triton(dtype: torch.dtype, device: torch.device) -> None:
    """First use per dtype: forward and backward against the reference on a small tensor."""
    if _verified.get(dtype):
        return
    gen = torch.Generator(device=device).manual_seed(0)
    y = (torch.randn(37, 2 * 1000, generator=gen, device=device) * 3).to(dtype)
    g = torch.randn(37, 1000, generator=gen, device=device).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    try:
        torch.testing.assert_close(_fwd_triton(y), swiglu_reference(y), **tol)
        torch.testing.assert_close(_bwd_triton(g, y), swiglu_backward_reference(g, y), **tol)
    except AssertionError as exc:
        raise RuntimeError(f"the Triton SwiGLU kernel disagrees with its reference on "
                           f"{torch.cuda.get_device_name(device)} ({dtype}, Triton {triton.__version__}); "
                           f"refusing to train with it: {exc}") from exc
    _verified[dtype] = True


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for y = [a | b] (last dim), differentiable; Triton on CUDA, the reference elsewhere."""
    if triton_supported(y):
        _check_triton(y.dtype, y.device)
        return _SwiGLUTriton.apply(y)
    return swiglu_reference(y)
