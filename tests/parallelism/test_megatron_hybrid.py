"""The megatron engine's model for hybrid patterns (Gated DeltaNet, attention, Mamba2, sliding-window
attention, each followed by an MLP: `hybrid/debug` = "G-*-M-W-"; `hybrid/debug-moe` = "GEBE|GE*E")
under TP2 (+SP) and PP2, on CPU.

Two real rank processes over gloo (tests/parallelism/megatron_hybrid_ranks.py says how): fp32 per-token
loss within 1e-5 of the reference model, every rank's gradients within 1e-4 (relative, per tensor) of
the reference's cut the same way, weights gathered back to reference names bitwise equal. Plus the pure
rules (parallelism/megatron/blocks.py): which patterns and layouts map, and the refusals' messages.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from raytron import models
from raytron.parallelism.megatron.blocks import (UnsupportedArchitecture, blocks, megatron_pattern_gaps,
                                                 pipeline_split)


def _layout(tp=1, pp=1, vpp=1, cp=1):
    return SimpleNamespace(tp=tp, pp=pp, vpp=vpp, cp=cp)


@pytest.mark.slow
@pytest.mark.parametrize("flavor,overrides,layouts,layers", [
    ("debug", {}, [{"tp": 2}, {"pp": 2}], [[[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2], [3, 4]]]),
    # uneven '|' stages (1 + 3 megatron layers): megatron's first/last-stage split must follow the marks
    ("debug", {"pattern": "G-|*-M-W-"}, [{"pp": 2}], [[[1], [2, 3, 4]]]),
    # "GEBE|GE*E": block-sparse attention and MoE (aux loss in both losses), '|'-marked stages, TP with EP
    ("debug-moe", {}, [{"pp": 2}, {"tp": 2, "ep": 2}], [[[1, 2], [3, 4]], [[1, 2, 3, 4], [1, 2, 3, 4]]]),
])
def test_hybrid_tp_pp_match_reference(tmp_path, flavor, overrides, layouts, layers):
    """`layers`: per layout, the megatron layer numbers (1-based, global) each rank must hold."""
    pytest.importorskip("megatron.core")
    from tests.checkpoint.ckpt_helpers import spawn_ranks
    from tests.parallelism import megatron_hybrid_ranks

    out = tmp_path / "result.json"
    spawn_ranks(megatron_hybrid_ranks.equivalence, 2, "hybrid", flavor, overrides, layouts, str(out), timeout=240)
    records = json.loads(out.read_text())
    assert len(records) == len(layouts)
    for rec, want_layers in zip(records, layers):
        ranks = rec["ranks"]
        assert [r["layers"] for r in ranks] == want_layers, rec
        losses = [r["loss_err"] for r in ranks if r["loss_err"] is not None]
        assert losses and max(losses) <= 1e-5, rec
        for r in ranks:
            assert r["grad_bad"] == {} and r["round_trip_bad"] == [], (rec["layout"], r)


def test_pattern_pairs_and_stage_split():
    cfg = models.get_config("hybrid", "debug")
    assert blocks(cfg) == [("G", "-"), ("*", "-"), ("M", "-"), ("W", "-")]
    assert pipeline_split(cfg, 2) == {} and pipeline_split(cfg, 4) == {}
    uneven = models.get_config("hybrid", "debug", pattern="G-|*-M-W-")
    assert pipeline_split(uneven, 2) == {"num_layers_in_first_pipeline_stage": 1,
                                         "num_layers_in_last_pipeline_stage": 3}
    assert pipeline_split(uneven, 1) == {}  # no pipeline: the marks mean nothing
    assert megatron_pattern_gaps(models.get_config("hybrid", "debug-moe"), _layout(tp=2, pp=2)) == []


@pytest.mark.parametrize("overrides,layout,field,words", [
    ({"pattern": "GG*-"}, _layout(), "model.overrides.pattern", "(mixer, ffn) pairs"),
    ({"pattern": "G-*|-M-W-"}, _layout(pp=2), "model.overrides.pattern", "stage 0 ('G-*')"),
    ({"pattern": "G-|*-*-*-|M-|W-"}, _layout(pp=4), "model.overrides.pattern", "equal middle ones"),
    ({}, _layout(pp=3), "layout.pp", "does not divide the model's 4 megatron layers"),
    ({"ssm_state_dim": 6}, _layout(tp=4), "layout.tp", "ssm_state_dim 6"),
])
def test_refusals_name_the_field(overrides, layout, field, words):
    cfg = models.get_config("hybrid", "debug", **overrides)
    gaps = megatron_pattern_gaps(cfg, layout)
    assert gaps and gaps[0][0] == field and words in gaps[0][1], gaps


def test_engine_refuses_unpaired_pattern():
    pytest.importorskip("megatron.core")
    from raytron.parallelism.megatron.spec import check_supported

    with pytest.raises(UnsupportedArchitecture, match=r"model.overrides.pattern: pattern 'G\*-' is not"):
        check_supported(models.get_config("hybrid", "debug", pattern="G*-"))


def test_context_parallel_hybrids_map_when_chunks_hold_the_conv_halo():
    """CP is mapped for every hybrid mixer; a GDN / Mamba2 model refuses only CP chunks shorter than the
    short convolution's halo (conv_size - 1 tokens handed from chunk to chunk)."""
    for flavor in ("debug", "debug-moe"):
        assert megatron_pattern_gaps(models.get_config("hybrid", flavor), _layout(cp=2), seq_len=32) == []
    gaps = megatron_pattern_gaps(models.get_config("hybrid", "debug"), _layout(cp=2), seq_len=8)
    assert gaps and gaps[0][0] == "train.seq_len" and "3 halo tokens" in gaps[0][1], gaps
    assert megatron_pattern_gaps(models.get_config("dense", "debug"), _layout(cp=4), seq_len=8) == []


@pytest.mark.slow
def test_context_parallel_attention_spreads_heads_and_matches_whole_sequence(tmp_path):
    """CP2 attention (all-to-all, parallelism/megatron/cp.py) equals attention over the whole sequence,
    outputs and q/k/v gradients, with packed documents and causal / sliding-window / block-sparse masks;
    the kernel on each rank gets every token of heads/cp query heads and of max(kv heads, cp)/cp kv heads
    (one kv head is repeated to cp), never all heads' K/V."""
    from tests.checkpoint.ckpt_helpers import spawn_ranks
    from tests.parallelism.megatron_hybrid_ranks import CP_ATTENTION_CASES, cp_attention

    out = tmp_path / "cp_attention.json"
    spawn_ranks(cp_attention, 2, str(out), timeout=120)
    ranks = json.loads(out.read_text())
    for name, (heads, kv_heads, _) in CP_ATTENTION_CASES.items():
        for rank in ranks:
            assert max(rank[name]["errors"]) < 1e-12, (name, rank[name]["errors"])
            kv_per_rank = max(kv_heads, 2) // 2
            assert rank[name]["kernel_shapes"] == [[[2, heads // 2, 16, 8]] + [[2, kv_per_rank, 16, 8]] * 2], name
