"""The reference architecture expressed as megatron-core objects: TransformerConfig + ModuleSpec.

A reference model is a pattern of pre-norm residual layers (`models/config.py`); megatron-core's
TransformerLayer is one attention layer followed by one MLP/MoE layer. A pattern of the form
`(*-)^n` (dense) or `(*E)^n` (MoE) maps onto n megatron layers, block g holding reference layers 2g
(attention, its norm = `input_layernorm`) and 2g+1 (MLP/MoE, its norm = `pre_mlp_layernorm`).
Anything else (sliding-window, block-sparse, linear-sequence layers, sigmoid routers, capacity, routing
bias) is refused with the reason, so no run trains a different model than the reference.

Modules: megatron's SelfAttention (QKV/projection as Column/RowParallelLinear) with our SDPA core
attention, megatron's MLP / MoELayer (SequentialMLP experts, all-to-all dispatcher) with our router
and our sequence-parallel RMSNorm (parallelism/megatron_modules.py).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .megatron_modules import ReferenceRouter, RMSNorm, SDPACoreAttention, allow_moe_without_te


class UnsupportedArchitecture(ValueError):
    """The reference model uses something this engine cannot reproduce exactly (message says what)."""


def check_supported(cfg) -> bool:
    """Whether cfg maps onto megatron layers; returns True for MoE models. Raises UnsupportedArchitecture."""
    pattern = cfg.layer_pattern()
    if not re.fullmatch(r"(\*-)+|(\*E)+", pattern):
        raise UnsupportedArchitecture(
            f"layer pattern {pattern!r}: the megatron engine maps '*-' (dense) or '*E' (MoE) blocks only; "
            f"hybrid patterns (W, B, G, M layers) need engine: deepspeed for now")
    moe = "E" in pattern
    if moe:
        for field, bad, why in (("router", cfg.router != "softmax", "only the softmax router is mapped"),
                                ("capacity_factor", cfg.capacity_factor > 0, "token dropping order differs"),
                                ("bias_update_rate", cfg.bias_update_rate > 0, "aux-loss-free bias not mapped")):
            if bad:
                raise UnsupportedArchitecture(f"model.{field}={getattr(cfg, field)!r}: {why} in the megatron engine")
    return moe


def transformer_config(cfg, layout, *, aux_loss_coef: float = 0.01, on_gpu: bool = True,
                       perform_initialization: bool = True) -> TransformerConfig:
    """megatron TransformerConfig of reference config `cfg` under `layout`: bf16 compute and the
    all-to-all token dispatcher on GPU; fp32 and the all-gather dispatcher (no CUDA streams) on CPU,
    where megatron is only used by the single-process mapping tests."""
    moe = check_supported(cfg)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kwargs = dict(
        num_layers=len(cfg.layer_pattern()) // 2, hidden_size=cfg.dim, num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, kv_channels=cfg.attn_head_dim, ffn_hidden_size=cfg.ffn_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=cfg.init_std, perform_initialization=perform_initialization,
        use_cpu_initialization=not on_gpu, bf16=on_gpu, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp, sequence_parallel=layout.tp > 1,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False, calculate_per_token_loss=False, deallocate_pipeline_outputs=True)
    if moe:
        kwargs.update(
            num_moe_experts=cfg.num_experts, moe_router_topk=cfg.top_k, moe_ffn_hidden_size=cfg.moe_ffn_dim,
            moe_router_load_balancing_type="aux_loss" if aux_loss_coef > 0 else "none",
            moe_aux_loss_coeff=aux_loss_coef, moe_token_dispatcher_type="alltoall" if on_gpu else "allgather", moe_router_dtype="fp32",
            moe_router_pre_softmax=not cfg.norm_topk, moe_grouped_gemm=False, moe_permute_fusion=False,
            moe_shared_expert_intermediate_size=(cfg.moe_ffn_dim * cfg.shared_experts or None))
        allow_moe_without_te()
    return TransformerConfig(**kwargs)


def _linear_mlp() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def layer_spec(moe: bool) -> ModuleSpec:
    """One megatron TransformerLayer: RMSNorm -> attention (SDPA core) -> RMSNorm -> MLP or MoE."""
    attention = ModuleSpec(
        module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=SDPACoreAttention,
                                           linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                                           k_layernorm=IdentityOp))
    if moe:
        mlp = ModuleSpec(module=MoELayer, submodules=MoESubmodules(
            experts=ModuleSpec(module=SequentialMLP, submodules=_linear_mlp()),
            shared_experts=ModuleSpec(module=SharedExpertMLP, params={"gate": False}, submodules=_linear_mlp()),
            router=ReferenceRouter))
    else:
        mlp = ModuleSpec(module=MLP, submodules=_linear_mlp())
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=RMSNorm, mlp=mlp, mlp_bda=get_bias_dropout_add))


def build_model_chunks(cfg, tcfg: TransformerConfig, seq_len: int) -> list[GPTModel]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), parallel_state already initialized."""
    moe = check_supported(cfg)
    vpp = tcfg.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for v in range(vpp):
        vp_stage = v if vpp > 1 else None
        block = TransformerBlockSubmodules(
            layer_specs=[layer_spec(moe)] * get_num_layers_to_build(tcfg, vp_stage=vp_stage), layer_norm=RMSNorm)
        chunks.append(GPTModel(
            config=tcfg, transformer_layer_spec=block, vocab_size=cfg.vocab_size, max_sequence_length=seq_len,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=cfg.tie_embeddings, position_embedding_type="rope",
            rotary_base=int(cfg.rope_theta), vp_stage=vp_stage))
    return chunks
