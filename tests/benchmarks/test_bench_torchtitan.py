"""The TorchTitan comparison (benchmarks/megatron/bench_torchtitan.py) builds TorchTitan's Llama 3 and Qwen3-MoE at
our models' shapes: these check the mapping from our ModelConfig to their arguments (titan_shapes.py) without
TorchTitan (not a CI dependency). The GPU run builds the model with TorchTitan's own code and refuses a parameter count that differs
from ours; llama3_param_count is checked here against models.param_counts, computed independently."""

from __future__ import annotations


import pytest

from benchmarks.megatron import bench_torchtitan as bench
from raytron import models


def test_dense_1b_maps_to_llama3_arguments():
    shape = bench.llama3_shape(models.get_config("dense", "1b"))
    assert shape == {"dim": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 32000,
                     "multiple_of": 512, "ffn_dim_multiplier": None, "rope_theta": 10000.0,
                     "enable_weight_tying": False}
    # TorchTitan's rule: round_up(int(8 * 2048 / 3) = 5461, 512) = 11 * 512
    assert bench.ffn_hidden_dim(2048, shape["multiple_of"], shape["ffn_dim_multiplier"]) == 5632


@pytest.mark.parametrize("flavor", ["1b", "debug"])
def test_llama3_parameter_count_equals_ours(flavor):
    cfg = models.get_config("dense", flavor)
    assert bench.llama3_param_count(bench.llama3_shape(cfg)) == models.param_counts(cfg)[0]


def test_tied_embeddings_count_once():
    cfg = models.get_config("dense", "debug", tie_embeddings=True)
    shape = bench.llama3_shape(cfg)
    assert shape["enable_weight_tying"]
    assert bench.llama3_param_count(shape) == models.param_counts(cfg)[0]


def test_ffn_rule_matches_torchtitan_flavors():
    # TorchTitan 0.3.0's llama3 flavors (models/llama3/__init__.py) and the widths they are known to give
    assert bench.ffn_hidden_dim(256, 256) == 768  # debugmodel
    assert bench.ffn_hidden_dim(2048, 1024, 1.5) == 8192  # 1B
    assert bench.ffn_hidden_dim(4096, 1024, 1.3) == 14336  # 8B
    assert bench.ffn_hidden_dim(8192, 4096, 1.3) == 28672  # 70B


@pytest.mark.parametrize("overrides, problem", [
    ({"ffn_dim": 5000}, "ffn_dim 5000"),
    ({"head_dim": 64}, "head size 64"),
    ({"norm_eps": 1e-6}, "norm_eps"),
])
def test_unexpressible_dense_configs_are_refused(overrides, problem):
    with pytest.raises(ValueError, match=problem):
        bench.llama3_shape(models.get_config("dense", "1b", **overrides))


@pytest.mark.parametrize("family, flavor", [("moe", "olmoe"), ("hybrid", "1b")])
def test_non_dense_models_are_refused(family, flavor):
    with pytest.raises(ValueError, match="layer pattern"):
        bench.llama3_shape(models.get_config(family, flavor))


def test_record_fields_match_bench_throughput():
    rec = bench.bt.base_record("torchtitan", "dense-1b", ("dense", "1b", {}), 4, {"dp": 4, "fsdp": 4},
                               bench.layout_of("dense-1b", 4)[0])
    # the same tokens per optimizer step per GPU as raytron's records: SEQS_PER_RANK sequences of 4096
    assert rec["global_batch"] * rec["seq_len"] / rec["world"] == bench.bt.SEQS_PER_RANK * 4096
    assert rec["micro_batch"] * rec["grad_accum"] == bench.bt.SEQS_PER_RANK
    assert rec["flops_per_token"] == models.flops_per_token(models.get_config("dense", "1b"), 4096, "megatron")["total"]


def test_megatron_bench_runs_mcore_local_at_every_world_but_not_raytrons_ep1_variant():
    """bench_throughput.planned_runs: megatron-core's local spec runs beside raytron at 1 and at 2-4 GPUs (the
    comparison of benchmarks/megatron/README.md); the EP-1 MoE variant is raytron's own scaling check only."""
    plan = bench.bt.planned_runs(["raytron", "mcore_local"], list(bench.bt.WORKLOADS), 4)
    assert plan == [("dense-1b", "raytron"), ("dense-1b", "mcore_local"), ("moe-olmoe-4l", "raytron"),
                    ("moe-olmoe-4l", "mcore_local"), ("moe-olmoe-4l-ep1", "raytron")]
    assert bench.bt.planned_runs(["mcore_local"], list(bench.bt.WORKLOADS), 1) == [
        ("dense-1b", "mcore_local"), ("moe-olmoe-4l", "mcore_local")]


def test_dense_3b_is_an_opt_in_one_gpu_raytron_workload_with_recompute():
    """bench_throughput.py --workloads dense-3b --recompute selective: raytron alone, on one GPU, not in the
    default set (the suite's runs stay as they were); the spec the engine gets carries train.recompute."""
    bt = bench.bt
    assert "dense-3b" not in bt.DEFAULT_WORKLOADS and set(bt.DEFAULT_WORKLOADS) < set(bt.WORKLOADS)
    assert bt.planned_runs(["raytron", "mcore_local"], ["dense-3b"], 1) == [("dense-3b", "raytron")]
    assert bt.planned_runs(["raytron"], ["dense-3b"], 4) == []
    assert bt.make_spec("dense", "3b", {}, 32, bt.micro_batch("raytron", "dense-3b", 1),
                        recompute="selective").train.recompute == "selective"
    assert bt.make_spec("dense", "1b", {}, 32, 8).train.recompute == "none"


def test_moe_olmoe_4l_maps_to_qwen3_moe_arguments():
    shape = bench.qwen3_moe_shape(models.get_config("moe", "olmoe", **bench.bt.MOE_OVERRIDES))
    assert shape == {"dim": 2048, "n_layers": 4, "n_heads": 16, "n_kv_heads": 16, "head_dim": 128,
                     "moe_hidden_dim": 1024, "num_experts": 64, "top_k": 8, "vocab_size": 50304, "rope_theta": 10000.0}


@pytest.mark.parametrize("flavor, overrides", [("olmoe", {"num_layers": 4}), ("debug", {})])
def test_qwen3_moe_parameter_count_is_ours_plus_its_qk_norms(flavor, overrides):
    """Its q and k RMSNorms (head size each, per layer) are the only parameters ours has not."""
    cfg = models.get_config("moe", flavor, **overrides)
    shape = bench.qwen3_moe_shape(cfg)
    assert bench.qwen3_moe_param_count(shape) == models.param_counts(cfg)[0] + 2 * cfg.attn_head_dim * shape["n_layers"]


@pytest.mark.parametrize("flavor, overrides, problem", [
    ("deepseek-small", {}, "shared experts"),
    ("debug-sigmoid", {}, "router 'sigmoid'"),
    ("debug-capacity", {}, "capacity_factor"),
    ("debug", {"norm_topk": False}, "norm_topk=False"),
    ("debug", {"tie_embeddings": True}, "tied embeddings"),
])
def test_unexpressible_moe_configs_are_refused(flavor, overrides, problem):
    with pytest.raises(ValueError, match=problem):
        bench.qwen3_moe_shape(models.get_config("moe", flavor, **overrides))


@pytest.mark.parametrize("family, flavor", [("dense", "1b"), ("hybrid", "debug-moe")])
def test_non_moe_models_are_refused_by_qwen3_moe(family, flavor):
    with pytest.raises(ValueError, match="layer pattern"):
        bench.qwen3_moe_shape(models.get_config(family, flavor))


@pytest.mark.parametrize("workload, world, expect", [
    ("dense-1b", 1, (8, 1)), ("dense-1b", 4, (8, 1)), ("moe-olmoe-4l", 1, (4, 1)), ("moe-olmoe-4l", 2, (4, 2)),
    ("moe-olmoe-4l", 4, (8, 4)), ("moe-olmoe-4l-ep1", 4, (4, 1)), ("moe-debug", 2, (2, 2)), ("dense-debug", 2, (2, 1))])
def test_torchtitan_runs_at_raytrons_micro_batch_and_expert_parallel_degree(workload, world, expect):
    assert bench.layout_of(workload, world) == expect
    if workload in bench.bt.WORKLOADS:
        assert expect == (bench.bt.micro_batch("raytron", workload, world),
                          bench.bt.WORKLOADS[workload][3][world].get("ep", 1))


def test_runs_raytron_has_no_layout_for_or_torch_cannot_do_are_skipped_with_the_reason(monkeypatch):
    from torch.distributed.fsdp._fully_shard import _fsdp_common

    assert bench.why_not("moe-olmoe-4l-ep1", 1) == "no raytron layout at 1 GPU(s)"
    monkeypatch.setattr(_fsdp_common, "ShardPlacementResult", object(), raising=False)
    assert bench.why_not("moe-olmoe-4l", 4) is None and bench.why_not("moe-olmoe-4l-ep1", 4) is None
    monkeypatch.delattr(_fsdp_common, "ShardPlacementResult")  # as torch 2.11 on the GPU image
    assert "per-parameter meshes" in bench.why_not("moe-olmoe-4l", 4)
    assert bench.why_not("moe-olmoe-4l", 1) is None and bench.why_not("moe-olmoe-4l-ep1", 4) is None
    assert bench.why_not("dense-1b", 4) is None
