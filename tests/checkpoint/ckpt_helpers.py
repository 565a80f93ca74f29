"""Helpers for checkpoint tests: small job specs, and real rank processes over gloo (no Ray).

`spawn_ranks` starts one process per rank (spawn context: a fresh interpreter, like a Ray worker),
waits with a deadline, and fails naming the rank that exited badly. Rank functions write what the
test needs (losses, digests, errors) as JSON under the test's directory.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import socket
import sys
import traceback
from pathlib import Path

CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")


def job_overrides(root: Path, workers: int, ep: int, steps: int, every: int, **extra) -> list[str]:
    """The local demo job, shrunk: seq 64, global batch 8 of micro-batches 2, 120 documents."""
    sets = {"checkpoint.uri": str(root), "data.cache_uri": str(root / "_data_cache"),
            "resources.workers": workers, "layout.ep": ep, "train.steps": steps, "checkpoint.every": every,
            "train.seq_len": 64, "train.global_batch_size": 8, "train.micro_batch_size": 2,
            "data.max_documents": 120, "train.eval_every": 0, "train.warmup_steps": 2, **extra}
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()]


def load_job(root: Path, name: str, workers: int, ep: int, steps: int, every: int = 1, **extra):
    from raytron.config.spec import load_spec

    return load_spec(CONFIG, job_overrides(root, workers, ep, steps, every, **extra), name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        # megatron-core's module globals keep its process groups alive; left to interpreter finalization,
        # a gloo group's worker threads can be torn down there and abort the rank after its work is done
        # (SIGABRT, "terminate called without an active exception": seen once in CI). Release them first.
        ps = sys.modules.get("megatron.core.parallel_state")
        if ps is not None and ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
        gc.collect()


def spawn_ranks(fn, world: int, *args, timeout: float = 240.0) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes joined by a gloo group."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    stuck = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in stuck:
        procs[r].kill()
        procs[r].join(5)
    bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    assert not stuck and not bad, f"{fn.__name__}: ranks stuck {stuck}, exit codes {bad} (see stderr)"


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj))


def read_json(path):
    return json.loads(Path(path).read_text())


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines) if "loss" in rec}


def metrics(run: Path) -> dict[int, dict]:
    return {rec["step"]: rec for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
