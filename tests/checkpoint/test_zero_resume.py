"""Every ZeRO stage of the DeepSpeed engine trains, checkpoints and resumes bit for bit on CPU (real gloo
ranks through run_training), and a checkpoint moves across stages and DP sizes.

Stage 0 runs the MoE model with ep=2 (replicated experts' norm and torch's own Adam state), stages 1-3 the
dense model (DeepSpeed-MoE refuses ZeRO-3). A resume under the same layout must reproduce the straight
run's step-3 loss exactly; a resume under another stage and DP size sees the same weights and moments
(the canary checks them) but reduces in another order: FIRST_LOSS_RTOL, as in test_layout_resume.py.
"""

from __future__ import annotations

import shutil

import pytest

from ckpt_helpers import load_job, losses, read_json, spawn_ranks
from ckpt_ranks import train_rank
from raytron.data_pipeline import prepare_for_job

pytestmark = pytest.mark.slow
FIRST_LOSS_RTOL = 1e-5
STAGES = {0: {"ep": 2}, 1: {"ep": 1, "model.family": "dense"}, 2: {"ep": 1, "model.family": "dense"},
          3: {"ep": 1, "model.family": "dense"}}
STEPS = 3


def _train(root, name, world, stage, opts=None):
    spawn_ranks(train_rank, world, str(root), name,
                {"steps": STEPS, "every": 2, "layout.zero_stage": stage, **STAGES[stage]}, opts or {})


def _resume_copy(root, src, dst):
    """`dst`: `src` as it was when step 2 was committed (the step-3 checkpoint removed)."""
    shutil.copytree(root / src, root / dst)
    shutil.rmtree(root / dst / "checkpoints" / f"step-{STEPS:09d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    spec = load_job(root, "s0", 2, 2, STEPS)
    prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed, cache_uri=str(root / "_data_cache"))
    for stage in STAGES:
        _train(root, f"s{stage}", 2, stage)
        _resume_copy(root, f"s{stage}", f"r{stage}")
        _train(root, f"r{stage}", 2, stage)
    _resume_copy(root, "s2", "x")  # ZeRO-2 on 2 ranks -> ZeRO-3 on 1 rank
    _train(root, "x", 1, 3, {"canary_out": str(root / "canary-x.json")})
    return root


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_resumes_bitwise(runs, stage):
    straight, resumed = losses(runs / f"s{stage}"), losses(runs / f"r{stage}")
    assert sorted(straight) == list(range(1, STEPS + 1)), f"ZeRO-{stage} trained every step (NaN guard passed)"
    assert resumed[STEPS] == straight[STEPS], \
        f"ZeRO-{stage}: step {STEPS} after resuming step 2: {resumed[STEPS]!r} vs straight {straight[STEPS]!r}"


def test_zero2_resumes_under_zero3_on_another_dp(runs):
    zero2, zero3 = losses(runs / "s2"), losses(runs / "x")
    assert zero3[STEPS] == pytest.approx(zero2[STEPS], rel=FIRST_LOSS_RTOL), \
        f"step {STEPS} under ZeRO-3, dp 1 after ZeRO-2, dp 2: {zero3[STEPS]!r} vs {zero2[STEPS]!r}"
    assert read_json(runs / "canary-x.json")["tensors"] > 0, "the canary compared the restored state"
