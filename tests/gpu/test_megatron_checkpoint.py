"""Megatron engine checkpoint state on GPUs (marked `gpu`): save under one layout, load under another.

One torchrun per world size (2, 4) runs tests/gpu/megatron_checkpoint.py. Bars: every saved tensor
(fp32 master, exp_avg, exp_avg_sq in reference names) gathers back bit for bit after loading under the
new layout; the step counter is restored; the M steps after the load follow the uninterrupted run:
within SAME_ATOL when the layout is unchanged, within RESHARD_ATOL (bf16 reduction order) otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.gpu_worlds import gpu_count, load_records, records_dir, results_dir, selected as _selected
from tests.gpu.megatron_checkpoint import CASES, K

pytestmark = pytest.mark.gpu
SAME_ATOL, RESHARD_ATOL = 1e-3, 2e-2
PROGRAM = Path(__file__).with_name("megatron_checkpoint.py")


@pytest.fixture(scope="module")
def results() -> dict:
    if records_dir():  # judge what the program already wrote there (scripts/gpu_suite.py ran it)
        return load_records(records_dir(), "megatron_checkpoint_w*.jsonl", lambda r: r["case"])
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out_dir = results_dir()
    out: dict = {}
    for world in sorted({w for w, *_ in CASES.values()}):
        if world > torch.cuda.device_count() or not _selected(world):
            continue
        path = out_dir / f"megatron_checkpoint_w{world}.jsonl"
        path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_port=29534",
               str(PROGRAM), "--out", str(path)]
        proc = subprocess.run(cmd, timeout=300, capture_output=True, text=True)
        (out_dir / f"megatron_checkpoint_w{world}.log").write_text(proc.stdout + proc.stderr)
        out.update(load_records(out_dir, path.name, lambda r: r["case"]))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_resume_under_layout(results, name):
    world, _, fields_a, fields_b = CASES[name]
    if world > gpu_count():
        pytest.skip(f"{name} needs {world} GPUs")
    if not _selected(world):
        pytest.skip(f"world {world} not selected by RAYTRON_GPU_WORLDS")
    rec = results.get(name)
    assert rec is not None, f"{name}: no result (see the torchrun log in the results folder)"
    assert "error" not in rec, rec.get("traceback", rec.get("error"))
    assert rec["tensors"] > 0 and rec["digest_mismatch"] == [], rec["digest_mismatch"][:5]
    assert rec["steps_done_b"] == K
    tol = SAME_ATOL if fields_a == fields_b else RESHARD_ATOL
    assert rec["max_abs_dloss"] <= tol, (rec["a_cont"], rec["b_cont"])
