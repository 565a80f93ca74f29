"""GPU: the fused short-conv + SiLU kernels (ops/short_conv_triton.py) compiled, against `F.silu(short_conv)` in
float64 on the same inputs (output, dx, dweight) at 2 x 4K tokens and the conv widths of `hybrid/1b` (Gated
DeltaNet q/k/v: 3 x 16 x 128 = 6144 channels, contiguous) and `hybrid/1b-mamba` (Mamba2 x/B/C: 2048 + 2 x 128 =
2304 channels, a split of the in_proj output as the layer passes it), packed documents starting inside blocks.
Tolerances (relative error ||fast - ref|| / ||ref||): 1e-5 in float32, 1e-2 in bf16 (the result rounded once to
an 8-bit mantissa). Then whole hybrid/1b layers with RAYTRON_CONV_KERNEL=triton vs torch in float32.
Run through the device tool: pytest -m gpu tests/ops/test_short_conv_triton_gpu.py."""

import pytest
import torch
import torch.nn.functional as F

from raytron.models import get_config
from raytron.models.transformer import Layer
from raytron.ops.short_conv import choose_conv_kernel, short_conv
from raytron.ops.short_conv_triton import short_conv_silu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
WIDTHS = {"gdn-1b": (6144, 0, 6144), "mamba2-1b": (2304, 2048, 2048 + 2304 + 32)}  # C, offset, buffer width
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _doc_ids(bsz: int, t: int) -> torch.Tensor:
    starts = torch.zeros(bsz, t, dtype=torch.long, device="cuda")
    starts[:, 1000::1000] = 1
    starts[-1, 7] = 1  # a document start inside the first block, one row only
    return starts.cumsum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("k,docs", [(4, True), (4, False), (2, True)])
def test_kernels_match_reference(dtype, width, k, docs):
    (c, offset, total), (bsz, t) = WIDTHS[width], (2, 4096)
    gen = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(bsz, t, total, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(c, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
    probe = torch.randn(bsz, t, c, device="cuda", generator=gen, dtype=torch.float64)
    doc_ids = _doc_ids(bsz, t) if docs else None
    results = []
    for fast in (True, False):
        b = (buf if fast else buf.double()).clone().requires_grad_()
        w = (weight if fast else weight.double()).clone().requires_grad_()
        x = b[..., offset:offset + c]
        y = short_conv_silu(x, w, doc_ids) if fast else F.silu(short_conv(x, w, doc_ids))
        db, dw = torch.autograd.grad((y.double() * probe).sum(), [b, w])
        results.append([y, db[..., offset:offset + c], dw])
    errors = {n: _rel(a, r) for n, a, r in zip(("y", "dx", "dweight"), *results)}
    assert results[0][2].dtype == dtype and results[0][0].dtype == dtype
    assert all(e < TOL[dtype] for e in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_named_triton_kernel_passes_its_self_check(dtype):
    x, w = torch.zeros(1, 8, 16, device="cuda", dtype=dtype), torch.zeros(16, 4, device="cuda", dtype=dtype)
    assert choose_conv_kernel(x, w, "triton") == "triton"


@pytest.mark.parametrize("kind,flavor", [("G", "1b"), ("M", "1b-mamba")])
def test_layer_with_triton_conv_matches_torch_conv(monkeypatch, kind, flavor):
    cfg = get_config("hybrid", flavor)
    torch.manual_seed(0)
    layer = Layer(kind, cfg).cuda()
    x = torch.randn(1, 4096, cfg.dim, device="cuda")
    doc_ids = _doc_ids(1, 4096)
    probe = torch.randn_like(x)
    results = []
    for kernel in ("triton", "torch"):
        monkeypatch.setenv("RAYTRON_CONV_KERNEL", kernel)
        xi = x.clone().requires_grad_()
        y = layer(xi, doc_ids)
        grads = torch.autograd.grad((y * probe).sum(), [xi, layer.mixer.conv_weight])
        results.append([y, *grads])
    errors = {n: _rel(a, r) for n, a, r in zip(("y", "dx", "dconv_weight"), *results)}
    assert all(e < 1e-4 for e in errors.values()), errors
