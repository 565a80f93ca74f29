"""Multi-head latent attention in the megatron engine (parallelism/megatron/mla.py): megatron-core's
MLASelfAttention under TP2 (+SP) and PP2 on CPU equals the reference (the rank programs of
tests/parallelism/megatron_hybrid_ranks.py: per-token loss within 1e-5, every rank's gradients within 1e-4
of the reference's cut the same way, weights gathered back bitwise), and what the engine refuses with MLA
is named by field (parallelism/megatron/blocks.py `mla_gaps`). One-process CPU equivalence of the
`moe/debug-mla` flavor is in tests/parallelism/test_megatron_mapping.py, the engine's whole step (megatron's
schedule, DDP, distributed optimizer; recomputation) in tests/parallelism/test_megatron_step.py (`moe-mla-*`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from raytron import models
from raytron.parallelism.megatron.blocks import megatron_pattern_gaps


def _layout(tp=1, pp=1, vpp=1, cp=1):
    return SimpleNamespace(tp=tp, pp=pp, vpp=vpp, cp=cp)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 0}])
def test_mla_tp_pp_match_reference(tmp_path, overrides):
    pytest.importorskip("megatron.core")
    from tests.checkpoint.ckpt_helpers import spawn_ranks
    from tests.parallelism import megatron_hybrid_ranks

    out = tmp_path / "result.json"
    layouts = [{"tp": 2, "ep": 2}, {"pp": 2}]  # experts over EP: this harness reduces no expert-DP gradients
    spawn_ranks(megatron_hybrid_ranks.equivalence, 2, "moe", "debug-mla", overrides, layouts, str(out), timeout=240)
    records = json.loads(out.read_text())
    assert [[r["layers"] for r in rec["ranks"]] for rec in records] == [[[1, 2], [1, 2]], [[1], [2]]]
    for rec in records:
        losses = [r["loss_err"] for r in rec["ranks"] if r["loss_err"] is not None]
        assert losses and max(losses) <= 1e-5, rec
        for r in rec["ranks"]:
            assert r["grad_bad"] == {} and r["round_trip_bad"] == [], (rec["layout"], r)


@pytest.mark.parametrize("overrides,layout,precision,field,words", [
    ({"pattern": "*EWE", "window": 8}, _layout(), "bf16", "model.overrides.attention", "mla with W layers"),
    ({}, _layout(cp=2), "bf16", "layout.cp", "not mapped for multi-head latent attention"),
    ({}, _layout(), "fp8", "train.precision", "MLA has no FP8 GEMM path"),
])
def test_mla_refusals_name_the_field(overrides, layout, precision, field, words):
    cfg = models.get_config("moe", "debug-mla", **overrides)
    gaps = megatron_pattern_gaps(cfg, layout, precision)
    assert gaps and gaps[0][0] == field and words in gaps[0][1], gaps
    assert megatron_pattern_gaps(models.get_config("moe", "debug-mla"), _layout(tp=2, pp=2)) == []


def test_engine_refuses_masked_mla_layers():
    pytest.importorskip("megatron.core")
    from raytron.parallelism.megatron.blocks import UnsupportedArchitecture
    from raytron.parallelism.megatron.spec import check_supported

    with pytest.raises(UnsupportedArchitecture, match="model.overrides.attention: mla with W layers"):
        check_supported(models.get_config("moe", "debug-mla", pattern="*EWE", window=8))
