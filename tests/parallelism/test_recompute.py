"""train.recompute changes memory, never the numbers: the deepspeed engine's loss and every gradient with
selective and full recomputation equal those without (one forward/backward on 2 CPU ranks), for an
expert-parallel MoE (DeepSpeed-MoE layers inside the recomputed region under `full`) and the hybrid
(Gated DeltaNet, Mamba2, sliding-window attention mixers). The megatron engine's CPU path is checked in
test_megatron_step.py (recompute cases)."""

from __future__ import annotations


import pytest

pytestmark = pytest.mark.slow
from tests.checkpoint.ckpt_helpers import read_json, spawn_ranks
from tests.parallelism import ds_equivalence_ranks


@pytest.mark.parametrize("family, ep", [("moe", 2), ("hybrid", 1)])
def test_deepspeed_recompute_matches_no_recompute(tmp_path, family, ep):
    out = tmp_path / "grads.json"
    spawn_ranks(ds_equivalence_ranks.recompute_gradients, 2, family, ep, str(out), timeout=300)
    results = read_json(out)
    base = results["none"]
    assert len(base["grads"]) > 10
    # recomputation really happened: fewer activations kept for backward, fewest under `full`
    saved = {m: r["saved"] for m, r in results.items()}
    assert saved["none"] > saved["selective"] > saved["full"], saved
    for mode in ("selective", "full"):
        got = results[mode]
        assert got["loss"] == base["loss"], f"{family} recompute={mode}: loss {got['loss']} vs {base['loss']}"
        assert set(got["grads"]) == set(base["grads"])
        worst = max(max((abs(a - b) for a, b in zip(got["grads"][n], base["grads"][n])), default=0.0)
                    for n in base["grads"])
        assert worst <= 1e-6, f"{family} recompute={mode}: gradients differ by up to {worst}"
