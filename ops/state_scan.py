"""The inter-chunk state scan shared by the chunked linear-sequence layers (Gated DeltaNet, Mamba2 SSD).

Everything inside a chunk is computed for all chunks at once with batched matmuls; only the state
entering each chunk is sequential. Per (batch, head), with N chunks of C tokens and state h [d_k, d_v]:

    h_0 = 0
    u_c = uv_c - w_c h_c                    (w_c [C, d_k], uv_c [C, d_v]; no w term for SSD)
    h_{c+1} = decay_c h_c + kt_c^T u_c      (kt_c [C, d_k] keys already scaled to the chunk's end)

outputs: the entering states H [N, d_k, d_v] and the corrected values U [N, C, d_v]. Backward, walking
the chunks in reverse with G = dL/dh_{c+1} (zero after the last chunk):

    du_c   = dU_c + kt_c G                  (-> d uv_c)
    dkt_c  = u_c G^T
    dw_c   = -du_c h_c^T
    ddec_c = sum(G * h_c)
    G      <- dH_c + decay_c G - w_c^T du_c

Three implementations with one contract: `scan_reference` (autograd through a plain loop: the
reference), and `StateScan` whose forward/backward are the loops above written out either in PyTorch
(`torch` kernel: any device and dtype) or in Triton (`triton` kernel, ops/state_scan_triton.py: CUDA).
The Triton kernel keeps h (and G) in float32 registers for a whole sequence: one program per
(batch*head, d_v block), no Python loop and no per-chunk launches.
"""

from __future__ import annotations

import functools
import os

import torch

from . import state_scan_triton as _triton
from .self_check import isolated_autograd

KERNELS = ("reference", "torch", "triton")


def scan_reference(w, uv, kt, decay):
    """w [BH, N, C, dk] or None; uv [BH, N, C, dv]; kt [BH, N, C, dk]; decay [BH, N] -> (H, U)."""
    bh, n, _, dk = kt.shape
    h = kt.new_zeros(bh, dk, uv.shape[-1])
    states, us = [], []
    for c in range(n):
        states.append(h)
        u = uv[:, c] if w is None else uv[:, c] - w[:, c] @ h
        us.append(u)
        h = decay[:, c, None, None] * h + kt[:, c].transpose(-1, -2) @ u
    return torch.stack(states, 1), torch.stack(us, 1)


def _scan_fwd_torch(w, uv, kt, decay):
    with torch.no_grad():
        states, u = scan_reference(w, uv, kt, decay)
    return states, (uv if w is None else u)


def _scan_bwd_torch(w, kt, decay, states, u, d_states, d_u):
    """The backward recurrence of the module docstring, one chunk at a time (float32 at least)."""
    wide = torch.promote_types(kt.dtype, torch.float32)
    n = kt.shape[1]
    grad = torch.zeros_like(states[:, 0], dtype=wide)
    d_uv, d_kt = torch.empty_like(u), torch.empty_like(kt)
    d_w = None if w is None else torch.empty_like(w)
    d_decay = torch.empty_like(decay, dtype=wide)
    for c in reversed(range(n)):
        h, kt_c = states[:, c].to(wide), kt[:, c].to(wide)
        du = d_u[:, c].to(wide) + kt_c @ grad
        d_uv[:, c] = du
        d_kt[:, c] = u[:, c].to(wide) @ grad.transpose(-1, -2)
        d_decay[:, c] = (grad * h).sum((-1, -2))
        new_grad = d_states[:, c].to(wide) + decay[:, c, None, None].to(wide) * grad
        if w is not None:
            d_w[:, c] = -du @ h.transpose(-1, -2)
            new_grad = new_grad - w[:, c].to(wide).transpose(-1, -2) @ du
        grad = new_grad
    return d_w, d_uv, d_kt, d_decay.to(decay.dtype)


class StateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, uv, kt, decay, kernel: str):
        if kernel == "triton":
            states, u = _triton.scan_fwd(w, uv, kt, decay)
        else:
            states, u = _scan_fwd_torch(w, uv, kt, decay)
        ctx.kernel = kernel
        ctx.save_for_backward(w, kt, decay, states, u)
        return states, u

    @staticmethod
    def backward(ctx, d_states, d_u):
        w, kt, decay, states, u = ctx.saved_tensors
        d_states = torch.zeros_like(states) if d_states is None else d_states
        d_u = torch.zeros_like(u) if d_u is None else d_u
        if ctx.kernel == "triton":
            grads = _triton.scan_bwd(w, kt, decay, states, u, d_states, d_u)
        else:
            grads = _scan_bwd_torch(w, kt, decay, states, u, d_states, d_u)
        return (*grads, None)


def choose_kernel(kt: torch.Tensor, uv: torch.Tensor, kernel: str | None = None) -> str:
    """The kernel to run: `kernel` if given, else RAYTRON_SCAN_KERNEL if set (a name from KERNELS),
    else `triton` on CUDA where Triton imports and takes these shapes, else `torch`. A kernel asked for
    by name that cannot run here is an error, never a silent fallback."""
    kernel = kernel or os.environ.get("RAYTRON_SCAN_KERNEL") or None
    if kernel is not None:
        if kernel not in KERNELS:
            raise ValueError(f"scan kernel {kernel!r} (argument or RAYTRON_SCAN_KERNEL): expected one of "
                             f"{', '.join(KERNELS)}")
        if kernel == "triton":
            _check_triton(kt, uv)
        return kernel
    if kt.device.type == "cuda":
        if _triton.unsupported_reason(kt, uv) is None:  # else shapes Triton tiles cannot take (chunk < 16)
            _check_triton(kt, uv)
            return "triton"
    return "torch"


def state_scan(w, uv, kt, decay, kernel: str | None = None, initial: torch.Tensor | None = None):
    """(H, U) of the module docstring; w may be None (SSD, then U is uv). Kernel: `choose_kernel`.
    `initial` [BH, dk, dv]: the state entering the first chunk instead of 0 (context parallelism), carried
    in by leading chunks of the same scan (`_lead_in`), so every kernel takes it and its gradient."""
    kernel = choose_kernel(kt, uv, kernel)
    lead = 0
    if initial is not None:
        w, uv, kt, decay, lead = _lead_in(w, uv, kt, decay, initial)
    if kernel == "reference":
        states, u = scan_reference(w, uv, kt, decay)
    elif w is None:  # without the w term U is uv itself
        states, u = _NoWScan.apply(uv, kt, decay, kernel), uv
    else:
        states, u = StateScan.apply(w, uv, kt, decay, kernel)
    return (states[:, lead:], u[:, lead:]) if lead else (states, u)


def _lead_in(w, uv, kt, decay, initial: torch.Tensor):
    """Operands with ceil(dk / C) chunks in front that build `initial` from a zero state: chunk i has keys
    = rows iC..iC+C-1 of the identity, values = the same rows of `initial`, no w term, decay 0 (first) or
    1, so h after them is sum_i I_i^T initial_i = initial. Gradients reach `initial` through the values."""
    bh, _, c, dk = kt.shape
    lead = -(-dk // c)
    keys = torch.eye(lead * c, dk, dtype=kt.dtype, device=kt.device).view(1, lead, c, dk).expand(bh, -1, -1, -1)
    values = torch.zeros(bh, lead * c, uv.shape[-1], dtype=uv.dtype, device=uv.device)
    values = torch.cat([initial.to(uv.dtype), values[:, dk:]], dim=1).view(bh, lead, c, -1)
    decays = torch.ones(bh, lead, dtype=decay.dtype, device=decay.device)
    decays[:, 0] = 0
    if w is not None:
        w = torch.cat([w.new_zeros(bh, lead, c, w.shape[-1]), w], dim=1)
    return (w, torch.cat([values, uv], dim=1), torch.cat([keys, kt], dim=1), torch.cat([decays, decay], dim=1),
            lead)


def final_state(states: torch.Tensor, u: torch.Tensor, kt: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """The state after the last chunk [BH, dk, dv], from the scan's entering states H and values U (the
    recurrence's last step, so it is differentiable like them)."""
    last = decay[:, -1, None, None].to(states.dtype) * states[:, -1]
    return last + kt[:, -1].transpose(-1, -2).to(states.dtype) @ u[:, -1].to(states.dtype)


class _NoWScan(torch.autograd.Function):
    """StateScan without the w term (SSD)."""

    @staticmethod
    def forward(ctx, uv, kt, decay, kernel: str):
        states, u = StateScan.forward(ctx, None, uv, kt, decay, kernel)
        return states

    @staticmethod
    def backward(ctx, d_states):
        _, d_uv, d_kt, d_decay, _ = StateScan.backward(ctx, d_states, None)
        return d_uv, d_kt, d_decay, None


def _check_triton(kt: torch.Tensor, uv: torch.Tensor) -> None:
    """The Triton kernel takes these operands and agrees with the PyTorch kernel on this device/dtype."""
    _triton.check_supported(kt, uv)
    _self_check(kt.device.index or 0, kt.dtype)


@functools.lru_cache(maxsize=None)
@isolated_autograd
def _self_check(device_index: int, dtype: torch.dtype) -> None:
    """Run a small scan (with and without w, d_v spanning two blocks) through Triton and PyTorch and
    refuse the Triton kernel if outputs or gradients disagree beyond the dtype's rounding."""
    gen = torch.Generator(device=f"cuda:{device_index}").manual_seed(0)
    dev, (bh, n, c, dk, dv) = f"cuda:{device_index}", (3, 5, 64, 128, 80)  # the 1b flavors' tile sizes
    kt = torch.nn.functional.normalize(torch.randn(bh, n, c, dk, device=dev, generator=gen), dim=-1)
    w = 0.1 * torch.randn(bh, n, c, dk, device=dev, generator=gen)
    uv = torch.randn(bh, n, c, dv, device=dev, generator=gen)
    decay = torch.rand(bh, n, device=dev, generator=gen)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for with_w in (True, False):
        results = []
        for kernel in ("triton", "torch"):
            inputs = [x.to(dtype).requires_grad_() for x in ((w,) if with_w else ()) + (uv, kt, decay)]
            outs = StateScan.apply(*inputs, kernel) if with_w else (_NoWScan.apply(*inputs, kernel),)
            probes = [torch.randn(o.shape, device=dev, generator=gen.manual_seed(i)) for i, o in enumerate(outs)]
            loss = sum((o.float() * p).sum() for o, p in zip(outs, probes))
            grads = torch.autograd.grad(loss, inputs)
            results.append([o.detach().float() for o in outs] + [g.float() for g in grads])
        for i, (fast, ref) in enumerate(zip(*results)):
            err = float((fast - ref).norm() / ref.norm().clamp_min(1e-12))
            if not err < tol:
                raise RuntimeError(
                    f"the Triton state-scan kernel disagrees with the PyTorch kernel on this GPU "
                    f"({torch.cuda.get_device_name(device_index)}, Triton {_triton.triton.__version__}, "
                    f"{dtype}): "
                    f"tensor {i} {'with' if with_w else 'without'} w has relative error {err:.2e} > {tol}; "
                    "refusing to train with it. Set RAYTRON_SCAN_KERNEL=torch to use the PyTorch kernel.")
