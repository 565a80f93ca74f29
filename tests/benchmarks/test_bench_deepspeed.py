"""The deepspeed impl of benchmarks/megatron/bench_throughput.py, run as the GPU script runs it (torchrun, one
rank) on CPU over gloo with the debug flavors: its records carry the fields the summary reads, a finite
positive throughput, the ZeRO-2 layout, and the loss of the reference model (same seed, same tokens, in bf16
as DeepSpeed's bf16 runs it) on the first step."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.megatron import bench_throughput as bt
from raytron import models

ROOT = Path(__file__).parents[2]
SEQ, SEQS_PER_RANK = 64, 4
WORKLOADS = ("dense-debug-cpu", "moe-debug-cpu")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "benchmarks/megatron/bench_throughput.py"), "--impls", "deepspeed", "--workloads",
           ",".join(WORKLOADS), "--warmup", "0", "--timed", "2", "--seq-len", str(SEQ),
           "--seqs-per-rank", str(SEQS_PER_RANK), "--out", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {r["workload"]: r for r in map(json.loads, out.read_text().splitlines())}


def _reference_loss(workload: str, rec: dict) -> float:
    """Mean LM loss of the reference model (train.seed's init, cast to bf16) on the bench's micro-batches."""
    family, flavor, overrides, _ = bt.WORKLOADS[workload]
    torch.manual_seed(bt.make_spec(family, flavor, overrides, 1, 1).train.seed)
    model = models.build(family, flavor, **overrides).to(torch.bfloat16)
    micro = bt.bench_tokens(model.cfg.vocab_size, rec["micro_batch"], rec["grad_accum"], SEQ, rank=0)
    with torch.no_grad():
        losses = [F.cross_entropy(model(b[:, :-1]).float().reshape(-1, model.cfg.vocab_size), b[:, 1:].reshape(-1))
                  for b in micro]
    return float(sum(losses) / len(losses))


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_deepspeed_record_has_the_summary_fields_and_a_finite_throughput(records, workload):
    rec = records[workload]
    assert "error" not in rec, rec.get("traceback")
    assert rec["impl"] == "deepspeed" and rec["precision"] == "bf16" and rec["gpu"] == "cpu"
    assert rec["layout"] == {"dp": 1, "zero_stage": bt.DEEPSPEED_ZERO_STAGE}
    assert rec["micro_batch"] * rec["grad_accum"] == SEQS_PER_RANK and rec["seq_len"] == SEQ
    assert len(rec["step_times_s"]) == 2 and rec["step_s"] == statistics.median(rec["step_times_s"])
    assert math.isfinite(rec["tokens_per_s_per_gpu"]) and rec["tokens_per_s_per_gpu"] > 0
    assert rec["tokens_per_s_per_gpu"] == pytest.approx(rec["global_batch"] * SEQ / rec["step_s"])
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s_per_gpu"] * rec["flops_per_token"] / bt.PEAK_FLOPS)
    family, flavor, overrides, _ = bt.WORKLOADS[workload]
    cfg = models.get_config(family, flavor, **overrides)
    assert rec["flops_per_token"] == models.flops_per_token(cfg, SEQ, "megatron")["total"]


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_deepspeed_first_step_loss_is_the_reference_models(records, workload):
    """The engine trained the reference model of train.seed on the bench's tokens: its first-step loss is the
    bf16 reference's (a different init or batch is off by ~1e-2), and the update lowered the second."""
    losses = records[workload]["losses"]
    assert losses[0] == pytest.approx(_reference_loss(workload, records[workload]), abs=1e-4)
    assert losses[1] < losses[0]


def test_deepspeed_runs_raytrons_workloads_and_the_debug_ones_are_its_alone():
    assert bt.planned_runs(["deepspeed", "raytron"], ["dense-1b", "moe-olmoe-4l", "dense-debug-cpu"], 1) == [
        ("dense-1b", "deepspeed"), ("dense-1b", "raytron"), ("moe-olmoe-4l", "deepspeed"),
        ("moe-olmoe-4l", "raytron"), ("dense-debug-cpu", "deepspeed")]
    for workload in ("dense-1b", "moe-olmoe-4l"):
        assert bt.micro_batch("deepspeed", workload, 1) == bt.micro_batch("raytron", workload, 1)
    assert bt.planned_runs(["deepspeed", "raytron"], ["moe-deepseek-small-mla"], 1) == [
        ("moe-deepseek-small-mla", "raytron")]
