"""The benchmarks' stand-in job spec (bench_throughput.make_spec, also used by fp8_parity.py) is a valid
job config: every field the engines read exists, and the values pass the config's own validation."""

import dataclasses

from benchmarks.megatron import bench_throughput
from raytron.config.spec import ResourcesSpec, TrainSpec
from raytron.parallelism.schedule import lr_multiplier


def test_stand_in_spec_is_a_valid_train_config():
    spec = bench_throughput.make_spec("dense", "1b", {}, 32, 8, recompute="selective", precision="fp8")
    train = TrainSpec(**vars(spec.train))  # runs TrainSpec's checks; a missing required field raises
    assert {f.name for f in dataclasses.fields(TrainSpec)} == set(vars(spec.train))
    assert (train.recompute, train.precision, train.global_batch_size) == ("selective", "fp8", 32)
    assert lr_multiplier(spec.train)(0) == 1.0  # warm-up 0, min_lr == lr: a constant schedule
    assert {f.name for f in dataclasses.fields(ResourcesSpec)} <= set(vars(spec.resources))
    assert spec.resources.use_gpu is True
