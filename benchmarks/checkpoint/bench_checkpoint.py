"""Checkpoint benchmark: save blocking time, total save time and load time for the local demo model.

    python benchmarks/checkpoint/bench_checkpoint.py [--out benchmarks/results/checkpoint_cpu.json]
        [--uri file:///tmp/...] [--repeats 3] [--write-latency-s 0.25]

The job is cluster_configs/local_debug.yaml as written (moe/debug, DeepSpeed ZeRO-2, EP=2, 2 CPU
ranks over gloo, spawned here without Ray). Each rank takes one optimizer step on random tokens (so
Adam moments exist), then:
  * sync saves: blocking time == total save time (gather + write + commit);
  * async saves (`checkpoint.async_save`): blocking = gather only; total = until COMMITTED, measured
    while the next training step runs (what a real loop overlaps with the writes);
  * with --write-latency-s, every shard write first sleeps that long (a slow object store), which is
    where async saving pays off; without it the demo model's 2.5 MB writes are cheaper than the gather;
  * load: `restore_checkpoint` (verify SHA-256 of every file, read, load into the engine), same layout
    and under EP=1 (with the canary restore).
Times are the max over ranks (a collective is as slow as its slowest rank); medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "cluster_configs" / "local_debug.yaml")
VOCAB = 264  # the byte tokenizer's padded vocabulary


def _engine(spec, rank, world):
    from raytron.launcher.validate import validate_job
    from raytron.launcher.worker import build_engine

    layout = validate_job(spec)
    return build_engine(spec, layout, rank, world, VOCAB), layout


def _random_step(engine, spec, step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    mbs, seq = spec.train.micro_batch_size, spec.train.seq_len
    batches = [torch.randint(VOCAB, (mbs, seq + 1), generator=g) for _ in range(engine.layout.grad_accum)]
    return engine.train_step(batches)


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _slow_storage(latency_s: float) -> None:
    """Simulate an object store's per-request latency on every shard write."""
    from raytron.parallelism.checkpoint import CheckpointStore

    write = CheckpointStore.write_shard

    def slow_write(self, *a, **k):
        time.sleep(latency_s)
        return write(self, *a, **k)

    CheckpointStore.write_shard = slow_write


def _rank(rank: int, world: int, port: int, uri: str, repeats: int, out: str, latency_s: float) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"})
    import torch
    import torch.distributed as dist

    from raytron.data_pipeline import DataCursor
    from raytron.launcher.checkpointing import CheckpointSaver, restore_checkpoint
    from raytron.config.spec import load_spec
    from raytron.parallelism.checkpoint import CheckpointStore

    torch.set_num_threads(1)
    if latency_s:
        _slow_storage(latency_s)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = load_spec(CONFIG, [f"checkpoint.uri={uri}", "checkpoint.keep=2"])
    engine, layout = _engine(spec, rank, world)
    store = CheckpointStore(f"{spec.run_uri}/checkpoints", keep=2)
    _random_step(engine, spec, 0)
    result = {"sync": [], "async": [], "load": [], "load_ep1": []}
    for mode in ("sync", "async"):
        saver = CheckpointSaver(store, spec, layout, rank, world, async_save=mode == "async")
        for i in range(repeats):
            step = (1 if mode == "sync" else 100) + i
            blocking = saver.save(engine, step, DataCursor(16 * step))
            t0 = time.perf_counter()
            _random_step(engine, spec, step)  # the work an async save overlaps with
            step_s = time.perf_counter() - t0
            saver.wait()
            (_, timing), = saver.timings
            saver.timings.clear()
            result[mode].append(_max_over_ranks([blocking, timing["checkpoint/save_s"], step_s]))
    for i in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        restore_checkpoint(engine, store, spec, rank)
        result["load"].append(_max_over_ranks([time.perf_counter() - t0]))
    spec1 = load_spec(CONFIG, [f"checkpoint.uri={uri}", "layout.ep=1"])
    engine1, _ = _engine(spec1, rank, world)
    for i in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        restore_checkpoint(engine1, store, spec1, rank)  # EP 2 -> 1: reshard + canary
        result["load_ep1"].append(_max_over_ranks([time.perf_counter() - t0]))
    if rank == 0:
        newest = store.committed_steps()[-1]
        manifest = store.read_manifest(newest)
        result["bytes_per_checkpoint"] = sum(f["size"] for f in manifest["files"].values())
        result["files_per_checkpoint"] = len(manifest["files"])
        result["params"] = sum(p.numel() for p in engine.module.parameters())
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _summary(raw: dict) -> dict:
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    out = {}
    for mode in ("sync", "async"):
        rows = raw[mode]
        out[mode] = {"blocking_s": med([r[0] for r in rows]), "total_save_s": med([r[1] for r in rows]),
                     "overlapped_train_step_s": med([r[2] for r in rows]),
                     "runs": [[round(x, 4) for x in r] for r in rows]}
    out["load_same_layout_s"] = med([r[0] for r in raw["load"]])
    out["load_ep2_to_ep1_with_canary_s"] = med([r[0] for r in raw["load_ep1"]])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_cpu.json"))
    parser.add_argument("--uri", default=None, help="checkpoint root (default: a fresh local temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-latency-s", type=float, default=0.0,
                        help="simulated storage latency added to every shard write (object-store-like)")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="raytron-bench-ckpt-")
    uri = args.uri or f"file://{tmp}"
    raw_path = os.path.join(tmp, "raw.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    mp.start_processes(_rank, args=(2, port, uri, args.repeats, raw_path, args.write_latency_s), nprocs=2, start_method="spawn")
    raw = json.loads(Path(raw_path).read_text())
    import torch

    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "load_average": os.getloadavg()},
              "job": {"config": "cluster_configs/local_debug.yaml", "engine": "deepspeed ZeRO-2", "ep": 2,
                      "ranks": 2, "storage": uri.split("://")[0],
                      "simulated_write_latency_s": args.write_latency_s, "params": raw["params"],
                      "bytes_per_checkpoint": raw["bytes_per_checkpoint"],
                      "files_per_checkpoint": raw["files_per_checkpoint"]},
              "repeats": args.repeats, "wall_s": round(time.time() - t0, 1), **_summary(raw)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
