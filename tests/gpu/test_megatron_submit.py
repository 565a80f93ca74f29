"""`raytron submit` with the megatron engine on GPUs (marked `gpu`): train, `--resume`, resume under another
layout (scripts/gpu_megatron_submit.sh runs the four submits and compares them with
scripts/compare_resume.py; this module judges its comparisons).

Bars: the run resumed from its step-30 checkpoint logs every step 1..60 once and follows the
uninterrupted 60-step run within SAME_ATOL (no jump at the resume); the copy resumed under PP2 (ep 1)
logs 1..45 once, passed the canary restore (every resharded tensor bitwise equal to the checkpoint)
and follows the uninterrupted run within RESHARD_ATOL (bf16 reduction order of another layout).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.gpu.gpu_worlds import gpu_count, records_dir, results_dir

pytestmark = pytest.mark.gpu
SAME_ATOL, RESHARD_ATOL = 1e-3, 2e-2
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def submit_dir() -> Path:
    if records_dir():  # scripts/gpu_suite.py ran the script with OUT=<records>/submit
        return Path(records_dir()) / "submit"
    if not torch.cuda.is_available() or gpu_count() < 2:
        found = gpu_count() if torch.cuda.is_available() else 0
        pytest.skip(f"raytron submit with cluster_configs/gpu_megatron_2gpu.yaml (EP2 over NCCL) needs 2 CUDA GPUs, "
                    f"found {found}; RAYTRON_GPU_RECORDS=<folder> judges the comparisons of an earlier GPU run")
    out = results_dir("submit")
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_megatron_submit.sh")], env=dict(os.environ, OUT=str(out)),
                   timeout=900, check=False)
    return out


def _compare(folder: Path, name: str) -> dict:
    path = folder / f"{name}_compare.json"
    assert path.exists(), f"{path}: no comparison (see the submit logs beside it)"
    return json.loads(path.read_text())


def _exactly_once(rec: dict, steps: int) -> None:
    assert rec["steps_logged"] == steps, rec["steps_logged"]
    assert rec["repeated_steps"] == [] and rec["missing_steps"] == [], (rec["repeated_steps"], rec["missing_steps"])


def test_resume_continues_the_run_without_a_jump(submit_dir):
    rec = _compare(submit_dir, "resume")
    _exactly_once(rec, 60)
    assert rec["max_abs_dloss_before_resume"] == 0.0  # the first 30 steps are the same run
    assert rec["steps_compared_after_resume"] == 30
    assert rec["max_abs_dloss_after_resume"] <= SAME_ATOL, rec["max_abs_dloss_after_resume"]
    assert "step-000000060" in rec["committed_checkpoints"]


def test_resume_under_pp2_passes_the_canary_and_follows_the_run(submit_dir):
    rec = _compare(submit_dir, "relayout")
    _exactly_once(rec, 45)
    assert rec["steps_compared_after_resume"] == 15
    assert rec["max_abs_dloss_after_resume"] <= RESHARD_ATOL, rec["max_abs_dloss_after_resume"]
    log = (submit_dir / "relayout.log").read_text(errors="replace")
    assert "canary restore passed for step 30" in log and "-> world 2 tp=1 pp=2 ep=1" in log
