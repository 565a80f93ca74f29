"""ParallelLayout: which rank holds which shard, as one immutable, validated object.

Rank order (Megatron-core's default `tp-cp-ep-dp-pp`, first = fastest varying):

- dense mesh (attention, dense MLP, embeddings): `tp-cp-dp-pp`,
  rank = tp + TP * (cp + CP * (dp + DP * pp));
- expert mesh (routed experts): the tp*cp*dp ranks of one pipeline stage are re-folded as `etp-ep-edp`,
  rank = etp + ETP * (ep + EP * (edp + EDP * pp)), with EDP = TP*CP*DP / (ETP*EP).

Both meshes share the pipeline dimension, so a pipeline stage is the same block of ranks in each. DeepSpeed
(tp = cp = pp = 1) folds EP over DP the same way: its expert-parallel groups are blocks of `ep` consecutive
ranks and its expert-data-parallel groups are strided by `ep`. Workers are placed on nodes in rank order
(node = rank // workers_per_node, as Ray Train groups a node's workers), so a group of consecutive ranks
aligned to its size stays inside a node: TP always must, EP should where it fits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..typed import ConfigError, check
from .layout_rules import check_engine, check_model, derive_dp, resolve_model_config

if TYPE_CHECKING:
    from ..config.spec import JobSpec

ATTENTION_KINDS = "*WB"
"""Layer-pattern characters of attention layers (causal, sliding-window, block-sparse)."""
LINEAR_KINDS = "GM"
"""Layer-pattern characters of linear-sequence layers (Gated DeltaNet, Mamba2)."""

GROUP_KINDS = ("tp", "cp", "dp", "pp", "dp_cp", "ep", "etp", "edp")
"""Group kinds `ParallelLayout.groups` knows; `dp_cp` is the gradient all-reduce group when cp > 1."""


@dataclass(frozen=True)
class ModelFacts:
    """What the layout rules need to know about a model (nothing engine-specific)."""

    num_layers: int
    """Pipeline-splittable layers: blocks of a plain model, or one per character of a hybrid pattern."""
    num_heads: int
    """Attention query heads (split by tp)."""
    num_kv_heads: int
    """Attention key/value heads (split by tp)."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0 for a dense model (or a pattern without `E` layers)."""
    pattern: str | None = None
    """Hybrid layer pattern (`*` attention, `G`/`M` linear, `-` MLP, `E` MoE, `|` stage boundary)."""
    linear_heads: int = 0
    """Heads of linear-sequence layers (`G`, `M`; split by tp); 0 when the model has none."""
    has_attention: bool = True
    """Whether any layer is attention (otherwise the head rules do not apply)."""

    def stage_boundaries(self) -> int | None:
        """Stages the pattern marks with `|`, or None when it marks none."""
        if self.pattern and "|" in self.pattern:
            return self.pattern.count("|") + 1
        return None


@dataclass(frozen=True)
class ParallelLayout:
    """A validated parallel layout. Construct with `from_spec` (all rules) or directly (arithmetic only)."""

    world_size: int
    """Training processes in total (= tp * cp * dp * pp)."""
    tp: int = 1
    """Tensor-parallel degree (attention and dense MLP weights split across these ranks)."""
    pp: int = 1
    """Pipeline stages."""
    cp: int = 1
    """Context-parallel degree (the sequence split across these ranks)."""
    dp: int = 1
    """Data-parallel degree of the dense mesh."""
    vpp: int = 1
    """Virtual pipeline chunks per stage (interleaved schedule when > 1)."""
    ep: int = 1
    """Expert-parallel degree (routed experts split across these ranks; folded over tp*cp*dp)."""
    etp: int = 1
    """Expert tensor-parallel degree (each expert's weights split across these ranks)."""
    zero_stage: int = 0
    """Sharding over data parallel: 1 = optimizer state, 2 = + gradients, 3 = + parameters."""
    workers_per_node: int = 0
    """Workers on each node (0: all on one node)."""
    micro_batch_size: int = 1
    """Samples per rank per forward/backward."""
    global_batch_size: int = 0
    """Samples per optimizer step (0: micro_batch_size * dp, i.e. no gradient accumulation)."""

    def __post_init__(self) -> None:
        if self.workers_per_node == 0:
            object.__setattr__(self, "workers_per_node", self.world_size)
        if self.global_batch_size == 0:
            object.__setattr__(self, "global_batch_size", self.micro_batch_size * self.dp)
        for name in ("world_size", "tp", "pp", "cp", "dp", "vpp", "ep", "etp", "workers_per_node",
                     "micro_batch_size", "global_batch_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, _field(name), f"got {value!r}; must be an integer >= 1")
        check(self.zero_stage in (0, 1, 2, 3), "layout.zero_stage", f"got {self.zero_stage!r}; allowed 0-3")
        base = self.tp * self.pp * self.cp
        fix = (f"set dp: {self.world_size // base} (or null to derive it)" if self.world_size % base == 0
               else f"make resources.workers a multiple of tp*pp*cp = {base}")
        check(base * self.dp == self.world_size, "layout.dp",
              f"got dp={self.dp}: tp*pp*cp*dp = {self.tp}*{self.pp}*{self.cp}*{self.dp} = {base * self.dp} but "
              f"the world has {self.world_size} workers; {fix}")
        check(self.world_size % self.workers_per_node == 0, "resources.nodes",
              f"got {self.workers_per_node} workers per node; must divide the {self.world_size} workers")
        folded = self.tp * self.cp * self.dp
        check(folded % (self.ep * self.etp) == 0, "layout.ep",
              f"got ep={self.ep} (etp={self.etp}); ep*etp must divide tp*cp*dp = {folded} (experts borrow those ranks, "
              f"Megatron's folding); allowed ep with etp={self.etp}: {_divisors(folded // self.etp)}")
        check(self.vpp == 1 or self.pp >= 2, "layout.vpp",
              f"got vpp={self.vpp} with pp={self.pp}; the interleaved schedule needs pp >= 2 (or set vpp: 1)")
        per_step = self.micro_batch_size * self.dp
        check(self.global_batch_size % per_step == 0, "train.global_batch_size",
              f"got {self.global_batch_size}; must equal micro_batch_size * grad_accum * dp = "
              f"{self.micro_batch_size} * grad_accum * {self.dp} with an integer grad_accum >= 1: "
              f"use a multiple of {per_step}, e.g. {_near_multiples(self.global_batch_size, per_step)}")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def grad_accum(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: replicas of each expert shard."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.workers_per_node

    # ---- rank <-> coordinates ------------------------------------------------------------------------
    def _dense_sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}

    def _expert_sizes(self) -> dict[str, int]:
        return {"etp": self.etp, "ep": self.ep, "edp": self.edp, "pp": self.pp}

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of `rank`: dense mesh (tp, cp, dp, pp) and expert mesh (etp, ep, edp)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        out = _unravel(rank, self._dense_sizes())
        expert = _unravel(rank, self._expert_sizes())
        out.update(etp=expert["etp"], ep=expert["ep"], edp=expert["edp"])
        return out

    def rank_of(self, *, pp: int = 0, dp: int = 0, tp: int = 0, cp: int = 0, ep: int | None = None,
                etp: int | None = None, edp: int | None = None) -> int:
        """Rank at dense-mesh coordinates; expert coordinates, if given, must name the same rank.
        `rank_of(**layout.coords(r)) == r` for every rank."""
        rank = _ravel({"tp": tp, "cp": cp, "dp": dp, "pp": pp}, self._dense_sizes())
        if (ep, etp, edp) != (None, None, None):
            expert = {"etp": etp or 0, "ep": ep or 0, "edp": edp or 0, "pp": pp}
            other = _ravel(expert, self._expert_sizes())
            if other != rank:
                raise ValueError(f"dense coordinates give rank {rank} but expert coordinates give {other}")
        return rank

    def groups(self, kind: str) -> list[list[int]]:
        """Process groups of `kind` (see GROUP_KINDS); each a sorted rank list, together a partition."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; known: {', '.join(GROUP_KINDS)}")
        if kind in ("ep", "etp", "edp"):
            return _mesh_groups(self._expert_sizes(), (kind,))
        dims = ("dp", "cp") if kind == "dp_cp" else (kind,)
        return _mesh_groups(self._dense_sizes(), dims)

    # ---- placement -----------------------------------------------------------------------------------
    def node_of(self, rank: int, workers_per_node: int | None = None) -> int:
        """Node that holds `rank` when workers are placed in rank order."""
        return rank // (workers_per_node or self.workers_per_node)

    def _inside_nodes(self, groups: list[list[int]]) -> bool:
        return all(len({self.node_of(r) for r in g}) == 1 for g in groups)

    @property
    def ep_node_local(self) -> bool:
        """Whether every expert-parallel group sits inside one node (its all-to-all stays on NVLink)."""
        return self._inside_nodes(self.groups("ep"))

    def node_local_groups(self) -> list[list[int]]:
        """Groups the launcher must keep inside one node: TP and expert-TP always, EP where it fits."""
        out: list[list[int]] = []
        for kind, size in (("tp", self.tp), ("etp", self.etp)):
            if size > 1:
                out.extend(self.groups(kind))
        if self.ep > 1 and self.ep_node_local:
            out.extend(self.groups("ep"))
        return out

    # ---- records -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParallelLayout":
        """Inverse of `to_dict` (e.g. from a checkpoint manifest); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ParallelLayout field(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def describe(self) -> str:
        return (f"tp={self.tp} pp={self.pp} vpp={self.vpp} cp={self.cp} dp={self.dp} ep={self.ep} "
                f"etp={self.etp} edp={self.edp} zero={self.zero_stage} world={self.world_size} "
                f"nodes={self.num_nodes}x{self.workers_per_node} grad_accum={self.grad_accum}")

    @classmethod
    def from_spec(cls, spec: "JobSpec", model_facts: ModelFacts) -> "ParallelLayout":
        """Derive and validate the layout of `spec` for a model: every rule, errors name the field."""
        lay, res, train = spec.layout, spec.resources, spec.train
        check_engine(spec)  # engine refusals first: they explain the layout fields best
        layout = cls(world_size=res.workers, tp=lay.tp, pp=lay.pp, cp=lay.cp, dp=derive_dp(spec),
                     vpp=lay.vpp, ep=lay.ep, etp=lay.etp, zero_stage=lay.zero_stage,
                     workers_per_node=res.workers // res.nodes, micro_batch_size=train.micro_batch_size,
                     global_batch_size=train.global_batch_size)
        check_model(spec, layout, model_facts)
        return layout


def _field(name: str) -> str:
    if name in ("micro_batch_size", "global_batch_size"):
        return f"train.{name}"
    if name == "world_size":
        return "resources.workers"
    if name == "workers_per_node":
        return "resources.nodes"
    return f"layout.{name}"


def _near_multiples(value: int, step: int) -> str:
    below = value // step * step
    return f"{below} or {below + step}" if below else str(step)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _unravel(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, size in sizes.items():
        out[name] = rank % size
        rank //= size
    return out


def _ravel(coords: dict[str, int], sizes: dict[str, int]) -> int:
    rank, stride = 0, 1
    for name, size in sizes.items():
        value = coords[name]
        if not 0 <= value < size:
            raise ValueError(f"coordinate {name}={value} outside 0..{size - 1}")
        rank += value * stride
        stride *= size
    return rank


def _mesh_groups(sizes: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """Ranks that differ only along `dims` form one group."""
    world = math.prod(sizes.values())
    groups: dict[tuple, list[int]] = {}
    for rank in range(world):
        c = _unravel(rank, sizes)
        key = tuple(v for k, v in c.items() if k not in dims)
        groups.setdefault(key, []).append(rank)
    return sorted(groups.values())


def model_facts_from_config(cfg: Any) -> ModelFacts:
    """ModelFacts of a `raytron.models` config (fields num_layers, num_heads, num_kv_heads, num_experts,
    pattern; `layer_pattern()` gives one character per layer)."""
    pattern = getattr(cfg, "pattern", "") or None
    layers = cfg.layer_pattern() if hasattr(cfg, "layer_pattern") else (pattern or "").replace("|", "")
    has_moe = "E" in layers if layers else cfg.num_experts > 0
    has_linear = any(c in layers for c in LINEAR_KINDS)
    return ModelFacts(
        num_layers=len(layers) if pattern else cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        num_experts=cfg.num_experts if has_moe else 0, pattern=pattern,
        linear_heads=getattr(cfg, "linear_heads", 0) if has_linear else 0,
        has_attention=any(c in layers for c in ATTENTION_KINDS) if layers else True)


def model_config_from_spec(spec: "JobSpec") -> Any:
    """The registry's model config for `spec.model` (imports raytron.models lazily)."""
    return resolve_model_config(spec)


def model_facts_from_spec(spec: "JobSpec") -> ModelFacts:
    """ModelFacts of the model `spec` names, from the registry (ConfigError naming model.* if unknown)."""
    return model_facts_from_config(model_config_from_spec(spec))


__all__ = ["ParallelLayout", "ModelFacts", "GROUP_KINDS", "ConfigError", "model_facts_from_spec",
           "model_facts_from_config", "model_config_from_spec"]
