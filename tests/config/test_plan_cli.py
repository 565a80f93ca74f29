"""`raytron plan`: every shipped config plans (exit 0), bad ones exit 2 naming the field, -O included."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.config.config_helpers import DEEPSPEED_JOB, job

from raytron.launcher import plan

REPO = Path(__file__).resolve().parents[2]
# job configs; study_cpu.yaml / study_h200.yaml are `raytron study` configs (tests/study checks them)
CLUSTER_CONFIGS = sorted(p for p in (REPO / "cluster_configs").glob("*.yaml")
                         if not p.name.startswith("study_") or p.name.startswith("study_base_"))
REALISTIC = ["dense_1b_8gpu.yaml", "moe_olmoe_8gpu.yaml", "hybrid_moe_32gpu.yaml", "dense_3b_1gpu.yaml"]


def run_plan(config: str, *overrides: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    plan.add_subparser(sub)
    args = parser.parse_args(["plan", config, *[a for o in overrides for a in ("--set", o)]])
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_realistic_configs_exist():
    names = {p.name for p in CLUSTER_CONFIGS}
    assert set(REALISTIC) <= names


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_plans(path):
    code, out, err = run_plan(str(path))
    assert code == 0, err
    for needle in ("rank node", "params", "FLOP/token", "memory per GPU", "assumes precision"):
        assert needle in out
    written = re.search(r"^# Memory estimate \(raytron plan\): peak ([0-9.]+) GiB", path.read_text(), re.M)
    if path.name in REALISTIC:
        assert written, f"{path.name} must state its memory estimate in a comment at the top"
    if written:  # the comment must match what plan computes today
        computed = float(re.search(r"peak\s+([0-9.]+) GiB on stage", out).group(1))
        assert abs(float(written.group(1)) - computed) < 0.011, (
            f"{path.name} says {written.group(1)} GiB, plan computes {computed:.2f}: update the comment")


@pytest.mark.parametrize("config", ["dense_1b_8gpu.yaml", "dense_3b_1gpu.yaml", "hybrid_moe_32gpu.yaml",
                                    "local_debug.yaml"])
def test_recompute_lowers_the_estimate_and_says_so(config):
    """train.recompute: activations and peak drop from none to selective to full (full far below: one hidden
    state per layer boundary), weights and optimizer state stay; the printed assumption names the mode."""
    peaks, acts = {}, {}
    for mode in ("none", "selective", "full"):
        code, out, err = run_plan(str(REPO / "cluster_configs" / config), f"train.recompute={mode}")
        assert code == 0, err
        rows = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
        acts[mode] = max(float(r[4]) for r in rows)
        peaks[mode] = float(re.search(r"peak\s+([0-9.]+) \w+ on stage", out).group(1))
        assert {"none": "no recomputation", "selective": "selective recomputation",
                "full": "full recomputation"}[mode] in out
    assert peaks["none"] > peaks["selective"] > peaks["full"], peaks
    assert acts["none"] > acts["selective"] > acts["full"] and acts["full"] < acts["none"] / 2, acts


def test_dense_3b_fits_one_h200():
    """dense/3b: ~3.0 B parameters, and its 1-GPU config's estimate leaves room in an H200's 141 GB for the
    CUDA context and fragmentation, where the next micro-batch size would not fit."""
    from raytron import models

    total, _ = models.param_counts(models.get_config("dense", "3b"))
    assert 2.9e9 < total < 3.3e9
    h200 = 141e9 / 2**30
    config = str(REPO / "cluster_configs" / "dense_3b_1gpu.yaml")
    _, out, _ = run_plan(config)
    assert float(re.search(r"peak\s+([0-9.]+) GiB", out).group(1)) < h200 - 10
    _, out, _ = run_plan(config, "train.micro_batch_size=8")
    assert float(re.search(r"peak\s+([0-9.]+) GiB", out).group(1)) > h200


def test_invalid_config_exits_2_naming_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(job(DEEPSPEED_JOB, layout__ep=3)))
    code, out, err = run_plan(str(f))
    assert code == plan.EXIT_INVALID and out == ""
    assert "layout.ep" in err and "got 3" in err


def test_set_overrides_apply(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(DEEPSPEED_JOB))
    code, out, _ = run_plan(str(f), "layout.ep=4", "train.lr=1e-3")
    assert code == 0 and "ep=4" in out
    code, _, err = run_plan(str(f), "layout.ep=3")
    assert code == 2 and "layout.ep" in err


@pytest.mark.parametrize("change, field", [
    (("lr: 0.0003", "lr: '3e-4'"), "train.lr"),  # spec level
    (("ep: 2", "ep: 3"), "layout.ep"),  # layout rule (needs the model registry)
], ids=["spec", "layout"])
def test_python_O_still_refuses(tmp_path, change, field):
    """Validation never relies on assert: under `python -O` a bad config still exits 2."""
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(DEEPSPEED_JOB).replace(*change))
    env = {**os.environ, "PYTHONOPTIMIZE": ""}
    proc = subprocess.run([sys.executable, "-O", "-m", "raytron.launcher.plan", str(f)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr and proc.stdout == ""


def test_plan_counts_latent_attention_parameters(tmp_path):
    """`moe/deepseek-small-mla`: plan's parameter line is the registry's count of the MLA model (its latent
    projections, not grouped-query attention's)."""
    from raytron.launcher.plan import _fmt_count
    from raytron.models import get_config, param_counts
    from tests.config.config_helpers import MEGATRON_JOB

    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job(MEGATRON_JOB, model__flavor="deepseek-small-mla")))
    code, out, err = run_plan(str(f))
    assert code == 0, err
    total, active = param_counts(get_config("moe", "deepseek-small-mla", vocab_size=264))  # the byte tokenizer's
    gqa_total, _ = param_counts(get_config("moe", "deepseek-small", vocab_size=264))
    assert total != gqa_total
    assert f"params     total {_fmt_count(total)}, active {_fmt_count(active)}" in out
