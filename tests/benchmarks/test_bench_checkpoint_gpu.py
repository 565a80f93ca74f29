"""benchmarks/checkpoint/bench_checkpoint_gpu.py on its CPU path (`--device cpu`: the debug flavor through
the megatron engine's CPU stand-in, gloo): the report it writes for the GPU run is complete, and the
checkpoint it times restores the step, data cursor and engine state that were saved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_run_reports_saves_and_restores_the_saved_step(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks/checkpoint/bench_checkpoint_gpu.py"),
                           "--device", "cpu", "--out", str(out), "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["phases_done"] == ["setup", "step", "sync-0", "sync-1", "async-0", "async-1", "size",
                                     "load-0", "load-1", "done"]
    assert len(report["sync"]) == len(report["async"]) == len(report["load_s_runs"]) == 2
    # the newest committed checkpoint is the 2nd async save (step 101), taken after three train steps
    assert report["checkpoint"]["step"] == 101 and report["checkpoint"]["bytes"] > report["job"]["params"] * 4
    assert report["restored"]["step"] == 101 and report["restored"]["data_cursor"] == {"samples_consumed": 101}
    assert report["restored"]["engine_steps_done"] == 101  # the engine state as saved: steps done before step 101
    summary = report["summary"]
    assert summary["checkpoint_bytes"] == report["checkpoint"]["bytes"] and summary["load_s"] > 0
    assert all(r["blocking_s"] <= r["total_save_s"] + 1e-3 for r in report["sync"])
