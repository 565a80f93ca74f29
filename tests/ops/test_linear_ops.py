"""Chunked linear-sequence kernels == their token-by-token references (float64, outputs and every
gradient), with and without document resets, and the short convolution vs F.conv1d."""

import pytest
import torch
import torch.nn.functional as F

from raytron.ops.chunking import doc_starts
from raytron.ops.gated_delta import gated_delta_chunked, gated_delta_recurrent
from raytron.ops.short_conv import reference_short_conv, short_conv
from raytron.ops.ssd import ssd_chunked, ssd_recurrent

TOL = dict(atol=1e-10, rtol=1e-10)
DOCS = torch.tensor([[0] * 9 + [1] * 17 + [2] * 11, [5] * 37])  # [B=2, T=37]; row 1: one document


def _gdn_inputs(b=2, h=3, t=37, dk=8, dv=6):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, dk, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(b, h, t, dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(b, h, t, generator=g, dtype=torch.float64)
    beta = torch.rand(b, h, t, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, log_decay, beta)]


def _ssd_inputs(b=2, t=37, h=3, p=6, n=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, t, h, generator=g, dtype=torch.float64)
    a = -2 * torch.rand(h, generator=g, dtype=torch.float64)
    b_in = torch.randn(b, t, n, generator=g, dtype=torch.float64)
    c_in = torch.randn(b, t, n, generator=g, dtype=torch.float64)
    return [y.requires_grad_() for y in (x, dt, a, b_in, c_in)]


def _assert_same_with_grads(fn_a, fn_b, inputs):
    out_a, out_b = fn_a(*inputs), fn_b(*inputs)
    torch.testing.assert_close(out_a, out_b, **TOL)
    probe = torch.randn_like(out_a)
    grads_a = torch.autograd.grad(out_a, inputs, probe)
    grads_b = torch.autograd.grad(out_b, inputs, probe)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, **TOL)


@pytest.mark.parametrize("kernel", ["reference", "torch"])
@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("docs", [False, True])
def test_gated_delta_chunked_matches_recurrent(chunk, docs, kernel):
    starts = doc_starts(DOCS) if docs else None
    _assert_same_with_grads(lambda *x: gated_delta_chunked(*x, chunk, starts, kernel=kernel),
                            lambda *x: gated_delta_recurrent(*x, starts), _gdn_inputs())


@pytest.mark.parametrize("kernel", ["reference", "torch"])
@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("docs", [False, True])
def test_ssd_chunked_matches_recurrent(chunk, docs, kernel):
    starts = doc_starts(DOCS) if docs else None
    _assert_same_with_grads(lambda *x: ssd_chunked(*x, chunk, starts, kernel=kernel),
                            lambda *x: ssd_recurrent(*x, starts), _ssd_inputs())


def test_document_reset_equals_separate_documents():
    q, k, v, g, beta = (x.detach() for x in _gdn_inputs())
    packed = gated_delta_chunked(q, k, v, g, beta, 8, doc_starts(DOCS))
    alone = gated_delta_chunked(*(x[:1, :, 9:26] for x in (q, k, v, g, beta)), 8)
    torch.testing.assert_close(packed[:1, :, 9:26], alone, **TOL)
    x, dt, a, b_in, c_in = (y.detach() for y in _ssd_inputs())
    packed = ssd_chunked(x, dt, a, b_in, c_in, 8, doc_starts(DOCS))
    alone = ssd_chunked(x[:1, 9:26], dt[:1, 9:26], a, b_in[:1, 9:26], c_in[:1, 9:26], 8)
    torch.testing.assert_close(packed[:1, 9:26], alone, **TOL)


def test_short_conv_matches_conv1d_and_resets_at_documents():
    x = torch.randn(2, 37, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    _assert_same_with_grads(short_conv, reference_short_conv, [x, w])
    packed = short_conv(x, w, DOCS)
    torch.testing.assert_close(packed[:1, 9:26], reference_short_conv(x[:1, 9:26], w), **TOL)
    torch.testing.assert_close(packed[1:], reference_short_conv(x[1:], w), **TOL)


def test_short_conv_halo_continues_the_sequence():
    """The second part of a sequence with the first part's last K-1 inputs as halo (context parallelism)
    equals the whole sequence's output there, also where the halo reaches into the previous document."""
    x = torch.randn(2, 37, 5, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    for docs in (None, DOCS):
        whole = short_conv(x, w, docs)
        for cut in (20, 27):  # DOCS: a document starts at 26, so cut 27 has a halo across it
            part = short_conv(x[:, cut:], w, None if docs is None else docs[:, cut:], halo=x[:, cut - 3:cut],
                              halo_doc_ids=None if docs is None else docs[:, cut - 3:cut])
            torch.testing.assert_close(part, whole[:, cut:], **TOL)


def _cut(fn, inputs, time_dims, cut, starts):
    """fn on the two parts of the inputs cut along time at `cut`, the second started from the first's final
    state: (concatenated output, final state)."""
    first = [x if d is None else x.narrow(d, 0, cut) for x, d in zip(inputs, time_dims)]
    second = [x if d is None else x.narrow(d, cut, x.shape[d] - cut) for x, d in zip(inputs, time_dims)]
    out1, state = fn(*first, None if starts is None else starts[:, :cut], return_final_state=True)
    out2, final = fn(*second, None if starts is None else starts[:, cut:], initial_state=state,
                     return_final_state=True)
    out_dim = next(d for d in time_dims if d is not None)
    return torch.cat([out1, out2], dim=out_dim), final


@pytest.mark.parametrize("kernel", ["reference", "torch"])
@pytest.mark.parametrize("chunk", [4, 16])  # 4 < d_k: the initial state enters over two leading chunks
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("op", ["gdn", "ssd"])
def test_state_passed_between_parts_equals_whole(op, docs, chunk, kernel):
    """A sequence cut in two (inside a chunk, a document starting after the cut), the second part started
    from the first part's final state (context parallelism) == the whole sequence's recurrence: outputs,
    final state and every gradient."""
    starts = doc_starts(DOCS) if docs else None
    if op == "gdn":
        inputs, dims, chunked, recurrent = _gdn_inputs(), [2, 2, 2, 2, 2], gated_delta_chunked, gated_delta_recurrent
    else:
        inputs, dims, chunked, recurrent = _ssd_inputs(), [1, 1, None, 1, 1], ssd_chunked, ssd_recurrent

    def parts(*x):
        out, final = _cut(lambda *a, **kw: chunked(*a[:-1], chunk, a[-1], kernel=kernel, **kw), x, dims, 21, starts)
        return torch.cat([out.flatten(), final.flatten()])

    def whole(*x):
        out, final = recurrent(*x, starts, return_final_state=True)
        return torch.cat([out.flatten(), final.flatten()])

    _assert_same_with_grads(parts, whole, inputs)
