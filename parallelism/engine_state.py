"""The canonical layout-independent engine state: the one form every engine's checkpoint loads from.

Sections (all tensors full, fp32, on the host):
- `params`, `exp_avg`, `exp_avg_sq`: every reference parameter and its Adam moments under the reference
  model's names and shapes, MoE experts stacked `[E, ...]` (models.Transformer.state_dict()).
- `buffers`: the routing biases that training moves (`routing_bias_names`), reference names.
- `meta`: `optimizer_step` (Adam's step count), `has_moments`, `steps_done` (optimizer steps taken: the
  learning-rate schedule's position), `engine` (which engine wrote it); an engine may add its own extras.

Engines write it in parts: deepspeed's expert-parallel ranks write their experts one by one (`name#e`), so
the stacking happens when the writers' shards are merged. Checkpoints written before this form count steps
in deepspeed's own counters (`scheduler_last_epoch` / `global_steps` / `global_samples`) and keep every
module buffer; `canonical` converts those. Because both engines load only this form (their `load` calls
`canonical` first, which is idempotent), a checkpoint of one engine resumes the other on the same model.
"""

from __future__ import annotations

import re

import torch

from .checkpoint import merge_shards

MOMENTS = ("exp_avg", "exp_avg_sq")
TENSOR_SECTIONS = ("params", *MOMENTS)
_STACKED = re.compile(r"\.mixer\.(w_gate|w_up|w_down)$")  # MoE experts; dense SwiGLU names end in .weight


def expert_key(name: str, expert: int | None) -> str:
    """The key of one expert of a stacked tensor (`name#e`), or `name` itself for a non-expert tensor."""
    return name if expert is None else f"{name}#{expert}"


def split_experts(state: dict) -> dict:
    """Stacked experts ([experts, ...] `mixer.w_gate`) -> experts one by one (`name#e`); others unchanged."""
    out = {}
    for name, value in state.items():
        if _STACKED.search(name):
            out.update({expert_key(name, e): v for e, v in enumerate(value.unbind(0))})
        else:
            out[name] = value
    return out


def join_experts(state: dict) -> dict:
    """Inverse of `split_experts`: experts one by one (`name#e`) -> stacked [experts, ...] tensors."""
    out, experts = {}, {}
    for key, value in state.items():
        name, sep, expert = key.partition("#")
        if sep:
            experts.setdefault(name, {})[int(expert)] = value
        else:
            out[key] = value
    for name, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise ValueError(f"checkpoint tensor {name}: experts {sorted(per_expert)} are not 0..{len(per_expert) - 1} "
                             "(a writer's shard is missing)")
        out[name] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def routing_bias_names(cfg) -> list[str]:
    """Reference names of the routing biases that are state: those of sigmoid routers (megatron-core keeps
    one for each) and of any router whose bias is updated (bias_update_rate > 0). Other routers' biases stay
    at their initial zeros, so leaving them out loses nothing."""
    if not cfg.num_experts or (cfg.router != "sigmoid" and cfg.bias_update_rate <= 0):
        return []
    return [f"layers.{i}.mixer.router.expert_bias" for i, kind in enumerate(cfg.layer_pattern()) if kind == "E"]


def _meta(meta: dict) -> dict:
    """`meta` with `steps_done`, from deepspeed's counters in checkpoints that predate it."""
    if "steps_done" in meta:
        return dict(meta)
    if "global_steps" not in meta:
        raise ValueError(f"checkpoint meta has no step count (steps_done or global_steps): keys {sorted(meta)}")
    if meta.get("scheduler_last_epoch", meta["global_steps"]) != meta["global_steps"]:
        raise ValueError(f"checkpoint meta: scheduler_last_epoch {meta['scheduler_last_epoch']} != global_steps "
                         f"{meta['global_steps']}; the learning-rate position is ambiguous")
    out = {k: v for k, v in meta.items() if k not in ("scheduler_last_epoch", "global_steps")}
    return {**out, "engine": meta.get("engine", "deepspeed"), "steps_done": int(meta["global_steps"])}


def canonical(state: dict, cfg) -> dict:
    """Any engine's merged state (this or an older form) in the canonical form for model config `cfg`."""
    out = {s: join_experts(state[s]) for s in TENSOR_SECTIONS if s in state}
    buffers = state.get("buffers", {})
    out["buffers"] = {name: buffers[name] for name in routing_bias_names(cfg) if name in buffers}
    if "meta" not in state:
        raise ValueError("checkpoint state has no 'meta' section (step counts): no writer's shard holds one")
    out["meta"] = _meta(state["meta"])
    return out


def merge_state(shards: list[dict], cfg) -> dict:
    """The writers' shards of one checkpoint joined into the canonical form."""
    return canonical(merge_shards(shards), cfg)
