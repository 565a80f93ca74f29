"""Layout-independent checkpoint state of the deepspeed engine.

Saved: every parameter's full fp32 master value and full Adam moments (`exp_avg`, `exp_avg_sq`), named
as in the *reference* model (experts as `<layer>.mixer.w_gate#<global expert>`), plus the optimizer step,
scheduler position and router buffers. Because nothing is stored in ZeRO's flat-partition form, the
same checkpoint loads under any DP size, ZeRO stage 1/2 and EP degree: each rank picks the experts it
holds and ZeRO re-partitions (an online reshard, no offline conversion).

Writers: rank 0 writes the non-expert tensors; the ranks of the first expert-data-parallel replica
(ranks 0..ep-1) each write their local experts. Gathering full tensors uses DeepSpeed's
`safe_get_full_*` (collectives over the data-parallel group), so every rank calls them in the same order.
"""

from __future__ import annotations

import re

import torch

from .checkpoint import merge_shards  # noqa: F401 - part of the engine-state contract
from .deepspeed_moe import reference_name

MOMENTS = ("exp_avg", "exp_avg_sq")
_STACKED = re.compile(r"\.mixer\.(w_gate|w_up|w_down)$")  # MoE experts; dense SwiGLU names end in .weight


def _key(name: str, expert: int | None) -> str:
    return name if expert is None else f"{name}#{expert}"


def gather_state(engine) -> tuple[dict, bool]:
    """This rank's part of the checkpoint in reference names, and whether this rank should write it.
    Collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    num_local = engine.model_cfg.num_experts // engine.ep_size if engine.num_moe_layers else 1
    is_first_replica = engine.rank < engine.ep_size
    has_moments = _optimizer_initialized(engine)
    if has_moments:  # DeepSpeed links per-parameter views of the Adam moments lazily
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    tensors: dict[str, dict[str, torch.Tensor]] = {"params": {}, **{m: {} for m in MOMENTS}}
    for ds_name, p in engine.module.named_parameters():
        ref, expert = reference_name(ds_name, engine.ep_rank, num_local)
        full = safe_get_full_fp32_param(p)
        value = full if full is not None else p.detach().float()
        moments = {m: safe_get_full_optimizer_state(p, m) for m in MOMENTS} if has_moments else {}
        mine = engine.rank == 0 if expert is None else is_first_replica
        if mine:
            tensors["params"][_key(ref, expert)] = value.detach().cpu().clone()
            for m, v in moments.items():
                tensors[m][_key(ref, expert)] = v.detach().cpu().clone()
    if engine.rank == 0:
        tensors["buffers"] = {n: b.detach().cpu().clone() for n, b in engine.module.named_buffers()}
        tensors["meta"] = {"optimizer_step": _optimizer_step(engine), "has_moments": has_moments,
                           "scheduler_last_epoch": engine.scheduler.last_epoch,
                           "global_steps": engine.engine.global_steps,
                           "global_samples": engine.engine.global_samples}
    return tensors, engine.rank == 0 or (is_first_replica and engine.num_moe_layers > 0)


def _optimizer_initialized(engine) -> bool:
    return any(len(s) for s in engine.optimizer.optimizer.state.values())


def _optimizer_step(engine) -> int:
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


@torch.no_grad()
def load_state(engine, state: dict) -> None:
    """Load a merged reference-named state into this rank's engine (any DP/EP layout)."""
    meta = state["meta"]
    if meta["has_moments"]:
        _init_optimizer_state(engine, meta["optimizer_step"])
    load_params(engine, state["params"], {m: state[m] for m in MOMENTS} if meta["has_moments"] else None)
    for name, buf in engine.module.named_buffers():
        if name in state.get("buffers", {}):
            buf.copy_(state["buffers"][name])
    engine.scheduler.last_epoch = meta["scheduler_last_epoch"]
    engine.scheduler._last_lr = [g["lr"] for g in engine.optimizer.param_groups]
    for group in engine.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * engine.scheduler.lr_lambdas[0](engine.scheduler.last_epoch)
    engine.scheduler._last_lr = [g["lr"] for g in engine.optimizer.param_groups]
    engine.engine.global_steps = meta["global_steps"]
    engine.engine.global_samples = meta["global_samples"]


@torch.no_grad()
def load_params(engine, params: dict, moments: dict | None = None) -> None:
    """Full fp32 parameters in reference names (experts one by one, `name#e`) into this rank's model
    and ZeRO's fp32 partitions; Adam moments too when given."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    num_local = engine.model_cfg.num_experts // engine.ep_size if engine.num_moe_layers else 1
    missing = []
    for ds_name, p in engine.module.named_parameters():
        ref, expert = reference_name(ds_name, engine.ep_rank, num_local)
        key = _key(ref, expert)
        if key not in params:
            missing.append(key)
            continue
        value = params[key].to(p.device)
        if value.shape != p.shape:
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model has {tuple(p.shape)}")
        p.data.copy_(value.to(p.dtype))
        safe_set_full_fp32_param(p, value)
        for m, values in (moments or {}).items():
            safe_set_full_optimizer_state(p, values[key].to(p.device), m)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")


def split_experts(ref_state: dict) -> dict:
    """A reference state dict with stacked experts ([experts, ...] `mixer.w_gate`) -> experts one by one."""
    out = {}
    for name, value in ref_state.items():
        if _STACKED.search(name):
            out.update({_key(name, e): v for e, v in enumerate(value.unbind(0))})
        else:
            out[name] = value
    return out


def _init_optimizer_state(engine, step: int) -> None:
    """Create Adam state for ZeRO's flat fp32 partitions (torch creates it lazily at the first step)
    and link DeepSpeed's per-parameter views to it, so full moments can be written into it."""
    zero = engine.optimizer
    for group in zero.optimizer.param_groups:
        for flat in group["params"]:
            zero.optimizer.state[flat] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
            }
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
