"""The rules that tie a layout to its job: engine, model shape, sequence length, node size.

Each rule raises a ConfigError naming the dotted field, the bad value and what would be allowed. The pure
arithmetic of a layout (products, folding, batch sizes) lives in `ParallelLayout.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any

from ..typed import ConfigError, check, convert
from .engines import get_engine

if TYPE_CHECKING:
    from ..config.spec import JobSpec
    from .layout import ModelFacts, ParallelLayout

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
    """Layout fields the job's engine cannot take at all (its EngineSupport), refused before any arithmetic."""
    get_engine(spec.engine).check_layout(spec)


def check_model(spec: "JobSpec", layout: "ParallelLayout", facts: "ModelFacts") -> None:
    """Every rule that needs the model's shape, the sequence length or the node size."""
    _check_node_fit(layout)
    _check_experts(spec, layout, facts)
    _check_heads(layout, facts)
    _check_stages(layout, facts)
    _check_sequence(spec, layout)
    get_engine(spec.engine).check_model(spec, layout, facts)


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
    """(field, reason) for each part of a *valid* job that the engine cannot run (its EngineSupport.gaps).

    Distinct from the layout rules above: these are engine limits, not inconsistencies. `plan` lists
    them and still exits 0 (the layout is sound); `submit` refuses the job before Ray starts; the engines
    refuse the same when built directly. An engine passes the layout it was given."""
    return get_engine(engine or spec.engine).gaps(spec, cfg, layout or spec.layout)
