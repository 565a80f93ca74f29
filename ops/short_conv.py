"""Causal depthwise short convolution (the kernel-4 conv before Gated DeltaNet / Mamba2 mixing).

x [B, T, C], weight [C, K] -> out [B, T, C] with out_t = sum_i weight[:, K-1-i] * x_{t-i}, i < K.
With doc_ids [B, T], taps reaching into a previous document are dropped (packed sequences behave as
if each document were alone). A `halo` [B, K-1, C] supplies the K-1 inputs before x (context
parallelism: the previous sequence chunk's last inputs, held by another rank) instead of zeros.
Reference: `F.conv1d` (no document support).

The layers apply SiLU right after the conv; `conv_silu` is their one entry point and picks the kernel:
`torch` (`F.silu(short_conv(...))`) or `triton` (one fused launch each way, ops/short_conv_triton.py),
by RAYTRON_CONV_KERNEL. The default is `torch` everywhere until the Triton kernels are measured on a GPU
(benchmarks/models/bench_short_conv.py, tests/ops/test_short_conv_triton_gpu.py); `DEFAULT_KERNEL` is
what to change then (CPU and operands Triton cannot take keep the `torch` path whatever the default).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from . import short_conv_triton as _triton
from .self_check import isolated_autograd

KERNELS = ("torch", "triton")
DEFAULT_KERNEL = "torch"  # where Triton runs; unmeasured on a GPU so far
_log = logging.getLogger(__name__)


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


def conv_silu(x: torch.Tensor, weight: torch.Tensor, doc_ids: torch.Tensor | None = None,
              halo: torch.Tensor | None = None, halo_doc_ids: torch.Tensor | None = None,
              kernel: str | None = None) -> torch.Tensor:
    """`F.silu(short_conv(x, weight, doc_ids, halo, halo_doc_ids))` through `choose_conv_kernel`'s kernel.
    With a halo (context parallelism) always the PyTorch path: the Triton kernels take no halo."""
    if halo is not None:
        _asked_kernel(kernel)  # a wrong name is refused on every path
    elif choose_conv_kernel(x, weight, kernel) == "triton":
        return _triton.short_conv_silu(x, weight, doc_ids)
    return F.silu(short_conv(x, weight, doc_ids, halo, halo_doc_ids))


def choose_conv_kernel(x: torch.Tensor, weight: torch.Tensor, kernel: str | None = None) -> str:
    """`kernel` if given, else RAYTRON_CONV_KERNEL if set (a name from KERNELS), else DEFAULT_KERNEL where
    the Triton kernels run and `torch` elsewhere. `triton` asked for by name where it cannot run is an
    error, never a silent fallback; its first use per device and dtype runs `_self_check`."""
    asked = _asked_kernel(kernel)
    reason = _triton.unsupported_reason(x, weight)
    if asked == "triton" and reason:
        raise ValueError(f"short-conv kernel 'triton' cannot run here: {reason}; use kernel 'torch' "
                         "(or unset RAYTRON_CONV_KERNEL)")
    chosen = asked or (DEFAULT_KERNEL if reason is None else "torch")
    if chosen == "triton":
        _self_check(str(x.device), x.dtype)
    _log_choice(chosen, x.device.type, x.dtype, "asked for" if asked else (reason or "the default"))
    return chosen


def _asked_kernel(kernel: str | None) -> str | None:
    """`kernel`, else RAYTRON_CONV_KERNEL, else None; a name outside KERNELS is an error."""
    asked = kernel or os.environ.get("RAYTRON_CONV_KERNEL") or None
    if asked is not None and asked not in KERNELS:
        raise ValueError(f"short-conv kernel {asked!r} (argument or RAYTRON_CONV_KERNEL): expected one of "
                         f"{', '.join(KERNELS)}")
    return asked


@functools.lru_cache(maxsize=None)
def _log_choice(kernel: str, device: str, dtype: torch.dtype, why: str) -> None:
    _log.info("short conv + SiLU kernel %r on %s (%s): %s", kernel, device, dtype, why)


@functools.lru_cache(maxsize=None)
@isolated_autograd
def _self_check(device: str, dtype: torch.dtype) -> None:
    """Forward + backward of the Triton kernels on a small case (packed documents starting inside blocks,
    a length and a width no multiple of the blocks, two batch rows) against `F.silu(short_conv)` in float64
    on the same (rounded) inputs; refuse the kernels if any of y, dx, dweight disagrees beyond the dtype's
    rounding."""
    gen = torch.Generator(device=device).manual_seed(0)
    bsz, t, c, k = 2, 100, 80, 4
    x = torch.randn(bsz, t, c, device=device, generator=gen).to(dtype)
    weight = torch.randn(c, k, device=device, generator=gen).to(dtype)
    doc_ids = torch.cumsum(torch.rand(bsz, t, device=device, generator=gen) < 0.05, dim=1)
    probe = torch.randn(bsz, t, c, device=device, generator=gen, dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    results = []
    for fast in (True, False):
        inputs = [y.clone() if fast else y.double() for y in (x, weight)]
        inputs = [y.requires_grad_() for y in inputs]
        out = (_triton.short_conv_silu if fast else lambda a, w, d: F.silu(short_conv(a, w, d)))(*inputs, doc_ids)
        results.append([out.detach(), *torch.autograd.grad((out.double() * probe).sum(), inputs)])
    for name, got, ref in zip(("y", "dx", "dweight"), *results):
        err = float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))
        if not err < tol:
            gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
            raise RuntimeError(
                f"the Triton short-conv + SiLU kernels disagree with F.silu(short_conv) on {gpu} "
                f"(Triton {_triton.triton.__version__}, {dtype}): {name} has relative error {err:.2e} > {tol}; "
                "refusing to train with them. Set RAYTRON_CONV_KERNEL=torch to use the PyTorch path.")
