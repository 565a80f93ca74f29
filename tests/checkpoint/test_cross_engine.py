"""Cross-engine resume on CPU through the launcher's save_checkpoint / restore_checkpoint: a deepspeed
checkpoint continues under the megatron engine, and a megatron checkpoint under the deepspeed engine, on
the same curve (rank program and what runs where: tests/checkpoint/cross_engine_ranks.py).

Tolerances: the states move bit for bit (both engines keep the same reference-named fp32 tensors; only
how experts, counters and buffers are laid out differs), so a deepspeed engine resumed from the megatron
save repeats the deepspeed curve to fp32 round-off of identical arithmetic (1e-6 relative: in practice
equal). The megatron engine computes the same model with other kernels and summation orders (megatron-core
attention, grouped experts, DDP reduction), so its loss and gradient norm at the next step match to
fp32 accumulation error: 1e-5 relative here (observed ~1e-7)."""

from __future__ import annotations

import pytest

from tests.checkpoint.ckpt_helpers import read_json, spawn_ranks
from tests.checkpoint.cross_engine_ranks import STEPS, cross_engine_rank
from tests.parallelism.megatron_cpu_schedule import GLOBAL

CASES = [["dense", 1], ["moe", 2]]  # (family of the debug flavor, expert parallelism over 2 ranks)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_engine")
    spawn_ranks(cross_engine_rank, 2, str(root), CASES, str(root / "out.json"), timeout=300)
    return {r["family"]: r for r in read_json(root / "out.json")}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("family", [c[0] for c in CASES])
def test_deepspeed_save_continues_under_megatron(results, family):
    got = results[family]
    loss, norm = got["megatron_next"]
    want_loss, want_norm, _ = got["ds_continued"][0]
    assert _rel(loss, want_loss) < 1e-5 and _rel(norm, want_norm) < 1e-5, got
    assert got["save_mismatch"] == [], f"megatron's save differs from the state it loaded: {got['save_mismatch']}"
    assert got["steps"] == [STEPS, STEPS] and got["cursors"] == [STEPS * GLOBAL] * 2, got
    ds_meta, mg_meta = got["meta"]
    assert ds_meta["steps_done"] == mg_meta["steps_done"] == STEPS and mg_meta["optimizer_step"] == STEPS
    assert mg_meta["engine"] == "megatron" and ds_meta["engine"] == "deepspeed"


@pytest.mark.slow
@pytest.mark.parametrize("family", [c[0] for c in CASES])
def test_megatron_save_continues_under_deepspeed(results, family):
    """Two steps after the resume: the second one uses the carried Adam moments and schedule position."""
    got = results[family]
    for (loss, norm, lr), (want_loss, want_norm, want_lr) in zip(got["ds_from_megatron"], got["ds_continued"]):
        assert _rel(loss, want_loss) < 1e-6 and _rel(norm, want_norm) < 1e-6 and lr == want_lr, got
    if family == "moe":  # 4 experts x 3 stacked tensors x 2 layers x 3 sections, compared one by one
        assert got["experts_split"] == 72, got["experts_split"]
