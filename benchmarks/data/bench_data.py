"""Data pipeline benchmark: prepare throughput and batch fetch latency on this machine.

    python benchmarks/data/bench_data.py [--out benchmarks/results/data_pipeline_cpu.json]

Measures:
  * `prepare` tokens/s over the Python stdlib corpus read 4 times (~48 M byte tokens, page-cached
    local files), 1 and 2 thread workers and 2 spawned processes;
  * `prepare_for_job` cold build and warm (cache hit) load time for the demo corpus;
  * latency of one rank's micro-batches per step and of a full global batch;
  * for scale, one forward+backward of a small 2-layer transformer on the same micro-batches with
    one torch thread (a stand-in for a CPU debug-model step): data time / step time must be << 1
    for a synchronous loader to never make a CPU step wait.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from raytron.data_pipeline import BUILTIN_STDLIB, DataCursor, prepare, prepare_for_job
from raytron.config.spec import DataSpec, SourceSpec


def bench_prepare(tmp: Path, workers: int, pool: str, copies: int) -> dict:
    """Best of 2 runs (the machine is shared; the first run also warms the page cache)."""
    runs = [prepare([BUILTIN_STDLIB] * copies, str(tmp / f"stdlib-{pool}{workers}"), workers=workers,
                    pool=pool, seq_len=256) for _ in range(2)]
    summary = min(runs, key=lambda s: s.seconds)
    return {"workers": workers, "pool": pool, "corpus": f"{copies} x {BUILTIN_STDLIB}",
            "documents": summary.documents, "tokens": summary.tokens, "seconds": round(summary.seconds, 3),
            "tokens_per_s": round(summary.tokens_per_s), "skipped": summary.stats.skipped}


def timed(fn, repeats: int) -> dict:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"mean_ms": round(statistics.fmean(times), 4), "p50_ms": round(times[len(times) // 2], 4),
            "p99_ms": round(times[int(len(times) * 0.99) - 1], 4), "repeats": repeats}


def reference_step_ms(seq_len: int, mbs: int, vocab: int, repeats: int = 5) -> float:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = 128
    emb = torch.nn.Embedding(vocab, d)
    body = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True), 2)
    head = torch.nn.Linear(d, vocab)
    params = [*emb.parameters(), *body.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randint(0, vocab, (mbs, seq_len + 1))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(seq_len)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        logits = head(body(emb(x[:, :-1]), mask=mask, is_causal=True))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/data_pipeline_cpu.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--gbs", type=int, default=16)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--copies", type=int, default=4, help="read the stdlib corpus this many times for prepare")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="raytron-bench-data-"))
    try:
        results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "python": sys.version.split()[0], "numpy": np.__version__},
                   "prepare": [bench_prepare(tmp, w, pool, args.copies)
                               for w, pool in ((1, "thread"), (2, "thread"), (2, "process"))]}
        spec = DataSpec(sources=[SourceSpec(BUILTIN_STDLIB)])
        t0 = time.perf_counter()
        prepare_for_job(spec, args.seq_len, 1234, cache_uri=str(tmp / "cache"))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = prepare_for_job(spec, args.seq_len, 1234, cache_uri=str(tmp / "cache"))
        warm = time.perf_counter() - t0
        results["prepare_for_job"] = {"corpus": BUILTIN_STDLIB, "seq_len": args.seq_len,
                                      "train_samples": len(data.train), "valid_samples": len(data.valid),
                                      "cold_build_s": round(cold, 3), "warm_load_s": round(warm, 4)}
        ds, gbs, mbs, dp = data.train, args.gbs, args.mbs, args.dp
        rank_fetch = timed(lambda i: ds.micro_batches(DataCursor(i * gbs), gbs, mbs, 0, dp), 300)
        global_fetch = timed(lambda i: ds.global_batch(i * gbs, gbs), 300)
        step_ms = reference_step_ms(args.seq_len, mbs, data.vocab_size) * (gbs // (mbs * dp))
        results["batch_fetch"] = {"gbs": gbs, "mbs": mbs, "dp": dp, "seq_len": args.seq_len,
                                  "rank_micro_batches_per_step": rank_fetch, "global_batch": global_fetch,
                                  "reference_cpu_step_ms": round(step_ms, 2),
                                  "data_share_of_step": round(rank_fetch["p99_ms"] / step_ms, 5)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
