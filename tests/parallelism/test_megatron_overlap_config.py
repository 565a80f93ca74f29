"""train.overlap_moe_comm reaches megatron-core: the engine's GPU TransformerConfig (built on CPU here, no
model) carries overlap_moe_expert_parallel_comm, and `engine_gaps` refuses every layout megatron-core's
own checks refuse (TransformerConfig.__post_init__: ep > 1, virtual stages when pp > 1), plus two that
megatron-core accepts but runs wrong (tests/parallelism/test_megatron_step.py says how they fail). That the
schedule then runs the engine's plans and matches the reference: test_megatron_step.py's overlap cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raytron import models
from raytron.parallelism.layout import ParallelLayout
from raytron.parallelism.layout_rules import engine_gaps
from raytron.parallelism.megatron.spec import transformer_config

SPEC = SimpleNamespace(engine="megatron", train=SimpleNamespace(overlap_moe_comm=True))


def _case(family: str, overrides: dict, world: int, fields: dict):
    cfg = models.get_config(family, "debug", **overrides)
    layout = ParallelLayout(world_size=world, micro_batch_size=2, global_batch_size=8, **fields)
    return cfg, layout, [reason for field, reason in engine_gaps(SPEC, cfg, layout) if field == "train.overlap_moe_comm"]


@pytest.mark.parametrize("family, overrides, world, fields, runs", [
    ("moe", {}, 2, {"dp": 2, "ep": 2}, True),
    ("moe", {"num_layers": 4}, 4, {"pp": 2, "vpp": 2, "dp": 2, "ep": 2}, True),  # interleaved schedule
    ("moe", {}, 2, {"dp": 2}, False),  # ep 1
    ("dense", {}, 2, {"dp": 2}, False),  # no experts
    ("moe", {}, 2, {"pp": 2}, False),  # pp > 1 without virtual stages
])
def test_refusals_cover_megatron_cores_checks(family, overrides, world, fields, runs):
    cfg, layout, gaps = _case(family, overrides, world, fields)
    assert (gaps == []) == runs, gaps
    if runs:
        tcfg = transformer_config(cfg, layout, overlap_moe_comm=True)
        assert tcfg.overlap_moe_expert_parallel_comm and tcfg.bf16 and tcfg.moe_token_dispatcher_type == "alltoall"
        assert not transformer_config(cfg, layout).overlap_moe_expert_parallel_comm  # off by default
    else:
        with pytest.raises(AssertionError):
            transformer_config(cfg, layout, overlap_moe_comm=True)


@pytest.mark.parametrize("overrides, reason", [
    ({"pattern": "*E*-"}, "ends in a dense MLP"),  # megatron-core would skip the final norm
    ({"num_experts": 2}, "one expert per EP rank"),  # megatron-core would free the experts' saved input
])
def test_refusals_beyond_megatron_cores_checks(overrides, reason):
    cfg, layout, gaps = _case("moe", overrides, 2, {"dp": 2, "ep": 2})
    assert transformer_config(cfg, layout, overlap_moe_comm=True).overlap_moe_expert_parallel_comm
    assert len(gaps) == 1 and reason in gaps[0], gaps
