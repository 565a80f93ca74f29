"""Triton's real compiler on a CPU machine, for tests that a kernel the interpreter runs also compiles for
Hopper (sm_90) with the bundled ptxas: launches are recorded instead of run (`Recorder`), then compiled ahead of
time (`compile_for_hopper`) and checked for shared memory and register spills (`stack_bytes`)."""

import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import native_specialize_impl

HOPPER_SMEM = 227 * 1024


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def compile_for_hopper(fn, args, kwargs):
    """The launch `fn[grid](*args, **kwargs)` compiled for sm_90 with the specialization a real launch gets
    (integers equal to 1 become constants; integers and data pointers divisible by 16 are marked so, which
    decides vectorized loads), as JITFunction.run would on an H100/H200."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args), **kwargs)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, name) in enumerate(zip(fn.params, fn.arg_names)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(backend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = spec
        elif spec:
            attrs[(i,)] = backend.parse_attr(spec)
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options)


def stack_bytes(cubin: bytes, tmp_path, name: str) -> int:
    """Local-memory stack of a compiled kernel (nonzero: registers spill)."""
    path = tmp_path / f"{name}.cubin"
    path.write_bytes(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))
