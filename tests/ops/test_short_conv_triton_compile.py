"""The short-conv + SiLU kernels (ops/short_conv_triton.py) through Triton's real compiler on a CPU machine:
the forward and backward launches as the wrappers issue them, at the Gated DeltaNet conv width of hybrid/1b,
compiled for Hopper (sm_90). Catches what the interpreter accepts and the compiler refuses, and register spills
of the backward's [BT, KP, BC] tiles (local-memory stack) that would slow it down."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on x86_64 Linux)")

from raytron.ops import short_conv_triton as kernels  # noqa: E402
from tests.ops.triton_compile import HOPPER_SMEM, Recorder, compile_for_hopper, stack_bytes  # noqa: E402

# (dtype, K, with documents): the training case (bf16, K = 4, packed documents) and the other branches
VARIANTS = [(torch.bfloat16, 4, True), (torch.bfloat16, 4, False), (torch.float32, 4, True), (torch.bfloat16, 8, True),
            (torch.bfloat16, 2, True)]


@pytest.mark.parametrize("dtype,k,docs", VARIANTS)
def test_kernels_compile_for_hopper_without_spills(monkeypatch, tmp_path, dtype, k, docs):
    launches = []
    for name in ("_conv_silu_fwd_kernel", "_conv_silu_bwd_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(getattr(kernels, name), launches))
    bsz, t, c = 1, 300, 6144
    x, w = torch.zeros(bsz, t, c, dtype=dtype), torch.zeros(c, k, dtype=dtype)
    doc_ids = torch.zeros(bsz, t, dtype=torch.long) if docs else None
    kernels.conv_silu_fwd(x, w, doc_ids)
    kernels.conv_silu_bwd(x, w, doc_ids, torch.zeros_like(x))  # outputs are garbage (nothing ran)
    monkeypatch.undo()
    assert [fn.__name__ for fn, _, _ in launches] == ["_conv_silu_fwd_kernel", "_conv_silu_bwd_kernel"]
    for fn, args, kwargs in launches:
        kernel = compile_for_hopper(fn, args, kwargs)
        assert kernel.metadata.shared <= HOPPER_SMEM, (fn.__name__, kernel.metadata.shared)
        assert stack_bytes(kernel.asm["cubin"], tmp_path, fn.__name__) == 0, f"{fn.__name__} spills registers"
