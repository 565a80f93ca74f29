"""The study config (`raytron study CONFIG`): which efficient-architecture families to pretrain on one
base job, each sized to the same active-parameter count, and the context lengths of the throughput sweep.

Strict like job configs: unknown keys, wrong types and values no family can honour are ConfigErrors
naming the field, raised before anything trains. Every family keeps the study's depth (`layers`,
the family's pattern repeated) and gets the hidden size whose active-parameter count is closest to
`target_active_params`; FFN and expert sizes scale with it, head counts and head sizes stay fixed (the
base flavor's, or `overrides`' num_heads / head_dim / linear_heads ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from ..models.config import ModelConfig
from ..models.flops import param_counts
from ..models.registry import FLAVORS, get_config
from ..typed import ConfigError, build, check, to_dict
from ..config.spec import JobSpec, load_spec
from ..config.strict_yaml import load_yaml
from .validate import validate_job

# study family -> (layer-pattern unit, registry family of its base flavor). The unit is repeated to
# `layers` layers. `sliding_window` is pure `W-` (no global layers): it shows what the window alone costs.
FAMILIES: dict[str, tuple[str, str]] = {
    "full_attention": ("*-", "dense"),
    "sliding_window": ("W-", "dense"),
    "block_sparse": ("B-", "dense"),
    "gated_deltanet": ("G-", "hybrid"),
    "mamba2": ("M-", "hybrid"),
    "moe": ("*E", "moe"),
    "gdn_hybrid": ("G-G-G-*-", "hybrid"),
    "mamba2_hybrid": ("M-M-M-*-", "hybrid"),
    "moe_hybrid": ("GEGEGE*E", "hybrid"),
}
EXPERT_FIELDS = ("num_experts", "top_k", "moe_ffn_dim", "shared_experts", "router", "norm_topk",
                 "capacity_factor", "bias_update_rate")
SOLVED_FIELDS = ("pattern", "num_layers", "dim", "ffn_dim", "head_dim")
# head_dim is kept from the base (or an override of it) when the width changes, so it may be overridden
SCALED_FIELDS = ("pattern", "num_layers", "dim", "ffn_dim")
DIM_STEP, FFN_STEP, DIM_MAX = 4, 8, 16384


@dataclass(frozen=True)
class FlavorSpec:
    dense: str = "debug"
    """Flavor of the `dense` registry family: base shape of attention-only families."""
    moe: str = "debug"
    """Flavor of the `moe` registry family: base shape of `moe`, and the expert settings of every E layer."""
    hybrid: str = "debug"
    """Flavor of the `hybrid` registry family: base shape (linear-layer heads, chunk) of G/M families."""

    def validate(self, path: str) -> None:
        for fam in ("dense", "moe", "hybrid"):
            flavor = getattr(self, fam)
            check(flavor in FLAVORS[fam], f"{path}.{fam}", f"got {flavor!r}; known: {', '.join(FLAVORS[fam])}")


@dataclass(frozen=True)
class SweepSpec:
    warmup: int = 1
    """Untimed forward+backward passes per family and context before timing."""
    repeats: int = 3
    """Timed forward+backward passes per family and context (the median is reported)."""
    tokens: int | None = None
    """Tokens per timed pass: a context of `seq` tokens runs max(1, tokens // seq) sequences, so every context
    does the same work per pass (one short sequence would time kernel launches, not the model). Default: the
    longest swept context."""

    def validate(self, path: str) -> None:
        check(self.repeats >= 1, f"{path}.repeats", f"got {self.repeats}; must be >= 1")
        check(self.tokens is None or self.tokens >= 1, f"{path}.tokens", f"got {self.tokens}; must be >= 1")
        check(self.warmup >= 0, f"{path}.warmup", f"got {self.warmup}; must be >= 0")

    def batch(self, seq: int, longest: int) -> int:
        """Sequences per pass at context `seq` when the longest swept context is `longest`."""
        return max(1, (self.tokens or longest) // seq)


@dataclass(frozen=True)
class ClaimsSpec:
    min_train_tokens: int = 100_000_000
    """Training tokens per family below which perplexity comparisons are reported as not measurable."""
    comparable_ppl: float = 0.05
    """Relative perplexity gap to full attention that still counts as `comparable` (MoE/hybrid claim)."""

    def validate(self, path: str) -> None:
        check(self.min_train_tokens >= 0, f"{path}.min_train_tokens", f"got {self.min_train_tokens}; must be >= 0")
        check(0 < self.comparable_ppl < 1, f"{path}.comparable_ppl", f"got {self.comparable_ppl}; must be in (0, 1)")


@dataclass(frozen=True)
class StudySpec:
    base: str
    """Base job config (path relative to the study file, or absolute): data, tokenizer, schedule,
    token budget (train.steps x global batch x seq_len), engine and resources shared by every family."""
    families: list[str]
    """Families to train, in order; known: full_attention, sliding_window, block_sparse, gated_deltanet,
    mamba2, moe, gdn_hybrid, mamba2_hybrid, moe_hybrid."""
    target_active_params: int
    """Active parameters per token (embeddings included) every family is sized to."""
    layers: int
    """Layers per model (a multiple of every chosen family's pattern unit: 2, or 8 for hybrids)."""
    contexts: list[int]
    """Context lengths of the throughput/memory sweep (forward+backward of each family's model)."""
    mode: Literal["cpu", "gpu"] = "cpu"
    """cpu: reference modules on CPU, no MFU; gpu: CUDA bf16 sweep and MFU. `--mode` overrides it."""
    tolerance: float = 0.10
    """Largest relative gap between a family's active parameters and the target."""
    max_context: int = 65536
    """Longest sweep context accepted (a family's model at this length must fit the machine)."""
    dim_multiple: int = DIM_STEP
    """Hidden sizes tried are multiples of this: 4 suits CPU; on GPUs 32 or 64 keeps every GEMM dimension on
    tensor-core tiles (a size off them, e.g. 1228, makes cuBLAS pick slower kernels and skews throughput)."""
    flavors: FlavorSpec = field(default_factory=FlavorSpec)
    """Registry flavors the families start from."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Model fields set on every family (e.g. window, sparse_block, num_experts, num_heads with head_dim);
    not the solved ones (pattern, num_layers, dim, ffn_dim)."""
    sweep: SweepSpec = field(default_factory=SweepSpec)
    """How the throughput sweep times each family."""
    claims: ClaimsSpec = field(default_factory=ClaimsSpec)
    """Thresholds the report uses to judge the survey's claims."""

    def validate(self, path: str) -> None:
        check(len(self.families) >= 1, "families", "got an empty list; name at least one family")
        seen: set[str] = set()
        for i, name in enumerate(self.families):
            check(name in FAMILIES, f"families[{i}]", f"got {name!r}; known: {', '.join(FAMILIES)}")
            check(name not in seen, f"families[{i}]", f"{name!r} is listed twice")
            seen.add(name)
        check(self.target_active_params >= 1, "target_active_params", f"got {self.target_active_params}; must be >= 1")
        check(0 < self.tolerance < 1, "tolerance", f"got {self.tolerance}; must be in (0, 1)")
        check(self.layers >= 1, "layers", f"got {self.layers}; must be >= 1")
        check(self.dim_multiple >= 1 and self.dim_multiple % DIM_STEP == 0, "dim_multiple",
              f"got {self.dim_multiple}; use a positive multiple of {DIM_STEP}")
        for name in self.families:
            unit = FAMILIES[name][0]
            check(self.layers % len(unit) == 0, "layers", f"got {self.layers}; family {name!r} repeats the "
                  f"{len(unit)}-layer unit {unit!r}, so layers must be a multiple of {len(unit)}")
        check(1 <= self.max_context <= 1 << 20, "max_context", f"got {self.max_context}; must be in [1, {1 << 20}]")
        check(len(self.contexts) >= 1, "contexts", "got an empty list; give at least one context length")
        for i, ctx in enumerate(self.contexts):
            check(1 <= ctx <= self.max_context, f"contexts[{i}]",
                  f"got {ctx}; must be in [1, max_context={self.max_context}]")
        check(list(self.contexts) == sorted(set(self.contexts)), "contexts",
              f"got {list(self.contexts)}; list distinct lengths in increasing order")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in self.overrides:
            check(key in known, f"overrides.{key}", f"unknown model field; fields: {', '.join(sorted(known))}")
            check(key not in SCALED_FIELDS, f"overrides.{key}",
                  f"set by the study per family ({', '.join(SCALED_FIELDS)} are solved); remove it")


@dataclass(frozen=True)
class FamilyPlan:
    """One family as it will train: its job spec and the solved model shape."""

    name: str
    spec: JobSpec
    cfg: ModelConfig
    total_params: int
    active_params: int


def _base_config(study: StudySpec, name: str, vocab_size: int) -> ModelConfig:
    unit, registry = FAMILIES[name]
    # the vocabulary the run will have (the worker sizes it to the tokenizer): it counts in the parameters
    cfg = get_config(registry, getattr(study.flavors, registry), vocab_size=vocab_size)
    if "E" in unit and not cfg.num_experts:  # an MoE hybrid takes its experts from the moe flavor
        experts = get_config("moe", study.flavors.moe)
        cfg = cfg.replace(**{k: getattr(experts, k) for k in EXPERT_FIELDS})
    try:
        return cfg.replace(**study.overrides, pattern=unit * (study.layers // len(unit)))
    except (ValueError, TypeError) as exc:
        raise ConfigError("overrides", f"family {name!r}: {exc}") from None


def _scaled(base: ModelConfig, dim: int) -> ModelConfig:
    r = dim / base.dim
    return base.replace(dim=dim, head_dim=base.attn_head_dim,
                        ffn_dim=max(FFN_STEP, round(base.ffn_dim * r / FFN_STEP) * FFN_STEP),
                        moe_ffn_dim=max(FFN_STEP, round(base.moe_ffn_dim * r / FFN_STEP) * FFN_STEP))


def solve_width(study: StudySpec, name: str, vocab_size: int) -> ModelConfig:
    """The family's config whose active parameters are closest to the target (refused past tolerance)."""
    base = _base_config(study, name, vocab_size)
    best, best_gap = None, float("inf")
    for dim in range(study.dim_multiple, DIM_MAX + 1, study.dim_multiple):
        cfg = _scaled(base, dim)
        gap = abs(param_counts(cfg)[1] - study.target_active_params)
        if gap < best_gap:
            best, best_gap = cfg, gap
        elif param_counts(cfg)[1] > study.target_active_params:
            break  # active parameters grow with dim: past the target nothing gets closer
    active = param_counts(best)[1]
    rel = best_gap / study.target_active_params
    check(rel <= study.tolerance, "target_active_params",
          f"family {name!r} ({best.pattern[:16]}, {study.layers} layers) cannot reach {study.target_active_params:,} "
          f"active parameters within tolerance {study.tolerance:.0%}: the closest width, dim={best.dim}, gives "
          f"{active:,} ({rel:.1%} off); change the target, `layers` or `tolerance`")
    return best


def check_contexts(study: StudySpec, base: JobSpec, name: str, cfg: ModelConfig) -> None:
    """Masks that would make a sparse family dense (or empty) at the training length are refused."""
    seq, kinds = base.train.seq_len, set(cfg.layer_pattern())
    if "W" in kinds:
        check(1 <= cfg.window < seq, "overrides.window", f"family {name!r}: window={cfg.window} with train.seq_len="
              f"{seq}; a window >= seq_len is full attention, so it must be in [1, {seq - 1}]")
    if "B" in kinds:
        reach = cfg.sparse_block * (cfg.sparse_local_blocks + cfg.sparse_global_blocks)
        check(reach < seq, "overrides.sparse_block",
              f"family {name!r}: sparse_block={cfg.sparse_block} x (local {cfg.sparse_local_blocks} + global "
              f"{cfg.sparse_global_blocks} blocks) = {reach} tokens >= train.seq_len={seq}: every query would see "
              "every key (dense attention); use a smaller block")


def load_study(path: str, mode: str | None = None) -> tuple[StudySpec, JobSpec, list[FamilyPlan]]:
    """Read and validate the study and its base job; solve every family's shape. Nothing is written."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f.read(), path)
    except FileNotFoundError:
        raise ConfigError("", f"study config not found: {path}") from None
    if mode is not None and isinstance(raw, dict):
        raw = {**raw, "mode": mode}
    study = build(StudySpec, raw)
    base_path = study.base if os.path.isabs(study.base) else os.path.join(os.path.dirname(path), study.base)
    try:
        base = load_spec(base_path)
    except ConfigError as exc:
        raise ConfigError(f"base ({base_path}): {exc.path}" if exc.path else "base", exc.message) from None
    check(base.resources.use_gpu == (study.mode == "gpu"), "mode",
          f"got {study.mode!r} but the base job has resources.use_gpu={str(base.resources.use_gpu).lower()}; "
          "a gpu study needs a GPU base job and a cpu study a CPU one")
    check(not base.model.overrides.get("pattern"), "base",
          f"{base_path} sets model.overrides.pattern; the study sets each family's pattern, remove it")
    from ..data_pipeline import get_tokenizer

    vocab = base.model.overrides.get("vocab_size") or get_tokenizer(base.data.tokenizer).vocab_size
    plans = []
    for name in study.families:
        cfg = solve_width(study, name, vocab)
        check_contexts(study, base, name, cfg)
        unit, registry = FAMILIES[name]
        overrides = {**study.overrides, "vocab_size": cfg.vocab_size,
                     **{k: getattr(cfg, k) for k in SOLVED_FIELDS if k != "num_layers"}}
        if "E" in unit:
            overrides.update({k: getattr(cfg, k) for k in EXPERT_FIELDS})
        model = dataclasses.replace(base.model, family=registry, flavor=getattr(study.flavors, registry),
                                    overrides=overrides)
        spec = dataclasses.replace(base, name=name, model=model)
        try:  # what the family's run would refuse at submit (the engine's gaps too), refused before any trains
            validate_job(spec, runnable=True)
        except ConfigError as exc:
            raise ConfigError(f"families[{study.families.index(name)}]",
                              f"{name!r} as engine {spec.engine} would run it: {exc}") from None
        total, active = param_counts(cfg)
        plans.append(FamilyPlan(name, spec, cfg, total, active))
    return study, base, plans


def study_fingerprint(study: StudySpec, base: JobSpec, plans: list[FamilyPlan]) -> str:
    """What makes two studies' families the same runs (not the output place): the configs and every
    family's solved model. The sweep and claims settings are left out: they change how trained families are
    timed and judged, not what they trained (a changed sweep is re-measured, see study._sweep)."""
    trained = {k: v for k, v in to_dict(study).items() if k not in ("sweep", "claims")}
    record = {"study": trained, "base": {**base.to_dict(), "checkpoint": None, "name": None},
              "models": {p.name: to_dict(p.spec.model) for p in plans}}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
