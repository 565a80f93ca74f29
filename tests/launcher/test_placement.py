"""Rank -> node planning (no Ray): TP groups inside a node, stages across nodes, refusals with reasons."""

from __future__ import annotations

import pytest

from raytron.launcher.placement import NodeInfo, plan_placement, verify_rank_nodes
from raytron.config.spec import spec_from_dict
from raytron.config.strict_yaml import ConfigError
from raytron.launcher.validate import validate_job
from raytron.parallelism.layout import ParallelLayout

GPU = {"CPU": 1.0, "fake_gpu": 1.0}


def node(i: int, gpus: float, cpus: float = 8, head: bool = False, free: float | None = None) -> NodeInfo:
    res = {"CPU": cpus, "fake_gpu": gpus}
    return NodeInfo(f"node{i:02d}" + "0" * 40, res, None if free is None else {"CPU": cpus, "fake_gpu": free}, head)


def megatron_layout(workers: int, nodes: int, tp: int, pp: int) -> ParallelLayout:
    spec = spec_from_dict({
        "name": "place", "engine": "megatron", "model": {"family": "moe", "flavor": "debug"},
        "layout": {"tp": tp, "pp": pp, "zero_stage": 1}, "resources": {"workers": workers, "nodes": nodes, "use_gpu": True},
        "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 1, "global_batch_size": workers // (tp * pp),
                  "lr": 3e-4},
        "data": {"sources": [{"uri": "builtin://python-stdlib"}]}, "checkpoint": {"uri": "/tmp/raytron-placement-tests/runs"}})
    return validate_job(spec)


def test_tp_groups_on_one_node_and_stages_across_nodes():
    layout = megatron_layout(workers=8, nodes=2, tp=2, pp=2)  # wpn = 4: stage 0 on node 0, stage 1 on node 1
    plan = plan_placement(layout, [node(0, 0, head=True), node(1, 4), node(2, 4)], GPU)
    assert plan.node_ids == (node(1, 4).node_id, node(2, 4).node_id), "the GPU-less head is never chosen"
    for group in layout.groups("tp"):
        assert len({plan.rank_nodes[r] for r in group}) == 1, group
    stage_nodes = [{plan.rank_nodes[r] for r in range(8) if layout.coords(r)["pp"] == s} for s in (0, 1)]
    assert stage_nodes[0].isdisjoint(stage_nodes[1]), "pipeline stages span nodes"
    assert plan.label_selectors()[0] == {"ray.io/node-id": plan.node_ids[0]}
    assert [s["ray.io/node-id"] for s in plan.label_selectors()] == list(plan.rank_nodes)
    assert plan.scaling_options()["label_selector"] == plan.label_selectors()
    verify_rank_nodes(layout, list(plan.rank_nodes), plan)


def test_one_node_uses_strict_pack_and_prefers_idle_nodes():
    layout = ParallelLayout(world_size=2, dp=2)
    plan = plan_placement(layout, [node(1, 2, free=0), node(2, 2, free=2)], GPU)
    assert plan.node_ids == (node(2, 2).node_id,)
    assert plan.scaling_options() == {"placement_strategy": "STRICT_PACK"}


def test_refuses_what_the_cluster_cannot_place_with_the_reason():
    # 4 workers on one node (TP=2 needs them together) but every node has 2 GPUs.
    layout = megatron_layout(workers=4, nodes=1, tp=2, pp=1)
    with pytest.raises(ConfigError) as err:
        plan_placement(layout, [node(1, 2), node(2, 2)], GPU)
    msg = str(err.value)
    assert "resources.nodes" in msg and "1 node(s) with 4 workers each" in msg and "TP groups of 2" in msg
    assert "-> 2 worker(s)" in msg, "says what each node can hold"
    # Two nodes of 2 GPUs each place it when the job asks for 2 nodes.
    plan = plan_placement(megatron_layout(workers=4, nodes=2, tp=2, pp=1), [node(1, 2), node(2, 2)], GPU)
    assert len(set(plan.rank_nodes)) == 2
    # Too few nodes.
    with pytest.raises(ConfigError, match="only 1 of 1 alive node"):
        plan_placement(megatron_layout(workers=4, nodes=2, tp=2, pp=1), [node(1, 4)], GPU)


def test_verify_names_a_tp_group_split_across_nodes():
    layout = megatron_layout(workers=4, nodes=2, tp=2, pp=1)
    with pytest.raises(RuntimeError, match=r"ranks \[0, 1\] must share a node"):
        verify_rank_nodes(layout, ["a", "b", "b", "a"])
