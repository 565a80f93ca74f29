"""MFU, device peaks, peak memory, routing entropy and expert-load balance, checked by hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from raytron import models
from raytron.launcher.metrics import (DENSE_BF16_PEAK, MetricsWriter, device_peak_flops, mfu, model_flops_rate,
                                      peak_memory_gib)
from raytron.models.moe import routing_entropy
from raytron.parallelism.deepspeed.engine import StepMetrics
from raytron.parallelism.estimate import flops_per_token
from raytron.run_dir import RunDir


def test_peak_lookup_by_gpu_name():
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12  # the variant wins over its family
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak_flops(None) is None and device_peak_flops("") is None  # CPU: no invented peak
    assert device_peak_flops("Some Future Accelerator") is None
    assert all(peak > 0 for _, peak in DENSE_BF16_PEAK)


def test_mfu_of_dense_3b_by_hand():
    """dense/3b at seq 4096 (Megatron convention), worked out term by term without models/flops.py."""
    d, layers, h, kv, hd, f, vocab, seq = 3072, 28, 24, 8, 128, 8192, 32000, 4096
    qkv, proj = 2 * d * (h + 2 * kv) * hd, 2 * h * hd * d
    scores = 4 * h * hd * (seq / 2)  # QK^T and PV, causal: half the keys on average
    mlp = 6 * d * f  # gate, up, down
    per_token = 3 * (layers * (qkv + proj + scores + mlp) + 2 * d * vocab)  # fwd + 2x bwd, logits included
    cfg = models.get_config("dense", "3b")
    assert flops_per_token(cfg, seq) == pytest.approx(per_token, rel=1e-12)
    tokens_per_sec, devices = 8 * 4096 * 8 / 2.0, 8  # 8 GPUs, 8 x 4096-token samples each, 2 s per step
    assert model_flops_rate(per_token, tokens_per_sec, devices) == pytest.approx(per_token * 16384)
    expected = per_token * 16384 / 989e12
    assert mfu(per_token, tokens_per_sec, devices, device_peak_flops("NVIDIA H200")) == pytest.approx(expected)
    assert 0.3 < expected < 0.4  # 16k tokens/s/GPU on a 3B model is about a third of an H200
    assert mfu(per_token, tokens_per_sec, devices, None) is None


def test_moe_flops_count_active_experts():
    cfg = models.get_config("moe", "olmoe")
    seq, d = 4096, cfg.dim
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.attn_head_dim
    attn = 2 * d * (h + 2 * kv) * hd + 2 * h * hd * d
    attn += 4 * h * hd * seq / 2
    moe = 2 * d * cfg.num_experts + 6 * d * cfg.moe_ffn_dim * cfg.top_k  # router + top_k experts, not all 64
    assert flops_per_token(cfg, seq) == pytest.approx(3 * (cfg.num_layers * (attn + moe) + 2 * d * cfg.vocab_size))


def test_cpu_peak_memory_is_the_rss_high_water_mark():
    before = peak_memory_gib(cuda=False)["memory/rss_peak_gib"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_memory_gib(cuda=False)["memory/rss_peak_gib"]
    assert block.sum() > 0 and 0 < before and after >= before
    with open("/proc/self/status") as status:
        hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    assert after == pytest.approx(hwm_kib / 2**20, rel=0.05)


def _entropy_by_hand(probs: torch.Tensor) -> float:
    return float(-(probs * probs.log()).sum(-1).mean())


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_routing_entropy_matches_hand_computation(kind):
    logits = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)) * 2
    probs = torch.softmax(logits, -1) if kind == "softmax" else torch.sigmoid(logits)
    probs = probs / probs.sum(-1, keepdim=True)  # the reference router's normalized scores
    total, count = routing_entropy(logits, kind).tolist()
    assert count == 15
    assert total / count == pytest.approx(_entropy_by_hand(probs.reshape(-1, 8)), rel=1e-6)
    uniform = routing_entropy(torch.zeros(4, 8), kind)
    assert float(uniform[0] / uniform[1]) == pytest.approx(math.log(8))


def test_load_max_over_mean():
    assert StepMetrics(1.0, 0.0, 1.0, 1e-3, 8, expert_load=[0.25] * 4).load_max_over_mean == pytest.approx(1.0)
    assert StepMetrics(1.0, 0.0, 1.0, 1e-3, 8, expert_load=[0.5, 0.25, 0.125, 0.125]).load_max_over_mean == 2.0
    assert StepMetrics(1.0, 0.0, 1.0, 1e-3, 8).load_max_over_mean is None


def test_progress_line_shows_mfu_memory_and_router(tmp_path):
    writer = MetricsWriter(RunDir(str(tmp_path)), 0, 10)
    base = {"loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 1000.0}
    gpu = writer.progress(1, {**base, "mfu": 0.523, "memory/max_allocated_gib": 70.25,
                              "moe/router_entropy": 1.2, "moe/load_max_over_mean": 1.5})
    assert "MFU 52.3%" in gpu and "mem 70.25 GiB" in gpu and "router H 1.200 load max/mean 1.50" in gpu
    cpu = writer.progress(1, {**base, "mfu": None, "model_tflops_per_device": 0.0123, "memory/rss_peak_gib": 1.5})
    assert "MFU" not in cpu and "model TFLOP/s 0.0123" in cpu and "mem 1.50 GiB" in cpu
    writer.close()


def test_moe_statistics_reach_tensorboard(tmp_path):
    """Per-expert load, and for biased routers the per-expert bias (mean over layers), its largest magnitude
    and one histogram per layer, are TensorBoard events of the step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(str(tmp_path / "run"))
    writer = MetricsWriter(run, 0, 10)
    bias = [[0.01, -0.02, 0.0, 0.01], [0.03, 0.0, -0.01, -0.02]]
    writer.moe(3, [0.25, 0.5, 0.125, 0.125], bias)
    writer.moe(4, [0.25] * 4, None)  # softmax router: load only
    writer.close()
    events = EventAccumulator(run.tensorboard, size_guidance={"histograms": 0}).Reload()
    scalars = events.Tags()["scalars"]

    def values(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert values("moe/expert_load/1") == [(3, 0.5), (4, 0.25)]
    assert values("moe/expert_bias/0") == [(3, pytest.approx(0.02))] and values("moe/expert_bias/3")[0][1] == pytest.approx(-0.005)
    assert values("moe/expert_bias_absmax") == [(3, pytest.approx(0.03))]
    assert {"moe/expert_bias_layer0", "moe/expert_bias_layer1"} <= set(events.Tags()["histograms"])
    assert not any(t.startswith("moe/expert_bias") for t in scalars if values(t)[-1][0] == 4)
