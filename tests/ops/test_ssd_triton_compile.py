"""The fused SSD kernels through Triton's real compiler on a CPU machine: every launch of a bf16 forward +
backward (as ops/ssd_fused.py issues them) is compiled ahead of time for Hopper (sm_90) with the bundled
ptxas, at the Mamba2 widths of the hybrid flavors. Catches what the interpreter accepts and the compiler
refuses (tl.dot shapes and dtypes, block sizes), shared memory beyond Hopper's 227 KiB, and register
spills (local-memory stack) that would slow the kernels down."""

import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on x86_64 Linux)")

from triton.backends.compiler import GPUTarget  # noqa: E402

from raytron.ops import ssd_fused, ssd_triton  # noqa: E402

KERNELS = ("_chunk_prep", "_chunk_cb", "_chunk_state", "_pass_fwd", "_pass_bwd", "_chunk_out", "_chunk_bwd",
           "_finish_dt", "_finish_bc")
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.bool: "i1"}
HOPPER_SMEM = 227 * 1024
# flavor -> (heads, head dim P, state N, chunk) of models/registry.py
WIDTHS = {"hybrid/1b-mamba": (32, 64, 128, 64), "hybrid/1b": (16, 128, 16, 64), "hybrid/debug": (4, 16, 16, 16)}


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _launches(monkeypatch, h, p, n, chunk) -> list:
    launches = []
    for name in KERNELS:
        monkeypatch.setattr(ssd_triton, name, _Recorder(getattr(ssd_triton, name), launches))
    bsz, t = 1, 3 * chunk + 5
    vals = [torch.randn(bsz, t, h, p), torch.rand(bsz, t, h), -torch.rand(h), torch.randn(bsz, t, n),
            torch.randn(bsz, t, n), torch.randn(bsz, h, n, p)]
    x, dt, a, b_in, c_in, init = (v.bfloat16().requires_grad_() for v in vals)
    starts = torch.zeros(bsz, t, dtype=torch.bool)
    y, final = ssd_fused.SSDTriton.apply(x, dt, a, b_in, c_in, starts, init, chunk)
    (y.float().sum() + final.sum()).backward()  # outputs are garbage (nothing ran); only the launches matter
    monkeypatch.undo()
    return launches


def _compile(fn, args, kwargs):
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for param, name in zip(fn.params, fn.arg_names):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
        else:
            signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _stack_bytes(cubin: bytes, tmp_path, name: str) -> int:
    path = tmp_path / f"{name}.cubin"
    path.write_bytes(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


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
        kernel = _compile(fn, args, kwargs)
        assert kernel.metadata.shared <= HOPPER_SMEM, (key, kernel.metadata.shared)
        assert _stack_bytes(kernel.asm["cubin"], tmp_path, fn.__name__) == 0, f"{key} spills registers"
