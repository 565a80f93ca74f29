"""Megatron engine checkpoint state (parallelism/megatron/state.py) on CPU: a full reference-named
state (fp32 masters + both Adam moments, distinct random values) is loaded into megatron-core GPTModel
shards under TP/PP/CP/DP/EP/ETP layouts and gathered back; every tensor must come back bit for bit.
Ranks are real processes over gloo; the DistributedOptimizer is a CPU stand-in with megatron's
partitioning (tests/parallelism/megatron_cpu_ranks.py says why). The real optimizer runs on GPU in
tests/gpu/megatron_checkpoint.py."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

from tests.checkpoint.ckpt_helpers import spawn_ranks  # noqa: E402
from tests.parallelism import megatron_cpu_ranks  # noqa: E402


@pytest.mark.parametrize("family,world,layouts", [
    ("dense", 2, [{"tp": 2}, {"pp": 2}, {"cp": 2}, {}]),
    ("moe", 2, [{"ep": 2}, {"tp": 2, "ep": 2}, {"pp": 2}, {"tp": 2}, {}]),  # tp=2: experts in expert-DP over TP
    ("moe", 4, [{"tp": 2, "ep": 2}, {"pp": 2, "ep": 2}, {"ep": 2, "etp": 2}]),
    ("hybrid", 2, [{"tp": 2}, {"pp": 2}, {}]),  # G-*-M-W-: per-head, replicated and B/C-sharded tensors
])
def test_state_round_trip_under_layouts(tmp_path, family, world, layouts):
    out = tmp_path / "result.json"
    spawn_ranks(megatron_cpu_ranks.round_trip, world, family, layouts, str(out), timeout=400)
    results = json.loads(out.read_text())
    assert len(results) == len(layouts)
    for r in results:
        assert r["tensors"] > 0 and r["mismatch"] == [], r
        assert r["steps_done"] == 7 and r["optimizer_step"] == 7, r


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_state_round_trip_interleaved(tmp_path, family):
    """pp=2, vpp=2 on 4 blocks: each rank holds two non-contiguous chunks (blocks p and 2+p)."""
    out = tmp_path / "result.json"
    spawn_ranks(megatron_cpu_ranks.round_trip, 2, family, [{"pp": 2, "vpp": 2}], str(out), {"num_layers": 4},
                timeout=400)
    (result,) = json.loads(out.read_text())
    assert result["tensors"] > 0 and result["mismatch"] == [], result


def test_routing_bias_round_trip(tmp_path):
    """Sigmoid routers' aux-loss-free bias (a buffer, replicated on every TP/DP/EP rank, one per pipeline
    stage's MoE layers) is saved under its reference name and loaded back bit for bit."""
    out = tmp_path / "result.json"
    spawn_ranks(megatron_cpu_ranks.round_trip, 2, "moe", [{"pp": 2}, {"tp": 2, "ep": 2}], str(out),
                {"router": "sigmoid", "bias_update_rate": 0.01}, timeout=400)
    for r in json.loads(out.read_text()):
        assert r["mismatch"] == [] and r["biases"] == 2, r
