"""Every attention mask vs the explicit masked softmax: the CPU path (SDPA + dense mask, with
gradients), FlexAttention eager (forward only: no CPU backward), and the mask semantics themselves."""

import pytest
import torch

from raytron.ops.attention import (BlockSparse, attention, causal_mask, dense_mask, flex_attention,
                                   make_mask_mod, reference_attention)

B, H, KV, S, D = 2, 4, 2, 48, 8
DOCS = torch.tensor([[0] * 10 + [1] * 30 + [2] * 8, [0] * 48])
CASES = {
    "causal": dict(),
    "window": dict(window=7),
    "sparse": dict(sparse=BlockSparse(block=8, local=2, global_=1)),
    "docs": dict(doc_ids=DOCS),
    "window+docs": dict(window=7, doc_ids=DOCS),
    "sparse+docs": dict(sparse=BlockSparse(block=8, local=1, global_=1), doc_ids=DOCS),
}


def _qkv(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, S, D, generator=g, dtype=dtype).requires_grad_() for h in (H, KV, KV)]


def _explicit_mask(window=0, doc_ids=None, sparse=None) -> torch.Tensor:
    """The same rules written as loops over positions, independent of make_mask_mod."""
    mask = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            for j in range(i + 1):
                ok = window <= 0 or i - j < window
                if sparse is not None:  # blocks counted from the document's start
                    first = 0 if doc_ids is None else min(p for p in range(S) if doc_ids[b, p] == doc_ids[b, i])
                    qb, kb = (i - first) // sparse.block, (j - first) // sparse.block
                    ok &= qb - kb < sparse.local or kb < sparse.global_
                if doc_ids is not None:
                    ok &= bool(doc_ids[b, i] == doc_ids[b, j])
                mask[b, 0, i, j] = ok
    return mask


@pytest.mark.parametrize("case", CASES)
def test_mask_mod_matches_explicit_rules(case):
    assert torch.equal(dense_mask(make_mask_mod(**CASES[case]), B, S), _explicit_mask(**CASES[case]))


def test_causal_mask_helper():
    assert torch.equal(causal_mask(S, S, 7), _explicit_mask(window=7)[0, 0])


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_reference_with_grads(case):
    q, k, v = _qkv()
    out = attention(q, k, v, **CASES[case])
    ref = reference_attention(q, k, v, _explicit_mask(**CASES[case]))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    probe = torch.randn_like(out)
    for ga, gb in zip(torch.autograd.grad(out, (q, k, v), probe), torch.autograd.grad(ref, (q, k, v), probe)):
        torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", ["window", "sparse+docs"])
def test_flex_attention_eager_matches_reference(case):
    q, k, v = (x.detach().float() for x in _qkv())
    out = flex_attention(q, k, v, make_mask_mod(**CASES[case]), compiled=False)
    ref = reference_attention(q, k, v, _explicit_mask(**CASES[case]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

