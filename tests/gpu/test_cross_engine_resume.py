"""`raytron submit` across engines on one GPU (marked `gpu`): a deepspeed run resumed with engine megatron
continues the uninterrupted deepspeed run's loss curve (scripts/gpu_cross_engine_submit.sh runs the
submits and compares them with scripts/compare_resume.py; this module judges its comparison).

Bar: the resumed run logs every step 1..12 once; steps 1..6 are deepspeed's, checkpoints 3 and 6 were
written by deepspeed and 9 and 12 by megatron; the resume passed the canary restore (every converted tensor
bitwise equal to the checkpoint); steps 7..12 follow the uninterrupted deepspeed run within CROSS_ATOL.
The engines compute the same bf16 model with other kernels and reduction orders, so the bar is the
equivalence suite's curve bar between an engine and the reference (tests/gpu/README.md), not bitwise.
The CPU test of the same conversion in fp32 is tests/checkpoint/test_cross_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.gpu.gpu_worlds import results_dir, selected

pytestmark = pytest.mark.gpu
CROSS_ATOL = 5e-2
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def folder() -> Path:
    if not torch.cuda.is_available() or not selected(1):
        pytest.skip("the cross-engine submit needs 1 CUDA GPU and world 1 among RAYTRON_GPU_WORLDS")
    out = results_dir("cross_engine")
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_cross_engine_submit.sh")], env=dict(os.environ, OUT=str(out)),
                   timeout=300, check=False)
    return out


def _read(folder: Path, name: str) -> dict:
    path = folder / name
    assert path.exists(), f"{path}: not written (see the cross_engine_*.log beside it)"
    return json.loads(path.read_text())


def test_deepspeed_run_resumed_with_megatron_follows_the_curve(folder):
    judge(folder)


def judge(folder: Path) -> None:
    """The bar of the module docstring on the script's output folder (also run on committed records)."""
    rec = _read(folder, "cross_engine_compare.json")
    assert rec["steps_logged"] == 12, rec["steps_logged"]
    assert rec["repeated_steps"] == [] and rec["missing_steps"] == [], (rec["repeated_steps"], rec["missing_steps"])
    assert rec["steps_compared_after_resume"] == 6
    assert rec["max_abs_dloss_after_resume"] <= CROSS_ATOL, (rec["loss_at"], rec["straight_loss_at"])
    engines = _read(folder, "cross_engine_manifests.json")
    assert engines == {"step-000000003": "deepspeed", "step-000000006": "deepspeed",
                       "step-000000009": "megatron", "step-000000012": "megatron"}, engines
    log = (folder / "cross_engine_resumed.log").read_text(errors="replace")
    assert "resumed from step 6" in log and "canary restore passed for step 6" in log, log[-3000:]
