"""Checkpoint benchmark on one GPU: save blocking time, total save time and load time for a ~1B model.

    source scripts/gpu_env.sh && python3 -P benchmarks/checkpoint/bench_checkpoint_gpu.py --out $OUT/ckpt_gpu.json
    python benchmarks/checkpoint/bench_checkpoint_gpu.py --device cpu --flavor debug --out /tmp/ckpt_cpu.json  # smoke

The job is cluster_configs/dense_1b_8gpu.yaml (megatron engine, models: dense/1b, 0.89 B params, bf16 weights,
fp32 masters, Adam in megatron's distributed optimizer) shrunk to world 1 (tp = pp = dp = 1), micro-batch 1,
seq_len 2048 (--seq-len). One process, torch.distributed over NCCL. The engine takes one optimizer step on
random tokens (so Adam moments exist), then, with the checkpoint on local disk (a fresh dir under /tmp):
  * sync save (`CheckpointSaver`, async off): blocking == total (gather + serialize + SHA-256 + write + commit);
  * async save (`async_save`): blocking = snapshot of the optimizer ranges to (pinned) host memory; total = until COMMITTED, measured while the next
    training step runs (what a real loop overlaps with the writes);
  * load: `restore_checkpoint` into a freshly built engine (pick the newest committed step and verify the
    SHA-256 of every file, read and check each shard again, torch.load, load the fp32 masters, Adam moments
    and bf16 weights into the engine). The files were just written, so they are read from the page cache.
The checkpoint is the engine's layout-independent state (parallelism/megatron/state.py: full fp32 masters
and both Adam moments, 12 bytes per parameter, written by rank 0).

Weights start from megatron's own random init (--init-from-reference builds the reference model first, as
`raytron submit` does; slower, same checkpoint size). --device cpu runs the same measurement path on CPU
with the debug flavor: megatron-core's DistributedOptimizer is CUDA-only, so the engine is the CPU stand-in
of tests/parallelism/megatron_cpu_ranks.py and a "step" loads a random full state (masters + moments).
Shared pieces (random-token step, simulated slow storage) come from bench_checkpoint.py.
Results are written after every phase (atomically), so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import ROOT, _random_step, _slow_storage

CONFIG = ROOT / "cluster_configs" / "dense_1b_8gpu.yaml"


def _log(t_start: float, msg: str) -> None:
    print(f"[bench +{time.time() - t_start:6.1f}s] {msg}", flush=True)


def _spec(args, uri: str):
    from raytron.config.spec import load_spec
    from raytron.launcher.validate import validate_job

    sets = [f"model.family={args.family}", f"model.flavor={args.flavor}", "layout.dp=1", "resources.workers=1",
            f"resources.use_gpu={str(args.device == 'cuda').lower()}", f"train.seq_len={args.seq_len}",
            "train.micro_batch_size=1", "train.global_batch_size=1", f"checkpoint.uri={uri}", "checkpoint.keep=2"]
    spec = load_spec(str(CONFIG), sets, name="bench-checkpoint-gpu")
    if args.device == "cpu":  # the megatron engine runs on GPUs only: the CPU stand-in takes the bare layout
        from raytron.parallelism.layout import ParallelLayout, model_facts_from_spec

        return spec, ParallelLayout.from_spec(spec, model_facts_from_spec(spec))
    return spec, validate_job(spec)


def _build(args, spec, layout):
    if args.device == "cuda":
        from raytron.parallelism.megatron.engine import MegatronEngine

        return MegatronEngine(spec, layout, 0, 1, init_from_reference=args.init_from_reference)
    sys.path.insert(0, str(ROOT / "tests" / "parallelism"))
    from megatron_cpu_ranks import CpuEngine

    engine = CpuEngine(args.family, layout, 0)
    engine.spec = spec  # engine: megatron (state_ops), model family/flavor
    return engine


def _step(args, engine, spec, step: int) -> None:
    if args.device == "cuda":
        import torch

        _random_step(engine, spec, step)
        torch.cuda.synchronize()
        return
    from megatron_cpu_ranks import reference_state
    from raytron.parallelism.megatron.state import load_state

    load_state(engine, reference_state(args.family, seed=step))  # masters + Adam moments, as after a step
    engine.steps_done = step + 1


def _sync(args) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


def _mount_of(path: str) -> dict:
    """Filesystem holding `path` (longest matching mount point in /proc/mounts) and its free space."""
    best = {"mount": "?", "fstype": "?", "device": "?"}
    try:
        real = os.path.realpath(path)
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best["mount"].strip("?")):
                best = {"mount": mnt, "fstype": fstype, "device": dev}
    except OSError:
        pass
    usage = shutil.disk_usage(path)
    return {**best, "free_gib": round(usage.free / 2**30, 1), "total_gib": round(usage.total / 2**30, 1)}


def _write(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def _parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--family", default="dense")
    parser.add_argument("--flavor", default=None, help="default: 1b on cuda, debug on cpu")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1, help="saves per mode and loads")
    parser.add_argument("--uri", default=None, help="checkpoint root (default: a fresh dir under /tmp)")
    parser.add_argument("--init-from-reference", action="store_true")
    parser.add_argument("--write-latency-s", type=float, default=0.0,
                        help="simulated storage latency added to every shard write (object-store-like)")
    args = parser.parse_args(argv)
    args.flavor = args.flavor or ("1b" if args.device == "cuda" else "debug")
    if args.device == "cpu" and args.flavor != "debug":
        parser.error("--device cpu runs the debug flavor only (the CPU engine stand-in)")
    return args


def _init_process_group(args) -> None:
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    if args.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)


def _report_head(args, spec, layout, cfg, params_total: int, tmp: str, uri: str) -> dict:
    import torch

    try:
        import megatron.core as mcore
        mcore_version = getattr(mcore, "__version__", "?")
    except ImportError:
        mcore_version = None
    return {
        "command": " ".join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "device": args.device,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": mcore_version,
                    "checkpoint_fs": _mount_of(tmp)},
        "job": {"config": str(CONFIG.relative_to(ROOT)), "engine": "megatron", "family": spec.model.family,
                "flavor": spec.model.flavor, "vocab_size": cfg.vocab_size, "params": params_total,
                "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world": 1},
                "seq_len": spec.train.seq_len, "micro_batch_size": 1, "grad_accum": layout.grad_accum,
                "precision": "bf16 weights, fp32 masters + Adam (megatron distributed optimizer)",
                "init_from_reference": args.init_from_reference, "storage": uri,
                "simulated_write_latency_s": args.write_latency_s},
        "repeats": args.repeats, "phases_done": [],
        "notes": [("times in seconds; files are written through the page cache (no fsync), and loaded right "
                   "after writing, so reads hit the page cache"),
                  ("load_s = restore_checkpoint: newest committed step + SHA-256 of every file, each shard read "
                   "and SHA-256-checked again, torch.load, load into a freshly built engine")],
    }


def _time_saves(args, engine, spec, layout, store, report: dict, phase, t_start: float) -> dict:
    """Sync then async saves, each followed by the train step an async save overlaps with."""
    from raytron.data_pipeline import DataCursor
    from raytron.launcher.checkpointing import CheckpointSaver

    raw = {"sync": [], "async": []}
    for mode in ("sync", "async"):
        saver = CheckpointSaver(store, spec, layout, 0, 1, async_save=mode == "async")
        for i in range(args.repeats):
            step = (1 if mode == "sync" else 100) + i
            gc.collect()
            _sync(args)
            blocking = saver.save(engine, step, DataCursor(step))
            t0 = time.perf_counter()
            _step(args, engine, spec, step)  # the work an async save overlaps with
            step_s = time.perf_counter() - t0
            saver.wait()
            (_, timing), = saver.timings
            saver.timings.clear()
            raw[mode].append({"blocking_s": round(blocking, 4), "total_save_s": round(timing["checkpoint/save_s"], 4),
                              "train_step_after_save_s": round(step_s, 4)})
            _log(t_start, f"{mode} save step {step}: {raw[mode][-1]}")
            report[mode] = raw[mode]
            phase(f"{mode}-{i}")
    return raw


def _time_loads(args, fresh, store, spec, report: dict, phase, t_start: float, trained_steps: int) -> list[float]:
    from raytron.launcher.checkpointing import restore_checkpoint

    loads = []
    for i in range(args.repeats):
        gc.collect()
        _sync(args)
        t0 = time.perf_counter()
        step, cursor = restore_checkpoint(fresh, store, spec, 0)
        _sync(args)
        loads.append(round(time.perf_counter() - t0, 4))
        _log(t_start, f"load of step {step}: {loads[-1]}s")
        report["load_s_runs"] = loads
        report["restored"] = {"step": step, "engine_steps_done": fresh.steps_done,
                              "steps_done_when_saved": trained_steps - 1, "data_cursor": cursor.to_dict()}
        phase(f"load-{i}")
    return loads


def _summary(params_total: int, checkpoint_bytes: int, raw: dict, loads: list[float]) -> dict:
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    return {
        "params": params_total, "checkpoint_bytes": checkpoint_bytes,
        "sync_blocking_s": med([r["blocking_s"] for r in raw["sync"]]),
        "sync_total_save_s": med([r["total_save_s"] for r in raw["sync"]]),
        "async_blocking_s": med([r["blocking_s"] for r in raw["async"]]),
        "async_total_save_s": med([r["total_save_s"] for r in raw["async"]]),
        "load_s": med(loads),
        "save_throughput_gb_s_sync": round(checkpoint_bytes / 1e9 / med([r["total_save_s"] for r in raw["sync"]]), 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="raytron-bench-ckpt-gpu-", dir="/tmp")
    uri = args.uri or f"file://{tmp}"

    import torch
    import torch.distributed as dist
    from raytron.parallelism.checkpoint import CheckpointStore

    from raytron import models

    if args.write_latency_s:
        _slow_storage(args.write_latency_s)
    _init_process_group(args)
    spec, layout = _spec(args, uri)
    cfg = models.get_config(spec.model.family, spec.model.flavor, **spec.model.overrides)
    params_total, _ = models.param_counts(cfg)
    report = _report_head(args, spec, layout, cfg, params_total, tmp, uri)

    def phase(name: str) -> None:
        report["phases_done"].append(name)
        report["wall_s"] = round(time.time() - t_start, 1)
        _write(args.out, report)

    phase("setup")
    _log(t_start, f"setup done: {report['gpu'] or 'cpu'}, torch {torch.__version__}, checkpoint under {uri}")
    t0 = time.perf_counter()
    engine = _build(args, spec, layout)
    report["engine_build_s"] = round(time.perf_counter() - t0, 3)
    _log(t_start, f"engine built in {report['engine_build_s']}s ({params_total / 1e9:.3f} B params)")
    store = CheckpointStore(f"{spec.run_uri}/checkpoints", keep=2)
    t0 = time.perf_counter()
    _step(args, engine, spec, 0)
    report["first_step_s"] = round(time.perf_counter() - t0, 3)
    _log(t_start, f"first step {report['first_step_s']}s")
    phase("step")

    raw = _time_saves(args, engine, spec, layout, store, report, phase, t_start)
    newest = store.committed_steps()[-1]
    files = store.read_manifest(newest)["files"]
    total = sum(f["size"] for f in files.values())
    report["checkpoint"] = {"step": newest, "bytes": total, "files": {n: f["size"] for n, f in files.items()},
                            "bytes_per_param": round(total / params_total, 3)}
    if args.device == "cuda":
        report["peak_gpu_mem_gib_first_engine"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    trained_steps = engine.steps_done
    del engine
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    phase("size")

    t0 = time.perf_counter()
    fresh = _build(args, spec, layout)
    report["fresh_engine_build_s"] = round(time.perf_counter() - t0, 3)
    loads = _time_loads(args, fresh, store, spec, report, phase, t_start, trained_steps)
    report["summary"] = _summary(params_total, total, raw, loads)
    phase("done")
    print(json.dumps(report["summary"], indent=1), flush=True)
    dist.destroy_process_group()
    if not args.uri:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
