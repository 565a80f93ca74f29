"""Why a reference model has no exact transformers counterpart (export), and which config.json fields make
a checkpoint compute something the reference model does not (import). Each reason names the layer or
field and what differs in the transformers classes that come closest (as of transformers 5)."""

from __future__ import annotations

from .config import ModelConfig

_NOT_WRITTEN = "a layout this exporter does not write"
_SUPPORTED = ("export writes LlamaForCausalLM (blocks `*-`), MistralForCausalLM (blocks `W-`) and "
              "MixtralForCausalLM (blocks `*E` or `WE`, softmax router with renormalised top-k, dropless, no "
              "shared experts, no routing bias)")


def _layer_problem(cfg: ModelConfig, index: int, kind: str) -> str | None:
    if kind in "*WB" and cfg.attention == "mla":
        return (f"layer {index} is multi-head latent attention (attention=mla): Llama, Mistral and Mixtral have "
                "grouped-query attention only; DeepseekV2ForCausalLM and DeepseekV3ForCausalLM, the transformers "
                "classes with latent attention, pair it with DeepSeek's MoE (group-limited routing, "
                "routed_scaling_factor, first_k_dense_replace dense layers) and their own weight names "
                "(kv_a_proj_with_mqa, kv_b_proj), which this exporter does not write, so MLA models are not exported")
    if kind == "G":
        return (f"layer {index} is Gated DeltaNet (`G`): the only transformers class with Gated DeltaNet layers, "
                "Qwen3-Next (Qwen3NextForCausalLM), RMS-normalises q and k per head in its attention layers "
                "(q_norm, k_norm) and multiplies their output by a sigmoid gate from q_proj, which raytron's `*` "
                "attention does not; its MoE layers always add a sigmoid-gated shared expert; and its Gated "
                "DeltaNet L2-normalises q and k as x*rsqrt(sum(x^2)+1e-6) where raytron's divides by "
                "max(|x|, 1e-12), so even its recurrence gives other numbers. No transformers class computes "
                "this model")
    if kind == "M":
        return (f"layer {index} is Mamba2 (`M`): NemotronH, the transformers class with Megatron's M/*/- pattern, "
                "has MLPs without a gate projection (down(relu2(up(x)))) that cannot hold raytron's SwiGLU `-` "
                "layers, and BambaForCausalLM (Mamba2 or attention, each followed by a SwiGLU MLP) differs in "
                "its defaults (conv bias, partial rotary) and its equivalence is not established by this exporter, "
                "so Mamba2 hybrids are not exported")
    if kind == "B":
        return (f"layer {index} is block-sparse attention (`B`: blocks of {cfg.sparse_block} tokens, "
                f"{cfg.sparse_local_blocks} local and {cfg.sparse_global_blocks} leading key blocks): no "
                "transformers class has this static mask")
    return None


def _moe_problems(cfg: ModelConfig) -> list[str]:
    problems = []
    if cfg.router != "softmax":
        problems.append("router=sigmoid: Mixtral routes with a softmax; DeepSeek-V3's sigmoid router comes with "
                        "multi-head latent attention and group-limited routing, not raytron's GQA attention")
    if not cfg.norm_topk:
        problems.append("norm_topk=false: Mixtral always renormalises the top-k weights; Qwen3-MoE and OLMoE can "
                        "leave them unnormalised but RMS-normalise q and k in attention (q_norm, k_norm), which "
                        "raytron's attention does not; Qwen2-MoE (norm_topk_prob=false, qkv_bias=false) would "
                        f"need its always-present gated shared expert at zero width, {_NOT_WRITTEN}")
    if cfg.shared_experts:
        problems.append(f"shared_experts={cfg.shared_experts}: Mixtral has none; Qwen2-MoE and Qwen3-Next scale "
                        "their shared expert by a learned sigmoid gate, DeepSeek pairs it with latent attention")
    if cfg.capacity_factor > 0:
        problems.append(f"capacity_factor={cfg.capacity_factor} drops tokens over an expert's capacity; Mixtral "
                        "(like the other decoder-only MoE classes named here) routes every token")
    if cfg.bias_update_rate > 0:
        problems.append(f"bias_update_rate={cfg.bias_update_rate} (aux-loss-free routing bias): Mixtral has no "
                        "routing bias; DeepSeek-V3's e_score_correction_bias comes with a sigmoid router and "
                        "latent attention")
    if cfg.n_group > 1:
        problems.append(f"n_group={cfg.n_group}, topk_group={cfg.topk_group} (group-limited routing): Mixtral "
                        "routes over all experts; DeepSeek-V3's groups come with a sigmoid router and latent attention")
    if cfg.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={cfg.routed_scaling_factor}: Mixtral does not scale the routed "
                        "experts' weights")
    return problems


def export_problem(cfg: ModelConfig) -> str | None:
    """None when Llama, Mistral or Mixtral computes `cfg` exactly, else the reason (names the layer or field)."""
    pattern = cfg.layer_pattern()
    for index, kind in enumerate(pattern):
        problem = _layer_problem(cfg, index, kind)
        if problem:
            return problem
    blocks = {pattern[i:i + 2] for i in range(0, len(pattern), 2)}
    if len(pattern) % 2 or not blocks <= {"*-", "*E", "W-", "WE"}:
        return (f"layer pattern {pattern!r} is not a stack of attention + feed-forward blocks (`*-`, `*E`, "
                f"`W-`, `WE`); {_SUPPORTED}")
    if {b[0] for b in blocks} == {"*", "W"}:
        return (f"layer {pattern.index('W')} is sliding-window attention (`W`, window {cfg.window}) and layer "
                f"{pattern.index('*')} full attention (`*`): Llama has no window, and Mistral's and Mixtral's "
                "sliding_window applies to every layer, so none of them computes this model")
    if {b[1] for b in blocks} == {"-", "E"}:
        return (f"layer pattern {pattern!r} mixes dense (`*-`) and MoE (`*E`) blocks: Mixtral has MoE in every "
                "layer; Qwen3-MoE's mlp_only_layers would allow the mix but its attention RMS-normalises q and "
                "k per head (q_norm, k_norm), which raytron's attention does not; Qwen2-MoE's mlp_only_layers "
                f"(qkv_bias=false) would need its always-present gated shared expert at zero width, {_NOT_WRITTEN}")
    if "E" in pattern:
        problems = _moe_problems(cfg)
        if problems:
            return "; ".join(problems) + f". {_SUPPORTED}"
    if cfg.dim % cfg.num_heads:
        return (f"dim {cfg.dim} is not a multiple of num_heads {cfg.num_heads} (head_dim {cfg.head_dim} set "
                "explicitly): transformers 5 configs refuse hidden_size % num_attention_heads != 0")
    return None


_ROPE_KEYS = {"rope_type", "type", "rope_theta"}


def import_problems(config: dict) -> list[str]:
    """Every config.json field that keeps the checkpoint from being a reference model, each named."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral", "mixtral"):
        return [f"architectures={config.get('architectures')} (model_type={model_type!r}): raytron imports "
                "LlamaForCausalLM, MistralForCausalLM and MixtralForCausalLM checkpoints only"]
    problems = [f"{key} is missing" for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "intermediate_size") if key not in config]
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r}: raytron's MLPs are SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}=true: raytron's projections have no bias")
    if config.get("rope_scaling"):
        problems.append(f"rope_scaling={config['rope_scaling']}: raytron's RoPE is unscaled")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or set(rope) - _ROPE_KEYS:
        problems.append(f"rope_parameters={rope}: raytron's RoPE is the default (unscaled, full rotary) kind")
    window = config.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        problems.append(f"sliding_window={window!r}: must be a positive number of tokens or null")
    if config.get("quantization_config"):
        problems.append("quantization_config is set: import unquantized weights")
    if model_type == "mixtral":
        problems += [f"{key} is missing" for key in ("num_local_experts", "num_experts_per_tok") if key not in config]
    return problems
