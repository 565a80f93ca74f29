"""ParallelLayout arithmetic: rank <-> coordinates, groups, node placement."""

from __future__ import annotations

import pickle

import pytest

from raytron.config.strict_yaml import ConfigError
from raytron.parallelism.layout import GROUP_KINDS, ModelFacts, ParallelLayout

LAYOUTS = [
    dict(world_size=1),
    dict(world_size=8, dp=8, ep=4),  # deepspeed-style: EP folded over DP
    dict(world_size=8, tp=2, pp=2, dp=2, ep=2, workers_per_node=4),
    dict(world_size=16, tp=2, cp=2, dp=4, ep=4, etp=2, workers_per_node=8),
    dict(world_size=32, tp=2, pp=2, dp=8, ep=8, workers_per_node=8),  # cluster_configs/hybrid_moe_32gpu
    dict(world_size=24, tp=2, pp=3, cp=2, dp=2, ep=8, vpp=2, workers_per_node=4),
]


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_rank_coords_bijection(kw):
    layout = ParallelLayout(**kw)
    seen_dense, seen_expert = set(), set()
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        assert layout.rank_of(**c) == rank
        assert layout.rank_of(pp=c["pp"], dp=c["dp"], tp=c["tp"], cp=c["cp"]) == rank
        seen_dense.add((c["tp"], c["cp"], c["dp"], c["pp"]))
        seen_expert.add((c["etp"], c["ep"], c["edp"], c["pp"]))
    assert len(seen_dense) == len(seen_expert) == layout.world_size


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_groups_partition_world(kw):
    layout = ParallelLayout(**kw)
    sizes = {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "pp": layout.pp, "dp_cp": layout.dp * layout.cp,
             "ep": layout.ep, "etp": layout.etp, "edp": layout.edp}
    for kind in GROUP_KINDS:
        groups = layout.groups(kind)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(layout.world_size)), kind
        assert all(len(g) == sizes[kind] for g in groups), kind
        # members of one group differ only in that group's own coordinates
        dims = {"dp_cp": ("dp", "cp")}.get(kind, (kind,))
        fixed = [k for k in ("tp", "cp", "dp", "pp") if k not in dims] if kind not in ("ep", "etp", "edp") else \
            [k for k in ("etp", "ep", "edp", "pp") if k not in dims]
        for g in groups:
            assert len({tuple(layout.coords(r)[k] for k in fixed) for r in g}) == 1, kind


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_node_local_groups(kw):
    layout = ParallelLayout(**kw)
    for group in layout.node_local_groups():
        assert len({layout.node_of(r) for r in group}) == 1
    tp_groups = layout.groups("tp")
    assert all(len({layout.node_of(r) for r in g}) == 1 for g in tp_groups)
    listed = layout.node_local_groups()
    if layout.tp > 1:
        assert all(g in listed for g in tp_groups)
    if layout.ep > 1 and layout.ep_node_local:
        assert all(g in listed for g in layout.groups("ep"))


def test_megatron_reference_groups():
    """Megatron-LM's documented example (16 GPUs, tp=2, pp=4, dp=2) and order tp-cp-ep-dp-pp."""
    layout = ParallelLayout(world_size=16, tp=2, pp=4, dp=2)
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout.groups("pp") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]


def test_deepspeed_expert_groups_match_deepspeed():
    """DeepSpeed's _create_expert_and_data_parallel(ep): EP groups are consecutive blocks, expert-DP
    groups stride by ep; the engine's `rank % ep` is the EP coordinate."""
    layout = ParallelLayout(world_size=8, dp=8, ep=4)
    assert layout.groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.groups("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert all(layout.coords(r)["ep"] == r % 4 for r in range(8))


def test_ep_across_nodes_is_reported():
    layout = ParallelLayout(world_size=16, dp=16, ep=16, workers_per_node=8)
    assert not layout.ep_node_local
    assert layout.node_local_groups() == []  # TP=1, and EP cannot fit: nothing to pin
    assert layout.node_of(9) == 1 and layout.node_of(9, 4) == 2


def test_derived_sizes_and_records():
    layout = ParallelLayout(world_size=8, tp=2, pp=2, dp=2, ep=2, micro_batch_size=2, global_batch_size=16)
    assert (layout.grad_accum, layout.dp, layout.edp, layout.num_nodes) == (4, 2, 2, 1)
    assert ParallelLayout.from_dict(layout.to_dict()) == layout
    assert pickle.loads(pickle.dumps(layout)) == layout
    with pytest.raises(Exception):
        layout.tp = 4  # frozen


def test_direct_construction_validates():
    with pytest.raises(ConfigError) as exc:
        ParallelLayout(world_size=8, tp=2, dp=2)
    assert exc.value.path == "layout.dp"
    with pytest.raises(ConfigError) as exc:
        ParallelLayout(world_size=8, dp=8, micro_batch_size=3, global_batch_size=20)
    assert exc.value.path == "train.global_batch_size"
    with pytest.raises(ValueError):
        ParallelLayout(world_size=4, dp=4).coords(4)
    with pytest.raises(ValueError):
        ParallelLayout(world_size=2, dp=2, ep=2).rank_of(dp=1, ep=0)  # names two different ranks


def test_model_facts_stage_marks():
    assert ModelFacts(num_layers=8, num_heads=4, num_kv_heads=2, pattern="G-*-|G-*-").stage_boundaries() == 2
    assert ModelFacts(num_layers=8, num_heads=4, num_kv_heads=2, pattern="G-*-G-*-").stage_boundaries() is None
