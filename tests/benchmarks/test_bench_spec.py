"""The stand-in job specs built in code (bench_throughput.make_spec, also used by fp8_parity.py, and the GPU
equivalence/checkpoint programs' make_spec) are valid job configs: every field the engines read exists, and
the values pass the config's own validation."""

import dataclasses

import pytest

from benchmarks.megatron import bench_throughput
from raytron.config.spec import LayoutSpec, ResourcesSpec, TrainSpec
from raytron.parallelism.schedule import lr_multiplier
from tests.gpu import megatron_equivalence


@pytest.mark.parametrize("spec", [
    bench_throughput.make_spec("dense", "1b", {}, 32, 8, recompute="selective", precision="fp8"),
    bench_throughput.make_spec("moe", "olmoe", {}, 32, 4, engine="deepspeed", zero_stage=2),
    megatron_equivalence.make_spec("moe", 50),
], ids=["bench_throughput", "bench_throughput_deepspeed", "megatron_equivalence"])
def test_stand_in_spec_is_a_valid_train_config(spec):
    train = TrainSpec(**vars(spec.train))  # runs TrainSpec's checks; a missing required field raises
    assert {f.name for f in dataclasses.fields(TrainSpec)} == set(vars(spec.train))
    assert lr_multiplier(spec.train)(0) == 1.0  # warm-up 0, min_lr == lr: a constant schedule
    assert train.global_batch_size == spec.train.global_batch_size
    assert {f.name for f in dataclasses.fields(ResourcesSpec)} <= set(vars(spec.resources))
    assert spec.resources.use_gpu is True
    if hasattr(spec, "layout"):  # the deepspeed engine reads spec.layout (offload) and spec.engine
        assert LayoutSpec(**vars(spec.layout)).zero_stage == spec.layout.zero_stage
        assert spec.engine in ("megatron", "deepspeed")
