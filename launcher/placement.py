"""Placing ranks on nodes: which node runs which rank, decided before any worker starts.

What Ray Train (2.60, Train V2) lets us control: one placement-group bundle per worker, each bundle
with the worker's resources and an optional label selector; after the workers start, Ray Train orders
them by node (nodes in the order their first worker appears, workers of a node together) and gives
world ranks in that order. So ranks are contiguous per node; the number of workers on each node is
what decides which groups share a node. We pin bundle i to a chosen node through the built-in
`ray.io/node-id` label, exactly `workers_per_node` bundles per node, so that:

- node k runs ranks [k * wpn, (k + 1) * wpn) (the layout's `node_of(rank)`);
- every TP group (consecutive ranks, tp divides wpn: a layout rule) and every EP group that fits in a
  node sits on one node; pipeline stages (the outermost, slowest-varying rank dimension) span nodes;
- `resources.nodes` is honoured: exactly that many nodes, each with room for wpn workers.

A layout the cluster cannot place (too few nodes with wpn free accelerators/CPU slots) is refused
with the reason before the worker group is created. `verify_rank_nodes` checks the result from the
workers' own view (rank -> node id).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

from ..parallelism.layout import ParallelLayout
from ..config.strict_yaml import ConfigError

NODE_ID_LABEL = "ray.io/node-id"


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node as placement sees it."""

    node_id: str
    resources: dict[str, float]
    """Total resources of the node (what a job could ever get there)."""
    available: dict[str, float] | None = None
    """Resources free right now, when known (used only to prefer idle nodes)."""
    is_head: bool = False
    address: str = ""

    def fits(self, per_worker: dict[str, float], total: bool = True) -> int:
        """How many workers needing `per_worker` this node holds."""
        have = self.resources if total or self.available is None else self.available
        counts = [math.floor(have.get(name, 0.0) / amount + 1e-9) for name, amount in per_worker.items() if amount > 0]
        return min(counts) if counts else 0


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    """Node of every rank; node k holds ranks k*wpn .. (k+1)*wpn - 1."""

    layout: ParallelLayout
    node_ids: tuple[str, ...]
    """Chosen nodes, in node-rank order."""
    per_worker: dict[str, float]

    @property
    def rank_nodes(self) -> tuple[str, ...]:
        wpn = self.layout.workers_per_node
        return tuple(self.node_ids[r // wpn] for r in range(self.layout.world_size))

    def label_selectors(self) -> list[dict[str, str]]:
        """Ray Train `ScalingConfig(label_selector=...)`: bundle i pinned to the node of rank i."""
        return [{NODE_ID_LABEL: node} for node in self.rank_nodes]

    def scaling_options(self) -> dict[str, Any]:
        """Extra `ScalingConfig` arguments that realise the plan. One node: STRICT_PACK (all workers on
        one node, any node that fits, so a restart after a node loss lands elsewhere). Several nodes:
        each bundle pinned to its planned node, exactly workers_per_node per node."""
        if len(self.node_ids) == 1:
            return {"placement_strategy": "STRICT_PACK"}
        return {"placement_strategy": "PACK", "label_selector": self.label_selectors()}

    def describe(self) -> str:
        lay = self.layout
        lines = [f"placement: {lay.num_nodes} node(s) x {lay.workers_per_node} workers "
                 f"({', '.join(f'{v:g} {k}' for k, v in self.per_worker.items())} per worker)"]
        for k, node in enumerate(self.node_ids):
            ranks = range(k * lay.workers_per_node, (k + 1) * lay.workers_per_node)
            stages = sorted({lay.coords(r)["pp"] for r in ranks})
            lines.append(f"  node {k} ({node[:12]}): ranks {ranks.start}-{ranks.stop - 1}, pipeline stage(s) {stages}")
        return "\n".join(lines)


def worker_resources(spec) -> dict[str, float]:
    """Ray resources one worker of `spec` takes (the same dict the ScalingConfig asks for)."""
    res: dict[str, float] = {"CPU": float(spec.resources.cpus_per_worker)}
    if spec.resources.use_gpu:
        res["GPU"] = 1.0
    return res


def plan_placement(layout: ParallelLayout, nodes: Iterable[NodeInfo], per_worker: dict[str, float]) -> PlacementPlan:
    """Choose `layout.num_nodes` nodes that each hold `layout.workers_per_node` workers, or refuse.

    Raises ConfigError (field `resources.nodes`) naming what the layout needs and what each node has."""
    nodes = list(nodes)
    n, wpn = layout.num_nodes, layout.workers_per_node
    eligible = [node for node in nodes if node.fits(per_worker) >= wpn]
    if len(eligible) < n:
        need = ", ".join(f"{v * wpn:g} {k}" for k, v in per_worker.items())
        have = "; ".join(f"{node.node_id[:12]}{' (head)' if node.is_head else ''}: "
                         + ", ".join(f"{node.resources.get(k, 0):g} {k}" for k in per_worker)
                         + f" -> {node.fits(per_worker)} worker(s)" for node in nodes) or "no alive nodes"
        groups = []
        if layout.tp > 1:
            groups.append(f"TP groups of {layout.tp}")
        if layout.ep > 1 and layout.ep_node_local:
            groups.append(f"EP groups of {layout.ep}")
        keep = f" ({' and '.join(groups)} stay inside a node)" if groups else ""
        raise ConfigError("resources.nodes",
                          f"the cluster cannot place this layout: it needs {n} node(s) with {wpn} workers each "
                          f"({need} per node){keep}, but only {len(eligible)} of {len(nodes)} alive node(s) "
                          f"have room for {wpn} [{have}]; change resources.nodes / resources.workers or add nodes")
    # Prefer nodes that are idle now, then workers over the head (the head also runs Ray's services),
    # then a stable order so a relaunch lands the same way.
    eligible.sort(key=lambda node: (-node.fits(per_worker, total=False) if node.available is not None else 0,
                                    node.is_head, node.node_id))
    plan = PlacementPlan(layout, tuple(node.node_id for node in eligible[:n]), dict(per_worker))
    for group in layout.node_local_groups():  # holds by construction (tp | wpn); kept as a guard
        if len({plan.rank_nodes[r] for r in group}) != 1:
            raise ConfigError("layout", f"group {group} would span nodes under {wpn} workers per node")
    return plan


def cluster_nodes() -> list[NodeInfo]:
    """Alive nodes of the Ray cluster this process is connected to (ray.init done)."""
    import ray

    try:  # per-node free resources: private API, only used to prefer idle nodes
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:  # noqa: BLE001
        free = {}
    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = {k: float(v) for k, v in node.get("Resources", {}).items()}
        out.append(NodeInfo(node["NodeID"], res, free.get(node["NodeID"]),
                            is_head="node:__internal_head__" in res, address=node.get("NodeManagerAddress", "")))
    return out


def nodes_from_state_api(records: list[dict[str, Any]]) -> list[NodeInfo]:
    """NodeInfo from the dashboard state API's `/api/v0/nodes?detail=1` records (client side, no ray.init)."""
    return [NodeInfo(r["node_id"], {k: float(v) for k, v in (r.get("resources_total") or {}).items()}, None,
                     bool(r.get("is_head_node")), r.get("node_ip", ""))
            for r in records if r.get("state") == "ALIVE"]


def verify_rank_nodes(layout: ParallelLayout, rank_nodes: list[str], plan: PlacementPlan | None = None) -> None:
    """Check where ranks actually run: every node-local group on one node, and (with a plan) each rank
    on its planned node. Raises RuntimeError naming the group or rank."""
    for group in layout.node_local_groups():
        where = {rank_nodes[r] for r in group}
        if len(where) != 1:
            raise RuntimeError(f"ranks {group} must share a node but run on {len(where)} nodes: "
                               + ", ".join(f"rank {r} on {rank_nodes[r][:12]}" for r in group))
    if plan is not None:
        for r, (want, got) in enumerate(zip(plan.rank_nodes, rank_nodes)):
            if want != got:
                raise RuntimeError(f"rank {r} runs on node {got[:12]} but was placed on {want[:12]}")


def gather_rank_nodes(world: int) -> list[str]:
    """Node id of every rank (collective over the default process group; call on all ranks)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return [str(x) for x in out]


__all__ = ["NodeInfo", "PlacementPlan", "plan_placement", "cluster_nodes", "nodes_from_state_api",
           "verify_rank_nodes", "gather_rank_nodes", "worker_resources", "NODE_ID_LABEL"]
