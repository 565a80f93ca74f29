"""GPU: the fused Gated DeltaNet kernels compiled (ops/gated_delta_fused.py) against the chunked form in
float64, outputs and the gradients of q, k, v, g, beta. bf16: relative error ||fast - ref|| / ||ref||
below 2e-2 (as tests/ops/test_gpu_kernels.py); float32 (IEEE dots): below 1e-4. Packed documents,
lengths that are no multiple of the chunk, the hybrid flavors' head dims (128, 1b; 16 with chunk 16,
debug), the layer's strided inputs, and the first-use self-check's refusal."""

import pytest
import torch
import torch.nn.functional as F

from raytron.models import get_config
from raytron.models.gated_deltanet import GatedDeltaNet
from raytron.ops import gated_delta_triton as kernels
from raytron.ops.gated_delta import _fused_self_check, choose_gdn_kernel, gated_delta, gated_delta_chunked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(b, h, t, d, n_docs, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q = F.normalize(randn(b, h, t, d), dim=-1) / d ** 0.5
    k = F.normalize(randn(b, h, t, d), dim=-1)
    g = -0.1 * torch.rand(b, h, t, device="cuda", generator=gen)
    beta = torch.rand(b, h, t, device="cuda", generator=gen)
    starts = None
    if n_docs > 1:
        starts = torch.zeros(b, t, dtype=torch.bool, device="cuda")
        cuts = torch.randperm(t - 1, device="cuda", generator=gen)[: n_docs - 1] + 1
        starts[:, cuts] = True
    return [q, k, randn(b, h, t, d), g, beta], starts


def _compare(inputs, starts, chunk, dtype, tol, **state):
    probe = torch.randn_like(inputs[2])
    results = []
    for fn, cast in ((gated_delta, dtype), (gated_delta_chunked, torch.float64)):
        x = [y.to(cast).requires_grad_() for y in inputs]
        out = fn(*x, chunk, starts, kernel="fused") if fn is gated_delta else fn(*x, chunk, starts)
        results.append([out, *torch.autograd.grad((out.double() * probe).sum(), x)])
    for name, got, want in zip(["output", "dq", "dk", "dv", "dg", "dbeta"], *results):
        assert _rel(got, want) < tol, f"{name}: relative error {_rel(got, want):.2e} >= {tol}"


@pytest.mark.parametrize("b,h,t,d,docs,chunk", [
    (1, 4, 4096, 64, 1, 64), (2, 4, 4096 + 37, 128, 5, 64), (1, 4, 16384, 128, 9, 64), (2, 4, 999, 16, 4, 16)])
def test_fused_bf16_matches_chunked_float64(b, h, t, d, docs, chunk):
    inputs, starts = _inputs(b, h, t, d, docs)
    _compare(inputs, starts, chunk, torch.bfloat16, 2e-2)


@pytest.mark.parametrize("t,d,chunk", [(301, 128, 64), (77, 64, 32), (50, 16, 16)])
def test_fused_float32_matches_chunked_float64(t, d, chunk):
    inputs, starts = _inputs(2, 3, t, d, 3)
    _compare(inputs, starts, chunk, torch.float32, 1e-4)


def test_fused_is_the_cuda_default_and_runs_the_layer_like_the_chunked_form(monkeypatch):
    """GatedDeltaNet (hybrid/1b widths, bf16, packed documents): fused vs the chunked form with the
    Triton scan, through the layer's strided q/k/v/g/beta views."""
    monkeypatch.delenv("RAYTRON_SCAN_KERNEL", raising=False)
    x = torch.zeros(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16)
    monkeypatch.delenv("RAYTRON_GDN_KERNEL", raising=False)
    assert choose_gdn_kernel(x, x, 64) == "fused"
    torch.manual_seed(0)
    cfg = get_config("hybrid", "1b")
    layer = GatedDeltaNet(cfg).cuda().bfloat16()
    t = 2048 + 100
    h_in = torch.randn(1, t, cfg.dim, device="cuda", dtype=torch.bfloat16)
    doc_ids = (torch.arange(t, device="cuda") // 700)[None]
    results = []
    for kernel in ("fused", "triton"):
        monkeypatch.setenv("RAYTRON_GDN_KERNEL", kernel)
        xin = h_in.clone().requires_grad_()
        out = layer(xin, doc_ids)
        grads = torch.autograd.grad(out.float().square().sum(), [xin, *layer.parameters()])
        results.append([out, *grads])
    for i, (got, want) in enumerate(zip(*results)):
        assert _rel(got, want) < 3e-2, f"tensor {i}: relative error {_rel(got, want):.2e}"


def test_fused_self_check_refuses_when_it_disagrees(monkeypatch):
    good = kernels.prep_bwd
    monkeypatch.setattr(kernels, "prep_bwd", lambda *a: tuple(g * 1.01 for g in good(*a)))
    with pytest.raises(RuntimeError, match="refusing to train with them.*RAYTRON_GDN_KERNEL=triton"):
        _fused_self_check.__wrapped__(torch.cuda.current_device(), torch.float32)
