"""The reference architecture expressed as megatron-core objects: TransformerConfig + ModuleSpec.

A reference model is a pattern of pre-norm residual layers (`models/config.py`); megatron-core's
TransformerLayer is one sequence mixer followed by one MLP/MoE layer. A pattern of (mixer, ffn) pairs
maps onto one megatron layer per pair, block g holding reference layers 2g (mixer, its norm =
`input_layernorm`) and 2g+1 (MLP/MoE, its norm = `pre_mlp_layernorm`); hybrid mixers (sliding-window,
block-sparse, Gated DeltaNet, Mamba2) come from parallelism/megatron/hybrid.py, the pattern rules and
pipeline split from parallelism/megatron/blocks.py. Anything else (unpaired patterns, routing options
megatron-core computes otherwise, parallelism/megatron/support.py `moe_gaps`) is refused with the
reason, so no run trains a different model than the reference.

Modules: megatron's SelfAttention (QKV/projection as Column/RowParallelLinear) with our SDPA core
attention, megatron's MLP / MoELayer (SequentialMLP's experts as grouped GEMMs, all-to-all dispatcher) with our router
and our sequence-parallel RMSNorm (parallelism/megatron/modules.py). With train.precision fp8 the
attention, MLP and shared-expert linears and the grouped experts are the FP8 ones of
parallelism/megatron/fp8.py (same parameters, so mapping and checkpoints are unchanged).
"""

from __future__ import annotations

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
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (TransformerLayer, TransformerLayerSubmodules,
                                                         get_transformer_layer_offset)

from .kernels import install_wgrad_accumulation_fusion
from .blocks import UnsupportedArchitecture, blocks, mla_model_refusal, pipeline_split
from .hybrid import self_attention_spec
from .support import moe_gaps
from .modules import (GroupedMLPExperts, ReferenceRouter, RMSNorm, SDPACoreAttention, allow_moe_without_te,
                      install_fused_cross_entropy, install_fused_rope, install_fused_swiglu)


def check_supported(cfg) -> bool:
    """Whether cfg maps onto megatron layers; returns True for MoE models. Raises UnsupportedArchitecture.
    Layer patterns: parallelism/megatron/blocks.py ((mixer, ffn) pairs, hybrids included)."""
    pattern = cfg.layer_pattern()
    blocks(cfg)
    refusal = mla_model_refusal(cfg)  # latent attention on masked layers
    if refusal is not None:
        raise refusal
    moe = "E" in pattern
    for field, reason in moe_gaps(cfg):  # support.MOE_LIMITS, the table plan reads
        raise UnsupportedArchitecture(f"{field}: {reason}")
    return moe


def transformer_config(cfg, layout, *, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, on_gpu: bool = True,
                       perform_initialization: bool = True, overlap_moe_comm: bool = False,
                       recompute: str = "none") -> TransformerConfig:
    """megatron TransformerConfig of reference config `cfg` under `layout`: bf16 compute and the
    all-to-all token dispatcher on GPU; fp32 and the all-gather dispatcher (no CUDA streams) on CPU,
    where megatron is only used by the single-process mapping tests. `overlap_moe_comm`: megatron's
    EP all-to-all overlap (train.overlap_moe_comm; GPU only, megatron-core asserts bf16 and ep > 1).
    `recompute`: train.recompute (see recompute_fields). `z_loss_coef`: train.router_z_loss_coef."""
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
        # on GPU: RoPE, SwiGLU (MLP) and cross-entropy through ours (megatron/modules.py), residual adds and
        # the experts' weighted SwiGLU through megatron's torch.compile'd fusions
        bias_activation_fusion=on_gpu and install_fused_swiglu(), bias_dropout_fusion=on_gpu, masked_softmax_fusion=False,
        apply_rope_fusion=on_gpu and install_fused_rope(),
        # weight gradients accumulate into the fp32 main_grad inside the GEMM (megatron/kernels.py)
        gradient_accumulation_fusion=on_gpu and install_wgrad_accumulation_fusion(),
        persist_layer_norm=False, cross_entropy_loss_fusion=on_gpu,
        cross_entropy_fusion_impl="te" if on_gpu and install_fused_cross_entropy() else "native",
        calculate_per_token_loss=False, deallocate_pipeline_outputs=True,
        **pipeline_split(cfg, layout.pp, layout.vpp))  # '|' stage marks of hybrid patterns
    # megatron-core's default batched P2P posts [send prev, recv prev, send next, recv next] as one batch.
    # With pp == 2 both neighbours are the same rank, so when the interleaved schedule sends and receives
    # in both directions at once, an activation and a gradient (same shape) land in each other's buffer:
    # silently wrong losses. The unbatched path keeps the two directions on separate communicators
    # (Megatron-LM's own interleaved default, overlap_p2p_comm, also avoids the batch). 1F1B is unaffected.
    kwargs["batch_p2p_comm"] = layout.vpp == 1
    # the no-pipelining and interleaved schedules then run megatron's combined 1F1B (one micro-batch's
    # forward beside another's backward, layer by layer, dispatch/combine on a second stream); the engine's
    # forward step hands them GPTModel.build_schedule_plan instead of the forward output
    kwargs["overlap_moe_expert_parallel_comm"] = overlap_moe_comm
    kwargs.update(recompute_fields(recompute))
    if moe:
        kwargs.update(
            num_moe_experts=cfg.num_experts, moe_router_topk=cfg.top_k, moe_ffn_hidden_size=cfg.moe_ffn_dim,
            moe_router_load_balancing_type="aux_loss" if aux_loss_coef > 0 else "none",
            moe_aux_loss_coeff=aux_loss_coef, moe_token_dispatcher_type="alltoall" if on_gpu else "allgather", moe_router_dtype="fp32",
            moe_router_pre_softmax=not cfg.norm_topk, moe_grouped_gemm=False, moe_permute_fusion=False,
            moe_shared_expert_intermediate_size=(cfg.moe_ffn_dim * cfg.shared_experts or None),
            **router_fields(cfg, z_loss_coef))
        allow_moe_without_te()
    if cfg.attention == "mla":  # multi-head latent attention (parallelism/megatron/mla.py)
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        from .mla import mla_config_fields

        return MLATransformerConfig(**{**kwargs, **mla_config_fields(cfg)})
    return TransformerConfig(**kwargs)


def router_fields(cfg, z_loss_coef: float) -> dict:
    """TopKRouter fields of the reference's routing options (models/moe.py `route`): sigmoid scores, the
    aux-loss-free bias (megatron-core updates it in finalize_model_grads from the step's token counts
    all-reduced over TP x CP x DP, the reference's rule), node/device-limited groups, the routed scaling
    factor and the z-loss. What it would compute otherwise is refused (support.py moe_gaps). Sigmoid
    routers always hold the bias (rate 0 keeps it fixed), so a bias loaded from a checkpoint still routes."""
    groups = cfg.n_group > 1
    return dict(
        moe_router_score_function=cfg.router, moe_router_enable_expert_bias=cfg.router == "sigmoid",
        moe_router_bias_update_rate=cfg.bias_update_rate,
        moe_router_num_groups=cfg.n_group if groups else None, moe_router_group_topk=cfg.topk_group if groups else None,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor if cfg.routed_scaling_factor != 1.0 else None,
        moe_z_loss_coeff=z_loss_coef or None)


def recompute_fields(recompute: str) -> dict:
    """TransformerConfig fields of train.recompute. `selective`: megatron's core-attention recompute (our
    SDPA / masked cores inside its SelfAttention; the Gated DeltaNet and Mamba2 mixers read the same switch
    for their chunked cores, parallelism/megatron/hybrid.py `_LinearMixer._core`); `full`: every
    TransformerLayer from its input, one layer per checkpoint."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"train.recompute: got {recompute!r}; use none, selective or full")


def _linears(precision: str) -> tuple[type, type]:
    """(column, row) parallel linear classes of train.precision (FP8: parallelism/megatron/fp8.py)."""
    if precision == "fp8":
        from .fp8 import FP8ColumnParallelLinear, FP8RowParallelLinear

        return FP8ColumnParallelLinear, FP8RowParallelLinear
    if precision != "bf16":
        raise ValueError(f"train.precision: got {precision!r}; allowed bf16, fp8")
    return ColumnParallelLinear, RowParallelLinear


def _linear_mlp(precision: str = "bf16") -> MLPSubmodules:
    column, row = _linears(precision)
    return MLPSubmodules(linear_fc1=column, linear_fc2=row)


def layer_spec(moe: bool, self_attention: ModuleSpec | None = None, core_attention=SDPACoreAttention,
               precision: str = "bf16") -> ModuleSpec:
    """One megatron TransformerLayer: RMSNorm -> attention (SDPA core) -> RMSNorm -> MLP or MoE. Hybrid
    layers (parallelism/megatron/hybrid.py) give another `self_attention` or a masked `core_attention`.
    precision fp8: QKV, projection, MLP and shared-expert linears and the grouped experts in FP8."""
    column, row = _linears(precision)
    attention = self_attention or ModuleSpec(
        module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core_attention,
                                           linear_proj=row, q_layernorm=IdentityOp,
                                           k_layernorm=IdentityOp))
    if moe:
        experts = GroupedMLPExperts
        if precision == "fp8":
            from .fp8 import FP8GroupedMLPExperts as experts
        mlp = ModuleSpec(module=MoELayer, submodules=MoESubmodules(
            # the per-expert linears stay bf16: they run only where the grouped path does not apply
            experts=ModuleSpec(module=experts, submodules=_linear_mlp()),
            # shared experts' gate: config.moe_shared_expert_gate
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=_linear_mlp(precision)),
            router=ReferenceRouter))
    else:
        mlp = ModuleSpec(module=MLP, submodules=_linear_mlp(precision))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=RMSNorm, mlp=mlp, mlp_bda=get_bias_dropout_add))


def stage_layer_specs(cfg, tcfg, vp_stage: int | None, precision: str = "bf16") -> list[ModuleSpec]:
    """Layer specs of this pipeline stage (chunk `vp_stage`): megatron's own split and offset, so the
    global layer numbers (and so the weight mapping) follow megatron."""
    kinds = blocks(cfg)
    first = get_transformer_layer_offset(tcfg, vp_stage=vp_stage)
    count = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    return [layer_spec(ffn == "E", precision=precision, **self_attention_spec(mixer, cfg))
            for mixer, ffn in kinds[first:first + count]]


def build_model_chunks(cfg, tcfg: TransformerConfig, seq_len: int, precision: str = "bf16") -> list[GPTModel]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), parallel_state already initialized.
    precision: train.precision (layer_spec)."""
    check_supported(cfg)
    # megatron's process-global MoE aux-loss log is sized by the first model's layer count: a later model
    # of another depth in the same process (tests, the GPU equivalence program) would index past it
    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    vpp = tcfg.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for v in range(vpp):
        vp_stage = v if vpp > 1 else None
        block = TransformerBlockSubmodules(layer_specs=stage_layer_specs(cfg, tcfg, vp_stage, precision), layer_norm=RMSNorm)
        chunks.append(GPTModel(
            config=tcfg, transformer_layer_spec=block, vocab_size=cfg.vocab_size, max_sequence_length=seq_len,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=cfg.tie_embeddings, position_embedding_type="rope",
            rotary_base=int(cfg.rope_theta), vp_stage=vp_stage))
        reduce_experts_over_expert_dp(chunks[-1])
    return chunks


def reduce_experts_over_expert_dp(chunk: GPTModel) -> None:
    """Mark routed-expert weights as expert parameters (`allreduce=False`) for every ep, so megatron's DDP
    and optimizer reduce and shard them over the expert-data-parallel group. megatron-core 0.16.1 marks
    them only when ep > 1; with ep == 1 they count as dense and are reduced over the dense DP group alone.
    With etp < tp the experts are replicated over the TP ranks and, under sequence parallelism, each TP
    rank's copy sees only its share of the tokens: the TP ranks are in the expert-DP group but not in the
    dense one, so the expert gradients missed the other ranks' tokens and the copies drifted apart."""
    for module in chunk.modules():
        if isinstance(module, MoELayer):
            for param in module.experts.parameters():
                param.allreduce = False
