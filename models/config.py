"""ModelConfig: every architecture in the zoo is one of these plus a layer-pattern string.

Layer-pattern characters (Megatron's hybrid convention): `*` causal attention, `W` sliding-window
attention, `B` block-sparse attention (static pattern, ours),
`G` Gated DeltaNet, `M` Mamba2, `-` SwiGLU MLP, `E` MoE, `|` pipeline-stage boundary
(ignored by the single-device model). A dense transformer block is `*-`, an MoE block is `*E`.
The attention layers (`*`, `W`, `B`) are grouped-query attention, or multi-head latent attention
(models/mla.py) with `attention: mla`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

LAYER_CHARS = "*WBGM-E"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 264
    """Vocabulary size (the byte tokenizer has 256 bytes + specials, padded to a multiple of 8)."""
    dim: int = 64
    """Hidden size."""
    num_layers: int = 2
    """Blocks when `pattern` is empty: each block is attention + (MLP or MoE)."""
    pattern: str = ""
    """Explicit layer pattern (overrides num_layers), e.g. `G-G-G-*-|G-G-G-*-`."""
    num_heads: int = 4
    """Attention query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when < num_heads)."""
    head_dim: int = 0
    """Per-head size; 0 means dim // num_heads."""
    ffn_dim: int = 128
    """SwiGLU inner size of dense MLP layers."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    window: int = 0
    """Sliding-window size for `W` layers (tokens attended, including self)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    # MoE
    num_experts: int = 0
    """Routed experts per MoE layer (0: the model has no MoE layers)."""
    top_k: int = 2
    """Experts each token is routed to."""
    moe_ffn_dim: int = 64
    """SwiGLU inner size of each routed expert."""
    shared_experts: int = 0
    """Always-active shared experts (DeepSeek style), each of size moe_ffn_dim."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """Top-k softmax (Switch/GShard/Mixtral) or top-k sigmoid (DeepSeek-V3) scores."""
    norm_topk: bool = True
    """Renormalize the k selected scores to sum to 1."""
    capacity_factor: float = 0.0
    """Tokens per expert = capacity_factor * tokens * k / experts, excess dropped; 0 = dropless."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): after each optimizer step every MoE layer's per-expert
    routing bias moves by this rate toward uniform load, `bias += rate * sign(mean load - load)`, the load
    counted over the step's whole global batch (0 = off). The bias only selects experts; the combine
    weights stay the unbiased scores. It is model state: checkpointed and resumed with the weights."""
    n_group: int = 1
    """Node/device-limited routing (DeepSeek-V3's `n_group`): the experts form this many equal groups
    and each token picks from `topk_group` of them only (1 = no limit)."""
    topk_group: int = 1
    """Groups each token may route into (DeepSeek-V3's `topk_group`), the ones with the largest sum of
    their top (top_k // topk_group) selection scores (scores plus routing bias); at most n_group."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' combine weights (after any top-k normalisation), as DeepSeek-V3's
    `routed_scaling_factor`; shared experts are not scaled."""
    # linear-sequence layers
    linear_heads: int = 4
    """Heads of Gated DeltaNet / Mamba2 layers."""
    linear_head_dim: int = 16
    """Key/value head size of linear-sequence layers."""
    chunk_size: int = 16
    """Chunk length of the chunked parallel form of linear-sequence layers."""
    conv_size: int = 4
    """Kernel of the causal depthwise short convolution in Gated DeltaNet / Mamba2 layers."""
    ssm_state_dim: int = 16
    """Mamba2 state size N (one group of B/C shared by all heads)."""
    # block-sparse attention (`B` layers)
    sparse_block: int = 64
    """Tokens per block of the static block-sparse pattern."""
    sparse_local_blocks: int = 2
    """Nearest key blocks (diagonal included) each query block attends."""
    sparse_global_blocks: int = 1
    """Leading key blocks every query block attends (attention sinks)."""
    # attention kind of the `*`, `W`, `B` layers
    attention: Literal["gqa", "mla"] = "gqa"
    """`gqa`: grouped-query attention (num_kv_heads, head_dim); `mla`: DeepSeek-V2/V3 multi-head latent
    attention (models/mla.py: q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)."""
    q_lora_rank: int = 0
    """MLA: rank of the RMS-normalised query latent; 0 projects queries from the hidden state directly."""
    kv_lora_rank: int = 32
    """MLA: rank of the RMS-normalised key/value latent shared by all heads."""
    qk_nope_head_dim: int = 16
    """MLA: per-head query/key channels without position encoding (expanded from the latents)."""
    qk_rope_head_dim: int = 8
    """MLA: RoPE channels of each query head and of the one key part shared by all heads (even)."""
    v_head_dim: int = 16
    """MLA: per-head value channels."""

    def __post_init__(self) -> None:
        small = [f"{name}={getattr(self, name)}" for name in ("vocab_size", "dim", "num_heads", "num_kv_heads")
                 if getattr(self, name) < 1]
        if small:
            raise ValueError(f"got {', '.join(small)}; each must be >= 1")
        if not self.layer_pattern():
            raise ValueError(f"got no layers (num_layers={self.num_layers}, pattern={self.pattern!r}); set num_layers >= 1")
        bad = sorted(set(self.layer_pattern()) - set(LAYER_CHARS))
        if bad:
            raise ValueError(f"pattern {self.pattern!r}: unknown layer kinds {bad}; allowed {LAYER_CHARS!r} and '|'")
        if self.dim % self.num_heads and not self.head_dim:
            raise ValueError(f"dim {self.dim} not divisible by num_heads {self.num_heads}; set head_dim")
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention {self.attention!r}: use 'gqa' or 'mla'")
        if self.attention == "mla":
            self._check_mla()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if "W" in self.layer_pattern() and self.window <= 0:
            raise ValueError(f"pattern {self.pattern!r} has sliding-window layers but window={self.window}")
        if "B" in self.layer_pattern() and self.sparse_block <= 0:
            raise ValueError(f"pattern {self.pattern!r} has block-sparse layers but sparse_block={self.sparse_block}")
        if "E" in self.layer_pattern():
            self._check_routing()

    def _check_routing(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoE layers need 1 <= top_k ({self.top_k}) <= num_experts ({self.num_experts})")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group {self.n_group} must be >= 1 and divide num_experts {self.num_experts}")
        per_group = self.num_experts // self.n_group
        if not 1 <= self.topk_group <= self.n_group or self.top_k < self.topk_group:
            raise ValueError(f"topk_group {self.topk_group} must be in [1, n_group {self.n_group}] and <= top_k "
                             f"{self.top_k} (each chosen group is ranked by its top top_k // topk_group scores)")
        if self.topk_group * per_group < self.top_k:
            raise ValueError(f"topk_group {self.topk_group} groups of {per_group} experts cannot hold top_k "
                             f"{self.top_k} experts; raise topk_group or lower n_group")
        if self.bias_update_rate < 0 or self.routed_scaling_factor <= 0:
            raise ValueError(f"bias_update_rate ({self.bias_update_rate}) must be >= 0 and routed_scaling_factor "
                             f"({self.routed_scaling_factor}) > 0")

    def _check_mla(self) -> None:
        small = [f"{name}={getattr(self, name)}" for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                               "v_head_dim") if getattr(self, name) < 1]
        if small or self.q_lora_rank < 0:
            raise ValueError(f"attention 'mla' with {', '.join(small) or f'q_lora_rank={self.q_lora_rank}'}; "
                             "the ranks and head sizes must be >= 1 (q_lora_rank >= 0)")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even (RoPE rotates channel pairs)")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"attention 'mla' expands a key and a value for every query head from the shared "
                             f"latent: set num_kv_heads = num_heads ({self.num_heads}), not {self.num_kv_heads}")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    def layer_pattern(self) -> str:
        """The pattern without stage boundaries: one character per residual layer."""
        if self.pattern:
            return self.pattern.replace("|", "")
        ffn = "E" if self.num_experts else "-"
        return ("*" + ffn) * self.num_layers

    def stage_patterns(self) -> list[str]:
        """Pipeline stages as marked by `|` (one stage when unmarked)."""
        return (self.pattern or self.layer_pattern()).split("|")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
