"""Run by test_node_loss_on_simulated_cluster in its own process (it needs its own Ray cluster).

A `ray.cluster_utils.Cluster`: a head without CPUs (driver, Ray Train controller) and two worker
nodes of 2 CPUs. The job (2 workers, resources.nodes=1: both on one node) pauses rank 1 at step 3;
then the node running it is removed. Ray Train restarts the group on the node that remains, from the
last committed step. Prints one JSON line with what happened; exits with the CLI's exit code.
Usage: python node_loss_job.py ROOT CACHE
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path (python FILE): the repository root holds `tests`
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from tests.launcher.ft_helpers import inject, processes_of, submit_args, wait_for  # noqa: E402


def _free_port() -> int:
    """Own ports: the session's embedded Ray already holds the default dashboard port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(root: Path, cache: Path) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from raytron.launcher.attempts import read_attempts
    from raytron.launcher.cli import main as cli

    # The GCS marks a node dead after health_check_failure_threshold failed checks, one every
    # health_check_period_ms (Ray's defaults: 5 x 3 s). A removed node's checks fail at once (connection
    # refused), so a 1 s period finds it dead ~10 s sooner; a live but busy node still has each check's
    # own timeout (health_check_timeout_ms, unchanged) to answer.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": _free_port(),
                                                            "_system_config": {"health_check_period_ms": 1000}})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    run = root / "nodeloss"
    report: dict = {}

    def remove_node() -> None:
        try:
            wait_for("worker_groups/0000/pause-rank-*.json", run, 300)
            rec = read_attempts(str(run))[0][1]
            node = next(n for n in nodes if n.node_id == rec["node_id"])
            report["pids"] = sorted(processes_of(run, 0))
            report["removed"] = node.node_id
            report["removed_at"] = time.time()
            cluster.remove_node(node, allow_graceful=False)
        except BaseException as exc:  # noqa: BLE001 - reported in the JSON line
            report["error"] = repr(exc)

    t = threading.Thread(target=remove_node, daemon=True)
    t.start()
    code = cli(submit_args(root, "nodeloss", 4, cache, *inject("pause", step=3, rank=1),
                           "--set", "fault.max_failures=1", "--address", cluster.address))
    t.join(5)
    report["code"] = code
    report["attempt_nodes"] = {a: sorted({r["node_id"] for r in ranks.values()})
                               for a, ranks in read_attempts(str(run)).items()}
    print("NODE_LOSS_REPORT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
