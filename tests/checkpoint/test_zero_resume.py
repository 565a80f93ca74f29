"""Every ZeRO stage of the DeepSpeed engine, in bf16 and with ZeRO-Offload too, trains, checkpoints and
resumes bit for bit on CPU (real gloo ranks through run_training); a checkpoint moves across stages, offload
and DP sizes.

ZeRO-0 runs the MoE model with ep=2 (the engine's own norm over replicated experts, torch's own Adam
state), the others the dense model (DeepSpeed-MoE refuses ZeRO-3). On CPU, offload runs DeepSpeed's
offload code path (host partitions, torch AdamW) without saving memory. A resume under the same layout
must reproduce the straight run's last loss exactly; a resume under another stage and DP size sees the
same weights and moments (the canary checks them) but reduces in another order: FIRST_LOSS_RTOL, as in
test_layout_resume.py.
"""

from __future__ import annotations

import shutil

import pytest

from raytron.data_pipeline import prepare_for_job
from tests.checkpoint.ckpt_helpers import load_job, losses, metrics, read_json, spawn_ranks
from tests.checkpoint.ckpt_ranks import train_rank, train_ranks_in_turn

pytestmark = pytest.mark.slow
FIRST_LOSS_RTOL = 1e-5
STEPS = 2  # a checkpoint after step 1, the resumed step 2
DENSE = {"ep": 1, "model.family": "dense"}
CASES = {
    "z0": {"ep": 2, "layout.zero_stage": 0},
    "z1-bf16": {**DENSE, "layout.zero_stage": 1, "train.precision": "bf16"},
    "z2-offload": {**DENSE, "layout.zero_stage": 2, "layout.offload": "optimizer"},
    "z3": {**DENSE, "layout.zero_stage": 3},
    "z3-offload": {**DENSE, "layout.zero_stage": 3, "layout.offload": "optimizer+params"},
}
BIAS = {"ep": 2, "layout.zero_stage": 2, "model.flavor": "debug-sigmoid"}  # test_routing_bias_resumes


def _job(case: dict) -> dict:
    return {"steps": STEPS, "every": 1, **case}


def _train(root, name, world, case, opts=None):
    spawn_ranks(train_rank, world, str(root), name, _job(case), opts or {})


def _resume_copy(root, src, dst):
    """`dst`: `src` as it was when step STEPS-1 was committed (the last checkpoint removed)."""
    shutil.copytree(root / src, root / dst)
    shutil.rmtree(root / dst / "checkpoints" / f"step-{STEPS:09d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    spec = load_job(root, "warm", 2, 2, STEPS)
    prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed, cache_uri=str(root / "_data_cache"))
    # Every straight run in one group of 2 processes, then every resume in another (each resume still starts
    # in other processes than its straight run, from the checkpoint on disk): 2 interpreter starts, not 12.
    straight = [(name, _job(case), {}) for name, case in {**CASES, "bias": BIAS}.items()]
    spawn_ranks(train_ranks_in_turn, 2, str(root), straight, timeout=600)
    for name, _, _ in straight:
        _resume_copy(root, name, f"{name}-resumed")
    resumed = [(f"{name}-resumed", job, opts) for name, job, opts in straight]
    spawn_ranks(train_ranks_in_turn, 2, str(root), resumed, timeout=600)
    _resume_copy(root, "z2-offload", "to-z3")  # ZeRO-2 + offload on 2 ranks -> ZeRO-3 on 1 rank
    _train(root, "to-z3", 1, CASES["z3"], {"canary_out": str(root / "canary-to-z3.json")})
    return root


@pytest.mark.parametrize("name", sorted(CASES))
def test_resumes_bitwise(runs, name):
    straight, resumed = losses(runs / name), losses(runs / f"{name}-resumed")
    assert sorted(straight) == list(range(1, STEPS + 1)), f"{name} logged every step (NaN guard passed)"
    # a fresh start would have re-logged step 1 with its own timing; a resume keeps the line it resumed after
    assert metrics(runs / f"{name}-resumed")[1] == metrics(runs / name)[1], f"{name}: the second run resumed"
    assert resumed[STEPS] == straight[STEPS], \
        f"{name}: step {STEPS} after resuming step {STEPS - 1}: {resumed[STEPS]!r} vs straight {straight[STEPS]!r}"


def test_zero2_resumes_under_zero3_on_another_dp(runs):
    zero2, zero3 = losses(runs / "z2-offload"), losses(runs / "to-z3")
    assert zero3[STEPS] == pytest.approx(zero2[STEPS], rel=FIRST_LOSS_RTOL), \
        f"step {STEPS} under ZeRO-3, dp 1 after ZeRO-2 + offload, dp 2: {zero3[STEPS]!r} vs {zero2[STEPS]!r}"
    assert read_json(runs / "canary-to-z3.json")["tensors"] > 0, "the canary compared the restored state"


def test_routing_bias_resumes(runs):
    """moe/debug-sigmoid (aux-loss-free bias updated every step) on ZeRO-2, EP2: the bias is model state,
    so the resumed step 2 starts from step 1's bias and ends where the straight run does."""
    root = runs
    straight, resumed = metrics(root / "bias"), metrics(root / "bias-resumed")
    assert straight[1]["expert_bias"] != straight[STEPS]["expert_bias"], "the bias moved at step 2"
    assert resumed[STEPS]["expert_bias"] == straight[STEPS]["expert_bias"]
    assert resumed[STEPS]["loss"] == straight[STEPS]["loss"]
    from safetensors.torch import load_file

    from raytron.launcher.export import main as export_main

    assert export_main([str(root / "bias"), "--out", str(root / "bias.safetensors")]) == 0
    exported = load_file(str(root / "bias.safetensors"))
    assert [exported[f"layers.{i}.mixer.router.expert_bias"].tolist() for i in (1, 3)] == straight[STEPS]["expert_bias"]
