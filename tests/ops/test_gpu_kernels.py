"""GPU: every fast path in bf16 vs its reference in float32/float64, outputs and all gradients, at
seq 4K and 16K. Tolerance: relative error ||fast - ref|| / ||ref|| below 2e-2 (bf16 has 8 bits of
mantissa; errors grow with accumulation length). Run through the device tool: pytest -m gpu."""

import pytest
import torch
import torch.nn.functional as F

from raytron.ops.attention import BlockSparse, attention, dense_mask, make_mask_mod, reference_attention
from raytron.ops.gated_delta import gated_delta, gated_delta_chunked
from raytron.ops.moe import expert_swiglu, reference_expert_swiglu
from raytron.ops.ssd import ssd, ssd_chunked
from raytron.ops.state_scan import StateScan, _NoWScan, choose_kernel, scan_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REL = 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(fast_fn, ref_fn, inputs_fp32):
    """fast_fn on bf16 copies vs ref_fn on the float32 originals, outputs and gradients."""
    fast_in = [x.detach().bfloat16().requires_grad_(x.requires_grad) if x.is_floating_point() else x
               for x in inputs_fp32]
    ref_in = [x.detach().requires_grad_(x.requires_grad) for x in inputs_fp32]
    out, ref = fast_fn(*fast_in), ref_fn(*ref_in)
    assert _rel(out, ref) < REL
    probe = torch.randn_like(ref)
    diff = [x for x in ref_in if x.requires_grad]
    ref_grads = torch.autograd.grad(ref, diff, probe)
    fast_grads = torch.autograd.grad(out, [x for x in fast_in if x.requires_grad], probe.bfloat16())
    for name, (g_fast, g_ref) in enumerate(zip(fast_grads, ref_grads)):
        assert _rel(g_fast, g_ref) < REL, f"gradient {name}: {_rel(g_fast, g_ref)}"


@pytest.mark.parametrize("seq", [4096, 16384])
@pytest.mark.parametrize("case", ["window", "sparse", "docs"])
def test_flex_attention_bf16(seq, case):
    torch.manual_seed(0)
    docs = (torch.arange(seq, device="cuda") // 1000)[None].expand(1, seq)
    kwargs = {"window": dict(window=512), "sparse": dict(sparse=BlockSparse(128, 2, 1)),
              "docs": dict(doc_ids=docs)}[case]
    q, k, v = (torch.randn(1, h, seq, 64, device="cuda", requires_grad=True) for h in (4, 2, 2))
    mask = dense_mask(make_mask_mod(**kwargs), 1, seq, "cuda")
    _check(lambda *t: attention(*t, **kwargs), lambda *t: reference_attention(*t, mask), [q, k, v])


@pytest.mark.parametrize("seq", [4096, 16384])
def test_gated_delta_bf16(seq):
    torch.manual_seed(0)
    b, h, d = 1, 4, 64
    q = F.normalize(torch.randn(b, h, seq, d, device="cuda"), dim=-1) / d ** 0.5
    k = F.normalize(torch.randn(b, h, seq, d, device="cuda"), dim=-1)
    v = torch.randn(b, h, seq, d, device="cuda")
    g = -0.1 * torch.rand(b, h, seq, device="cuda")
    beta = torch.rand(b, h, seq, device="cuda")
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta)]
    assert choose_kernel(k, v) == "triton"  # the training path on this GPU is the Triton scan
    _check(lambda *t: gated_delta(*t, 64), lambda *t: gated_delta_chunked(*[x.double() for x in t], 64), inputs)


@pytest.mark.parametrize("seq", [4096, 16384])
def test_ssd_bf16(seq):
    torch.manual_seed(0)
    b, h, p, n = 1, 8, 64, 64
    x = torch.randn(b, seq, h, p, device="cuda")
    dt = F.softplus(torch.randn(b, seq, h, device="cuda") - 3)
    a = -torch.rand(h, device="cuda") - 0.5
    b_in, c_in = torch.randn(b, seq, n, device="cuda"), torch.randn(b, seq, n, device="cuda")
    inputs = [t.requires_grad_() for t in (x, dt, a, b_in, c_in)]
    tile = torch.empty(1, 1, 64, n, device="cuda", dtype=torch.bfloat16)  # [BH, N, C, d] as the scan sees it
    assert choose_kernel(tile, tile) == "triton"
    _check(lambda *t: ssd(*t, 64), lambda *t: ssd_chunked(*[y.double() for y in t], 64), inputs)


@pytest.mark.parametrize("with_w", [True, False])
@pytest.mark.parametrize("dk,dv", [(128, 128), (64, 200), (16, 16)])
def test_triton_state_scan_float32_matches_reference(with_w, dk, dv):
    """The Triton scan in float32 (IEEE dots) vs autograd through the plain loop: rounding only."""
    torch.manual_seed(0)
    bh, n, c = 6, 64, 64
    kt = F.normalize(torch.randn(bh, n, c, dk, device="cuda"), dim=-1)
    w = 0.1 * torch.randn(bh, n, c, dk, device="cuda") if with_w else None
    uv, decay = torch.randn(bh, n, c, dv, device="cuda"), torch.rand(bh, n, device="cuda")
    inputs = [t.requires_grad_() for t in (w, uv, kt, decay) if t is not None]
    ref = scan_reference(*(([] if with_w else [None]) + inputs))
    fast = StateScan.apply(*inputs, "triton") if with_w else (_NoWScan.apply(*inputs, "triton"), inputs[0])
    probes = [torch.randn_like(r) for r in ref]
    ref_grads = torch.autograd.grad(sum((r * p).sum() for r, p in zip(ref, probes)), inputs)
    fast_grads = torch.autograd.grad(sum((f * p).sum() for f, p in zip(fast, probes)), inputs)
    for got, want in zip([*fast, *fast_grads], [*ref, *ref_grads]):
        assert _rel(got, want) < 1e-5, _rel(got, want)


def test_grouped_expert_gemm_bf16():
    torch.manual_seed(0)
    tokens, dim, ffn, experts, k = 4096, 512, 256, 16, 4
    x = torch.randn(tokens, dim, device="cuda", requires_grad=True)
    ids = torch.rand(tokens, experts, device="cuda").topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, device="cuda", requires_grad=True)
    ws = [torch.randn(experts, ffn, dim, device="cuda") / dim ** 0.5,
          torch.randn(experts, ffn, dim, device="cuda") / dim ** 0.5,
          torch.randn(experts, dim, ffn, device="cuda") / ffn ** 0.5]
    inputs = [x, ids, weights, *(w.requires_grad_() for w in ws)]
    _check(expert_swiglu, reference_expert_swiglu, inputs)


def test_triton_scan_refuses_when_it_disagrees(monkeypatch):
    """The first-use self-check turns a wrong kernel (here: a backward off by 1%) into a clear refusal."""
    from raytron.ops import state_scan
    from raytron.ops import state_scan_triton as sst

    good = sst.scan_bwd
    monkeypatch.setattr(sst, "scan_bwd", lambda *a: tuple(None if g is None else g * 1.01 for g in good(*a)))
    with pytest.raises(RuntimeError, match="refusing to train with it.*RAYTRON_SCAN_KERNEL=torch"):
        state_scan._self_check.__wrapped__(torch.cuda.current_device(), torch.float32)


@pytest.mark.parametrize("op", ["gdn", "ssd"])
def test_triton_scan_carries_state_between_parts_bf16(op):
    """Context parallelism on the training path: a 4K sequence cut in two, the second part started from
    the first part's final state (lead-in chunks through the Triton scan), vs the whole sequence in float64."""
    torch.manual_seed(0)
    seq, cut, h, d = 4096, 2048 + 100, 4, 64
    if op == "gdn":
        q = F.normalize(torch.randn(1, h, seq, d, device="cuda"), dim=-1) / d ** 0.5
        k = F.normalize(torch.randn(1, h, seq, d, device="cuda"), dim=-1)
        inputs = [q, k, torch.randn(1, h, seq, d, device="cuda"), -0.1 * torch.rand(1, h, seq, device="cuda"),
                  torch.rand(1, h, seq, device="cuda")]
        dims, fast_op, ref_op = [2] * 5, gated_delta, gated_delta_chunked
    else:
        inputs = [torch.randn(1, seq, h, d, device="cuda"), F.softplus(torch.randn(1, seq, h, device="cuda") - 3),
                  -torch.rand(h, device="cuda") - 0.5, torch.randn(1, seq, d, device="cuda"),
                  torch.randn(1, seq, d, device="cuda")]
        dims, fast_op, ref_op = [1, 1, None, 1, 1], ssd, ssd_chunked
    out_dim = dims[0]

    def parts(*t):
        first = [x if dm is None else x.narrow(dm, 0, cut) for x, dm in zip(t, dims)]
        second = [x if dm is None else x.narrow(dm, cut, seq - cut) for x, dm in zip(t, dims)]
        out1, state = fast_op(*first, 64, return_final_state=True)
        return torch.cat([out1, fast_op(*second, 64, initial_state=state)], dim=out_dim)

    _check(parts, lambda *t: ref_op(*[x.double() for x in t], 64), [x.requires_grad_() for x in inputs])

