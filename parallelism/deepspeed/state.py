"""Layout-independent checkpoint state of the deepspeed engine.

Saved: every parameter's full fp32 master value and full Adam moments (`exp_avg`, `exp_avg_sq`), named
as in the *reference* model (experts as `<layer>.mixer.w_gate#<global expert>`, stacked when the shards are
merged), plus the optimizer step, the steps done and the routing biases: the canonical state of
parallelism/engine_state.py, which `load_state` takes from either engine. Because nothing is stored in
ZeRO's flat-partition form, the same checkpoint loads under any DP size, ZeRO stage 0-3, precision and EP
degree: each rank picks the experts it holds and ZeRO re-partitions (an online reshard, no offline conversion).

Where the fp32 master lives depends on the stage: ZeRO-0 in fp32 has none besides the parameter itself
and torch's own per-parameter Adam state; ZeRO-1/2 (and DeepSpeed's bf16 optimizer) link per-parameter
views into flat partitions (`_hp_mapping`); ZeRO-3 partitions the parameters themselves. DeepSpeed's
`safe_get_full_*` / `safe_set_full_*` cover the last two; all three are handled here.

Writers: rank 0 writes the non-expert tensors; the ranks of the first expert-data-parallel replica
(ranks 0..ep-1) each write their local experts. Gathering full tensors under ZeRO is collective over the
data-parallel group, so every rank calls it for every parameter in the same order.
"""

from __future__ import annotations

import torch

from ... import models
from ..checkpoint import merge_shards  # noqa: F401 - part of the engine-state contract
from ..engine_state import MOMENTS, canonical, join_experts, routing_bias_names, split_experts
from ..engine_state import expert_key as _key
from .moe import reference_name


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW holding the Adam state: wrapped by ZeRO/bf16 optimizers, bare under ZeRO-0 fp32."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _link_views(engine) -> None:
    """ZeRO-1/2 and bf16 link per-parameter views of the Adam moments lazily; ZeRO-3 needs no link."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _full_param(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return full if full is not None else p.detach().float()  # ZeRO-0 fp32: the parameter is the master


def _full_moment(engine, p: torch.nn.Parameter, moment: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    full = safe_get_full_optimizer_state(p, moment)
    return full if full is not None else _torch_optimizer(engine).state[p][moment]


def gather_state(engine) -> tuple[dict, bool]:
    """This rank's part of the checkpoint in reference names, and whether this rank should write it.
    Collective: every rank must call it."""
    num_local = engine.model_cfg.num_experts // engine.ep_size if engine.num_moe_layers else 1
    is_first_replica = engine.rank < engine.ep_size
    has_moments = _optimizer_initialized(engine)
    if has_moments:
        _link_views(engine)
    tensors: dict[str, dict[str, torch.Tensor]] = {"params": {}, **{m: {} for m in MOMENTS}}
    for ds_name, p in engine.module.named_parameters():
        ref, expert = reference_name(ds_name, engine.ep_rank, num_local)
        value = _full_param(p)
        moments = {m: _full_moment(engine, p, m) for m in MOMENTS} if has_moments else {}
        if engine.rank == 0 if expert is None else is_first_replica:
            tensors["params"][_key(ref, expert)] = value.detach().cpu().clone()
            for m, v in moments.items():
                tensors[m][_key(ref, expert)] = v.detach().cpu().clone()
    if engine.rank == 0:
        buffers = dict(engine.module.named_buffers())
        tensors["buffers"] = {n: buffers[n].detach().float().cpu().clone()
                              for n in routing_bias_names(engine.model_cfg)}
        tensors["meta"] = {"engine": "deepspeed", "optimizer_step": _optimizer_step(engine),
                           "has_moments": has_moments, "steps_done": engine.scheduler.last_epoch,
                           "global_samples": engine.engine.global_samples}
    return tensors, engine.rank == 0 or (is_first_replica and engine.num_moe_layers > 0)


def _optimizer_initialized(engine) -> bool:
    return any(len(s) for s in _torch_optimizer(engine).state.values())


def _optimizer_step(engine) -> int:
    for state in _torch_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


@torch.no_grad()
def load_state(engine, state: dict) -> None:
    """Load a merged reference-named state of either engine (parallelism/engine_state.py) into this rank's
    engine (any DP/EP layout, ZeRO stage)."""
    state = canonical(state, engine.model_cfg)
    meta = state["meta"]
    if meta["has_moments"]:
        _init_optimizer_state(engine, meta["optimizer_step"])
    sections = ("params", *MOMENTS) if meta["has_moments"] else ("params",)
    tensors = {s: split_experts(state[s]) for s in sections}
    load_params(engine, tensors["params"], {m: tensors[m] for m in MOMENTS} if meta["has_moments"] else None)
    for name, buf in engine.module.named_buffers():
        if name in state["buffers"]:
            buf.copy_(state["buffers"][name])
    engine.scheduler.last_epoch = meta["steps_done"]
    for group in engine.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * engine.scheduler.lr_lambdas[0](engine.scheduler.last_epoch)
    engine.scheduler._last_lr = [g["lr"] for g in engine.optimizer.param_groups]
    engine.engine.global_steps = meta["steps_done"]
    # a megatron checkpoint does not count samples: the steps done at this job's global batch size
    samples = meta.get("global_samples", meta["steps_done"] * engine.spec.train.global_batch_size)
    engine.engine.global_samples = samples


@torch.no_grad()
def load_params(engine, params: dict, moments: dict | None = None) -> None:
    """Full fp32 parameters in reference names (experts one by one, `name#e`) into this rank's model
    and wherever its ZeRO stage keeps the fp32 masters; Adam moments too when given (their state must
    exist: `_init_optimizer_state`). Shared by resume (`load_state`) and `model.init_from`."""
    num_local = engine.model_cfg.num_experts // engine.ep_size if engine.num_moe_layers else 1
    missing = []
    for ds_name, p in engine.module.named_parameters():
        ref, expert = reference_name(ds_name, engine.ep_rank, num_local)
        key = _key(ref, expert)
        if key not in params:
            missing.append(key)
            continue
        value = params[key]
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape aside
        if tuple(value.shape) != shape:
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model has {shape}")
        _set_param(engine, p, value, {m: values[key] for m, values in (moments or {}).items()})
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    _publish_zero3_params(engine)


def _set_param(engine, p: torch.nn.Parameter, value: torch.Tensor, moments: dict) -> None:
    """Write one full fp32 value (and its moments) into wherever this stage keeps it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero3 = hasattr(p, "ds_id")
    sharded = zero3 or hasattr(p, "_hp_mapping")
    if not zero3:  # the working copy (bf16 or fp32); ZeRO-3 refreshes its partitions after all are set
        p.data.copy_(value.to(p.device, p.dtype))
    if not sharded:  # ZeRO-0 fp32: the parameter and torch's own state are the master
        state = _torch_optimizer(engine).state[p] if moments else {}
        for m, v in moments.items():
            state[m].copy_(v)
        return
    target = p.ds_tensor.device if zero3 else p.device
    safe_set_full_fp32_param(p, value.to(target))
    for m, v in moments.items():
        safe_set_full_optimizer_state(p, v.to(target), m)


def _publish_zero3_params(engine) -> None:
    """ZeRO-3 sets the fp32 partitions only; copy them into the working parameter partitions, as its
    optimizer step does (private API of deepspeed 0.19: stage3.DeepSpeedZeroOptimizer_Stage3)."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        for sub_group in range(len(zero.fp32_partitioned_groups_flat)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)


def _init_optimizer_state(engine, step: int) -> None:
    """Create the Adam state torch creates lazily at the first step, so full moments can be written
    into it: per parameter under ZeRO-0 fp32, per flat fp32 partition otherwise (then link views)."""
    opt = _torch_optimizer(engine)
    # ZeRO-3 hands its fp32 partitions to torch only for the duration of its step
    masters = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if masters is None:
        masters = [p for group in opt.param_groups for p in group["params"]]
    for flat in masters:
        opt.state[flat] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
        }
    _link_views(engine)


def export_reference(engine) -> dict:
    """The full reference state dict (stacked experts, persistent buffers, tied aliases, zero routing biases) on
    every rank: each rank's reference-named part (`gather_state`) exchanged with all_gather_object.
    Collective; meant for tests and small scales, not for checkpoints."""
    tensors, _ = gather_state(engine)
    persistent = set(engine.module.state_dict().keys())
    mine = {**tensors["params"], **{n: b for n, b in tensors.get("buffers", {}).items() if n in persistent}}
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    out = join_experts({k: v for part in parts for k, v in part.items()})
    with torch.device("meta"):
        reference = models.Transformer(engine.model_cfg).state_dict()
    for name, ref in reference.items():
        if name in out:
            continue
        if name.endswith("router.expert_bias"):  # DeepSpeed-MoE has no routing bias (support.py refuses one)
            out[name] = torch.zeros(ref.shape, dtype=ref.dtype)
        elif name == "output.weight" and engine.model_cfg.tie_embeddings:
            out[name] = out["embed.weight"]
    missing = sorted(set(reference) - set(out))
    if missing:
        raise RuntimeError(f"export_reference: the engine holds no tensor for {missing[:5]}")
    return out
