"""Rank programs for CPU tests of the megatron engine's checkpoint state (parallelism/megatron/state.py).

megatron-core's DistributedOptimizer hard-codes CUDA (device='cuda' tensors, 'torch.cuda.*Tensor' type
checks), so on CPU the engine's optimizer is replaced by `ShardedOptimizer`: the same interface that
megatron_state uses (gbuf_ranges / buffers / model_param_group_index_map / optimizer.state and
`_get_main_param_and_optimizer_states`) with megatron's partitioning rule: the parameters of a buffer
laid end to end, padded to a multiple of the DP size, DP rank r owning the r-th contiguous slice, and a
parameter's owned range the overlap of that slice with it. Dense parameters shard over the DP x CP
group and experts over the expert-DP group, as in megatron. The model chunks are real megatron-core
GPTModels from parallelism/megatron/spec.py (fp32, CPU, `torch.cuda.current_device` pointed at "cpu").
The real optimizer's path runs on GPU (tests/gpu/megatron_checkpoint.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist


@dataclass
class Range:
    start: int
    end: int


class ShardedOptimizer:
    """Stand-in for one megatron DistributedOptimizer over `params` sharded on `group` (see module doc)."""

    def __init__(self, params: list[torch.nn.Parameter], group):
        self.buffers = [SimpleNamespace(params=set(params), data_parallel_group=group)]
        size, rank = group.size(), group.rank()
        total = sum(p.numel() for p in params)
        per = -(-total // size)
        mine = Range(rank * per, (rank + 1) * per)
        param_map, mains, offset = {}, [], 0
        self.model_param_group_index_map = {}
        for p in params:
            lo, hi = max(offset, mine.start), min(offset + p.numel(), mine.end)
            if hi > lo:
                param_map[p] = {"param": Range(lo - offset, hi - offset)}
                self.model_param_group_index_map[p] = (0, len(mains))
                mains.append(p.detach().float().view(-1)[lo - offset:hi - offset].clone())
            offset += p.numel()
        self.gbuf_ranges = [{torch.float32: [{"param_map": param_map}]}]
        self.optimizer = SimpleNamespace(param_groups=[{"params": mains}], state={})

    def _get_main_param_and_optimizer_states(self, model_param):
        g, i = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[g]["params"][i]
        return {"param": main, **self.optimizer.state.get(main, {})}


class CpuEngine:
    """What megatron_state needs of MegatronEngine: spec, device, chunks + pieces, optimizer, steps_done."""

    def __init__(self, family: str, layout, rank: int, overrides: dict | None = None):
        from megatron.core import parallel_state as ps

        from raytron import models
        from raytron.parallelism.megatron.engine import chunk_coords, init_megatron_groups
        from raytron.parallelism.megatron.mapping import chunk_buffers, chunk_pieces
        from raytron.parallelism.megatron.spec import build_model_chunks, transformer_config

        torch.cuda.current_device = lambda: "cpu"  # see the module docstring
        init_megatron_groups(layout, rank, create_gloo_process_groups=False)
        overrides = overrides or {}
        self.layout, self.device, self.steps_done = layout, torch.device("cpu"), 0
        self.spec = SimpleNamespace(model=SimpleNamespace(family=family, flavor="debug", overrides=overrides))
        self.model_cfg = models.get_config(family, "debug", **overrides)
        tcfg = transformer_config(self.model_cfg, layout, on_gpu=False)
        self.chunks = build_model_chunks(self.model_cfg, tcfg, seq_len=32)
        self.pieces = [chunk_pieces(self.model_cfg, chunk_coords(c, layout)) for c in self.chunks]
        self.buffers = [chunk_buffers(self.model_cfg, chunk_coords(c, layout)) for c in self.chunks]
        params = [p for c in self.chunks for p in c.parameters()]
        dense = [p for p in params if getattr(p, "allreduce", True)]
        experts = [p for p in params if not getattr(p, "allreduce", True)]
        opts = [ShardedOptimizer(dense, ps.get_data_parallel_group(with_context_parallel=True))]
        if experts:
            opts.append(ShardedOptimizer(experts, ps.get_expert_data_parallel_group()))
        self.optimizer = SimpleNamespace(chained_optimizers=opts)

    @staticmethod
    def _master_params(chunk):
        return chunk.named_parameters()

    def load_buffers(self, chunks, ref_named: dict) -> None:
        from raytron.parallelism.megatron.engine import MegatronEngine

        MegatronEngine.load_buffers(self, chunks, ref_named)


def reference_state(family: str, seed: int = 0, overrides: dict | None = None) -> dict:
    """A full reference-named state with distinct random values in every section."""
    from raytron import models

    torch.manual_seed(seed)
    model = models.build(family, "debug", **(overrides or {}))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    biases = [n for n, _ in model.named_buffers() if n.endswith("router.expert_bias") and model.cfg.router == "sigmoid"]
    return {"params": {n: torch.randn(s, generator=g) for n, s in shapes.items()},
            "exp_avg": {n: torch.randn(s, generator=g) for n, s in shapes.items()},
            "exp_avg_sq": {n: torch.rand(s, generator=g) for n, s in shapes.items()},
            "buffers": {n: torch.randn(model.cfg.num_experts, generator=g) for n in biases},  # sigmoid routers' bias
            "meta": {"engine": "megatron", "optimizer_step": 7, "has_moments": True, "steps_done": 7}}


def round_trip(rank: int, world: int, family: str, layouts: list[dict], out: str, overrides: dict | None = None) -> None:
    """For each layout: load the reference state, gather it back; rank 0 records which tensors differ.
    `overrides`: model overrides of the debug flavor (e.g. num_layers for pp * vpp stages)."""
    from raytron.launcher.canary import state_digests
    from raytron.parallelism.megatron import state as megatron_state
    from raytron.parallelism.layout import ParallelLayout

    torch.set_num_threads(1)
    want = reference_state(family, overrides=overrides)
    results = []
    for kw in layouts:
        dp = world // (kw.get("tp", 1) * kw.get("pp", 1) * kw.get("cp", 1))
        layout = ParallelLayout(world_size=world, **{"dp": dp, **kw})
        engine = CpuEngine(family, layout, rank, overrides)
        megatron_state.load_state(engine, want)
        got, writes = megatron_state.gather_state(engine)
        assert writes == (rank == 0)
        if rank == 0:
            a, b = state_digests(want), state_digests(got)
            results.append({"layout": kw, "tensors": len(a), "steps_done": got["meta"]["steps_done"],
                            "biases": sum(k.startswith("buffers/") for k in b),
                            "optimizer_step": got["meta"]["optimizer_step"],
                            "mismatch": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))})
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
