"""Context parallelism for the sequence mixers: which parts of the sequence a CP rank holds, and how what
crosses a part boundary moves between ranks.

megatron's load-balanced split cuts the sequence into 2*cp chunks; CP rank r holds chunk r (its first
half, `A`) and chunk 2cp-1-r (second half, `B`). A linear-sequence layer (Gated DeltaNet, Mamba2) needs,
at the start of each chunk, what the chunk before it ended with: the short convolution's last K-1 inputs
(the halo) and the recurrent state. Chunk r-1 is rank r-1's A; chunk 2cp-2-r is rank r+1's B, or, on the
last rank, its own A. So halos move A: r -> r+1 and B: r -> r-1 all at once (`exchange_halos`), and the
state runs one sequential pass over the chunks in order: up the ranks through the A halves, across on the
last rank, and back down through the B halves (`recv_state` / `send_state`, gradients the other way).

Backward must walk the same chain in reverse without two ranks waiting on each other: a rank's B half
has to finish (sending its initial state's gradient up) before its A half waits for its final state's
gradient from above. `recv_state` takes the A half's output as an anchor for the B half's initial state,
so autograd cannot start A's backward before B's is done.

Attention under context parallelism is all-to-all (Ulysses): `heads_to_sequence` trades this rank's
tokens of every head for every token of heads/cp of the heads (q, k and v each), the attention kernel runs
unchanged on the whole sequence in natural order, and `sequence_to_heads` trades the output back. No rank
ever holds the keys and values of all heads and all tokens: K/V per rank is (kv heads/cp) x S, a 1/cp
share of a full gather. All-to-all rather than a ring because every mask the engine has (causal,
documents, sliding window, block-sparse counted from each document's start) is a function of global
positions over the whole sequence, so FlexAttention / SDPA see exactly the single-device problem, with no
online-softmax merge, no per-block mask slicing and no backward of our own beyond the all-to-all's
(which is its own adjoint). The costs: four all-to-alls per attention layer (q, k, v forward, the output;
the same in backward), each moving 1/cp of the tensor per peer, and the constraint that cp divides the
query heads of a TP rank (num_heads / tp; MegatronSupport.check_model refuses the rest at `plan`). KV
heads need not divide: with fewer than cp (or not a multiple of it) each one is repeated to
lcm(kv heads, cp), which divides the query heads, so the GQA grouping is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ...ops.attention import attention


def split_for_context_parallel(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of x along `dim`: chunks rank and 2*cp-1-rank of 2*cp (megatron's balance)."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=dim)


def _chunk_slots(cp: int) -> list[int]:
    """Position of natural chunk c in the rank-major order [rank0: c0, c(2cp-1) | rank1: c1, c(2cp-2) | ...]."""
    slots = [0] * (2 * cp)
    for r in range(cp):
        slots[r], slots[2 * cp - 1 - r] = 2 * r, 2 * r + 1
    return slots


def natural_order(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Every CP rank's part one after the other along dim 0 (rank-major) -> chunks c0, c1, ..., c(2cp-1)."""
    chunks = x.chunk(2 * cp, dim=0)
    return torch.cat([chunks[slot] for slot in _chunk_slots(cp)], dim=0)


def rank_order(x: torch.Tensor, cp: int) -> torch.Tensor:
    """The inverse of natural_order: the whole sequence along dim 0 -> every rank's part, rank-major."""
    return torch.cat([split_for_context_parallel(x, cp, r, dim=0) for r in range(cp)], dim=0)


class CPSide:
    """This rank's place in the CP group (module docstring), with the document ids of its parts."""

    def __init__(self, group, doc_ids: torch.Tensor | None, kernel_size: int):
        self.group, self.cp, self.rank = group, group.size(), group.rank()
        self.halo = kernel_size - 1
        self.doc_ids = doc_ids  # [b, S] whole sequence, or None

    def global_rank(self, r: int) -> int:
        return dist.get_global_rank(self.group, r)

    def local_doc_ids(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Document ids of the A and B halves [b, S/2cp] (None without documents)."""
        if self.doc_ids is None:
            return None, None
        return split_for_context_parallel(self.doc_ids, self.cp, self.rank).chunk(2, dim=1)

    def halo_doc_ids(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Document ids of the K-1 tokens before each half (the first token's id where there are none)."""
        if self.doc_ids is None:
            return None, None
        chunks = self.doc_ids.chunk(2 * self.cp, dim=1)
        out = []
        for c in (self.rank, 2 * self.cp - 1 - self.rank):
            before = chunks[c - 1][:, -self.halo:] if c > 0 else chunks[c][:, :1].expand(-1, self.halo)
            out.append(before)
        return out[0], out[1]

    def keeps_state(self, half: int) -> torch.Tensor | None:
        """[b] 1 where the state entering half 0 (A) or 1 (B) continues a document, 0 where a document
        starts at its first token (the state is reset there); None without documents."""
        if self.doc_ids is None:
            return None
        chunks = self.doc_ids.chunk(2 * self.cp, dim=1)
        c = self.rank if half == 0 else 2 * self.cp - 1 - self.rank
        if c == 0:
            return None
        return (chunks[c - 1][:, -1] == chunks[c][:, 0])


def _p2p(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group) -> None:
    """Post every send and receive at once (no ordering deadlock), then wait for all."""
    sends = [(t.contiguous(), peer) for t, peer in sends]  # kept alive until the waits below
    if dist.get_backend(group) == "gloo":  # gloo has no coalesced P2P; its isend/irecv never block
        works = [dist.isend(t, peer, group) for t, peer in sends]
        works += [dist.irecv(t, peer, group) for t, peer in recvs]
    else:  # NCCL: one group call, so paired sends and receives cannot wait on each other
        ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs]
        works = dist.batch_isend_irecv(ops) if ops else []
    for work in works:
        work.wait()


class _HaloExchange(torch.autograd.Function):
    """(tail_A, tail_B) [b, K-1, C] -> (halo_A, halo_B): A tails go to the next rank, B tails to the
    previous one; the last rank's B halo is its own A tail, the first rank's A halo is zeros."""

    @staticmethod
    def forward(ctx, tail_a, tail_b, side: CPSide):
        ctx.side = side
        r, cp = side.rank, side.cp
        halo_a = torch.zeros_like(tail_a, memory_format=torch.contiguous_format)
        halo_b = tail_a.clone() if r == cp - 1 else torch.empty_like(tail_b, memory_format=torch.contiguous_format)
        sends, recvs = [], []
        if r < cp - 1:
            sends.append((tail_a, side.global_rank(r + 1)))
            recvs.append((halo_b, side.global_rank(r + 1)))
        if r > 0:
            sends.append((tail_b, side.global_rank(r - 1)))
            recvs.append((halo_a, side.global_rank(r - 1)))
        _p2p(sends, recvs, side.group)
        return halo_a, halo_b

    @staticmethod
    def backward(ctx, d_halo_a, d_halo_b):
        side = ctx.side
        r, cp = side.rank, side.cp
        d_tail_a = (d_halo_b.clone() if r == cp - 1
                    else torch.empty_like(d_halo_a, memory_format=torch.contiguous_format))
        d_tail_b = torch.zeros_like(d_halo_b, memory_format=torch.contiguous_format)
        sends, recvs = [], []
        if r > 0:
            sends.append((d_halo_a, side.global_rank(r - 1)))
            recvs.append((d_tail_b, side.global_rank(r - 1)))
        if r < cp - 1:
            sends.append((d_halo_b, side.global_rank(r + 1)))
            recvs.append((d_tail_a, side.global_rank(r + 1)))
        _p2p(sends, recvs, side.group)
        return d_tail_a, d_tail_b, None


def exchange_halos(tail_a: torch.Tensor, tail_b: torch.Tensor, side: CPSide) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-1 inputs before each half, given each half's last K-1 inputs (see _HaloExchange)."""
    if tail_a.shape[1] != side.halo:
        raise ValueError(f"context parallelism: a sequence chunk of {tail_a.shape[1]} tokens is shorter than the "
                         f"short convolution's {side.halo} halo tokens; use a longer train.seq_len or a smaller cp")
    return _HaloExchange.apply(tail_a, tail_b, side)


class _RecvState(torch.autograd.Function):
    """Forward: receive a state from `peer`; backward: send its gradient back. `anchor` only orders the
    backward (module docstring); it gets a zero gradient."""

    @staticmethod
    def forward(ctx, anchor, shape, dtype, peer: int, group):
        ctx.peer, ctx.group, ctx.anchor_shape = peer, group, anchor.shape
        state = torch.empty(shape, dtype=dtype, device=anchor.device)
        _p2p([], [(state, peer)], group)
        return state

    @staticmethod
    def backward(ctx, d_state):
        _p2p([(d_state, ctx.peer)], [], ctx.group)
        return d_state.new_zeros(()).expand(ctx.anchor_shape), None, None, None, None


class _SendState(torch.autograd.Function):
    """Forward: send `state` to `peer` and pass `out` through; backward: receive the state's gradient."""

    @staticmethod
    def forward(ctx, out, state, peer: int, group):
        ctx.peer, ctx.group, ctx.state_shape, ctx.state_dtype = peer, group, state.shape, state.dtype
        _p2p([(state.detach(), peer)], [], group)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, d_out):
        d_state = torch.empty(ctx.state_shape, dtype=ctx.state_dtype, device=d_out.device)
        _p2p([], [(d_state, ctx.peer)], ctx.group)
        return d_out, d_state, None, None


def send_state(out: torch.Tensor, state: torch.Tensor, peer: int, group) -> torch.Tensor:
    """`out` unchanged; `state` goes to global rank `peer` (its gradient comes back in backward)."""
    return _SendState.apply(out, state, peer, group)


def recv_state(anchor: torch.Tensor, shape: tuple, dtype: torch.dtype, peer: int, group) -> torch.Tensor:
    """A state of `shape` from global rank `peer`, its gradient sent back in backward (`anchor`: the
    tensor whose backward must come after this one's, module docstring)."""
    return _RecvState.apply(anchor, shape, dtype, peer, group)


class _AllToAll(torch.autograd.Function):
    """x [cp * n, ...]: slice i goes to CP rank i, slice i of the result came from rank i. Its adjoint is
    the same exchange (what rank j sent to i goes back from i to j), so backward is this on the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)  # gloo (CPU) and NCCL both take equal splits
    return out


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[S/cp, b, h, d], this rank's chunks r and 2cp-1-r of every head -> [S, b, h/cp, d], the whole
    sequence in natural order for heads [r*h/cp, (r+1)*h/cp) (the module docstring's all-to-all)."""
    cp = group.size()
    s, b, h, d = x.shape
    if h % cp:
        raise ValueError(f"context-parallel attention: {h} heads on this TP rank do not split over cp = {cp}; "
                         "layout.cp must divide num_heads / layout.tp (MegatronSupport.check_model)")
    x = x.reshape(s, b, cp, h // cp, d).permute(2, 0, 1, 3, 4)  # [cp (head group = destination), s, b, h/cp, d]
    return natural_order(_AllToAll.apply(x, group).reshape(cp * s, b, h // cp, d), cp)


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of heads_to_sequence: [S, b, h/cp, d] -> [S/cp, b, h, d]."""
    cp = group.size()
    seq, b, hc, d = x.shape
    x = rank_order(x, cp).view(cp, seq // cp, b, hc, d)  # [cp (destination rank), S/cp, b, h/cp, d]
    x = _AllToAll.apply(x, group)  # [cp (head group = source rank), S/cp, b, h/cp, d]
    return x.permute(1, 2, 0, 3, 4).reshape(seq // cp, b, cp * hc, d)


def kv_heads_for_cp(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Key or value heads [s, b, g, d] repeated (each in place, GQA order kept) to lcm(g, cp) heads, so they
    split over cp; unchanged when cp divides g. lcm(g, cp) divides the query heads whenever g and cp do."""
    g = x.shape[2]
    rep = math.lcm(g, cp) // g
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def core_attention(query, key, value, cp_group, doc_ids: torch.Tensor | None = None, window: int = 0,
                   sparse=None, scale: float | None = None) -> torch.Tensor:
    """q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn]: ops.attention.attention with the reference's
    masks (doc_ids [b, S] of the whole sequence), for megatron's core-attention modules. Under context
    parallelism (module docstring) an all-to-all gives this rank every token of np/cp query heads and of
    their key/value heads, attention runs on the whole sequence, and the output goes back to this rank's
    tokens of every head."""
    sq, b = query.shape[:2]
    cp = cp_group.size()
    if cp > 1:
        key, value = kv_heads_for_cp(key, cp), kv_heads_for_cp(value, cp)
        query, key, value = (heads_to_sequence(t, cp_group) for t in (query, key, value))
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
    out = attention(q, k, v, window=window, doc_ids=doc_ids, sparse=sparse, scale=scale).permute(2, 0, 1, 3)
    if cp > 1:
        out = sequence_to_heads(out, cp_group)
    return out.reshape(sq, b, -1)
