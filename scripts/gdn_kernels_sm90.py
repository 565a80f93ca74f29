"""Build the fused Gated DeltaNet kernels (ops/gated_delta_triton.py) for sm_90 on a machine without a
GPU, with the launch parameters the wrappers use, and report shared memory, registers and spills per
kernel (Triton's bundled ptxas). Refuses (exit 1) when a kernel needs more shared memory than Hopper has.
Usage: python scripts/gdn_kernels_sm90.py [--dtype bf16 fp32] [--dims 16 64 128] [--chunk 64]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from raytron.ops import gated_delta_triton as K

HOPPER_SHARED = 232448  # bytes of shared memory one block may opt into on H100/H200
FLOAT_PTRS = {"g_ptr", "dec_ptr", "tinv_ptr", "dg_ptr", "dbeta_ptr", "ddec_ptr"}  # float32 whatever the inputs
KERNELS = (K._prep_fwd_kernel, K._output_fwd_kernel, K._output_bwd_kernel, K._prep_bwd_kernel)


def build(fn, dtype: str, chunk: int, dim: int):
    meta = K._meta(chunk, dim, dim, True, torch.float32 if dtype == "fp32" else torch.bfloat16)
    warps = meta.pop("num_warps")
    signature = {}
    for name in fn.arg_names:
        if name in meta:
            signature[name] = "constexpr"
        elif name == "st_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT_PTRS else f"*{dtype}"
        else:
            signature[name] = "i32"
    return triton.compile(ASTSource(fn, signature, constexprs=meta), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps)), warps


def ptxas_report(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"registers {regs.group(1) if regs else '?'}, spill stores {spills.group(1) if spills else '?'} B"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--dims", type=int, nargs="+", default=[128])
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    too_big = 0
    for dtype in args.dtype:
        for dim in args.dims:
            for fn in KERNELS:
                kernel, warps = build(fn, dtype, args.chunk, dim)
                shared = kernel.metadata.shared
                too_big += shared > HOPPER_SHARED
                print(f"{dtype} C={args.chunk} d={dim} {fn.__name__}: {warps} warps, shared {shared} B"
                      f"{' (over Hopper)' if shared > HOPPER_SHARED else ''}, {ptxas_report(kernel.asm['ptx'])}",
                      flush=True)
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
