"""Weight mapping of the linear-sequence mixers (Gated DeltaNet `G`, Mamba2 `M`) between the reference
(models/gated_deltanet.py, models/mamba2.py) and their megatron twins (parallelism/megatron/hybrid.py),
in the pieces language of parallelism/megatron/pieces.py. Names are relative to the mixer: reference
`layers.{i}.mixer.*`, megatron `decoder.layers.{j}.self_attention.*`.

TP rank r of tp holds heads [r*H/tp, (r+1)*H/tp) (I = H*d channels in all, I_r = I/tp of them here):
- `in_proj.weight` is one column-parallel GEMM whose rank-r rows are the concatenation of the r-th head
  shard of every reference projection: GDN [q, k, v, g, a, b]; Mamba2 [z, x, B, C, dt], where Mamba2's
  B and C (one group, N state channels shared by all heads) are split into N/tp channel shards and
  all-gathered after the convolution;
- `conv_weight` holds the same channels, in the reference's order ([q, k, v] / [x, B, C]);
- per-head vectors (A_log, dt_bias, D) and Mamba2's norm over x channels are cut by head; GDN's o_norm
  (one [d] weight shared by every head) is replicated; `out_proj` is row-parallel.
"""

from __future__ import annotations

from .pieces import Piece, row, shard


def _rows(ref: str, offset: int, count: int, parts: int, rank: int) -> Piece:
    """Rank's shard of rows [offset, offset + count) of reference tensor `ref`."""
    start, length = shard(count, parts, rank)
    return Piece(ref, None, 0, offset + start, length)


def gated_deltanet_pieces(cfg, prefix: str, tp: int, rank: int) -> dict[str, list[Piece]]:
    heads, inner = cfg.linear_heads, cfg.linear_heads * cfg.linear_head_dim
    proj = [_rows(f"{prefix}.{name}_proj.weight", 0, n, tp, rank)
            for name, n in (("q", inner), ("k", inner), ("v", inner), ("g", inner), ("a", heads), ("b", heads))]
    conv = [_rows(f"{prefix}.conv_weight", i * inner, inner, tp, rank) for i in range(3)]
    return {"in_proj.weight": proj, "conv_weight": conv,
            "A_log": [_rows(f"{prefix}.A_log", 0, heads, tp, rank)],
            "dt_bias": [_rows(f"{prefix}.dt_bias", 0, heads, tp, rank)],
            "o_norm.weight": [Piece(f"{prefix}.o_norm.weight", None, 0, 0, cfg.linear_head_dim)],
            "out_proj.weight": [row(f"{prefix}.out_proj.weight", inner, tp, rank)]}


def mamba2_pieces(cfg, prefix: str, tp: int, rank: int) -> dict[str, list[Piece]]:
    heads, inner, n = cfg.linear_heads, cfg.linear_heads * cfg.linear_head_dim, cfg.ssm_state_dim
    w = f"{prefix}.in_proj.weight"  # rows [z (I), x (I), B (N), C (N), dt (H)]
    proj = [_rows(w, 0, inner, tp, rank), _rows(w, inner, inner, tp, rank), _rows(w, 2 * inner, n, tp, rank),
            _rows(w, 2 * inner + n, n, tp, rank), _rows(w, 2 * inner + 2 * n, heads, tp, rank)]
    c = f"{prefix}.conv_weight"  # rows [x (I), B (N), C (N)]
    conv = [_rows(c, 0, inner, tp, rank), _rows(c, inner, n, tp, rank), _rows(c, inner + n, n, tp, rank)]
    out = {"in_proj.weight": proj, "conv_weight": conv,
           "norm_weight": [_rows(f"{prefix}.norm.weight", 0, inner, tp, rank)],
           "out_proj.weight": [row(f"{prefix}.out_proj.weight", inner, tp, rank)]}
    for name in ("A_log", "dt_bias", "D"):
        out[name] = [_rows(f"{prefix}.{name}", 0, heads, tp, rank)]
    return out


def mixer_pieces(cfg, kind: str, prefix: str, tp: int, rank: int) -> dict[str, list[Piece]]:
    """Pieces of a linear-sequence mixer (`G` or `M`) named inside megatron's `self_attention` slot."""
    if kind == "G":
        return gated_deltanet_pieces(cfg, prefix, tp, rank)
    if kind == "M":
        return mamba2_pieces(cfg, prefix, tp, rank)
    raise ValueError(f"no linear-sequence mapping for layer kind {kind!r}")
