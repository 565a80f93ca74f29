"""Mamba2 state-space duality (SSD, Dao & Gu 2024): token-by-token reference and chunked form.

Per head (scalar A < 0, one group of B/C shared by all heads), state h [N, P]:
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,        y_t = h_t^T C_t
(the skip term D x_t is added by the layer). Shapes: x [B, T, H, P]; dt [B, T, H] (after softplus);
A [H]; b_in, c_in [B, T, N]; starts [B, T] bool (document starts: state zeroed before them);
output y [B, T, H, P]. Chunked form: within a chunk y = (C B^T * decay) (dt x), plus the entering
state read through C; the state is carried across chunks (the "SSD minimal" algorithm of the paper).
"""

from __future__ import annotations

import functools

import torch

from . import ssd_fused
from .chunking import chunk_decays, pad_to_chunks
from .self_check import isolated_autograd
from .state_scan import choose_kernel, final_state, state_scan


def ssd_recurrent(x, dt, a, b_in, c_in, starts: torch.Tensor | None = None,
                  initial_state: torch.Tensor | None = None, return_final_state: bool = False):
    """Reference: the recurrence above, one token at a time (state options as ssd_chunked)."""
    bsz, t, h, p = x.shape
    state = x.new_zeros(bsz, h, b_in.shape[-1], p) if initial_state is None else initial_state  # [B, H, N, P]
    out = []
    for i in range(t):
        decay = (dt[:, i] * a).exp()[..., None, None]  # [B, H, 1, 1]
        if starts is not None:
            decay = decay * (~starts[:, i]).to(decay.dtype)[:, None, None, None]
        update = torch.einsum("bn,bhp->bhnp", b_in[:, i], dt[:, i, :, None] * x[:, i])
        state = decay * state + update
        out.append(torch.einsum("bn,bhnp->bhp", c_in[:, i], state))
    out = torch.stack(out, dim=1)
    return (out, state) if return_final_state else out


def _intra_chunk(x, dt, a, b_in, c_in, starts, chunk: int):
    """The part of chunked SSD that is parallel over chunks: the scan operands (v = dt x, keys scaled
    to the chunk's end, state decay) and the outputs' intra-chunk term and state-reading queries."""
    bsz, t, h, p = x.shape
    n_state = b_in.shape[-1]
    v = pad_to_chunks((dt[..., None] * x).transpose(1, 2), chunk, 2)  # [B, H, T', P]
    wide = torch.promote_types(dt.dtype, torch.float32)  # log-decays in float32 at least
    g = pad_to_chunks((dt.to(wide) * a.to(wide)).transpose(1, 2), chunk, 2)  # [B, H, T']
    q = pad_to_chunks(c_in, chunk, 1)[:, None]  # [B, 1, T', N], shared by heads
    k = pad_to_chunks(b_in, chunk, 1)[:, None]
    if starts is not None:
        starts = pad_to_chunks(starts, chunk, 1)
    n = v.shape[2] // chunk
    dec = chunk_decays(g, starts, chunk, x.dtype)
    q, k = q.reshape(bsz, 1, n, chunk, n_state), k.reshape(bsz, 1, n, chunk, n_state)
    v = v.reshape(bsz, h, n, chunk, p)
    scores = (q @ k.transpose(-1, -2)) * dec.within  # [B, H, N, C, C]; C B^T once, decay per head
    k_to_end = k * dec.to_end[..., None]  # [B, H, N, C, N_state]
    scan = (v.reshape(bsz * h, n, chunk, p), k_to_end.reshape(bsz * h, n, chunk, n_state),
            dec.state.reshape(bsz * h, n))
    return scan, scores @ v, q * dec.from_state[..., None]


_intra_chunk_compiled = torch.compile(_intra_chunk, dynamic=False)  # as in ops/gated_delta.py


def ssd_chunked(x, dt, a, b_in, c_in, chunk: int, starts: torch.Tensor | None = None,
                kernel: str | None = "reference", initial_state: torch.Tensor | None = None,
                return_final_state: bool = False):
    """Chunked SSD: quadratic inside chunks of `chunk` tokens, batched over all chunks; the state
    entering each chunk comes from the scan of ops/state_scan.py (`kernel` as in gated_delta_chunked;
    initial_state [B, H, N, P] and return_final_state as there too)."""
    bsz, t, h, p = x.shape
    n_state = b_in.shape[-1]
    kernel = choose_kernel(b_in.new_empty(1, 1, chunk, n_state), x.new_empty(1, 1, chunk, p), kernel)
    intra = _intra_chunk_compiled if kernel == "triton" else _intra_chunk
    (v, k_to_end, decay), out, q_state = intra(x, dt, a, b_in, c_in, starts, chunk)
    n = v.shape[1]
    initial = None if initial_state is None else initial_state.reshape(bsz * h, n_state, p)
    states, _ = state_scan(None, v, k_to_end, decay, kernel, initial=initial)
    final = final_state(states, v, k_to_end, decay).view(bsz, h, n_state, p) if return_final_state else None
    out = out + q_state @ states.view(bsz, h, n, n_state, p).to(x.dtype)  # [B, H, N, C, P]
    out = out.reshape(bsz, h, n * chunk, p)[:, :, :t].transpose(1, 2)  # [B, T, H, P]
    return (out, final) if return_final_state else out


def ssd(x, dt, a, b_in, c_in, chunk: int, starts: torch.Tensor | None = None, kernel: str | None = None,
        initial_state: torch.Tensor | None = None, return_final_state: bool = False):
    """Training path: the fused Triton kernels (ops/ssd_fused.py) where they run, else the chunked form
    with the fastest scan kernel that runs here; `kernel` ("triton" or "chunked") as ssd_fused.choose_kernel.
    State options and results as ssd_chunked."""
    if ssd_fused.choose_kernel(x, b_in, chunk, kernel) == "triton":
        _self_check(x.device.index or 0, x.dtype)
        y, final = ssd_fused.SSDTriton.apply(x, dt, a, b_in, c_in, starts, initial_state, chunk)
        return (y, final.to(x.dtype)) if return_final_state else y
    return ssd_chunked(x, dt, a, b_in, c_in, chunk, starts, kernel=None, initial_state=initial_state,
                       return_final_state=return_final_state)


@functools.lru_cache(maxsize=None)
@isolated_autograd
def _self_check(device_index: int, dtype: torch.dtype) -> None:
    """A small forward + backward (documents, a length that is not a multiple of the chunk, an initial
    state, two P blocks) through the fused kernels and through ssd_chunked's PyTorch path; refuse the
    fused kernels if outputs or gradients disagree beyond the dtype's rounding."""
    dev = f"cuda:{device_index}"
    gen = torch.Generator(device=dev).manual_seed(0)
    bsz, t, h, p, n, chunk = 2, 200, 3, 80, 48, 64

    def rand(*shape):
        return torch.randn(*shape, device=dev, generator=gen)

    base = [rand(bsz, t, h, p), torch.nn.functional.softplus(rand(bsz, t, h) - 2), -torch.rand(h, device=dev,
            generator=gen) - 0.5, rand(bsz, t, n) / n ** 0.5, rand(bsz, t, n), rand(bsz, h, n, p)]
    starts = torch.rand(bsz, t, device=dev, generator=gen) < 0.02
    probe, probe_final = rand(bsz, t, h, p), rand(bsz, h, n, p)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    results = []
    for fused in (True, False):
        inputs = [y.to(dtype if fused else torch.float64).requires_grad_() for y in base]
        x, dt, a, b_in, c_in, init = inputs
        if fused:
            y, final = ssd_fused.SSDTriton.apply(x, dt, a, b_in, c_in, starts, init, chunk)
        else:
            y, final = ssd_chunked(x, dt, a, b_in, c_in, chunk, starts, kernel="torch", initial_state=init,
                                   return_final_state=True)
        loss = (y.double() * probe).sum() + (final.double() * probe_final).sum()
        results.append([y.detach(), final.detach(), *torch.autograd.grad(loss, inputs)])
    for i, (fast, ref) in enumerate(zip(*results)):
        err = float((fast.double() - ref).norm() / ref.norm().clamp_min(1e-12))
        if not err < tol:
            raise RuntimeError(
                f"the fused Triton SSD kernels disagree with the PyTorch chunked form on this GPU "
                f"({torch.cuda.get_device_name(device_index)}, Triton {ssd_fused._k.triton.__version__}, {dtype}): "
                f"tensor {i} of (y, final, dx, ddt, da, dB, dC, d initial) has relative error {err:.2e} > {tol}; "
                "refusing to train with it. Set RAYTRON_SSD_KERNEL=chunked to use the chunked PyTorch form.")
