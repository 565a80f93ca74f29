"""Engine limits: `plan` flags a sound layout the engine cannot run yet; `submit`'s validation refuses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytron.launcher.plan import main as plan_main
from raytron.config.spec import load_spec
from raytron.launcher.validate import validate_job
from raytron.typed import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "cluster_configs"


@pytest.mark.parametrize("config, overrides, field", [
    # CP chunks (seq_len / 2cp = 2 tokens) shorter than the GDN / Mamba2 short-conv halo (3 tokens)
    ("hybrid_moe_32gpu.yaml", ["layout.cp=2", "layout.dp=4", "train.seq_len=8"], "train.seq_len"),
    ("hybrid_moe_32gpu.yaml", ["model.overrides.pattern=GEG*|E*E"], "model.overrides.pattern"),  # mark inside a pair
    ("gpu_megatron_2gpu.yaml", ["model.overrides.capacity_factor=1.25"], "model.overrides.capacity_factor"),
    ("local_debug.yaml", ["train.overlap_grad_reduce=true"], "train.overlap_grad_reduce"),  # deepspeed engine
    ("dense_1b_8gpu.yaml", ["train.overlap_grad_reduce=true", "layout.pp=2", "layout.tp=2", "layout.dp=null"],
     "train.overlap_grad_reduce"),  # megatron with pp > 1
    ("moe_olmoe_8gpu.yaml", ["train.recompute=full"], "train.recompute"),  # megatron refuses it with overlap_moe_comm
])
def test_runnable_validation_names_the_gap(config, overrides, field):
    spec = load_spec(str(CONFIGS / config), overrides)
    validate_job(spec)  # the layout itself is sound
    with pytest.raises(ConfigError) as err:
        validate_job(spec, runnable=True)
    assert err.value.path == field


@pytest.mark.parametrize("config, overrides, reason", [
    ("local_debug.yaml", [], "deepspeed engine"),
    ("dense_1b_8gpu.yaml", [], "no MoE layers"),
    ("gpu_megatron_2gpu.yaml", ["layout.ep=1"], "layout.ep is 1"),
    ("hybrid_moe_32gpu.yaml", [], "interleaved pipeline schedule"),  # pp=2 without vpp
    ("gpu_megatron_2gpu.yaml", ["model.overrides.pattern=*E*-"], "ends in a dense MLP"),  # final norm skipped
    ("gpu_megatron_2gpu.yaml", ["model.overrides.num_experts=2"], "one expert per EP rank"),  # freed input
])
def test_overlap_moe_comm_refusals(config, overrides, reason):
    """train.overlap_moe_comm where megatron-core 0.16.1 cannot run it, or runs it wrong (the last two:
    proven on CPU by tests/parallelism/test_megatron_step.py's overlap cases and their history)."""
    spec = load_spec(str(CONFIGS / config), ["train.overlap_moe_comm=true", *overrides])
    validate_job(spec)
    with pytest.raises(ConfigError) as err:
        validate_job(spec, runnable=True)
    assert err.value.path == "train.overlap_moe_comm" and reason in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides, field", [
    (["model.overrides.capacity_factor=1.25"], "model.overrides.capacity_factor"),  # another dropping order
    (["model.overrides.bias_update_rate=0.01"], "model.overrides.bias_update_rate"),  # bias on softmax scores
    (["model.overrides.router=sigmoid", "model.overrides.norm_topk=false"], "model.overrides.norm_topk"),
    (["model.overrides.top_k=1"], "model.overrides.top_k"),  # a single score left unnormalised
    (["model.overrides.n_group=2"], "model.overrides.n_group"),  # softmax groups ranked by logits
])
def test_megatron_router_refusals_name_the_engine_that_can(overrides, field, capsys):
    """Routing options megatron-core computes otherwise than the reference: plan names the option and
    the deepspeed engine, which runs each of them (tests/parallelism/test_deepspeed_equivalence.py)."""
    spec = load_spec(str(CONFIGS / "gpu_megatron_2gpu.yaml"), overrides)
    validate_job(spec)
    with pytest.raises(ConfigError) as err:
        validate_job(spec, runnable=True)
    assert err.value.path == field and "engine: deepspeed runs it" in str(err.value), str(err.value)
    validate_job(load_spec(str(CONFIGS / "local_debug.yaml"), overrides), runnable=True)
    assert plan_main([str(CONFIGS / "gpu_megatron_2gpu.yaml"), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert f"NOT RUNNABLE YET on engine megatron: {field}" in capsys.readouterr().out


@pytest.mark.parametrize("config, overrides", [
    ("gpu_megatron_2gpu.yaml", []), ("local_debug.yaml", []),
    ("moe_olmoe_8gpu.yaml", ["engine=deepspeed", "layout.zero_stage=2", "train.overlap_moe_comm=false"]),  # top-8
])
@pytest.mark.parametrize("flavor", ["deepseek-small", "debug-sigmoid"])
def test_deepseek_routing_runs_on_both_engines(config, overrides, flavor):
    """Sigmoid routers with the aux-loss-free bias and shared experts (DeepSeek-V3 style) on either engine."""
    sets = [f"model.flavor={flavor}", *overrides]
    validate_job(load_spec(str(CONFIGS / config), sets), runnable=True)


def test_plan_lists_gap_and_still_exits_zero(capsys):
    assert plan_main([str(CONFIGS / "hybrid_moe_32gpu.yaml"), "--set", "layout.cp=2", "--set", "layout.dp=4",
                      "--set", "train.seq_len=8"]) == 0
    assert "NOT RUNNABLE YET on engine megatron: train.seq_len" in capsys.readouterr().out


def test_plan_says_hybrid_megatron_job_is_runnable_with_context_parallelism(capsys):
    assert plan_main([str(CONFIGS / "hybrid_moe_32gpu.yaml"), "--set", "layout.cp=2", "--set", "layout.dp=4"]) == 0
    assert "NOT RUNNABLE" not in capsys.readouterr().out


def test_plan_says_hybrid_megatron_job_is_runnable(capsys):
    assert plan_main([str(CONFIGS / "hybrid_moe_32gpu.yaml")]) == 0
    assert "NOT RUNNABLE" not in capsys.readouterr().out


@pytest.mark.parametrize("config, overrides", [
    ("gpu_megatron_2gpu.yaml", ["layout.ep=1", "layout.tp=2", "layout.dp=null"]),  # MoE TP, experts replicated
    ("dense_1b_8gpu.yaml", ["layout.pp=2", "layout.vpp=2", "layout.tp=2", "layout.dp=null"]),  # interleaved PP
    ("gpu_megatron_2gpu.yaml", ["train.overlap_grad_reduce=true"]),  # EP2 x DP2, pp = 1
    ("gpu_megatron_2gpu.yaml", ["train.overlap_moe_comm=true", "train.overlap_grad_reduce=true"]),  # EP2 x DP2
    ("moe_olmoe_8gpu.yaml", ["layout.pp=2", "layout.vpp=2", "layout.dp=4", "layout.ep=4"]),  # interleaved PP
])
def test_fixed_megatron_gaps_are_runnable(config, overrides):
    """MoE with experts replicated over TP, interleaved PP, and the gradient-reduction and EP all-to-all
    overlaps: proven on CPU by tests/parallelism/test_megatron_step.py."""
    validate_job(load_spec(str(CONFIGS / config), overrides), runnable=True)


def test_runnable_jobs_have_no_gaps():
    """Every shipped job (the Ray cluster examples submit moe_olmoe_8gpu.yaml) runs as written."""
    for config in ("local_debug.yaml", "gpu_megatron_2gpu.yaml", "dense_1b_8gpu.yaml", "hybrid_moe_32gpu.yaml",
                   "moe_olmoe_8gpu.yaml"):
        validate_job(load_spec(str(CONFIGS / config)), runnable=True)


@pytest.mark.parametrize("config, overrides, reason", [
    ("local_debug.yaml", [], "deepspeed engine has no FP8"),
    ("dense_1b_8gpu.yaml", ["train.seq_len=1001"], "tokens per rank"),
    ("dense_1b_8gpu.yaml", ["model.overrides.ffn_dim=5000"], "model.ffn_dim / layout.tp = 5000"),
])
def test_fp8_refusals(config, overrides, reason, capsys):
    """train.precision fp8 needs the megatron engine on GPUs and 16-aligned GEMMs: plan says why, submit refuses."""
    spec = load_spec(str(CONFIGS / config), ["train.precision=fp8", *overrides])
    validate_job(spec)
    with pytest.raises(ConfigError) as err:
        validate_job(spec, runnable=True)
    assert err.value.path == "train.precision" and reason in str(err.value), str(err.value)
    sets = [a for o in ["train.precision=fp8", *overrides] for a in ("--set", o)]
    assert plan_main([str(CONFIGS / config), *sets]) == 0
    assert "NOT RUNNABLE YET" in capsys.readouterr().out


def test_fp8_megatron_gpu_job_is_runnable():
    validate_job(load_spec(str(CONFIGS / "dense_1b_8gpu.yaml"), ["train.precision=fp8"]), runnable=True)
    validate_job(load_spec(str(CONFIGS / "moe_olmoe_8gpu.yaml"), ["train.precision=fp8"]), runnable=True)


@pytest.mark.parametrize("overrides, field, reason", [
    (["layout.zero_stage=0", "train.precision=bf16"], "train.precision", "FP16_Optimizer"),
    (["layout.zero_stage=0", "resources.use_gpu=true"], "train.precision", "train.precision: auto"),  # auto: bf16
    (["layout.offload=optimizer", "layout.zero_stage=0", "resources.use_gpu=true", "train.precision=fp32"],
     "layout.offload", "ZeRO-0 has none"),
    (["layout.offload=optimizer+params", "resources.use_gpu=true"], "layout.offload", "ZeRO-3 only"),
    (["engine=megatron", "resources.use_gpu=true", "train.precision=fp32", "layout.zero_stage=1"], "train.precision",
     "deepspeed-engine option"),
    (["engine=megatron", "resources.use_gpu=true", "layout.offload=optimizer", "layout.zero_stage=1"],
     "layout.offload", "engine: deepspeed"),
])
def test_precision_and_offload_gaps(overrides, field, reason):
    """What DeepSpeed (or the megatron engine) cannot run among train.precision x layout.offload x zero_stage."""
    spec = load_spec(str(CONFIGS / "local_debug.yaml"), overrides)
    validate_job(spec)
    with pytest.raises(ConfigError) as err:
        validate_job(spec, runnable=True)
    assert err.value.path == field and reason in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides", [
    ["layout.zero_stage=0"],  # fp32 on CPU
    ["layout.zero_stage=2", "train.precision=bf16"],  # DeepSpeed's CPU accelerator runs bf16 ZeRO
    ["layout.zero_stage=2", "resources.use_gpu=true", "layout.offload=optimizer"],
    ["layout.zero_stage=1", "layout.offload=optimizer"],  # on CPU: DeepSpeed's offload path, no memory saved
    ["model.family=dense", "layout.ep=1", "layout.zero_stage=3", "resources.use_gpu=true",
     "layout.offload=optimizer+params"],
    ["model.flavor=debug-capacity"],  # the reference's token dropping (tests/parallelism/test_deepspeed_equivalence.py)
])
def test_deepspeed_runs(overrides):
    validate_job(load_spec(str(CONFIGS / "local_debug.yaml"), overrides), runnable=True)


def test_plan_refuses_moe_zero3_naming_what_runs(capsys):
    assert plan_main([str(CONFIGS / "local_debug.yaml"), "--set", "layout.zero_stage=3"]) == 2
    err = capsys.readouterr().err
    assert "layout.zero_stage" in err and "DeepSpeed-MoE does not support ZeRO-3" in err and "zero_stage 1 or 2" in err
