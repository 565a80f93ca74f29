"""Run by test_short_conv_triton.py in a subprocess with TRITON_INTERPRET=1 (Triton reads it when a kernel
is defined, so it cannot be switched on inside a pytest process that already imported raytron.ops): the
fused short-conv + SiLU kernels on CPU vs `F.silu(short_conv)` in float64 on the same (rounded) inputs,
output and both gradients; and `conv_silu`'s routing by RAYTRON_CONV_KERNEL. Prints one JSON line
{"errors": {case: {tensor: relative error}}, "routing": {check: value}}."""

import json
import os
import sys

import torch
import torch.nn.functional as F

from raytron.ops import short_conv_triton
from raytron.ops.short_conv import choose_conv_kernel, conv_silu, short_conv
from raytron.ops.short_conv_triton import short_conv_silu

# name: (dtype, batch, T, C, K, document starts as (batch row, t) or None, extra channels around x)
# T = 37 and C = 80 / 33 are no multiple of the blocks (forward 32 x 128, backward 16 x 64 at K = 4); the
# documents start inside blocks; `extra` makes x a channel slice of a wider buffer, as Mamba2's split.
CASES = {
    "fp32_docs_k4": (torch.float32, 2, 37, 80, 4, [(0, 5), (0, 20), (1, 17), (1, 33)], 0),
    "bf16_docs_k4": (torch.bfloat16, 2, 37, 80, 4, [(0, 5), (0, 20), (1, 17), (1, 33)], 0),
    "fp32_k2": (torch.float32, 2, 37, 80, 2, None, 0),
    "bf16_k2": (torch.bfloat16, 2, 37, 80, 2, None, 0),
    "fp32_docs_k8_strided": (torch.float32, 2, 19, 33, 8, [(0, 3), (1, 9), (1, 12)], 7),
}


def _doc_ids(bsz: int, t: int, starts) -> torch.Tensor | None:
    if starts is None:
        return None
    ids = torch.zeros(bsz, t, dtype=torch.long)
    for row, pos in starts:
        ids[row, pos:] += 1
    return ids


def run(name: str) -> dict[str, float]:
    dtype, bsz, t, c, k, starts, extra = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    wide = torch.randn(bsz, t, c + 2 * extra, generator=gen).to(dtype)
    weight = torch.randn(c, k, generator=gen).to(dtype)
    probe = torch.randn(bsz, t, c, generator=gen, dtype=torch.float64)
    doc_ids = _doc_ids(bsz, t, starts)
    results = []
    for fast in (True, False):
        buf = (wide if fast else wide.double()).requires_grad_()
        w = (weight if fast else weight.double()).clone().requires_grad_()
        x = buf[..., extra:extra + c]
        out = short_conv_silu(x, w, doc_ids) if fast else F.silu(short_conv(x, w, doc_ids))
        assert out.dtype == x.dtype
        grads = torch.autograd.grad((out.double() * probe).sum(), [buf, w])
        assert grads[1].dtype == w.dtype
        results.append([out.detach(), grads[0][..., extra:extra + c], grads[1]])
    return {n: float((a.double() - r).norm() / r.norm()) for n, a, r in zip(("y", "dx", "dweight"), *results)}


def routing() -> dict[str, object]:
    """RAYTRON_CONV_KERNEL=triton sends conv_silu through the kernels (after their self-check); a halo keeps
    the PyTorch path."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 21, 24, generator=gen), torch.randn(24, 4, generator=gen)
    halo = torch.randn(2, 3, 24, generator=gen)
    calls = []
    short_conv_triton.short_conv_silu = lambda *args: calls.append(len(args)) or short_conv_silu(*args)
    os.environ["RAYTRON_CONV_KERNEL"] = "triton"
    chosen = choose_conv_kernel(x, w)  # runs the self-check (through the kernels too)
    before = len(calls)
    same = torch.equal(conv_silu(x, w), short_conv_silu(x, w))
    kernel_calls = len(calls) - before
    same_halo = torch.equal(conv_silu(x, w, halo=halo), F.silu(short_conv(x, w, halo=halo)))
    return {"chosen": chosen, "same_as_kernel": bool(same), "kernel_calls": kernel_calls,
            "halo_same_as_torch": bool(same_halo),
            "kernel_calls_with_halo": len(calls) - before - kernel_calls}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({"errors": {name: run(name) for name in (sys.argv[1:] or CASES)}, "routing": routing()}))
