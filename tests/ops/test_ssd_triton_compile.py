"""The fused SSD kernels through Triton's real compiler on a CPU machine: every launch of a bf16 forward +
backward (as ops/ssd_fused.py issues them) is compiled ahead of time for Hopper (sm_90) with the bundled
ptxas, at the Mamba2 widths of the hybrid flavors. Catches what the interpreter accepts and the compiler
refuses (tl.dot shapes and dtypes, block sizes), shared memory beyond Hopper's 227 KiB, and register
spills (local-memory stack) that would slow the kernels down."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on x86_64 Linux)")

from raytron.ops import ssd_fused, ssd_triton  # noqa: E402
from tests.ops.triton_compile import HOPPER_SMEM, Recorder, compile_for_hopper, stack_bytes  # noqa: E402

KERNELS = ("_chunk_prep", "_chunk_cb", "_chunk_state", "_pass_fwd", "_pass_bwd", "_chunk_out", "_chunk_bwd",
           "_finish_dt", "_finish_bc")
# flavor -> (heads, head dim P, state N, chunk) of models/registry.py
WIDTHS = {"hybrid/1b-mamba": (32, 64, 128, 64), "hybrid/1b": (16, 128, 16, 64), "hybrid/debug": (4, 16, 16, 16)}


def _launches(monkeypatch, h, p, n, chunk) -> list:
    launches = []
    for name in KERNELS:
        monkeypatch.setattr(ssd_triton, name, Recorder(getattr(ssd_triton, name), launches))
    bsz, t = 1, 3 * chunk + 5
    vals = [torch.randn(bsz, t, h, p), torch.rand(bsz, t, h), -torch.rand(h), torch.randn(bsz, t, n),
            torch.randn(bsz, t, n), torch.randn(bsz, h, n, p)]
    x, dt, a, b_in, c_in, init = (v.bfloat16().requires_grad_() for v in vals)
    starts = torch.zeros(bsz, t, dtype=torch.bool)
    y, final = ssd_fused.SSDTriton.apply(x, dt, a, b_in, c_in, starts, init, chunk)
    (y.float().sum() + final.sum()).backward()  # outputs are garbage (nothing ran); only the launches matter
    monkeypatch.undo()
    return launches


@pytest.mark.parametrize("flavor", list(WIDTHS))
def test_bf16_kernels_compile_for_hopper_without_spills(monkeypatch, tmp_path, flavor):
    launches = _launches(monkeypatch, *WIDTHS[flavor])
    assert sorted({fn.__name__ for fn, _, _ in launches}) == sorted(KERNELS)
    seen = set()
    for fn, args, kwargs in launches:
        key = (fn.__name__, kwargs.get("TO_END"))
        if key in seen:  # the forward's launches again in the backward's recomputation
            continue
        seen.add(key)
        kernel = compile_for_hopper(fn, args, kwargs)
        assert kernel.metadata.shared <= HOPPER_SMEM, (key, kernel.metadata.shared)
        assert stack_bytes(kernel.asm["cubin"], tmp_path, fn.__name__) == 0, f"{key} spills registers"
