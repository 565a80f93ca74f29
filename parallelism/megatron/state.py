"""Layout-independent checkpoint state of the megatron engine (same contract as parallelism/deepspeed/state.py).

Saved: every reference parameter's full fp32 master value and full Adam moments (`exp_avg`,
`exp_avg_sq`) under its *reference* name (MoE experts stay stacked `[E, ...]` as in the reference
model), plus the optimizer step, the engine's step count and the routing biases of sigmoid routers
(`buffers`, reference names): the canonical state of parallelism/engine_state.py, which `load_state`
takes from either engine. Nothing is stored in megatron's TP/PP/EP
shard or distributed-optimizer bucket form, so a checkpoint loads under any TP/PP/EP/CP/DP layout:
`load_state` cuts the reference tensors with the weight mapping (parallelism/megatron/mapping.py) and
each rank takes its distributed-optimizer range.

Which megatron-core 0.16.1 API: the per-parameter accessors of `DistributedOptimizer`
(`gbuf_ranges[..]["param_map"][param]["param"]` = the flat range of a model parameter this DP rank
owns, `_get_main_param_and_optimizer_states` / `_set_main_param_and_optimizer_states` = that range of
the fp32 master and of the Adam moments). They are what megatron's own `fully_sharded_model_space`
format is built on; `get_parameter_state_dp_zero` was not used because its bucket-space layout would
need the same per-parameter range arithmetic to get back to parameters, and it funnels through gloo.

Gathering (collective, every rank in the same order): one `reduce(SUM)` to rank 0 per reference
tensor of a zero tensor `[3, *shape]` into which exactly one rank places each element: for every
distinct mapping piece the ranks of the optimizer DP group (dense: DP x CP; experts: expert-DP) of the
lowest rank holding that piece contribute their disjoint master ranges; replicas (TP-replicated norms
and routers, other PP/EP copies) add zeros. Adding zeros is exact in fp32, so the saved tensors are the
masters bit for bit (a stored -0.0 would read back as +0.0). Rank 0 writes everything; its host memory
holds the full fp32 state (12 bytes per parameter): fine from debug scale to a few billion parameters,
a sharded writer is the next step beyond that.

A save is split so training blocks only for copies: `snapshot_state` (collective, blocking) copies
each rank's own optimizer ranges into reusable host buffers (pinned on GPUs, so the copies run
asynchronously at full bandwidth) and returns; `assemble_state` builds and reduces the full tensors
from those buffers over a group of the caller's choice, so the checkpoint saver runs it on its
background thread over its own gloo group while the next steps train. `gather_state` is both in one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..checkpoint import merge_shards  # noqa: F401 - part of the engine-state contract
from ..engine_state import MOMENTS, canonical, routing_bias_names
from .kernels import new_step_counter
from .mapping import Piece, to_megatron, unwrapped_buffers

SECTIONS = ("params", *MOMENTS)


def _optimizers(engine) -> list:
    return list(getattr(engine.optimizer, "chained_optimizers", None) or [engine.optimizer])


def _param_ranges(engine) -> dict:
    """model parameter -> (its DistributedOptimizer, flat range this rank owns) for ranks owning a range."""
    out = {}
    for opt in _optimizers(engine):
        for gbuf_range_maps in opt.gbuf_ranges:
            for per_dtype in gbuf_range_maps.values():
                for bucket in per_dtype:
                    for param, ranges in bucket["param_map"].items():
                        out[param] = (opt, ranges["param"])
    return out


def _param_groups(engine) -> dict:
    """model parameter -> global ranks of the DP group its optimizer shards it over."""
    out = {}
    for opt in _optimizers(engine):
        for gbuf in opt.buffers:
            ranks = tuple(dist.get_process_group_ranks(gbuf.data_parallel_group))
            for param in gbuf.params:
                out[param] = ranks
    return out


def _named_params(engine):
    """(chunk index, megatron name, model parameter, its pieces) for every parameter of this rank."""
    for i, (chunk, pieces) in enumerate(zip(engine.chunks, engine.pieces)):
        for name, param in engine._master_params(chunk):
            yield i, name, param, pieces[name]


def _reference_shapes(engine) -> dict[str, torch.Size]:
    from ... import models

    with torch.device("meta"):
        model = models.build(engine.spec.model.family, engine.spec.model.flavor, **engine.spec.model.overrides)
    return {name: p.shape for name, p in model.named_parameters()}


def _has_moments(engine) -> bool:
    local = torch.zeros(1, device=engine.device)
    for opt in _optimizers(engine):
        if any(len(s) for s in opt.optimizer.state.values()):
            local[0] = 1
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return bool(local.item())


def _optimizer_step(engine) -> int:
    local = torch.zeros(1, device=engine.device, dtype=torch.float64)
    for opt in _optimizers(engine):
        for state in opt.optimizer.state.values():
            if "step" in state:
                local[0] = max(float(local[0]), float(state["step"]))
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return int(local.item())


def _contributions(engine) -> set:
    """The (chunk, megatron name, piece position) this rank places into the gathered tensors."""
    groups = _param_groups(engine)
    rank = dist.get_rank()
    mine = {}  # piece key -> DP group ranks
    for _, name, param, pieces in _named_params(engine):
        for p in pieces:
            mine.setdefault((p.ref_name, p.index, p.dim, p.start, p.length), groups[param])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    designated = {}
    for r, held in enumerate(everyone):  # ascending ranks: the first holder's group wins
        for key, ranks in held.items():
            designated.setdefault(key, ranks)
    out = set()
    for i, name, param, pieces in _named_params(engine):
        for j, p in enumerate(pieces):
            if rank in designated[(p.ref_name, p.index, p.dim, p.start, p.length)]:
                out.add((i, name, j))
    return out


def _contributions_cached(engine) -> set:
    """`_contributions` once per engine: the layout and the optimizer's ranges never change in a run."""
    cached = getattr(engine, "_ckpt_contributions", None)
    if cached is None:
        cached = engine._ckpt_contributions = _contributions(engine)
    return cached


def _host_buffer(engine, key, shape) -> torch.Tensor:
    """A reusable host buffer for the snapshot of one parameter's range: pinned when the engine is on a
    GPU, so the device-to-host copies run at full bandwidth and asynchronously. Kept on the engine, so
    only the first save pays for pinning; the saver's wait() before each snapshot keeps them free."""
    pool = engine.__dict__.setdefault("_ckpt_host_buffers", {})
    buf = pool.get(key)
    if buf is None or buf.shape != shape:
        buf = pool[key] = torch.empty(shape, dtype=torch.float32, pin_memory=engine.device.type == "cuda")
    return buf


@torch.no_grad()
def snapshot_state(engine) -> dict:
    """The blocking half of a save: this rank's optimizer-owned ranges of the fp32 masters (and Adam
    moments) copied into host buffers, plus the counters. Collective over the default group. Nothing
    is assembled here: `assemble_state` does that later, possibly on a background thread."""
    ranges = _param_ranges(engine)
    has_moments = _has_moments(engine)
    step = _optimizer_step(engine) if has_moments else 0
    contribute = _contributions_cached(engine)
    sections = 1 + len(MOMENTS) if has_moments else 1
    local: dict = {}  # (chunk, megatron name) -> (range start, host [sections, range length])
    for i, name, param, pieces in _named_params(engine):
        if param not in ranges or not any((i, name, j) in contribute for j in range(len(pieces))):
            continue
        opt, rng = ranges[param]
        values = opt._get_main_param_and_optimizer_states(param)
        host = _host_buffer(engine, (i, name), (sections, rng.end - rng.start))
        host[0].copy_(values["param"].detach().view(-1), non_blocking=True)
        for k, m in enumerate(MOMENTS[:sections - 1], start=1):
            host[k].copy_(values[m].detach().view(-1), non_blocking=True)
        local[(i, name)] = (rng.start, host)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return {"local": local, "contribute": contribute, "has_moments": has_moments, "optimizer_step": step,
            "steps_done": engine.steps_done, "biases": _snapshot_biases(engine)}


def _snapshot_biases(engine) -> dict[str, torch.Tensor]:
    """Reference name -> routing bias (host copy) of this rank's routers, from the first TP / DP(xCP) rank
    of each pipeline stage only (the others hold equal copies), so the gathering reduce adds zeros to it."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_rank() or ps.get_data_parallel_rank(with_context_parallel=True):
        return {}
    return {ref: unwrapped_buffers(chunk)[name].detach().float().cpu().clone()
            for chunk, names in zip(engine.chunks, engine.buffers) for name, ref in names.items()}


@torch.no_grad()
def assemble_state(engine, snapshot: dict, group=None) -> tuple[dict, bool]:
    """Full reference-named fp32 state on rank 0 (empty sections elsewhere) from every rank's snapshot,
    and whether this rank writes it (rank 0 only). Collective over `group` (one reduce per reference
    tensor); reads only the engine's structure, never its values, so it may run while training goes on.
    A gloo group reduces host tensors; any other backend reduces on the engine's device."""
    device = torch.device("cpu") if dist.get_backend(group) == "gloo" else engine.device
    has_moments, contribute = snapshot["has_moments"], snapshot["contribute"]
    by_ref: dict[str, list] = {}
    uses: dict = {}  # (chunk, name) -> pieces still to place; its full tensor is freed after the last
    for i, name, param, pieces in _named_params(engine):
        for j, p in enumerate(pieces):
            if (i, name, j) in contribute:
                by_ref.setdefault(p.ref_name, []).append((i, name, param, pieces, j))
                uses[(i, name)] = uses.get((i, name), 0) + 1
    local_full: dict = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SECTIONS}
    for ref_name, shape in sorted(_reference_shapes(engine).items()):
        out = torch.zeros((3, *shape), dtype=torch.float32, device=device)
        for i, name, param, pieces, j in by_ref.get(ref_name, []):
            if (i, name) not in local_full:  # zeros outside this rank's range
                local_full[(i, name)] = _full_local(snapshot, i, name, param, device)
            full = local_full[(i, name)]
            offset = sum(q.length for q in pieces[:j])
            p: Piece = pieces[j]
            value = full.narrow(1 + pieces[0].dim, offset, p.length)
            target = out if p.index is None else out[:, p.index]
            target.narrow(1 + p.dim, p.start, p.length).add_(value)
            uses[(i, name)] -= 1
            if not uses[(i, name)]:
                del local_full[(i, name)]
        dist.reduce(out, dst=0, group=group)
        if dist.get_rank() == 0:
            host = out.cpu()
            tensors["params"][ref_name] = host[0].clone()
            if has_moments:
                for k, m in enumerate(MOMENTS, start=1):
                    tensors[m][ref_name] = host[k].clone()
    biases = {}
    for ref_name in routing_bias_names(engine.model_cfg):  # one holder contributes, the others add zeros: exact
        out = torch.zeros(engine.model_cfg.num_experts, dtype=torch.float32, device=device)
        if ref_name in snapshot.get("biases", {}):
            out.copy_(snapshot["biases"][ref_name])
        dist.reduce(out, dst=0, group=group)
        biases[ref_name] = out.cpu()
    if dist.get_rank() != 0:
        return {}, False
    tensors["buffers"] = biases
    tensors["meta"] = {"engine": "megatron", "optimizer_step": snapshot["optimizer_step"],
                       "has_moments": has_moments, "steps_done": snapshot["steps_done"]}
    return tensors, True


def _full_local(snapshot: dict, i: int, name: str, param, device) -> torch.Tensor:
    """[3, *param.shape] of this rank's snapshot of one parameter, zeros outside its optimizer range."""
    full = torch.zeros((3, param.numel()), dtype=torch.float32, device=device)
    if (i, name) in snapshot["local"]:
        start, host = snapshot["local"][(i, name)]
        full[:host.shape[0], start:start + host.shape[1]] = host.to(device)
    return full.view(3, *param.shape)


def gather_state(engine, group=None) -> tuple[dict, bool]:
    """`snapshot_state` then `assemble_state` in one go (collective): the synchronous form."""
    return assemble_state(engine, snapshot_state(engine), group)


@torch.no_grad()
def load_state(engine, state: dict) -> None:
    """Load a merged reference-named state of either engine (parallelism/engine_state.py) into this rank's
    engine (any TP/PP/EP/CP/DP layout): the model's bf16 weights, this rank's fp32 master range and Adam
    moments, the step counters."""
    state = canonical(state, engine.model_cfg)
    meta = state["meta"]
    ranges = _param_ranges(engine)
    needed = set(_reference_shapes(engine))
    missing = sorted(needed - set(state["params"]))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    for chunk, pieces in zip(engine.chunks, engine.pieces):
        values = {s: to_megatron(state[s], pieces) for s in SECTIONS if s == "params" or meta["has_moments"]}
        for name, param in engine._master_params(chunk):
            full = values["params"][name]
            if full.shape != param.shape:
                raise ValueError(f"checkpoint gives {name} shape {tuple(full.shape)}, model has {tuple(param.shape)}")
            param.data.copy_(full.to(device=param.device, dtype=param.dtype))
            if param not in ranges:
                continue
            opt, rng = ranges[param]
            group_index, order = opt.model_param_group_index_map[param]
            main = opt.optimizer.param_groups[group_index]["params"][order]
            if meta["has_moments"] and not opt.optimizer.state.get(main):
                # torch's AdamW creates its state lazily at the first step; create it to write into
                step = new_step_counter(opt.optimizer.param_groups[group_index], main, float(meta["optimizer_step"]))
                opt.optimizer.state[main] = {"step": step,
                                             "exp_avg": torch.zeros_like(main), "exp_avg_sq": torch.zeros_like(main)}
            shard = {"param": full.float().view(-1)[rng.start:rng.end]}
            if meta["has_moments"]:
                for m in MOMENTS:
                    shard[m] = values[m][name].float().view(-1)[rng.start:rng.end]
                opt.optimizer.state[main]["step"].fill_(float(meta["optimizer_step"]))
            current = opt._get_main_param_and_optimizer_states(param)
            for key, value in shard.items():
                current[key].copy_(value.to(current[key].device))
    engine.load_buffers(engine.chunks, state.get("buffers", {}))
    engine.steps_done = int(meta["steps_done"])
