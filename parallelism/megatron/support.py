"""What the megatron engine runs: the reference architecture on megatron-core (TP+SP, PP/VPP, EP/ETP, CP,
DP with the distributed optimizer), bf16 or FP8 GEMMs, GPUs only. `plan`, `submit`, the support matrix and the
engine's own build (spec.py) read this one table. Imports no megatron-core (blocks.py is pure arithmetic)."""

from __future__ import annotations

from typing import Any

from ...typed import check
from ..engines import EngineSupport, Gap, MemoryFacts, StateOps
from .blocks import megatron_pattern_gaps

MOE_LIMITS: tuple[tuple[str, Any, str], ...] = (
    ("capacity_factor", lambda cfg: cfg.capacity_factor > 0, "megatron-core drops tokens per rank by probability "
     "or position, not in the reference's order (first choices before second ones, earlier tokens first)"),
    ("bias_update_rate", lambda cfg: cfg.bias_update_rate > 0 and cfg.router == "softmax",
     "megatron-core adds the aux-loss-free routing bias to sigmoid scores only; set model.overrides.router: sigmoid"),
    ("norm_topk", lambda cfg: cfg.router == "sigmoid" and not cfg.norm_topk,
     "megatron-core always renormalises the top-k sigmoid scores (norm_topk: true)"),
    ("top_k", lambda cfg: cfg.top_k == 1 and cfg.norm_topk, "megatron-core does not renormalise a single chosen "
     "score (the reference's weight is then 1); set model.overrides.norm_topk: false"),
    ("n_group", lambda cfg: cfg.n_group > 1 and cfg.router == "softmax" and cfg.norm_topk,
     "with the softmax router and norm_topk megatron-core ranks the groups by logits, the reference by "
     "probabilities; use router sigmoid or norm_topk false"),
)
"""(model field, refused when, why) for models with MoE layers: the routing options megatron-core 0.16.1's
TopKRouter computes otherwise than the reference (models/moe.py `route`); the deepspeed engine runs each of
them (its gate is the reference's routing)."""


def moe_gaps(cfg: Any) -> list[Gap]:
    """MOE_LIMITS a model with MoE layers breaks (none for a dense model)."""
    if not cfg.num_experts or "E" not in cfg.layer_pattern():
        return []
    return [(f"model.overrides.{name}", f"{getattr(cfg, name)!r}: {why} (engine: deepspeed runs it)")
            for name, bad, why in MOE_LIMITS if bad(cfg)]


class MegatronSupport(EngineSupport):
    name = "megatron"
    needs_gpu = True
    engine_class = "raytron.parallelism.megatron.engine:MegatronEngine"
    options = {
        "layout.zero_stage": (0, 1, 2, 3),
        "layout.offload": ("none", "optimizer"),
        "layout.tp": (1, 2), "layout.pp": (1, 2), "layout.cp": (1, 2), "layout.ep": (1, 2), "layout.etp": (1, 2),
        "layout.vpp": (1, 2),
        "train.precision": ("auto", "fp32", "bf16", "fp8"),
        "train.recompute": ("none", "selective", "full"),
        "train.overlap_grad_reduce": (False, True),
        "train.overlap_moe_comm": (False, True),
        "model.overrides.router": ("softmax", "sigmoid"),
        "model.overrides.top_k": (1, 2),
        "model.overrides.norm_topk": (True, False),
        "model.overrides.capacity_factor": (0.0, 1.25),
        "model.overrides.bias_update_rate": (0.0, 0.001),
    }
    memory = MemoryFacts(cpu_master_copy_with_zero=False, recompute_unit="megatron TransformerLayer",
                         recompute_unit_layers=2, selective_keeps_mixer_inputs=True,
                         zero1_note=" (megatron distributed optimizer)")

    def check_layout(self, spec: Any) -> None:
        stage = spec.layout.zero_stage
        check(stage == 1, "layout.zero_stage",
              f"got {stage} with engine megatron; megatron always shards the optimizer state with its distributed "
              "optimizer (the ZeRO-1 equivalent): set zero_stage: 1. Replicated optimizer state (0) and "
              "gradient/parameter sharding (ZeRO-2/3) are not offered")

    def check_model(self, spec: Any, layout: Any, facts: Any) -> None:
        seq = spec.train.seq_len
        if layout.tp > 1:
            check(seq % layout.tp == 0, "train.seq_len",
                  f"got {seq}; with tp > 1 megatron runs sequence parallelism (required for MoE), which splits "
                  f"the sequence over tp = {layout.tp}: use a multiple of {layout.tp}")
        heads = facts.num_heads // layout.tp  # _check_heads made tp divide them
        if layout.cp > 1 and facts.has_attention:
            allowed = [c for c in range(1, heads + 1) if heads % c == 0]
            check(heads % layout.cp == 0, "layout.cp",
                  f"got {layout.cp}; context-parallel attention (parallelism/megatron/cp.py) spreads each TP "
                  f"rank's attention heads over the CP ranks with an all-to-all, and the model's "
                  f"{facts.num_heads} heads / tp {layout.tp} = {heads} per TP rank do not split over cp: "
                  f"use cp in {allowed}, a smaller tp, or model.overrides.num_heads a multiple of "
                  f"{layout.tp * layout.cp}")

    def gaps(self, spec: Any, cfg: Any, layout: Any) -> list[Gap]:
        train = spec.train
        precision = getattr(train, "precision", "auto")
        gaps = megatron_pattern_gaps(cfg, layout, precision, getattr(train, "seq_len", None))
        if getattr(train, "overlap_grad_reduce", False) and layout.pp > 1:
            gaps.append(("train.overlap_grad_reduce", f"with pp={layout.pp}: the pipeline schedules' per-chunk "
                         "gradient-sync hooks are not wired in this build; use pp=1 or turn it off"))
        if getattr(train, "overlap_moe_comm", False):
            gaps += _moe_overlap_gaps(cfg, layout)
            if getattr(train, "recompute", "none") == "full":
                gaps.append(("train.recompute", "full with train.overlap_moe_comm: megatron-core's overlap "
                             "schedule runs each layer in pieces and refuses whole-layer recomputation "
                             "(TransformerConfig.__post_init__): use selective or turn the overlap off"))
        if precision == "fp32":
            gaps.append(("train.precision", "'fp32': the megatron engine computes in bf16 (auto, bf16) or with FP8 "
                         "GEMMs (fp8); fp32 compute is a deepspeed-engine option"))
        if precision == "fp8":
            gaps += _fp8_gaps(spec, cfg, layout)
        offload = getattr(getattr(spec, "layout", None), "offload", "none")
        if offload != "none":
            gaps.append(("layout.offload", f"{offload!r}: ZeRO-Offload is a deepspeed-engine option "
                         "(use engine: deepspeed with zero_stage 1-3) or set offload: none"))
        return gaps + moe_gaps(cfg)

    def state_ops(self) -> StateOps:
        from . import state

        return StateOps(state.snapshot_state, state.assemble_state, state.load_state, state.merge_shards)


def _moe_overlap_gaps(cfg: Any, lay: Any) -> list[Gap]:
    """What megatron-core 0.16.1's EP all-to-all overlap (train.overlap_moe_comm) cannot run, or would run
    wrong, with this model and layout. The engine's own settings (bf16, all-to-all dispatcher, no MTP, no
    CUDA graphs) already meet its TransformerConfig checks; train.recompute=full is refused in `gaps`."""
    field, pattern = "train.overlap_moe_comm", cfg.layer_pattern()
    if lay.ep == 1:
        what = "the model has no MoE layers" if not cfg.num_experts else "layout.ep is 1"
        return [(field, f"{what}: it hides the expert-parallel all-to-all, and megatron-core runs it only with "
                        "ep > 1 (TransformerConfig.__post_init__): use layout.ep > 1 or turn it off")]
    gaps = []
    if lay.pp > 1 and lay.vpp == 1:
        gaps.append((field, f"with pp={lay.pp}: megatron-core overlaps it in the interleaved pipeline schedule "
                            "only (TransformerConfig requires virtual pipeline stages): set layout.vpp > 1 or pp=1"))
    if pattern[-1] != "E":
        gaps.append((field, f"the pattern {pattern!r} ends in a dense MLP layer: megatron-core 0.16.1's overlap "
                            "schedule applies the final norm after a MoE layer only (fine_grained_callables.py, "
                            "the dense path skips it), so the model would train without it: end on an MoE layer"))
    if cfg.num_experts == lay.ep:
        gaps.append((field, f"one expert per EP rank ({cfg.num_experts} experts, ep={lay.ep}): the overlap "
                            "schedule frees the dispatched tokens after the expert forward, and with one local expert "
                            "they are the very tensor the expert keeps for its weight gradient (megatron-core "
                            "0.16.1; backward fails on freed storage): use ep < num_experts or turn it off"))
    return gaps


def _fp8_gaps(spec: Any, cfg: Any, lay: Any) -> list[Gap]:
    """train.precision fp8 (ops/fp8.py): every FP8 GEMM dimension a multiple of 16 (torch._scaled_mm). The
    GPUs' compute capability (>= 8.9) is checked on the GPU at build."""
    widths = {"tokens per rank (train.seq_len / layout.cp * train.micro_batch_size)":
              spec.train.seq_len // lay.cp * spec.train.micro_batch_size,
              "model.dim": cfg.dim,
              "attention heads * head dim / layout.tp": cfg.num_heads * cfg.attn_head_dim // lay.tp,
              "kv heads * head dim / layout.tp": cfg.num_kv_heads * cfg.attn_head_dim // lay.tp,
              "model.ffn_dim / layout.tp": cfg.ffn_dim // lay.tp}
    if cfg.num_experts:
        widths["model.moe_ffn_dim / layout.etp"] = cfg.moe_ffn_dim // lay.etp
    bad = {k: v for k, v in widths.items() if v % 16}
    if bad:
        return [("train.precision", f"fp8 GEMMs (torch._scaled_mm) need every dimension a multiple of 16, got "
                                    f"{', '.join(f'{k} = {v}' for k, v in bad.items())}: adjust them or use "
                                    "precision: bf16")]
    return []
