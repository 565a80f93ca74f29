"""The rules that tie a layout to its job: engine, model shape, sequence length, node size.

Each rule raises a ConfigError naming the dotted field, the bad value and what would be allowed. The pure
arithmetic of a layout (products, folding, batch sizes) lives in `ParallelLayout.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any

from ..typed import ConfigError, check, convert

if TYPE_CHECKING:
    from ..launcher.spec import JobSpec
    from .layout import ModelFacts, ParallelLayout

_DEEPSPEED_SCOPE = ("engine deepspeed here is ZeRO data parallelism + DeepSpeed-MoE expert parallelism "
                    "only; use engine: megatron for tensor/pipeline/context parallelism")


def derive_dp(spec: "JobSpec") -> int:
    """layout.dp, or workers / (tp*pp*cp) when it is null."""
    lay, workers = spec.layout, spec.resources.workers
    if lay.dp is not None:
        return lay.dp
    base = lay.tp * lay.pp * lay.cp
    check(workers % base == 0, "resources.workers",
          f"got {workers} workers, not a multiple of tp*pp*cp = {lay.tp}*{lay.pp}*{lay.cp} = {base}; "
          f"use a multiple of {base} or change layout.tp/pp/cp")
    return workers // base


def check_engine(spec: "JobSpec") -> None:
    """Layout fields an engine cannot run, refused before any arithmetic."""
    lay = spec.layout
    if spec.engine == "deepspeed":
        for name in ("tp", "pp", "cp", "vpp", "etp"):
            value = getattr(lay, name)
            check(value == 1, f"layout.{name}", f"got {value}; must be 1 with engine deepspeed: {_DEEPSPEED_SCOPE}")
        dp = derive_dp(spec)
        check(dp % lay.ep == 0, "layout.ep",
              f"got {lay.ep}; DeepSpeed folds expert parallelism over data parallelism, so ep must divide "
              f"dp = {dp}: allowed {[d for d in range(1, dp + 1) if dp % d == 0]}")
    else:
        check(lay.zero_stage in (0, 1), "layout.zero_stage",
              f"got {lay.zero_stage} with engine megatron; megatron shards optimizer state with its "
              "distributed optimizer (zero_stage: 1, ZeRO-1 equivalent) or keeps it replicated (0); "
              "gradient/parameter sharding (ZeRO-2/3) is not offered: set zero_stage: 1")


def check_model(spec: "JobSpec", layout: "ParallelLayout", facts: "ModelFacts") -> None:
    """Every rule that needs the model's shape, the sequence length or the node size."""
    _check_node_fit(layout)
    _check_experts(spec, layout, facts)
    _check_heads(layout, facts)
    _check_stages(layout, facts)
    _check_sequence(spec, layout)


def _check_node_fit(layout: "ParallelLayout") -> None:
    wpn = layout.workers_per_node
    for name in ("tp", "etp"):
        size = getattr(layout, name)
        check(size <= wpn and wpn % size == 0, f"layout.{name}",
              f"got {size}; a {name.upper()} group must stay inside one node (its collectives run every "
              f"layer), so it must divide the {wpn} workers per node: allowed {_divisors(wpn)}")


def _check_experts(spec: "JobSpec", layout: "ParallelLayout", facts: "ModelFacts") -> None:
    experts = facts.num_experts
    if experts == 0:
        for name in ("ep", "etp"):
            value = getattr(layout, name)
            check(value == 1, f"layout.{name}", f"got {value}; the model has no MoE layers, so it must be 1")
        return
    folded = layout.tp * layout.cp * layout.dp // layout.etp
    allowed = [d for d in _divisors(experts) if folded % d == 0]
    check(experts % layout.ep == 0, "layout.ep",
          f"got {layout.ep}; must divide the {experts} experts (and tp*cp*dp/etp = {folded}): allowed {allowed}")
    if spec.engine == "deepspeed":
        check(layout.zero_stage < 3, "layout.zero_stage",
              "got 3 with a MoE model; DeepSpeed-MoE does not support ZeRO-3 (expert parameters cannot be "
              "partitioned across the data-parallel group): use zero_stage 1 or 2 (with layout.offload: optimizer "
              "for more memory on GPUs), or engine megatron (zero_stage 1, its distributed optimizer)")


def _check_heads(layout: "ParallelLayout", facts: "ModelFacts") -> None:
    tp = layout.tp
    if facts.has_attention:
        for what, n in (("attention heads", facts.num_heads), ("key/value heads", facts.num_kv_heads)):
            check(n % tp == 0, "layout.tp",
                  f"got {tp}; the model's {n} {what} must divide evenly over tp: allowed {_divisors(n)}")
    if facts.linear_heads:
        n = facts.linear_heads
        check(n % tp == 0, "layout.tp",
              f"got {tp}; the model's {n} linear-sequence heads must divide evenly over tp: allowed {_divisors(n)}")


def _check_stages(layout: "ParallelLayout", facts: "ModelFacts") -> None:
    stages = layout.pp * layout.vpp
    marked = facts.stage_boundaries()
    if marked is not None:
        check(marked == stages, "layout.pp",
              f"got pp*vpp = {layout.pp}*{layout.vpp} = {stages} but the model's pattern {facts.pattern!r} marks "
              f"{marked} stages with '|'; set pp*vpp = {marked} or re-mark the pattern")
        empty = [i for i, s in enumerate(facts.pattern.split("|")) if not s]
        check(not empty, "model.overrides.pattern",
              f"got pattern {facts.pattern!r} with empty pipeline stage(s) {empty}; every stage must have a layer")
        return
    layers = facts.num_layers
    name = "layout.vpp" if layers % layout.pp == 0 else "layout.pp"
    check(layers % stages == 0, name,
          f"got pp*vpp = {layout.pp}*{layout.vpp} = {stages}, which does not divide the model's {layers} layers; "
          f"allowed pp*vpp: {_divisors(layers)} (or mark stages with '|' in a hybrid pattern)")


def _check_sequence(spec: "JobSpec", layout: "ParallelLayout") -> None:
    seq = spec.train.seq_len
    if layout.cp > 1:
        check(seq % (2 * layout.cp) == 0, "train.seq_len",
              f"got {seq}; context parallelism splits the sequence into 2*cp = {2 * layout.cp} load-balanced "
              f"chunks, so seq_len must be a multiple of {2 * layout.cp}")
    if spec.engine == "megatron" and layout.tp > 1:
        check(seq % layout.tp == 0, "train.seq_len",
              f"got {seq}; with tp > 1 megatron runs sequence parallelism (required for MoE), which splits "
              f"the sequence over tp = {layout.tp}: use a multiple of {layout.tp}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_model_config(spec: "JobSpec") -> Any:
    """The registry's config for spec.model, with `overrides` type-checked field by field."""
    try:
        from .. import models
    except Exception as exc:  # noqa: BLE001 - any import failure means the registry is unusable
        raise ConfigError("model.family", f"the model registry raytron.models cannot be imported "
                          f"({type(exc).__name__}: {exc}); layout rules that need the model cannot run") from None
    get_config = getattr(models, "get_config", None)
    list_flavors = getattr(models, "list_flavors", None)
    if get_config is None or list_flavors is None:
        raise ConfigError("model.family", "raytron.models does not provide get_config(family, flavor, "
                          "**overrides) and list_flavors() yet; cannot check the layout against the model")
    m = spec.model
    known = list_flavors()
    families = sorted({fam for fam, _ in known})
    check(m.family in families, "model.family", f"got {m.family!r}; known families: {', '.join(families)}")
    flavors = [fl for fam, fl in known if fam == m.family]
    check(m.flavor in flavors, "model.flavor",
          f"got {m.flavor!r}; allowed flavors of {m.family!r}: {', '.join(flavors)}")
    overrides = _typed_overrides(getattr(models, "ModelConfig", None), m.overrides)
    try:
        return get_config(m.family, m.flavor, **overrides)
    except (ValueError, TypeError, KeyError) as exc:
        path = "model.overrides" if overrides else "model.flavor"
        raise ConfigError(path, f"{m.family}/{m.flavor} with overrides {overrides}: {exc}") from None


def _typed_overrides(config_cls: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        return dict(overrides)
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in overrides.items():
        path = f"model.overrides.{key}"
        check(key in fields, path, f"unknown model field; allowed: {', '.join(sorted(fields))}")
        out[key] = convert(hints[key], value, path)
    return out


def resolved_precision(spec: "JobSpec") -> str:
    """train.precision with auto resolved: "bf16" on GPUs, "fp32" on CPU (else as given)."""
    precision = spec.train.precision
    if precision == "auto":
        return "bf16" if spec.resources.use_gpu else "fp32"
    return precision


def engine_gaps(spec: "JobSpec", cfg: Any, layout: Any = None, engine: str | None = None) -> list[tuple[str, str]]:
    """(field, reason) for each part of a *valid* job that this build's engine cannot run yet.

    Distinct from the layout rules above: these are engine limits, not inconsistencies. `plan` lists
    them and still exits 0 (the layout is sound); `submit` refuses the job before Ray starts. The engines
    raise the same refusals when built directly (parallelism/megatron_spec.py, deepspeed_moe.py)."""
    gaps: list[tuple[str, str]] = []
    lay, pattern = layout or spec.layout, cfg.layer_pattern()  # an engine passes the layout it was given
    overlap = getattr(spec.train, "overlap_grad_reduce", False)
    overlap_moe = getattr(spec.train, "overlap_moe_comm", False)
    if (engine or spec.engine) == "megatron":
        from .megatron_blocks import megatron_pattern_gaps  # (mixer, ffn) pairs, stage split, CP (pure)

        gaps += megatron_pattern_gaps(cfg, lay, getattr(spec.train, "seq_len", None))
        if overlap and lay.pp > 1:
            gaps.append(("train.overlap_grad_reduce", f"with pp={lay.pp}: the pipeline schedules' per-chunk "
                         "gradient-sync hooks are not wired in this build; use pp=1 or turn it off"))
        if overlap_moe:
            gaps += _moe_overlap_gaps(cfg, lay)
            if getattr(spec.train, "recompute", "none") == "full":
                gaps.append(("train.recompute", "full with train.overlap_moe_comm: megatron-core's overlap "
                             "schedule runs each layer in pieces and refuses whole-layer recomputation "
                             "(TransformerConfig.__post_init__): use selective or turn the overlap off"))
        if getattr(spec.train, "precision", "auto") == "fp32":
            gaps.append(("train.precision", "'fp32': the megatron engine computes in bf16 (auto, bf16) or with FP8 "
                         "GEMMs (fp8); fp32 compute is a deepspeed-engine option"))
        if getattr(getattr(spec, "layout", None), "offload", "none") != "none":
            gaps.append(("layout.offload", f"{spec.layout.offload!r}: ZeRO-Offload is a deepspeed-engine option "
                         "(use engine: deepspeed with zero_stage 1-3) or set offload: none"))
        for name, bad, why in (("router", cfg.router != "softmax", "only the softmax router is mapped"),
                               ("capacity_factor", cfg.capacity_factor > 0, "token-dropping order differs"),
                               ("bias_update_rate", cfg.bias_update_rate > 0, "aux-loss-free bias is not mapped")):
            if cfg.num_experts and bad:
                gaps.append((f"model.overrides.{name}", f"{getattr(cfg, name)!r}: {why} in the megatron engine"))
    else:
        if overlap:
            gaps.append(("train.overlap_grad_reduce", "a megatron-engine option; the deepspeed engine does not "
                         "overlap its ZeRO reductions in this build: turn it off"))
        if overlap_moe:
            gaps.append(("train.overlap_moe_comm", "a megatron-engine option (megatron-core's EP all-to-all "
                         "overlap); the deepspeed engine has no such schedule: turn it off"))
        gaps += _deepspeed_memory_gaps(spec, lay)
    gaps += _precision_gaps(spec, cfg, lay, engine or spec.engine)
    if (engine or spec.engine) != "megatron" and cfg.num_experts and "E" in pattern:
        for name, bad, why in (("router", cfg.router != "softmax", "DeepSpeed-MoE gates are softmax only"),
                               ("top_k", cfg.top_k != 2, "DeepSpeed's k>2 gate has other semantics; use 2"),
                               ("bias_update_rate", cfg.bias_update_rate > 0, "no aux-loss-free balancing")):
            if bad:
                gaps.append((f"model.overrides.{name}", f"{getattr(cfg, name)!r}: {why}"))
    return gaps


def _deepspeed_memory_gaps(spec: "JobSpec", lay: Any) -> list[tuple[str, str]]:
    """Precision and ZeRO-Offload combinations DeepSpeed cannot run (or runs another way than asked)."""
    gaps, stage, offload = [], lay.zero_stage, spec.layout.offload
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


def _moe_overlap_gaps(cfg: Any, lay: Any) -> list[tuple[str, str]]:
    """What megatron-core 0.16.1's EP all-to-all overlap (train.overlap_moe_comm) cannot run, or would run
    wrong, with this model and layout. The engine's own settings (bf16, all-to-all dispatcher, no MTP, no
    CUDA graphs) already meet its TransformerConfig checks; train.recompute=full is refused in engine_gaps."""
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


def _precision_gaps(spec: "JobSpec", cfg: Any, lay: Any, engine: str) -> list[tuple[str, str]]:
    """train.precision fp8 (ops/fp8.py): megatron engine on FP8-capable GPUs, every FP8 GEMM dimension a
    multiple of 16 (torch._scaled_mm). The megatron engine runs on GPUs only (launcher/validate.py check_kinds);
    their compute capability (>= 8.9) is checked on the GPU at build."""
    field = "train.precision"
    if getattr(spec.train, "precision", "auto") != "fp8":
        return []
    if engine != "megatron":
        return [(field, "fp8: the deepspeed engine has no FP8 GEMM path; use engine: megatron or precision: bf16")]
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
        return [(field, f"fp8 GEMMs (torch._scaled_mm) need every dimension a multiple of 16, got "
                        f"{', '.join(f'{k} = {v}' for k, v in bad.items())}: adjust them or use precision: bf16")]
    return []
