"""Rank programs for CPU tests of the megatron engine's model under TP (+SP) and PP, hybrids included
(tests/parallelism/test_megatron_hybrid.py).

Each rank builds its real megatron-core GPTModel chunk from parallelism/megatron/spec.py (fp32, CPU,
gloo, `torch.cuda.current_device` pointed at "cpu", megatron's CUDA RNG tracker's `fork` a no-op: it
guards dropout, which is 0 here), loads the reference weights through
parallelism/megatron/mapping.py and runs one micro-batch forward and backward; the same reference model
(same seed) runs on every rank. Checked per rank: per-token loss (last stage), every local gradient
against the reference gradient cut the same way, and the weights gathered back to reference names.

megatron's pipeline schedule hard-codes CUDA, so PP runs its micro-batch by hand, as the 1F1B schedule
does per micro-batch: stage 0's output goes to stage 1 (`set_input_tensor`), whose input gradient comes
back. After backward, megatron's own finalize step for TP-replicated parameters
(`_allreduce_non_tensor_model_parallel_grads`, what finalize_model_grads runs on GPU) sums the gradients
of parameters marked `sequence_parallel` over TP. DP and the optimizer are not involved here.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQ, BATCH, AUX_COEF = 32, 2, 0.01


def _init_megatron(layout, rank: int) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from raytron.parallelism.megatron.engine import init_megatron_groups

    torch.cuda.current_device = lambda: "cpu"  # see the module docstring
    get_cuda_rng_tracker().fork = lambda *_a, **_k: contextlib.nullcontext()  # CUDA RNG; dropout is 0
    init_megatron_groups(layout, rank, create_gloo_process_groups=False)


def _megatron_twin(ref, layout):
    """This rank's GPTModel chunk with the reference weights, its mapping pieces and its config."""
    from raytron.parallelism.megatron.engine import chunk_coords
    from raytron.parallelism.megatron.mapping import chunk_pieces, to_megatron
    from raytron.parallelism.megatron.spec import build_model_chunks, transformer_config

    tcfg = transformer_config(ref.cfg, layout, on_gpu=False, aux_loss_coef=AUX_COEF)
    (chunk,) = build_model_chunks(ref.cfg, tcfg, seq_len=SEQ)
    pieces = chunk_pieces(ref.cfg, chunk_coords(chunk, layout))
    params = dict(chunk.named_parameters())
    assert set(params) == set(pieces), (sorted(set(params) ^ set(pieces)))
    with torch.no_grad():
        for name, value in to_megatron(ref.state_dict(), pieces).items():
            assert params[name].shape == value.shape, (name, params[name].shape, value.shape)
            params[name].copy_(value)
    return chunk, pieces, tcfg


def _reference(family: str, flavor: str, overrides: dict, tokens: torch.Tensor):
    """The reference model (seed 0) after one backward of mean LM loss + AUX_COEF * its aux losses."""
    from raytron import models

    torch.manual_seed(0)
    ref = models.build(family, flavor, **overrides)
    logits = ref(tokens[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, ref.cfg.vocab_size), tokens[:, 1:].reshape(-1),
                                reduction="none").view(BATCH, SEQ)
    aux = sum(ref.aux_losses()) if ref.aux_losses() else 0.0
    (per_token.mean() + AUX_COEF * aux).backward()
    return ref, per_token.detach()


def _run_micro_batch(chunk, tokens: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
    """Forward + backward of one micro-batch over this rank's pipeline stage; per-token loss on the last."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    inp = None
    if not first:
        inp = torch.empty(SEQ // ps.get_tensor_model_parallel_world_size(), BATCH, hidden_size)
        dist.recv(inp, src=ps.get_pipeline_model_parallel_prev_rank())
        inp.requires_grad_(True)
        chunk.set_input_tensor(inp)
    if last:
        per_token = chunk(tokens[:, :-1], None, None, labels=tokens[:, 1:])
        per_token.mean().backward()
    else:
        out = chunk(tokens[:, :-1], None, None)
        dist.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(out)
        dist.recv(grad, src=ps.get_pipeline_model_parallel_next_rank())
        out.backward(grad)
        per_token = None
    if inp is not None:
        dist.send(inp.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
    return per_token


def _finalize_tp_grads(chunk, tcfg) -> None:
    """megatron's TP sum of replicated parameters' gradients (finalize_model_grads' step for them)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    chunk.ddp_config = SimpleNamespace(use_megatron_fsdp=False)  # read by that function (a DDP field)
    _allreduce_non_tensor_model_parallel_grads([chunk], tcfg, ps.get_tensor_model_parallel_group())


def _grad_mismatches(ref, chunk, pieces, rtol: float) -> dict[str, float]:
    """{megatron name: relative error} for local gradients farther than rtol from the reference's."""
    from raytron.parallelism.megatron.mapping import to_megatron

    ref_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in ref.named_parameters()}
    expected = to_megatron(ref_grads, pieces)
    bad = {}
    for name, p in chunk.named_parameters():
        want = expected[name]
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-8))
        if err > rtol:
            bad[name] = err
    return bad


def _round_trip_mismatches(ref, chunk, pieces) -> list[str]:
    """Reference names whose tensors differ after gathering every rank's megatron weights back."""
    from raytron.parallelism.megatron.mapping import from_megatron, tied_aliases

    mine = (pieces, {n: p.detach().clone() for n, p in chunk.named_parameters()})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    back = from_megatron(everyone, {k: v.shape for k, v in ref.state_dict().items()},
                         aliases=tied_aliases(ref.cfg))
    return sorted(k for k, v in ref.state_dict().items() if not torch.equal(back[k], v))


def equivalence(rank: int, world: int, family: str, flavor: str, overrides: dict, layouts: list[dict],
                out: str) -> None:
    """For each layout: megatron forward/backward vs the reference; rank 0 writes one record per layout."""
    from megatron.core import parallel_state as ps

    from raytron.parallelism.layout import ParallelLayout

    torch.set_num_threads(1)
    tokens = torch.randint(0, 264, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    records = []
    for kw in layouts:
        dp = world // (kw.get("tp", 1) * kw.get("pp", 1) * kw.get("cp", 1))
        layout = ParallelLayout(world_size=world, **{"dp": dp, **kw})
        _init_megatron(layout, rank)
        ref, ref_loss = _reference(family, flavor, overrides, tokens)
        chunk, pieces, tcfg = _megatron_twin(ref, layout)
        per_token = _run_micro_batch(chunk, tokens, ref.cfg.dim)
        _finalize_tp_grads(chunk, tcfg)
        mine = {"rank": rank, "layers": [layer.layer_number for layer in chunk.decoder.layers],
                "loss_err": None if per_token is None else float((per_token.detach() - ref_loss).abs().max()),
                "grad_bad": _grad_mismatches(ref, chunk, pieces, rtol=1e-4),
                "round_trip_bad": _round_trip_mismatches(ref, chunk, pieces)}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        records.append({"layout": kw, "ranks": everyone})
        ps.destroy_model_parallel()
    if rank == 0:
        Path(out).write_text(json.dumps(records))


CP_ATTENTION_CASES = {  # name -> (query heads, kv heads, mask keywords); every one with packed documents
    "gqa": (4, 2, {}),  # kv heads split over cp as they are
    "one-kv-head": (4, 1, {"window": 5}),  # fewer kv heads than cp: repeated to cp
    "block-sparse": (2, 2, {"sparse": (4, 2, 1)}),
}


def cp_attention(rank: int, world: int, out: str) -> None:
    """cp.core_attention over the CP group (every rank of the world) against ops.attention on the whole
    sequence, fp64: this rank's output rows and the gradients of its q/k/v parts. Records per case the
    [batch, heads, seq, dim] of every q/k/v the attention kernel got on this rank."""
    from raytron.ops.attention import BlockSparse, attention
    from raytron.parallelism.megatron import cp

    seen: list = []

    def recording(q, k, v, **kwargs):
        seen.append([list(t.shape) for t in (q, k, v)])
        return attention(q, k, v, **kwargs)

    cp.attention = recording
    seq, batch, dim, group = 16, 2, 8, dist.group.WORLD
    doc_ids = torch.tensor([[0] * 3 + [1] * 9 + [2] * 4, [0] * 8 + [1] * 8])
    records = {}
    for name, (heads, kv_heads, mask) in CP_ATTENTION_CASES.items():
        mask = {k: BlockSparse(*v) if k == "sparse" else v for k, v in mask.items()}
        g = torch.Generator().manual_seed(len(records))
        q, k, v = (torch.randn(seq, batch, h, dim, generator=g, dtype=torch.float64, requires_grad=True)
                   for h in (heads, kv_heads, kv_heads))
        whole = attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), doc_ids=doc_ids, **mask)
        whole = whole.permute(2, 0, 1, 3).reshape(seq, batch, -1)
        probe = torch.randn(whole.shape, generator=g, dtype=torch.float64)
        want = torch.autograd.grad(whole, (q, k, v), probe)
        parts = [cp.split_for_context_parallel(t.detach(), world, rank, dim=0).requires_grad_() for t in (q, k, v)]
        seen.clear()
        got = cp.core_attention(*parts, group, doc_ids=doc_ids, **mask)
        got.backward(cp.split_for_context_parallel(probe, world, rank, dim=0))
        errors = [float((got - cp.split_for_context_parallel(whole, world, rank, dim=0)).abs().max())]
        errors += [float((p.grad - cp.split_for_context_parallel(w, world, rank, dim=0)).abs().max())
                   for p, w in zip(parts, want)]
        records[name] = {"errors": errors, "kernel_shapes": list(seen)}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, records)
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))
