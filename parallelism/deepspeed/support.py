"""What the deepspeed engine runs: ZeRO data parallelism (stages 0-3, ZeRO-Offload) with DeepSpeed-MoE expert
parallelism folded over it, in fp32 or bf16, on CPU (gloo) or GPUs. `plan`, `submit`, the support matrix and
the engine's own build (engine.py) read this one table. Every MoE routing option runs: DeepSpeed's MoE layer
dispatches and runs the experts, its gate is the reference's routing (moe.py). Imports no DeepSpeed."""

from __future__ import annotations

from typing import Any

from ...typed import check
from ..engines import EngineSupport, Gap, MemoryFacts, StateOps
from ..layout_rules import derive_dp, resolved_precision

_SCOPE = ("engine deepspeed here is ZeRO data parallelism + DeepSpeed-MoE expert parallelism only; use "
          "engine: megatron for tensor/pipeline/context parallelism")

class DeepSpeedSupport(EngineSupport):
    name = "deepspeed"
    needs_gpu = False
    engine_class = "raytron.parallelism.deepspeed.engine:DeepSpeedEngine"
    options = {
        "layout.zero_stage": (0, 1, 2, 3),
        "layout.offload": ("none", "optimizer", "optimizer+params"),
        "layout.ep": (1, 2),
        "layout.tp": (1, 2), "layout.pp": (1, 2), "layout.cp": (1, 2), "layout.vpp": (1, 2),
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
    memory = MemoryFacts(cpu_master_copy_with_zero=True, recompute_unit="reference layer", recompute_unit_layers=1,
                         selective_keeps_mixer_inputs=False)

    def check_layout(self, spec: Any) -> None:
        lay = spec.layout
        for name in ("tp", "pp", "cp", "vpp", "etp"):
            value = getattr(lay, name)
            check(value == 1, f"layout.{name}", f"got {value}; must be 1 with engine deepspeed: {_SCOPE}")
        dp = derive_dp(spec)
        check(dp % lay.ep == 0, "layout.ep",
              f"got {lay.ep}; DeepSpeed folds expert parallelism over data parallelism, so ep must divide "
              f"dp = {dp}: allowed {[d for d in range(1, dp + 1) if dp % d == 0]}")

    def check_model(self, spec: Any, layout: Any, facts: Any) -> None:
        if facts.num_experts:
            check(layout.zero_stage < 3, "layout.zero_stage",
                  "got 3 with a MoE model; DeepSpeed-MoE does not support ZeRO-3 (expert parameters cannot be "
                  "partitioned across the data-parallel group): use zero_stage 1 or 2 (with layout.offload: "
                  "optimizer for more memory on GPUs), or engine megatron (zero_stage 1, its distributed optimizer)")

    def gaps(self, spec: Any, cfg: Any, layout: Any) -> list[Gap]:
        gaps: list[Gap] = []
        if getattr(spec.train, "overlap_grad_reduce", False):
            gaps.append(("train.overlap_grad_reduce", "a megatron-engine option; the deepspeed engine does not "
                         "overlap its ZeRO reductions in this build: turn it off"))
        if getattr(spec.train, "overlap_moe_comm", False):
            gaps.append(("train.overlap_moe_comm", "a megatron-engine option (megatron-core's EP all-to-all "
                         "overlap); the deepspeed engine has no such schedule: turn it off"))
        gaps += _memory_gaps(spec, layout)
        if getattr(spec.train, "precision", "auto") == "fp8":
            gaps.append(("train.precision", "fp8: the deepspeed engine has no FP8 GEMM path; use engine: megatron "
                         "or precision: bf16"))
        return gaps

    def state_ops(self) -> StateOps:
        from .state import gather_state, load_state, merge_shards

        return StateOps(gather_state, lambda engine, snapshot, group=None: snapshot, load_state, merge_shards)


def _memory_gaps(spec: Any, lay: Any) -> list[Gap]:
    """Precision and ZeRO-Offload combinations DeepSpeed cannot run (or runs another way than asked)."""
    gaps, stage, offload = [], lay.zero_stage, getattr(spec.layout, "offload", "none")
    if resolved_precision(spec) == "bf16" and stage == 0:
        gaps.append(("train.precision", f"bf16 (train.precision: {spec.train.precision}) with zero_stage 0: "
                     "DeepSpeed runs ZeRO-0 bf16 through its FP16_Optimizer, which accumulates and all-reduces "
                     "gradients in bf16 without the fp32-master path; use layout.zero_stage 1-3 or precision fp32"))
    if offload == "none":
        return gaps
    if stage == 0:
        gaps.append(("layout.offload", f"{offload!r} with zero_stage 0: DeepSpeed offloads ZeRO's optimizer "
                     "partitions, and ZeRO-0 has none; use layout.zero_stage 1-3"))
    elif offload == "optimizer+params" and stage < 3:
        gaps.append(("layout.offload", f"'optimizer+params' with zero_stage {stage}: DeepSpeed offloads parameters "
                     "under ZeRO-3 only (offload_param); use zero_stage 3 or offload: optimizer"))
    return gaps
