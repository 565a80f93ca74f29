"""Run by test_gated_delta_triton.py in a subprocess with TRITON_INTERPRET=1 (Triton reads it when a
kernel is defined, so it cannot be switched on inside a pytest process that already imported raytron.ops):
the fused kernels in float32 on CPU vs the token-by-token recurrence in float64, outputs and all
gradients. Prints one JSON line {case: {tensor: relative error}}."""

import json
import sys

import torch
import torch.nn.functional as F

from raytron.ops.gated_delta import gated_delta_recurrent
from raytron.ops.gated_delta_fused import gated_delta_fused

# name: (batch, heads, T, d_k, d_v, chunk, document starts as (batch row, t), with an initial state,
# inputs as the layer passes them: [B, T, H, .] buffers seen through a transpose)
CASES = {
    "docs_odd_length": (2, 2, 37, 16, 24, 16, [(0, 5), (1, 16), (1, 30)], False, True),
    "two_value_tiles": (1, 1, 40, 16, 80, 16, [(0, 17)], False, False),
    "initial_and_final_state": (1, 2, 19, 32, 16, 32, [(0, 11)], True, False),
}


def _layout(x: torch.Tensor, strided: bool) -> torch.Tensor:
    """x [B, H, T, ...] as it is, or the same values in a [B, T, H, ...] buffer seen through a transpose."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if strided else x


def run(name: str) -> dict[str, float]:
    b, h, t, dk, dv, chunk, doc_starts, with_state, strided = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    q = F.normalize(torch.randn(b, h, t, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, h, t, dk, generator=gen), dim=-1)
    v = torch.randn(b, h, t, dv, generator=gen)
    g = -0.5 * torch.rand(b, h, t, generator=gen)
    beta = torch.rand(b, h, t, generator=gen)
    starts = torch.zeros(b, t, dtype=torch.bool)
    for row, pos in doc_starts:
        starts[row, pos] = True
    inputs = [q, k, v, g, beta] + ([torch.randn(b, h, dk, dv, generator=gen)] if with_state else [])
    probe = torch.randn(b, h, t, dv, generator=gen, dtype=torch.float64)
    probe_final = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    results = []
    for dtype in (torch.float32, torch.float64):
        x = [_layout(y.to(dtype), strided and i < 5).requires_grad_() for i, y in enumerate(inputs)]
        state = dict(initial_state=x[5], return_final_state=True) if with_state else {}
        if dtype == torch.float32:  # the kernels under test; the Triton scan has its own GPU tests
            out = gated_delta_fused(*x[:5], chunk, starts, scan_kernel="torch", **state)
        else:
            out = gated_delta_recurrent(*x[:5], starts, **state)
        out, final = out if with_state else (out, None)
        loss = (out.double() * probe).sum() + (0 if final is None else (final.double() * probe_final).sum())
        results.append([out.detach(), *([] if final is None else [final.detach()]), *torch.autograd.grad(loss, x)])
    names = ["output"] + (["final_state"] if with_state else []) + ["dq", "dk", "dv", "dg", "dbeta"]
    names += ["d_initial_state"] if with_state else []
    return {n: float((a.double() - r).norm() / r.norm()) for n, a, r in zip(names, *results)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({name: run(name) for name in (sys.argv[1:] or CASES)}))
