"""GPU: the fused Triton SSD kernels (ops/ssd_fused.py) compiled, against the chunked form in float64
(itself checked against the token-by-token recurrence on CPU, tests/ops/test_linear_ops.py): outputs, final
state and all gradients, at the Mamba2 widths of `hybrid/1b-mamba` (32 heads x 64, state 128) and of the
benchmark's `hybrid/1b` stack (16 heads x 128, state 16), with packed documents, an initial state and odd
lengths. Tolerances: relative error ||fast - ref|| / ||ref|| below 2e-2 in bf16 (8-bit mantissa operands,
float32 accumulation), below 1e-4 in float32 (IEEE dots). Run through the device tool: pytest -m gpu."""

import pytest
import torch
import torch.nn.functional as F

from raytron.models import get_config
from raytron.models.mamba2 import Mamba2
from raytron.ops import ssd as ssd_ops, ssd_fused
from raytron.ops.ssd import ssd, ssd_chunked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
WIDTHS = {"1b-mamba": (32, 64, 128), "1b": (16, 128, 16)}  # heads, head dim P, state N


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(bsz, t, h, p, n, doc_len):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    base = [rand(bsz, t, h, p), F.softplus(rand(bsz, t, h) - 3), -torch.rand(h, device="cuda", generator=gen) - 0.5,
            rand(bsz, t, n) / n ** 0.5, rand(bsz, t, n), rand(bsz, h, n, p)]
    starts = None
    if doc_len:
        starts = torch.zeros(bsz, t, dtype=torch.bool, device="cuda")
        starts[:, doc_len::doc_len] = True
        starts[-1, 7] = True  # a document start inside the first chunk, one sequence only
    return base, starts


def _compare(dtype, bsz, t, h, p, n, doc_len, tol, chunk=64):
    base, starts = _inputs(bsz, t, h, p, n, doc_len)
    probe, probe_final = torch.randn_like(base[0]), torch.randn_like(base[5])
    results = []
    for fused in (True, False):
        inputs = [x.to(dtype if fused else torch.float64).requires_grad_() for x in base]
        x, dt, a, b_in, c_in, init = inputs
        run, kernel = (ssd, "triton") if fused else (ssd_chunked, "torch")
        y, final = run(x, dt, a, b_in, c_in, chunk, starts, kernel=kernel, initial_state=init,
                       return_final_state=True)
        loss = (y.double() * probe).sum() + (final.double() * probe_final).sum()
        results.append([y, final, *torch.autograd.grad(loss, inputs)])
    names = ["y", "final state", "dx", "ddt", "da", "dB", "dC", "d initial state"]
    errors = {name: _rel(got, want) for name, got, want in zip(names, *results)}
    assert all(err < tol for err in errors.values()), errors


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("seq,doc_len", [(4096, 1000), (4095, 0), (16383, 3001)])
def test_fused_ssd_bf16(width, seq, doc_len):
    _compare(torch.bfloat16, 1, seq, *WIDTHS[width], doc_len, 2e-2)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_fused_ssd_float32_batch(width):
    _compare(torch.float32, 2, 1000, *WIDTHS[width], 300, 1e-4)


def test_fused_ssd_debug_widths_and_chunks():
    """The debug flavors' 16-wide dims and chunk 16, and a state that is not a power of two."""
    _compare(torch.float32, 2, 333, 4, 16, 16, 50, 1e-4, chunk=16)
    _compare(torch.bfloat16, 1, 1001, 4, 80, 48, 200, 2e-2, chunk=32)


def test_training_path_on_cuda_is_fused_and_self_checked(monkeypatch):
    monkeypatch.delenv("RAYTRON_SSD_KERNEL", raising=False)
    x = torch.empty(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert ssd_fused.choose_kernel(x, x[..., 0, :], 64) == "triton"
    for dtype in (torch.bfloat16, torch.float32):
        ssd_ops._self_check(0, dtype)  # raises if the kernels disagree with the PyTorch form here


def test_mamba2_layer_fused_as_accurate_as_chunked(monkeypatch):
    """A Mamba2 layer of `hybrid/1b-mamba` in bf16 with packed documents, output and parameter gradients:
    the fused kernels are no further from the same layer in float64 (chunked form) than the bf16 chunked
    form is (the layer's other bf16 ops round the same way in both)."""
    torch.manual_seed(0)
    cfg = get_config("hybrid", "1b-mamba")
    layer = Mamba2(cfg).cuda()
    x = torch.randn(2, 3001, cfg.dim, device="cuda")
    doc_ids = (torch.arange(3001, device="cuda") // 700)[None].expand(2, -1)
    results = {}
    for kernel, dtype in (("triton", torch.bfloat16), ("chunked", torch.bfloat16), ("chunked", torch.float64)):
        monkeypatch.setenv("RAYTRON_SSD_KERNEL", kernel)
        layer.to(dtype).zero_grad()
        out = layer(x.to(dtype), doc_ids)
        out.double().square().mean().backward()
        results[kernel, dtype] = [out] + [p.grad.clone() for p in layer.parameters()]
    ref = results["chunked", torch.float64]
    for i, (fused, chunked, want) in enumerate(zip(results["triton", torch.bfloat16],
                                                   results["chunked", torch.bfloat16], ref)):
        assert _rel(fused, want) <= 1.5 * _rel(chunked, want) + 1e-3, (i, _rel(fused, want), _rel(chunked, want))


def test_self_check_refuses_a_wrong_kernel(monkeypatch):
    """The first-use self-check turns a wrong kernel (here: dx off by 1%) into a clear refusal."""
    from raytron.ops import ssd_triton

    good = ssd_triton.chunk_bwd

    def wrong(*args):
        dx, *rest = good(*args)
        return (dx * 1.01, *rest)

    monkeypatch.setattr(ssd_triton, "chunk_bwd", wrong)
    with pytest.raises(RuntimeError, match="refusing to train with it.*RAYTRON_SSD_KERNEL=chunked"):
        ssd_ops._self_check.__wrapped__(torch.cuda.current_device(), torch.float32)
