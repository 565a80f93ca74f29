"""Weight mapping between the reference model (`raytron.models`) and megatron-core GPTModel shards.

Every megatron parameter of one rank is described as a list of *pieces*: slices of reference tensors,
concatenated along one dimension. The same description drives both directions:

- `to_megatron`: reference state dict -> this rank's megatron tensors (any TP/PP/VPP/EP/ETP coordinates);
- `from_megatron`: every rank's megatron tensors (and their pieces) -> the full reference state dict.

Megatron conventions encoded here (megatron-core 0.16.1, no Transformer Engine):
- `linear_qkv.weight` rows are grouped per query group: [q heads of the group, its k head, its v head],
  and TP splits whole query groups;
- `linear_fc1.weight` of a gated MLP holds [gate rows; up rows] of this TP rank's shard;
- `linear_proj` / `linear_fc2` are row-parallel: TP splits their input columns;
- experts: EP rank r holds experts [r*E/ep, (r+1)*E/ep) as `local_experts.{j}`, split over ETP like an MLP.
Only plain tensor slicing happens, so a round trip is exact (bitwise) in any dtype that both sides hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .hybrid_mapping import mixer_pieces
from .pieces import Piece, column, row, shard, whole


@dataclass(frozen=True)
class ChunkCoords:
    """What decides the shards of one model chunk on one rank."""

    blocks: tuple[int, ...]
    """Global indices of the megatron layers in this chunk (block g = reference layers 2g, 2g+1)."""
    pre_process: bool
    """Chunk holds the embedding."""
    post_process: bool
    """Chunk holds the final norm and the output layer."""
    tp: int = 1
    tp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    etp: int = 1
    etp_rank: int = 0


def _qkv(cfg, prefix: str, tp: int, rank: int) -> list[Piece]:
    hd, groups, per_group = cfg.attn_head_dim, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    first, count = shard(groups, tp, rank)
    pieces = []
    for g in range(first, first + count):
        pieces += [Piece(f"{prefix}.wq.weight", None, 0, g * per_group * hd, per_group * hd),
                   Piece(f"{prefix}.wk.weight", None, 0, g * hd, hd),
                   Piece(f"{prefix}.wv.weight", None, 0, g * hd, hd)]
    return pieces


def _mla_pieces(cfg, prefix: str, tp: int, rank: int) -> dict[str, list[Piece]]:
    """Multi-head latent attention (models/mla.py) as megatron's MLASelfAttention (parallelism/megatron/mla.py):
    the up projections and `linear_proj` split by heads like attention's, the latent down projections and
    norms replicated over TP."""
    h, qk = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    out = {"linear_kv_down_proj.weight": [whole(f"{prefix}.wkv_a.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim)],
           "kv_layernorm.weight": [whole(f"{prefix}.kv_norm.weight", cfg.kv_lora_rank)],
           "linear_kv_up_proj.weight": [column(f"{prefix}.wkv_b.weight", h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                                tp, rank)],
           "linear_proj.weight": [row(f"{prefix}.wo.weight", h * cfg.v_head_dim, tp, rank)]}
    if not cfg.q_lora_rank:
        out["linear_q_proj.weight"] = [column(f"{prefix}.wq.weight", h * qk, tp, rank)]
        return out
    out["linear_q_down_proj.weight"] = [whole(f"{prefix}.wq_a.weight", cfg.q_lora_rank)]
    out["q_layernorm.weight"] = [whole(f"{prefix}.q_norm.weight", cfg.q_lora_rank)]
    out["linear_q_up_proj.weight"] = [column(f"{prefix}.wq_b.weight", h * qk, tp, rank)]
    return out


def _swiglu(prefix: str, hidden: int, parts: int, rank: int, index=None, stacked=False) -> dict:
    """fc1 = [gate; up] column shards, fc2 = down row shard; `stacked` = reference expert tensors [E, ...]."""
    w = "" if stacked else ".weight"
    return {"linear_fc1.weight": [column(f"{prefix}.w_gate{w}", hidden, parts, rank, index),
                                  column(f"{prefix}.w_up{w}", hidden, parts, rank, index)],
            "linear_fc2.weight": [row(f"{prefix}.w_down{w}", hidden, parts, rank, index)]}


def _block_pieces(cfg, g: int, c: ChunkCoords) -> dict[str, list[Piece]]:
    attn, ffn = f"layers.{2 * g}", f"layers.{2 * g + 1}"
    out = {"input_layernorm.weight": [whole(f"{attn}.norm.weight", cfg.dim)],
           "pre_mlp_layernorm.weight": [whole(f"{ffn}.norm.weight", cfg.dim)]}
    if cfg.layer_pattern()[2 * g] in "GM":  # linear-sequence mixers: parallelism/megatron/hybrid_mapping.py
        mixer = mixer_pieces(cfg, cfg.layer_pattern()[2 * g], f"{attn}.mixer", c.tp, c.tp_rank)
        out.update({f"self_attention.{k}": v for k, v in mixer.items()})
    elif cfg.attention == "mla":
        out.update({f"self_attention.{k}": v for k, v in _mla_pieces(cfg, f"{attn}.mixer", c.tp, c.tp_rank).items()})
    else:  # attention of any mask (*, W, B): same weights
        out["self_attention.linear_qkv.weight"] = _qkv(cfg, f"{attn}.mixer", c.tp, c.tp_rank)
        out["self_attention.linear_proj.weight"] = [row(f"{attn}.mixer.wo.weight",
                                                        cfg.num_heads * cfg.attn_head_dim, c.tp, c.tp_rank)]
    if cfg.layer_pattern()[2 * g + 1] == "-":
        out.update({f"mlp.{k}": v for k, v in _swiglu(f"{ffn}.mixer", cfg.ffn_dim, c.tp, c.tp_rank).items()})
        return out
    out["mlp.router.weight"] = [whole(f"{ffn}.mixer.router.weight", cfg.num_experts)]
    first, count = shard(cfg.num_experts, c.ep, c.ep_rank)
    for j in range(count):
        pieces = _swiglu(f"{ffn}.mixer", cfg.moe_ffn_dim, c.etp, c.etp_rank, index=first + j, stacked=True)
        out.update({f"mlp.experts.local_experts.{j}.{k}": v for k, v in pieces.items()})
    if cfg.shared_experts:
        shared = _swiglu(f"{ffn}.mixer.shared", cfg.moe_ffn_dim * cfg.shared_experts, c.tp, c.tp_rank)
        out.update({f"mlp.shared_experts.{k}": v for k, v in shared.items()})
    return out


def chunk_pieces(cfg, c: ChunkCoords) -> dict[str, list[Piece]]:
    """Megatron parameter name (inside one GPTModel chunk) -> the reference pieces it is made of."""
    out: dict[str, list[Piece]] = {}
    if c.pre_process:
        out["embedding.word_embeddings.weight"] = [column("embed.weight", cfg.vocab_size, c.tp, c.tp_rank)]
    for local, g in enumerate(c.blocks):
        out.update({f"decoder.layers.{local}.{k}": v for k, v in _block_pieces(cfg, g, c).items()})
    if c.post_process:
        out["decoder.final_layernorm.weight"] = [whole("norm.weight", cfg.dim)]
        if not cfg.tie_embeddings:
            out["output_layer.weight"] = [column("output.weight", cfg.vocab_size, c.tp, c.tp_rank)]
    return out


def chunk_buffers(cfg, c: ChunkCoords) -> dict[str, str]:
    """Megatron buffer name (inside one GPTModel chunk) -> reference name: the aux-loss-free routing bias
    of sigmoid routers (TopKRouter's `expert_bias`, whole and replicated on every TP/DP/EP rank)."""
    if cfg.router != "sigmoid":
        return {}
    pattern = cfg.layer_pattern()
    return {f"decoder.layers.{local}.mlp.router.expert_bias": f"layers.{2 * g + 1}.mixer.router.expert_bias"
            for local, g in enumerate(c.blocks) if pattern[2 * g + 1] == "E"}


def unwrapped_buffers(chunk) -> dict[str, torch.Tensor]:
    """A chunk's buffers named inside its GPTModel, whatever wraps it (DDP, Float16Module: `module.`)."""
    out = {}
    for name, buf in chunk.named_buffers():
        while name.startswith("module."):
            name = name[len("module."):]
        out[name] = buf
    return out


def buffer_pieces(cfg, buffers: dict[str, str]) -> dict[str, list[Piece]]:
    """`chunk_buffers` as whole-tensor pieces, for `from_megatron`."""
    return {name: [whole(ref, cfg.num_experts)] for name, ref in buffers.items()}


def _cat_dim(pieces: list[Piece]) -> int:
    return pieces[0].dim


def _ref_slice(tensor: torch.Tensor, p: Piece) -> torch.Tensor:
    t = tensor if p.index is None else tensor[p.index]
    return t.narrow(p.dim, p.start, p.length)


def to_megatron(ref_sd: dict[str, torch.Tensor], pieces: dict[str, list[Piece]]) -> dict[str, torch.Tensor]:
    """This chunk's megatron tensors from a reference state dict (new tensors, reference dtype)."""
    return {name: torch.cat([_ref_slice(ref_sd[p.ref_name], p) for p in ps], dim=_cat_dim(ps)).clone()
            for name, ps in pieces.items()}


def tied_aliases(cfg) -> dict[str, str]:
    """Reference names that are the same tensor as another (tied embeddings): alias -> source."""
    return {"output.weight": "embed.weight"} if cfg.tie_embeddings else {}


def from_megatron(parts: list[tuple[dict[str, list[Piece]], dict[str, torch.Tensor]]],
                  ref_shapes: dict[str, torch.Size], dtype=torch.float32,
                  aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Full reference state dict from (pieces, megatron tensors) of chunks covering every shard at least
    once (replicas are allowed and must agree). `aliases` (see `tied_aliases`) are filled from their
    source. Other reference entries no chunk covers must be routing-bias buffers: zero (softmax routers,
    which never hold one in megatron; sigmoid routers' biases come as `buffer_pieces`)."""
    aliases = aliases or {}
    full = {name: torch.empty(shape, dtype=dtype) for name, shape in ref_shapes.items()}
    covered: dict[str, dict[Piece, int]] = {name: {} for name in ref_shapes}  # unique pieces -> numel
    for pieces, tensors in parts:
        for name, ps in pieces.items():
            chunks = tensors[name].split([p.length for p in ps], dim=_cat_dim(ps))
            for p, value in zip(ps, chunks):
                _ref_slice(full[p.ref_name], p).copy_(value)
                covered[p.ref_name][p] = value.numel()
    for alias, source in aliases.items():
        full[alias] = full[source]
        covered[alias] = covered[source]
    for name, shape in ref_shapes.items():
        numel = torch.Size(shape).numel()
        if sum(covered[name].values()) < numel:
            if not re.search(r"expert_bias$", name):
                raise ValueError(f"reference tensor {name} is not fully covered by the megatron shards "
                                 f"({sum(covered[name].values())} of {numel} elements)")
            full[name].zero_()
    return full
