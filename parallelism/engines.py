"""The engine interface and the registry of engines: the one place an engine is looked up by its name.

An engine trains the reference model (models/) under a ParallelLayout on one rank. Each engine lives in a
subpackage of its own (parallelism/deepspeed/, parallelism/megatron/) with two parts:
- `support.py`, an `EngineSupport`: what the engine can run, without importing its framework. Its
  `options` table lists the job fields the engine has a say on (and the values the support matrix tries);
  `check_layout` / `check_model` refuse unsound layouts (ConfigError, `plan` exits 2); `gaps` lists what a
  sound job asks that the engine cannot run (`plan` prints them, `submit` and the engine itself refuse).
  It builds the engine (`build`) and says how its state is checkpointed (`state_ops`).
- `engine.py`, an `Engine`: train step, eval, reference-named weights in and out.
Nothing outside this module and the engine subpackages compares an engine's name: ask `get_engine(name)`.
"""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TYPE_CHECKING

from ..typed import ConfigError

Gap = tuple[str, str]
"""(dotted job field, why the engine cannot run it)."""


@dataclass
class StepMetrics:
    loss: float  # mean language-model loss over the global batch
    aux_loss: float  # mean MoE load-balancing loss (0 without MoE)
    grad_norm: float
    lr: float
    tokens: int  # tokens in the global batch
    expert_load: list[float] | None = None  # fraction of assignments per expert, summed over MoE layers
    router_entropy: float | None = None  # mean over MoE layers and tokens of the routing distribution's entropy
    z_loss: float = 0.0  # mean router z-loss (summed over MoE layers; unweighted)
    expert_bias: list[list[float]] | None = None  # aux-loss-free routing bias per MoE layer (sigmoid routers)

    @property
    def load_max_over_mean(self) -> float | None:
        """Busiest expert's share of the (layer-summed) load over the mean share; 1.0 is perfectly even."""
        if not self.expert_load:
            return None
        return max(self.expert_load) * len(self.expert_load) / max(sum(self.expert_load), 1e-30)


@dataclass(frozen=True)
class StateOps:
    """How an engine's layout-independent state (reference names, full tensors) is saved and loaded. A save
    is `snapshot` (blocking, collective over the default group) then `assemble` (collective over the group
    it is given; may run on a background thread); `merge` joins the ranks' shards, `load` loads them."""

    snapshot: Callable
    assemble: Callable
    load: Callable
    merge: Callable

    def gather(self, engine, group=None) -> tuple[dict, bool]:
        return self.assemble(engine, self.snapshot(engine), group)

if TYPE_CHECKING:
    import torch


def paired_document_ids(micro_batches: list[torch.Tensor], document_ids: list[torch.Tensor] | None) -> list:
    """One document-id tensor (or None) per micro-batch: the engines' `document_ids` argument (the packed
    documents of data.reset_at_documents, data_pipeline's micro_batch_document_ids) checked against the
    micro-batches it must match token for token."""
    if document_ids is None:
        return [None] * len(micro_batches)
    if len(document_ids) != len(micro_batches):
        raise ValueError(f"document_ids: got {len(document_ids)} tensors for {len(micro_batches)} micro-batches; "
                         "pass one per micro-batch (data_pipeline's micro_batch_document_ids) or None")
    for i, (batch, ids) in enumerate(zip(micro_batches, document_ids)):
        if tuple(ids.shape) != tuple(batch.shape):
            raise ValueError(f"document_ids[{i}]: shape {tuple(ids.shape)}, its micro-batch is {tuple(batch.shape)}; "
                             "they must match token for token")
    return list(document_ids)


class Engine(ABC):
    """One rank's engine, built by `EngineSupport.build(spec, layout, rank, world)`. Attributes every
    engine sets: spec, layout, rank, world, model_cfg, and `before_optimizer_step` (None, or a callback
    run with the local loss sum at the gradient-accumulation boundary, before the update)."""

    @abstractmethod
    def train_step(self, micro_batches: list, document_ids: list | None = None) -> StepMetrics:
        """One optimizer step over this rank's micro-batches ([mbs, seq+1] each, len == grad_accum);
        `document_ids` (one per micro-batch, or None) keeps packed documents apart (data.reset_at_documents)."""

    @abstractmethod
    def eval_loss(self, micro_batches: list, document_ids: list | None = None) -> float:
        """Mean LM loss over this rank's held-out micro-batches, averaged over all ranks."""

    @abstractmethod
    def after_step(self) -> None:
        """Work outside autograd after each optimizer step (routing-bias updates)."""

    @abstractmethod
    def load_reference(self, ref_sd: dict) -> None:
        """Load a reference state dict (models.Transformer.state_dict() names and shapes)."""

    @abstractmethod
    def export_reference(self) -> dict:
        """The full reference state dict on every rank (collective; for tests and init/export at small scale)."""


@dataclass(frozen=True)
class MemoryFacts:
    """What the memory estimate (parallelism/memory.py, estimate.py) needs to know of an engine."""

    cpu_master_copy_with_zero: bool
    """On CPU (fp32), ZeRO stages >= 1 keep an fp32 flat copy of the weights beside them."""
    recompute_unit: str
    """What train.recompute=full rebuilds at once, in words."""
    recompute_unit_layers: int
    """Reference layers per recomputed unit."""
    selective_keeps_mixer_inputs: bool
    """train.recompute=selective keeps a mixer's core inputs (True) or only its pre-norm's (False)."""
    zero1_note: str = ""
    """How zero_stage 1 is done, for the printed assumptions."""


class EngineSupport(ABC):
    """What one engine runs, read by `plan`, `submit` and the support matrix; see the module docstring."""

    name: ClassVar[str]
    needs_gpu: ClassVar[bool]
    engine_class: ClassVar[str]  # "module:Class", imported only when an engine is built
    options: ClassVar[dict[str, tuple]]  # job field -> values the support matrix tries (accepted or not)
    memory: ClassVar[MemoryFacts]

    def check_layout(self, spec: Any) -> None:
        """Layout fields this engine cannot take at all, refused (ConfigError) before any arithmetic."""

    def check_model(self, spec: Any, layout: Any, facts: Any) -> None:
        """Layout rules of this engine that need the model's shape (ConfigError)."""

    @abstractmethod
    def gaps(self, spec: Any, cfg: Any, layout: Any) -> list[Gap]:
        """(field, reason) for each part of a valid job this engine cannot run."""

    @abstractmethod
    def state_ops(self) -> StateOps:
        """How this engine's checkpoint state is saved and loaded."""

    def reshard_notes(self, old: dict, new: dict) -> list[str]:
        """What loading a checkpoint of layout `old` under layout `new` (ParallelLayout dicts) re-cuts
        beyond experts, ZeRO partitions and the batch (launcher/resume_plan.py says those)."""
        dims = [k for k in ("tp", "pp", "vpp", "cp", "etp") if old.get(k, 1) != new.get(k, 1)]
        if not dims:
            return []
        moved = ", ".join(f"{k} {old.get(k, 1)} -> {new.get(k, 1)}" for k in dims)
        return [f"{moved}: every shard is cut anew from the checkpoint's full reference-named tensors"]

    def build(self, spec: Any, layout: Any, rank: int, world: int) -> Engine:
        module, _, cls = self.engine_class.partition(":")
        return getattr(importlib.import_module(module), cls)(spec, layout, rank, world)


_REGISTRY: dict[str, str] = {
    "deepspeed": "raytron.parallelism.deepspeed.support:DeepSpeedSupport",
    "megatron": "raytron.parallelism.megatron.support:MegatronSupport",
}


def engine_names() -> tuple[str, ...]:
    """Every registered engine, in registration order."""
    return tuple(_REGISTRY)


@functools.cache
def get_engine(name: str) -> EngineSupport:
    """The EngineSupport of engine `name`; a ConfigError on field `engine` names the registered ones."""
    if name not in _REGISTRY:
        raise ConfigError("engine", f"got {name!r}; engines of this build: {', '.join(_REGISTRY)}")
    module, _, cls = _REGISTRY[name].partition(":")
    support = getattr(importlib.import_module(module), cls)()
    if support.name != name:
        raise RuntimeError(f"engine registry: {_REGISTRY[name]} says its name is {support.name!r}, not {name!r}")
    return support


def engine_of(engine: Any) -> EngineSupport:
    """The EngineSupport of a built engine (by the job it was built for)."""
    return get_engine(engine.spec.engine)
