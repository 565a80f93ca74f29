"""Multi-head latent attention (models/mla.py, `attention: mla`) in the megatron engine: megatron-core
0.16.1's MLASelfAttention with megatron's column/row-parallel linears for the up and output projections,
replicated latent down projections (LatentSelfAttention: megatron's own column-parallel ones give wrong
RoPE-key gradients under TP), raytron's RMSNorm on the latents and raytron's SDPA core attention
(parallelism/megatron/modules.py), so no Transformer Engine is needed.

megatron-core computes the reference's math: q = [nope, rope] per head (from the query latent or the
hidden state), `linear_kv_down_proj` gives [kv latent; shared RoPE key], `linear_kv_up_proj` gives
[key nope; value] per head, RoPE on the RoPE channels only, rotating DeepSeek's adjacent channel pairs
as the reference does (rope_type "rope", unfused: megatron-core's MLA fusion is for YaRN only), softmax
scale 1/sqrt(nope + rope). Its MLATransformerConfig applies to the whole model, which is why `attention` is
one field per model.
The weight mapping is parallelism/megatron/mapping.py `_mla_pieces`; what the engine refuses with MLA
(layouts, masks) is parallelism/megatron/blocks.py `mla_gaps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from .modules import RMSNorm, SDPACoreAttention


def mla_config_fields(cfg) -> dict:
    """MLATransformerConfig fields of reference config `cfg` (attention: mla)."""
    return dict(multi_latent_attention=True, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, rope_type="rope", rotary_base=cfg.rope_theta, rotary_percent=1.0,
                rotary_scaling_factor=1.0, apply_rope_fusion=False)


def mla_attention_spec() -> ModuleSpec:
    """megatron's MLASelfAttention with replicated down projections (LatentSelfAttention); bf16 linears
    (FP8 is refused with MLA, megatron_blocks.mla_gaps). The down projections given here are replaced."""
    allow_mla_without_te()
    column, row = ColumnParallelLinear, RowParallelLinear
    return ModuleSpec(module=LatentSelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=MLASelfAttentionSubmodules(
                          linear_q_proj=column, linear_q_down_proj=ColumnParallelLinear, linear_q_up_proj=column,
                          linear_kv_down_proj=ColumnParallelLinear, linear_kv_up_proj=column,
                          core_attention=SDPACoreAttention, linear_proj=row, q_layernorm=RMSNorm,
                          kv_layernorm=RMSNorm))


class ReplicatedLatentLinear(torch.nn.Module):
    """A latent down projection held whole on every TP rank (megatron's `(output, bias)` contract):
    [s/tp, b, dim] -> [s/tp, b, out] on this rank's sequence shard. Its gradient covers that shard only, so
    the weight is marked `sequence_parallel` and megatron's finalize_model_grads sums it over TP (as for
    the norms)."""

    def __init__(self, input_size: int, output_size: int, config):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, device=device, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.weight)
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None


class LatentSelfAttention(MLASelfAttention):
    """megatron-core's MLASelfAttention with the down projections replicated over TP (ReplicatedLatentLinear).

    Without Transformer Engine megatron-core 0.16.1 builds them as ColumnParallelLinear and gathers their
    output with gather_from_tensor_model_parallel_region, whose backward keeps this rank's slice of the
    gradient: the RoPE key, one per token and used by every rank's heads, then gets the gradient of the
    heads of the rank owning its columns only (wrong under TP > 1). Replicated, megatron takes its other
    branch (TE's `duplicated` one): the RoPE key is gathered over the sequence, whose backward
    reduce-scatters, summing what every rank's heads asked of it."""

    def __init__(self, config, submodules, layer_number: int, attn_mask_type=AttnMaskType.causal,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config, submodules, layer_number, attn_mask_type, cp_comm_type, pg_collection)
        if config.q_lora_rank is not None:
            self.linear_q_down_proj = ReplicatedLatentLinear(config.hidden_size, config.q_lora_rank, config)
        self.linear_kv_down_proj = ReplicatedLatentLinear(
            config.hidden_size, config.kv_lora_rank + config.qk_pos_emb_head_dim, config)


def allow_mla_without_te() -> None:
    """megatron-core 0.16.1's multi_latent_attention imports megatron.core.extensions.transformer_engine,
    which without Transformer Engine succeeds with MagicMock stand-ins, so its HAVE_TE is True and
    MLASelfAttention's `isinstance(self.linear_proj, TELinear)` raises TypeError (TELinear is no type).
    Where Transformer Engine is absent, mark it so; a real TE is kept."""
    import importlib.util

    from megatron.core.transformer import multi_latent_attention

    if importlib.util.find_spec("transformer_engine") is None:
        multi_latent_attention.HAVE_TE = False
