"""Run by test_cluster_ops in its own process (a driver of the test's Ray cluster).

Plans a megatron TP=2 layout (4 workers, resources.nodes=2) on the live cluster, whose worker nodes
have 2 `fake_gpu` each, starts a real Ray Train worker group with that plan and records which node
every rank runs on; also plans the same 4 workers on one node, which the cluster cannot hold.
Prints one line `PLACEMENT_REPORT {json}`.  Usage: python placement_probe.py GCS_ADDRESS OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GPU = {"CPU": 1.0, "fake_gpu": 1.0}


def job_layout(workers: int, nodes: int, tp: int):
    from raytron.config.spec import spec_from_dict
    from raytron.launcher.validate import validate_job

    return validate_job(spec_from_dict({
        "name": "placement", "engine": "megatron", "model": {"family": "moe", "flavor": "debug"},
        "layout": {"tp": tp, "zero_stage": 1}, "resources": {"workers": workers, "nodes": nodes, "use_gpu": True},
        "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 1, "global_batch_size": workers // tp, "lr": 3e-4},
        "data": {"sources": [{"uri": "builtin://python-stdlib"}]}, "checkpoint": {"uri": "/tmp/raytron-placement-probe/runs"}}))


def where_am_i(config: dict) -> None:
    """Ray Train worker loop: gather every rank's node id; rank 0 writes them (self-contained: the
    cluster's workers need nothing of raytron for this)."""
    import json

    import ray
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    nodes = [None] * ctx.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if ctx.get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(nodes, f)


def main(address: str, out_dir: Path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytron.launcher.placement import cluster_nodes, plan_placement
    from raytron.launcher.ray_loopback import join
    from raytron.config.strict_yaml import ConfigError

    join(address, logging_level="WARNING")  # a loopback cluster: stays at 127.0.0.1
    nodes = cluster_nodes()
    layout = job_layout(workers=4, nodes=2, tp=2)
    plan = plan_placement(layout, nodes, GPU)
    try:
        plan_placement(job_layout(workers=4, nodes=1, tp=2), nodes, GPU)
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    out = out_dir / "rank_nodes.json"
    TorchTrainer(where_am_i, train_loop_config={"out": str(out)}, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=4, resources_per_worker=GPU, **plan.scaling_options()),
                 run_config=RunConfig(name="placement", storage_path=str(out_dir / "ray"))).fit()
    report = {"planned": list(plan.rank_nodes), "actual": json.loads(out.read_text()),
              "tp_groups": layout.groups("tp"), "refused": refused,
              "gpu_nodes": sorted(n.node_id for n in nodes if n.resources.get("fake_gpu"))}
    print("PLACEMENT_REPORT " + json.dumps(report), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
