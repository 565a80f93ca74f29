"""`raytron data prepare` with a trained 32K BPE against the tokenizers library's own encode_batch.

    python benchmarks/data/bench_prepare_bpe.py [--mb 1024] [--workers N] [--out FILE]

1. Generates ~--mb MB of varied text as jsonl shards: windows of this Python's standard library
   (code, docstrings, comments) and sentences of random words (ASCII, accented, CJK, emoji, numbers).
2. Trains a --vocab (32000) byte-level BPE on --sample-mb MB more of it (`raytron tokenizer train`).
3. Runs `raytron data prepare --pool process --workers N` on all of it in a subprocess, polling the
   resident memory of its whole process tree (sum of RSS: shared pages counted once per process,
   so an upper bound).
4. Runs the same tokenizer's `tokenizers.Tokenizer.encode_batch` on the same documents with N Rayon
   threads in a subprocess, timing only the encode calls (reading and JSON parsing excluded).
Writes command, machine, CPU count, both throughputs (MB/s of text, tokens/s), peak RSS and
prepare/encode_batch ratio (targets: ratio >= 0.8, peak RSS < 2 GB) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the of and to in is that for it with as on was be by this are from at or an not have which "
         "über naïve café résumé straße ångström façade 東京 数据 模型 训练 データ 学習 🙂 🚀 ✓ "
         "tokenizer parallel pipeline gradient expert router attention sequence checkpoint").split()


def generate(root: Path, mb: int, seed: int = 0, shard_mb: int = 128) -> list[Path]:
    """~mb MB of jsonl in shards of shard_mb; deterministic for a seed."""
    from raytron.data_pipeline.sources import stdlib_files

    rng = np.random.default_rng(seed)
    stdlib = "\n".join(Path(p).read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:600])
    numbers = [str(n) for n in rng.integers(0, 100000, 2000)]
    words = np.array(WORDS + numbers + stdlib.split()[:20000:7])
    shards, written = [], 0
    while written < mb << 20:
        path = root / f"shard-{len(shards):04d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            size = 0
            while size < shard_mb << 20 and written + size < mb << 20:
                if rng.random() < 0.5:
                    start = int(rng.integers(0, len(stdlib) - 8000))
                    text = stdlib[start:start + int(rng.integers(200, 8000))]
                else:
                    picks = words[rng.integers(0, len(words), int(rng.integers(50, 1500)))]
                    text = ". ".join(" ".join(picks[i:i + 12]) for i in range(0, len(picks), 12))
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
        shards.append(path)
        written += size
    return shards


def run_tree(cmd: list[str], env: dict | None = None) -> tuple[str, float, int]:
    """(stdout, wall seconds, peak summed RSS bytes of the process and all its descendants)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # the process list is refreshed once a second and sampled every 0.2 s: walking /proc for the
    # tree at every sample took a fifth of a core, which the measured processes then lacked
    root, peak, procs, polls = psutil.Process(proc.pid), 0, [], 0
    while proc.poll() is None:
        try:
            if polls % 5 == 0:
                procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            procs = []
        polls += 1
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return out, time.perf_counter() - t0, peak


ENCODE_SCRIPT = r"""
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
batch, size, docs_bytes, tokens, seconds = [], 0, 0, 0, 0.0
def flush():
    global batch, size, tokens, seconds
    t0 = time.perf_counter()
    enc = tok.encode_batch(batch, add_special_tokens=False)
    seconds += time.perf_counter() - t0
    tokens += sum(len(e.ids) for e in enc)
    batch, size = [], 0
for path in sys.argv[2:]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text); size += len(text); docs_bytes += len(text.encode())
            if size >= 16 << 20:
                flush()
if batch:
    flush()
print(json.dumps({"seconds": seconds, "tokens": tokens, "text_bytes": docs_bytes}))
"""


def machine() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024, help="MB of text to generate and prepare")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sample-mb", type=int, default=64, help="MB of the text the BPE is trained on")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare processes = encode_batch threads")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/data_prepare_bpe_cpu.json"))
    p.add_argument("--workdir", default=None, help="where text and outputs go (default: a temp dir, removed)")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="bench-bpe-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    (work / "text").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shards = generate(work / "text", args.mb)
    text_bytes = sum(s.stat().st_size for s in shards)
    (work / "sample").mkdir(exist_ok=True)
    sample = generate(work / "sample", args.sample_mb, seed=1)  # same generator, other seed
    print(f"generated {text_bytes / 1e6:.0f} MB in {len(shards)} shards ({time.perf_counter() - t0:.0f} s)", flush=True)

    py, cli = sys.executable, ["-m", "raytron.launcher.cli"]
    t0 = time.perf_counter()
    subprocess.run([py, *cli, "tokenizer", "train", *map(str, sample), "--vocab-size", str(args.vocab),
                    "--out", str(work / "bpe"), "--force"], check=True)
    train_s = time.perf_counter() - t0
    prep_cmd = [py, *cli, "data", "prepare", *map(str, shards), "--tokenizer", str(work / "bpe"),
                "--out", str(work / "prep"), "--workers", str(args.workers), "--pool", "process",
                "--force", "--json", "--no-progress"]
    out, prep_wall, peak = run_tree(prep_cmd)
    summary = json.loads(out)
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.workers), "TOKENIZERS_PARALLELISM": "true"}
    enc_out, _, _ = run_tree([py, "-c", ENCODE_SCRIPT, str(work / "bpe/tokenizer.json"), *map(str, shards)], env)
    enc = json.loads(enc_out)

    doc_bytes = enc["text_bytes"]  # UTF-8 bytes of the document texts (JSON framing excluded), both sides
    prep_mb_s = doc_bytes / 1e6 / summary["seconds"]
    enc_mb_s = doc_bytes / 1e6 / enc["seconds"]
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "prepare_command": " ".join(["raytron", *prep_cmd[3:]]).replace(str(work), "WORK"),
        "machine": machine(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "workers": args.workers, "text_mb": round(text_bytes / 1e6, 1), "document_text_mb": round(doc_bytes / 1e6, 1),
        "vocab_size": args.vocab, "bpe_train_seconds": round(train_s, 1), "bpe_sample_mb": args.sample_mb,
        "prepare": {"seconds": round(summary["seconds"], 2), "wall_seconds": round(prep_wall, 2),
                    "documents": summary["documents"], "tokens": summary["tokens"],
                    "mb_per_s": round(prep_mb_s, 2), "tokens_per_s": round(summary["tokens"] / summary["seconds"]),
                    "peak_rss_mb": round(peak / 1e6, 1)},
        "encode_batch": {"seconds": round(enc["seconds"], 2), "tokens": enc["tokens"], "threads": args.workers,
                         "mb_per_s": round(enc_mb_s, 2), "tokens_per_s": round(enc["tokens"] / enc["seconds"])},
        "ratio_prepare_to_encode_batch": round(prep_mb_s / enc_mb_s, 3),
        "targets": {"ratio_at_least": 0.8, "peak_rss_mb_below": 2000,
                    "met": prep_mb_s / enc_mb_s >= 0.8 and peak < 2e9},
    }
    assert summary["tokens"] == enc["tokens"] + summary["documents"], "prepare and encode_batch disagree on tokens"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
