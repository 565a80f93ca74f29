"""train.recompute reaches megatron-core: the engine's GPU TransformerConfig (built on CPU here, no model)
carries megatron's recompute fields, and the one combination megatron-core refuses (full recomputation
with the EP-overlap schedule) is refused by `engine_gaps` too. That recomputation keeps loss and gradients:
test_megatron_step.py (recompute cases) and test_recompute.py (deepspeed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raytron import models
from raytron.parallelism.layout import ParallelLayout
from raytron.parallelism.layout_rules import engine_gaps
from raytron.parallelism.megatron.spec import transformer_config


@pytest.mark.parametrize("mode, expected", [
    ("none", (None, None, None)),
    ("selective", ("selective", None, None)),
    ("full", ("full", "uniform", 1)),
])
def test_recompute_maps_onto_transformer_config(mode, expected):
    cfg = models.get_config("dense", "1b")
    layout = ParallelLayout(world_size=1, micro_batch_size=4, global_batch_size=64)
    tcfg = transformer_config(cfg, layout, recompute=mode)
    assert (tcfg.recompute_granularity, tcfg.recompute_method, tcfg.recompute_num_layers) == expected
    if mode == "selective":
        assert tcfg.recompute_modules == ["core_attn"]  # megatron's selective recompute: core attention


def test_bad_mode_is_named():
    cfg = models.get_config("dense", "debug")
    layout = ParallelLayout(world_size=1, micro_batch_size=2, global_batch_size=2)
    with pytest.raises(ValueError, match="train.recompute"):
        transformer_config(cfg, layout, recompute="partial")


def test_full_recompute_with_moe_overlap_is_refused_like_megatron_does():
    cfg = models.get_config("moe", "debug")
    layout = ParallelLayout(world_size=2, micro_batch_size=2, global_batch_size=8, dp=2, ep=2)
    spec = SimpleNamespace(engine="megatron", train=SimpleNamespace(overlap_moe_comm=True, recompute="full"))
    assert [f for f, _ in engine_gaps(spec, cfg, layout)] == ["train.recompute"]
    with pytest.raises(AssertionError, match="full recomputation"):
        transformer_config(cfg, layout, overlap_moe_comm=True, recompute="full")
    spec.train.recompute = "selective"
    assert engine_gaps(spec, cfg, layout) == []
    tcfg = transformer_config(cfg, layout, overlap_moe_comm=True, recompute="selective")
    assert tcfg.recompute_granularity == "selective"
