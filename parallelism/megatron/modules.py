"""raytron's own megatron-core modules, for the paths where megatron-core has no fast or matching
implementation without Transformer Engine.

- `RMSNorm`: the reference RMSNorm (fp32 statistics) usable under sequence parallelism: its weight is
  marked `sequence_parallel`, so megatron's finalize_model_grads all-reduces its gradient over TP.
- `SDPACoreAttention`: causal attention through torch's scaled_dot_product_attention (flash / cuDNN /
  efficient backends) instead of megatron's unfused local softmax attention, document-masked with the
  engine's document ids (`cp.core_attention`: under context parallelism the heads are spread over the CP
  ranks by an all-to-all, each attending over the whole sequence).
- `GroupedMLPExperts`: megatron's SequentialMLP experts run as grouped GEMMs (torch._grouped_mm).
- `ReferenceRouter`: megatron's TopKRouter with the reference load-balancing loss: Switch/GShard's
  `E * sum_e P_e * f_e` with f_e the fraction of tokens whose *first* choice is e (megatron counts every
  one of the k choices). Scaling, the autograd attachment and TP/CP reduction stay megatron's own, as do
  sigmoid scores, the expert bias, group-limited routing and the z-loss.
- Installed into megatron-core where Transformer Engine would provide them: `fused_rope` (RoPE, cos/sin
  tables taken once per call), `_bias_swiglu` (the Triton SwiGLU of ops/swiglu.py for the MLP activation)
  and `fused_cross_entropy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe import moe_utils
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl, swiglu, weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.router import TopKRouter

from ...models.moe import routing_entropy
from ...ops import swiglu as swiglu_op
from ...ops.moe import grouped_mm_supported, segment_mm
from .cp import core_attention


def allow_moe_without_te() -> None:
    """megatron-core 0.16.1 references `te_general_gemm` in its router gating even without Transformer
    Engine (NameError). Defining it as None selects the plain torch path; a real TE binding is kept."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def _rope_rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's unfused RoPE (rotate-half form; t [s, b, h, d], cos/sin [s, 1, 1, rot]) with the rotation
    in fp32, rounded once at the end."""
    rot = cos.shape[-1]
    x, rest = t[..., :rot].to(torch.promote_types(t.dtype, torch.float32)), t[..., rot:]
    x1, x2 = x.chunk(2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out.to(t.dtype), rest), dim=-1)


# One fused Triton kernel each on GPU (the eager forms launch several elementwise kernels per call and
# keep fp32 copies of the activations for backward); CPU keeps the eager functions.
_compiled_rms_norm = torch.compile(_rms_norm_fp32, dynamic=False)
# cos/sin are taken once per call on the [s, 1, 1, rot] table, outside the kernel: computed inside, the
# fp32 sin/cos of every (token, head) element made RoPE compute-bound (~2.5x slower on H100).
_compiled_rope = torch.compile(_rope_rotate, dynamic=False)


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Stands in for Transformer Engine's fused_apply_rotary_pos_emb (same signature)."""
    if interleaved:
        raise NotImplementedError("fused_rope: interleaved rotary embeddings are not used by raytron models")
    return (_compiled_rope if t.is_cuda else _rope_rotate)(t, freqs.cos(), freqs.sin())


def install_fused_rope() -> bool:
    """Let megatron-core's apply_rope_fusion path call `fused_rope` where Transformer Engine (whose
    kernel it expects) is absent; a real TE binding is kept. Returns True (for config expressions)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope
    return True


def _bias_swiglu(input, bias, fp8_input_store=False, cpu_offload_input=False):
    """megatron's bias_swiglu_impl contract; without bias on CUDA, the Triton SwiGLU of ops/swiglu.py."""
    if bias is None and not fp8_input_store and not cpu_offload_input and swiglu_op.triton_supported(input):
        return swiglu_op.swiglu(input)
    return bias_swiglu_impl(input, bias, fp8_input_store, cpu_offload_input)


def install_fused_swiglu() -> bool:
    """Route megatron's MLP activation (bias_activation_fusion, SwiGLU) through `_bias_swiglu`: its own
    compiled backward concatenates the two input-gradient halves pointwise and reads the gate half and the
    output gradient twice. Returns True (for config expressions)."""
    from megatron.core.transformer import mlp

    if mlp.bias_swiglu_impl is bias_swiglu_impl:
        mlp.bias_swiglu_impl = _bias_swiglu
    return True


def _cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32: logits [s, b, vocab], labels [s, b] -> loss [s, b]."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return flat.view(labels.shape)


# fp32 upcast, log-sum-exp and the label gather in one reduction kernel, the gradient in one more
_compiled_cross_entropy = torch.compile(_cross_entropy_per_token, dynamic=False)


def fused_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group, is_cg_capturable: bool = False):
    """Stands in for Transformer Engine's parallel cross-entropy (megatron's `te_parallel_cross_entropy`
    signature). Without TP the whole vocabulary is local: one compiled kernel pair instead of megatron's
    native fusion (several fp32 passes over the logits). With TP, megatron's vocab-parallel fusion."""
    if tp_group is not None and tp_group.size() > 1:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        return fused_vocab_parallel_cross_entropy(logits, labels, tp_group)
    return (_compiled_cross_entropy if logits.is_cuda else _cross_entropy_per_token)(logits, labels)


def install_fused_cross_entropy() -> bool:
    """Let megatron-core's cross_entropy_fusion_impl="te" path call `fused_cross_entropy` where
    Transformer Engine is absent; a real TE binding is kept. Returns True (for config expressions)."""
    from megatron.core.models.common.language_module import language_module

    if language_module.te_parallel_cross_entropy is None:
        language_module.te_parallel_cross_entropy = fused_cross_entropy
    return True


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * weight, statistics in fp32 (the reference's RMSNorm), sequence-parallel aware."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_compiled_rms_norm if x.is_cuda else _rms_norm_fp32)(x, self.weight, self.eps)


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron's DotProductAttention: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, k_channels: int | None = None,
                 v_channels: int | None = None):
        super().__init__(config=config)  # k/v_channels: key and value widths, given by multi-latent attention
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"SDPACoreAttention supports causal masks only, got {attn_mask_type}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0:
            raise NotImplementedError("SDPACoreAttention runs without attention dropout")
        self.softmax_scale = softmax_scale
        self.cp_group = (pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp")
                         else parallel_state.get_context_parallel_group())

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """attention_mask: the engine's document ids of the whole sequence [b, S], or None."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences and attention bias are not supported")
        return core_attention(query, key, value, self.cp_group, doc_ids=attention_mask, scale=self.softmax_scale)


class GroupedMLPExperts(SequentialMLP):
    """megatron's SequentialMLP (same parameters and names, so mapping and checkpoints are unchanged)
    computed as two grouped GEMMs over the expert-sorted tokens (`ops.moe.segment_mm`, i.e.
    torch._grouped_mm) instead of a Python loop of per-expert GEMMs. The activation and the routing
    weights are applied as megatron's MLP applies them. Falls back to the loop where a grouped GEMM does
    not apply: one local expert, expert-TP > 1 (the per-expert linears then own collectives), fp8/fp4,
    probabilities applied on the input, or dtypes/alignments torch._grouped_mm refuses."""

    segment_mm = staticmethod(segment_mm)  # the FP8 experts (megatron/fp8.py) swap in their own

    def forward(self, hidden, tokens_per_expert, permuted_probs):
        fc1 = [e.linear_fc1.weight for e in self.local_experts]
        if (self.num_local_experts == 1 or self.tp_group.size() > 1 or self.config.fp8 or self.config.fp4
                or self.config.moe_apply_probs_on_input or not grouped_mm_supported(hidden, fc1[0][None])):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        offsets = torch.cumsum(tokens_per_expert.to(hidden.device), 0).to(torch.int32)
        h = self.segment_mm(hidden, torch.stack(fc1), offsets)  # [rows, 2 * ffn]: [gate; up] as MLP's fc1
        scale = permuted_probs.unsqueeze(-1)
        if self.config.bias_activation_fusion:
            h = weighted_bias_swiglu_impl(h, None, scale)
        else:
            h = (swiglu(h) * scale).to(h.dtype)
        out = self.segment_mm(h, torch.stack([e.linear_fc2.weight for e in self.local_experts]), offsets)
        return out, None


def _recomputing() -> bool:
    """Whether this forward is a recomputation inside backward (train.recompute=full reruns the router):
    its load and entropy were recorded by the original forward already."""
    return torch._C._current_graph_task_id() != -1


class ReferenceRouter(TopKRouter):
    """TopKRouter whose aux loss counts first choices only (see the module docstring), and which records
    its per-forward aux loss, z-loss and expert load for the engine's metrics. Routing, z-loss and the
    expert-bias token counts are megatron-core's own (topk_routing_with_score_function, apply_z_loss,
    _apply_expert_bias); the first choice is the best chosen expert by score + bias, as the reference's."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.recorded_aux: list[torch.Tensor] = []  # this rank's share of each forward's aux loss
        self.recorded_z: list[torch.Tensor] = []  # this rank's share of each forward's z-loss
        self.recorded_load: list[torch.Tensor] = []  # assignments per expert on this rank's tokens
        self.recorded_entropy: list[torch.Tensor] = []  # [routing entropy sum, tokens] per forward

    def _reference_aux_loss(self, probs, scores_for_aux_loss, first_choice):
        coeff = self.get_aux_loss_coeff("aux_loss")
        first = F.one_hot(first_choice, self.config.num_moe_experts).sum(0).float()
        if self.tp_cp_group.size() > 1:
            torch.distributed.all_reduce(first, group=self.tp_cp_group)
        local_tokens = first_choice.shape[0]
        total_tokens = local_tokens * self.tp_cp_group.size()
        # megatron's f_e = tokens_per_expert / (T * k): pass first-choice counts * k to get count / T
        aux = moe_utils.switch_load_balancing_loss_func(
            probs=scores_for_aux_loss, tokens_per_expert=first * self.topk, total_num_tokens=total_tokens,
            topk=self.topk, num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=coeff)
        # megatron adds the aux loss only where grad is enabled: once per micro-batch, in the forward or,
        # under full recomputation (whose first forward runs without grad), in its rerun
        self.recorded_aux.append(aux.detach().float() / coeff)
        return self.attach_and_log_load_balancing_loss(probs, coeff, aux, "load_balancing_loss",
                                                       self.tp_cp_group, valid_token_count=local_tokens)

    def _first_choice(self, logits: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """Each token's chosen expert of highest selection score (score + bias), the reference's ids[:, 0]."""
        with torch.no_grad():
            scores = torch.softmax(logits, -1) if self.score_function == "softmax" else torch.sigmoid(logits)
            if self.expert_bias is not None:
                scores = scores + self.expert_bias
            return scores.masked_fill(~routing_map, float("-inf")).argmax(-1)

    def routing(self, logits: torch.Tensor, padding_mask=None):
        if padding_mask is not None:
            # raytron packs samples without padding, so the engine never builds one; a caller that does would
            # get routing statistics over pad tokens, which the reference never computes
            raise ValueError("ReferenceRouter: got a padding mask, but raytron's samples are packed without "
                             "padding; route the unpadded tokens instead")
        logits = logits.view(-1, self.config.num_moe_experts)
        logits = self.apply_z_loss(logits)
        cfg = self.config
        probs, routing_map = moe_utils.topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=cfg.moe_router_pre_softmax, num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk, scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=self.score_function, expert_bias=self.expert_bias, fused=False)
        grad = self.training and torch.is_grad_enabled()
        if grad and self.is_aux_loss_enabled():
            _, scores_for_aux_loss = moe_utils.compute_routing_scores_for_aux_loss(logits, self.topk, self.score_function)
            probs = self._reference_aux_loss(probs, scores_for_aux_loss, self._first_choice(logits, routing_map))
        self._apply_expert_bias(routing_map)  # counts this step's tokens for the bias update (grad only)
        if grad and cfg.moe_z_loss_coeff:
            with torch.no_grad():
                self.recorded_z.append(moe_utils.z_loss_func(logits, 1.0).float() / self.tp_cp_group.size())
        if not _recomputing():
            self.recorded_load.append(routing_map.sum(0).detach().float())
            self.recorded_entropy.append(routing_entropy(logits, self.score_function))
        return probs, routing_map

    def pop_records(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(sum of recorded aux losses, summed expert load, [entropy sum, tokens], sum of recorded z-losses)
        since the last call; clears the records."""
        aux = torch.stack(self.recorded_aux).sum() if self.recorded_aux else None
        load = torch.stack(self.recorded_load).sum(0) if self.recorded_load else None
        entropy = torch.stack(self.recorded_entropy).sum(0) if self.recorded_entropy else None
        z = torch.stack(self.recorded_z).sum() if self.recorded_z else None
        self.recorded_aux, self.recorded_load, self.recorded_entropy, self.recorded_z = [], [], [], []
        return aux, load, entropy, z
