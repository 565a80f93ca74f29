"""World-size selection and case sharding shared by the GPU test programs and modules."""

from __future__ import annotations

import os


def selected(world: int) -> bool:
    """RAYTRON_GPU_WORLDS="4" (comma-separated) limits a run to those world sizes (device time is scarce)."""
    chosen = os.environ.get("RAYTRON_GPU_WORLDS", "")
    return not chosen or str(world) in chosen.split(",")


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; "" -> (0, 1), the whole list."""
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: INDEX must be in [0, COUNT) and COUNT >= 1")
    return index, count


def shard(items: list, text: str, weight=lambda item: 1.0) -> list:
    """The items of shard "i/n": longest-first greedy split of the items by `weight` into n shards of
    near-equal total weight (ties to the lower shard); every item lands in exactly one shard, each shard
    keeps the items' original order."""
    index, count = parse_shard(text)
    loads, owner = [0.0] * count, {}
    for pos in sorted(range(len(items)), key=lambda p: (-weight(items[p]), p)):
        target = min(range(count), key=lambda s: (loads[s], s))
        loads[target] += weight(items[pos])
        owner[pos] = target
    return [item for pos, item in enumerate(items) if owner[pos] == index]


def results_dir(*parts: str):
    """Where the GPU tests write what they ran (RAYTRON_GPU_RESULTS, else tests/gpu/results/local), with
    `parts` below it; created."""
    from pathlib import Path

    path = Path(os.environ.get("RAYTRON_GPU_RESULTS", Path(__file__).parent / "results" / "local"), *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def records_dir() -> str:
    """RAYTRON_GPU_RECORDS=<folder>: the GPU test modules judge the raw records already in that folder
    (written by the programs, e.g. by scripts/gpu_suite.py running them in shards side by side) instead
    of launching the programs themselves; "" when unset."""
    return os.environ.get("RAYTRON_GPU_RECORDS", "")


def read_records(folder, pattern: str) -> list[dict]:
    """The JSON lines of every file in `folder` matching `pattern` (shards of one program included), in
    file-name order."""
    import json
    from pathlib import Path

    return [json.loads(line) for path in sorted(Path(folder).glob(pattern))
            for line in path.read_text().splitlines() if line.strip()]


def load_records(folder, pattern: str, key) -> dict:
    """{key(record): record} over read_records (a later line for the same key wins)."""
    return {key(rec): rec for rec in read_records(folder, pattern)}


def gpu_count() -> int:
    """GPUs the tests may use: this machine's, or in records mode the machine the records came from
    (RAYTRON_GPU_RECORDS_GPUS, default 4: every case judged, a missing record fails)."""
    if records_dir():
        return int(os.environ.get("RAYTRON_GPU_RECORDS_GPUS", "4"))
    import torch

    return torch.cuda.device_count()
