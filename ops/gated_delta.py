"""Gated delta rule (Gated DeltaNet, Yang et al. 2024): token-by-token reference and chunked form.

State S [d_k, d_v] per head. With alpha_t = exp(g_t) and beta_t in (0, 1):
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t.
Shapes: q, k [B, H, T, d_k]; v [B, H, T, d_v]; g, beta [B, H, T]; starts [B, T] bool (document
starts: the state is zeroed before them); output [B, H, T, d_v]. Callers scale q and normalize k.

Chunked form (WY representation, as in the GDN paper and flash-linear-attention's naive chunk):
writing S_t = alpha_t S_{t-1} + k_t u_t^T with u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t), the u of
one chunk solve a unit lower-triangular system
    (I + A) U = diag(beta) V - diag(beta * decay_from_state) K S_0,   A_ij = beta_i dec_ij k_i.k_j (j < i)
so U = U_v - W S_0 with U_v, W computed for all chunks at once; only S_0 is carried chunk to chunk.
The same math runs as fused Triton kernels on CUDA (ops/gated_delta_fused.py), `gated_delta`'s default there.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import gated_delta_fused as fused
from .chunking import chunk_decays, pad_to_chunks
from .self_check import isolated_autograd
from .state_scan import KERNELS as SCAN_KERNELS
from .state_scan import choose_kernel, final_state, state_scan


def gated_delta_recurrent(q, k, v, g, beta, starts: torch.Tensor | None = None,
                          initial_state: torch.Tensor | None = None, return_final_state: bool = False):
    """Reference: the recurrence above, one token at a time (state options as gated_delta_chunked)."""
    b, h, t, dk = q.shape
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state  # [B, H, d_k, d_v]
    out = []
    for i in range(t):
        alpha = g[:, :, i].exp()[..., None, None]  # [B, H, 1, 1]
        if starts is not None:
            alpha = alpha * (~starts[:, i]).to(alpha.dtype)[:, None, None, None]
        ki, vi, bi = k[:, :, i], v[:, :, i], beta[:, :, i, None]
        state = alpha * state
        predicted = torch.einsum("bhk,bhkv->bhv", ki, state)  # what the state recalls for k_i
        state = state + torch.einsum("bhk,bhv->bhkv", ki, bi * (vi - predicted))
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, i], state))
    out = torch.stack(out, dim=2)
    return (out, state) if return_final_state else out


def _unit_lower_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve (I + a) x = rhs for strictly lower-triangular a [.., C, C]; in float32 at least (CUDA has
    no bf16 triangular solve, and the WY inverse is where low precision hurts most)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    eye = torch.eye(a.shape[-1], dtype=dtype, device=a.device)
    x = torch.linalg.solve_triangular(eye + a.to(dtype), rhs.to(dtype), upper=False, unitriangular=True)
    return x.to(rhs.dtype)


def _intra_chunk(q, k, v, g, beta, starts, chunk: int):
    """Everything of the chunked form that is parallel over chunks: the WY terms of the scan and the
    intra-chunk attention-like scores. Returns the scan operands (w, u_v, k_to_end [BH, N, C, d],
    state decay [BH, N]) and the output operands (q scaled from the state, scores qk)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    q, k, v = (pad_to_chunks(x, chunk, 2) for x in (q, k, v))
    g, beta = pad_to_chunks(g, chunk, 2), pad_to_chunks(beta, chunk, 2)
    if starts is not None:
        starts = pad_to_chunks(starts, chunk, 1)
    n = q.shape[2] // chunk
    dec = chunk_decays(g, starts, chunk, q.dtype)
    q, k = q.reshape(b, h, n, chunk, dk), k.reshape(b, h, n, chunk, dk)
    v, beta = v.reshape(b, h, n, chunk, dv), beta.reshape(b, h, n, chunk, 1)
    k_beta = k * beta
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    a = (k_beta @ k.transpose(-1, -2) * dec.within).masked_fill(~strictly_lower, 0)  # [B, H, N, C, C]
    rhs = torch.cat([v * beta, k_beta * dec.from_state[..., None]], dim=-1)
    u_v, w = _unit_lower_solve(a, rhs).split([dv, dk], dim=-1)  # [B, H, N, C, d_v], [.., d_k]
    k_to_end = k * dec.to_end[..., None]  # [B, H, N, C, d_k]
    scan = (w.reshape(b * h, n, chunk, dk), u_v.reshape(b * h, n, chunk, dv),
            k_to_end.reshape(b * h, n, chunk, dk), dec.state.reshape(b * h, n))
    qk = q @ k.transpose(-1, -2) * dec.within  # [B, H, N, C, C], j <= i
    return scan, q * dec.from_state[..., None], qk


# On CUDA with the Triton scan the elementwise work around it (decays, masks, scalings, casts) is the
# bulk of the layer's time in eager mode; compiled, it fuses into a few kernels (the solve stays cuBLAS).
_intra_chunk_compiled = torch.compile(_intra_chunk, dynamic=False)


def gated_delta_chunked(q, k, v, g, beta, chunk: int, starts: torch.Tensor | None = None,
                        kernel: str | None = "reference", initial_state: torch.Tensor | None = None,
                        return_final_state: bool = False):
    """Chunked parallel form: O(T C) work inside chunks, batched over all chunks; the state entering
    each chunk comes from the scan of ops/state_scan.py (`kernel`: reference, torch, triton, or None
    for the fastest that runs here, which on CUDA also compiles the intra-chunk part).
    initial_state [B, H, d_k, d_v]: the state before the first token (0 if None; a document start at
    t = 0 is the caller's to apply). return_final_state: also return the state after the last token."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    kernel = choose_kernel(q.new_empty(1, 1, chunk, dk), v.new_empty(1, 1, chunk, dv), kernel)
    intra = _intra_chunk_compiled if kernel == "triton" else _intra_chunk
    scan, q_state, qk = intra(q, k, v, g, beta, starts, chunk)
    n = scan[0].shape[1]
    initial = None if initial_state is None else initial_state.reshape(b * h, dk, dv)
    states, u = state_scan(*scan, kernel, initial=initial)
    final = final_state(states, u, scan[2], scan[3]).view(b, h, dk, dv) if return_final_state else None
    states, u = states.view(b, h, n, dk, dv).to(q.dtype), u.view(b, h, n, chunk, dv)
    out = q_state @ states + qk @ u  # [B, H, N, C, d_v]
    out = out.reshape(b, h, n * chunk, dv)[:, :, :t]
    return (out, final) if return_final_state else out


KERNELS = ("fused",) + SCAN_KERNELS  # fused: ops/gated_delta_fused.py; else the chunked form with that scan
_log = logging.getLogger(__name__)


def choose_gdn_kernel(q: torch.Tensor, v: torch.Tensor, chunk: int, kernel: str | None = None) -> str:
    """The kernel `gated_delta` runs: `kernel` if given, else RAYTRON_GDN_KERNEL if set (a name from
    KERNELS), else the chunked form when RAYTRON_SCAN_KERNEL names a scan, else `fused` where it runs
    (CUDA with Triton, self-checked on first use), else the chunked form with `choose_kernel`'s scan.
    A kernel asked for by name that cannot run here is an error, never a silent fallback."""
    kernel = kernel or os.environ.get("RAYTRON_GDN_KERNEL") or None
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"gated delta kernel {kernel!r} (argument or RAYTRON_GDN_KERNEL): expected one of "
                         f"{', '.join(KERNELS)}")
    if kernel == "fused" or (kernel is None and not os.environ.get("RAYTRON_SCAN_KERNEL")
                             and q.device.type == "cuda" and fused.unsupported_reason(q, v, chunk) is None):
        _check_fused(q, v, chunk)
        kernel = "fused"
    else:
        kernel = choose_kernel(q.new_empty(1, 1, chunk, q.shape[-1]), v.new_empty(1, 1, chunk, v.shape[-1]), kernel)
    _log_choice(kernel, q.device.type, q.dtype)
    return kernel


@functools.lru_cache(maxsize=None)
def _log_choice(kernel: str, device: str, dtype: torch.dtype) -> None:
    form = "fused Triton kernels" if kernel == "fused" else f"chunked form with the {kernel} scan"
    _log.info("gated delta rule on %s %s: %s", device, dtype, form)


def gated_delta(q, k, v, g, beta, chunk: int, starts: torch.Tensor | None = None, kernel: str | None = None,
                **state):
    """Training path: `choose_gdn_kernel`'s kernel (the fused Triton kernels on CUDA, else the chunked
    form). `state`: initial_state / return_final_state of gated_delta_chunked."""
    kernel = choose_gdn_kernel(q, v, chunk, kernel)
    if kernel == "fused":
        return fused.gated_delta_fused(q, k, v, g, beta, chunk, starts, **state)
    return gated_delta_chunked(q, k, v, g, beta, chunk, starts, kernel=kernel, **state)


def _check_fused(q: torch.Tensor, v: torch.Tensor, chunk: int) -> None:
    """Refuse operands the fused kernels cannot take; on CUDA, run the first-use self-check."""
    reason = fused.unsupported_reason(q, v, chunk)
    if reason:
        raise ValueError(f"gated delta kernel 'fused' cannot run here: {reason}; use a chunked-form kernel "
                         "(torch or triton scan) or unset RAYTRON_GDN_KERNEL")
    if q.device.type == "cuda":
        _fused_self_check(q.device.index if q.device.index is not None else torch.cuda.current_device(), q.dtype)


@functools.lru_cache(maxsize=None)
@isolated_autograd
def _fused_self_check(device_index: int, dtype: torch.dtype) -> None:
    """Run a small problem (two documents, a length that is no multiple of the chunk, d_v over two
    tiles) through the fused kernels and through the chunked PyTorch form in float64, outputs and all
    gradients, and refuse the fused kernels if they disagree beyond the dtype's rounding."""
    dev = f"cuda:{device_index}"
    gen = torch.Generator(device=dev).manual_seed(0)
    b, h, t, dk, dv, chunk = 2, 3, 200, 128, 80, 64
    randn = functools.partial(torch.randn, device=dev, generator=gen)
    q = torch.nn.functional.normalize(randn(b, h, t, dk), dim=-1) / dk ** 0.5
    k = torch.nn.functional.normalize(randn(b, h, t, dk), dim=-1)
    g = -0.1 * torch.rand(b, h, t, device=dev, generator=gen)
    beta = torch.rand(b, h, t, device=dev, generator=gen)
    starts = torch.zeros(b, t, dtype=torch.bool, device=dev)
    starts[0, 77] = starts[1, 128] = True
    inputs = [q, k, randn(b, h, t, dv), g, beta]
    probe = randn(b, h, t, dv)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    results = []
    for fn, cast in ((fused.gated_delta_fused, dtype), (gated_delta_chunked, torch.float64)):
        x = [y.to(cast).requires_grad_() for y in inputs]
        out = fn(*x, chunk, starts)
        results.append([out.detach(), *torch.autograd.grad((out.double() * probe).sum(), x)])
    for name, fast, ref in zip(["output", "dq", "dk", "dv", "dg", "dbeta"], *results):
        err = float((fast.double() - ref).norm() / ref.norm().clamp_min(1e-30))
        if not err < tol:
            raise RuntimeError(
                f"the fused Gated DeltaNet kernels disagree with the chunked PyTorch form on this GPU "
                f"({torch.cuda.get_device_name(device_index)}, Triton {fused.triton_version()}, {dtype}): "
                f"{name} has relative error {err:.2e} > {tol}; refusing to train with them. "
                "Set RAYTRON_GDN_KERNEL=triton to use the chunked form with the Triton scan.")
