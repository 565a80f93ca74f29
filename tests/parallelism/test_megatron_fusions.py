"""The fused paths the megatron engine turns on for GPU compute what megatron-core's unfused code and
the reference compute: RoPE vs megatron's `_apply_rotary_pos_emb_bshd` (float64 exactly, bf16 within
one rounding), and the engine's RMSNorm vs the reference model's (models/layers.py)."""

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.language_module import language_module

from raytron.models.layers import RMSNorm as ReferenceRMSNorm
from raytron.parallelism.megatron import modules as mm
from raytron.parallelism.megatron.modules import _rms_norm_fp32, fused_rope


@pytest.mark.parametrize("rot", [16, 8])  # full and partial rotary dims
def test_rope_matches_megatron_unfused(rot):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(12, 2, 4, 16, generator=g, dtype=torch.float64)
    freqs = torch.randn(12, 1, 1, rot, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fused_rope(t, freqs), rope_utils._apply_rotary_pos_emb_bshd(t, freqs),
                               atol=1e-14, rtol=1e-14)
    bf = fused_rope(t.bfloat16(), freqs.float())
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), rope_utils._apply_rotary_pos_emb_bshd(t, freqs), atol=2e-2, rtol=1e-2)
    with pytest.raises(NotImplementedError, match="interleaved"):
        fused_rope(t, freqs, interleaved=True)


@pytest.mark.parametrize("module, attr, install, stand_in", [
    (rope_utils, "fused_apply_rotary_pos_emb", mm.install_fused_rope, mm.fused_rope),
    (language_module, "te_parallel_cross_entropy", mm.install_fused_cross_entropy, mm.fused_cross_entropy),
])
def test_install_keeps_a_real_binding(monkeypatch, module, attr, install, stand_in):
    """The stand-in goes where Transformer Engine's kernel is missing (None), never over a real one."""
    monkeypatch.setattr(module, attr, None)
    assert install() and getattr(module, attr) is stand_in
    sentinel = object()
    monkeypatch.setattr(module, attr, sentinel)
    install()
    assert getattr(module, attr) is sentinel


def test_rms_norm_matches_reference():
    ref = ReferenceRMSNorm(32, 1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(_rms_norm_fp32(x, ref.weight, 1e-5), ref(x), atol=1e-6, rtol=1e-6)


def test_cross_entropy_stand_in_matches_megatron_vocab_parallel():
    from raytron.parallelism.megatron.modules import fused_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, 50, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (7, 3), generator=g)
    loss = fused_cross_entropy(logits, labels, None)
    assert loss.shape == (7, 3) and loss.dtype == torch.float32
    want = -torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-6)  # fp32 statistics
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)
