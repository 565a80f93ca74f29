"""parallelism/megatron/fp8.py's autograd function without communication (tp 1): the FP8 reference math of
ops/fp8.py, and megatron's gradient-accumulation-fusion contract (fp32 main_grad += dW, placeholder .grad)."""

import pytest
import torch

from raytron.ops import fp8

pytest.importorskip("megatron.core")


@pytest.mark.parametrize("fused", [False, True])
def test_fp8_linear_with_comm_matches_fp8_linear(fused):
    from raytron.parallelism.megatron.fp8 import FP8LinearWithComm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 32, generator=gen)  # [s, b, in] as megatron passes it
    w = (torch.randn(48, 32, generator=gen) * 0.1).requires_grad_()
    dy = torch.randn(16, 2, 48, generator=gen)
    xr, wr = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = fp8.fp8_linear(xr, wr, impl="reference")
    want.backward(dy)
    if fused:
        w.main_grad = torch.ones(48, 32)
        w.grad_added_to_main_grad = False
    xg = x.clone().requires_grad_()
    y = FP8LinearWithComm.apply(xg, w, fused, False, False, None, "reference")
    y.backward(dy)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=0, atol=0)
    if fused:
        torch.testing.assert_close(w.main_grad, 1 + wr.grad, rtol=1e-6, atol=1e-6)
        assert w.grad_added_to_main_grad and w.grad.shape == w.shape
    else:
        torch.testing.assert_close(w.grad, wr.grad, rtol=0, atol=0)


@pytest.mark.slow
def test_fp8_column_parallel_under_tp2(tmp_path):
    """Two gloo ranks: the sequence-parallel all-gather / reduce-scatter and the dgrad all-reduce around
    the FP8 GEMMs give each rank exactly its shard of the single-process FP8 computation."""
    import json

    from tests.checkpoint.ckpt_helpers import spawn_ranks
    from tests.parallelism import megatron_fp8_ranks

    out = tmp_path / "errors.json"
    spawn_ranks(megatron_fp8_ranks.column_parallel, 2, str(out))
    for mode, err in json.loads(out.read_text()).items():
        assert err["y"] < 1e-6 and err["dx"] < 1e-6 * err["dx_scale"], (mode, err)
