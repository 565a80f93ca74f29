"""Worker for tests/ops/test_ssd_triton.py, run in its own process with TRITON_INTERPRET=1: triton.jit picks
the interpreter when a kernel (Triton's own tl.sum, tl.cdiv ... included) is defined, i.e. at import, so
the setting cannot be switched on inside a pytest process that has imported Triton already.

Runs the fused SSD kernels on CPU for each case of argv[1] (JSON) and prints one JSON object: per case
id, the relative errors of (y, final state, dx, ddt, da, dB, dC, d initial) against ssd_recurrent in
float64, or the traceback of the failure."""

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
torch.set_num_threads(1)


def _interpreter_fixes() -> None:
    """Two gaps of Triton 3.6's interpreter (the compiled kernels are not affected):
    - it holds scalars as 1-element arrays and turns them into loop bounds with int(array), which
      NumPy >= 2.4 refuses ("only 0-dimensional arrays ..."): take the element instead;
    - tl.dot multiplies bf16 operands as their raw 16-bit patterns (NumPy has no bf16): widen them to
      float32 first (exact), accumulating in float32 as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor, create_dot = interpreter._patch_lang_tensor, interpreter.InterpreterBuilder.create_dot

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def wide(h):
        return (h.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if h.dtype == tl.bfloat16 else h.data

    def patched_dot(self, a, b, d, *args):
        if tl.bfloat16 not in (a.dtype, b.dtype):
            return create_dot(self, a, b, d, *args)
        return interpreter.TensorHandle(np.matmul(wide(a), wide(b), dtype=np.float32) + d.data, d.dtype.scalar)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.create_dot = patched_dot


_interpreter_fixes()
from raytron.ops.ssd import ssd_recurrent  # noqa: E402
from raytron.ops.ssd_fused import SSDTriton  # noqa: E402

NAMES = ["y", "final state", "dx", "ddt", "da", "dB", "dC", "d initial state"]


def inputs(b, t, h, p, n, docs: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, t, h, generator=gen) - 1)
    a = -torch.rand(h, generator=gen) - 0.5
    b_in = torch.randn(b, t, n, generator=gen) / n ** 0.5
    c_in = torch.randn(b, t, n, generator=gen)
    init = torch.randn(b, h, n, p, generator=gen)
    starts = None
    if docs:
        starts = torch.rand(b, t, generator=gen) < 0.1
        starts[0, 5] = True  # at least one document start inside the first chunk
    return [x, dt, a, b_in, c_in, init], starts


def rel(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def run_case(b, t, h, p, n, chunk, docs, with_init, dtype) -> dict:
    """Fused kernels in `dtype` vs the float64 recurrence on the same values: relative error per tensor."""
    base, starts = inputs(b, t, h, p, n, docs)
    base = [y.to(getattr(torch, dtype)).double() for y in base]  # the values the fused path sees
    gen = torch.Generator().manual_seed(1)
    probe, probe_final = torch.randn(base[0].shape, generator=gen), torch.randn(base[5].shape, generator=gen)
    results = []
    for fused in (True, False):
        vals = [y.to(getattr(torch, dtype) if fused else torch.float64).requires_grad_() for y in base]
        x, dt, a, b_in, c_in, init = vals
        init = init if with_init else None
        if fused:
            y, final = SSDTriton.apply(x, dt, a, b_in, c_in, starts, init, chunk)
            assert y.dtype == x.dtype and final.dtype == torch.float32, (y.dtype, final.dtype)
        else:
            y, final = ssd_recurrent(x, dt, a, b_in, c_in, starts, init, return_final_state=True)
        loss = (y.double() * probe).sum() + (final.double() * probe_final).sum()
        diff = vals if with_init else vals[:5]
        results.append([y, final, *torch.autograd.grad(loss, diff)])
    return {name: rel(got, want) for name, got, want in zip(NAMES, *results)}


def main() -> None:
    out = {}
    for case in json.loads(sys.argv[1]):
        try:
            out[case["id"]] = run_case(**case["args"])
        except Exception:  # reported to the test, which fails with it
            out[case["id"]] = traceback.format_exc()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
