"""The planner's numbers against measurements of the reference model on CPU.

Memory: the peak of live tensor storage bytes over two training steps (model build, forward, backward,
AdamW step), measured by a dispatch mode that sees every tensor any aten op creates and notices when its
storage is freed. That is exactly what the estimate models (weights, gradients, optimizer state, saved
activations) without allocator noise; RSS-based measurement adds the allocator's caching and library
pages, which are not what `plan` estimates. Gradients are kept between steps (`zero_grad(set_to_none=
False)`), as both engines keep persistent gradient buffers.

FLOPs: torch's FlopCounterMode (with the registry's `counting_mode()` mapping for the CPU SDPA,
`_grouped_mm` and triangular-solve ops) over one forward + backward, against the "counted" convention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytron import models
from raytron.launcher.study_measure import LiveTensorBytes
from raytron.parallelism.deepspeed.engine import apply_recompute
from raytron.parallelism.estimate import flops_per_token, model_stats
from raytron.parallelism.layout import ParallelLayout
from raytron.parallelism.memory import estimate_memory

# (family, flavor, batch, seq, overrides): shapes unlike the debug flavors', so the per-layer activation
# counts are checked away from the shapes they were read off.
CASES = [
    ("dense", "debug", 2, 256, dict(dim=128, num_heads=8, num_kv_heads=4, ffn_dim=344, num_layers=3)),
    ("moe", "debug", 3, 96, dict(dim=96, moe_ffn_dim=160, num_experts=8, top_k=3, shared_experts=1)),
    ("hybrid", "debug", 2, 192, dict(dim=96, linear_heads=6, linear_head_dim=24, chunk_size=32, num_heads=6,
                                     num_kv_heads=3, window=48, ssm_state_dim=32)),
    ("hybrid", "debug-moe", 2, 256, dict(chunk_size=32, sparse_block=32)),
    ("moe", "debug-mla", 2, 128, dict(dim=96, num_heads=6, num_kv_heads=6, q_lora_rank=40, kv_lora_rank=48,
                                     qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=20)),
]
IDS = [f"{c[0]}-{c[1]}" for c in CASES]


def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    aux = model.aux_losses()
    return loss + 0.01 * sum(aux) if aux else loss


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("family, flavor, batch, seq, overrides", CASES, ids=IDS)
def test_memory_estimate_matches_measured_peak(family, flavor, batch, seq, overrides, recompute):
    """Also under train.recompute, applied to the reference model as the deepspeed engine applies it."""
    cfg = models.get_config(family, flavor, **overrides)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with LiveTensorBytes() as mem:
        model = models.Transformer(cfg)
        apply_recompute(model, recompute)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        for _ in range(2):
            _loss(model, tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    layout = ParallelLayout(world_size=1, micro_batch_size=batch, global_batch_size=batch)
    est = estimate_memory(cfg, model_stats(cfg), layout, seq_len=seq, use_gpu=False, engine="deepspeed",
                          recompute=recompute).worst
    assert abs(est.total - mem.peak) / mem.peak < 0.25, (
        f"estimate {est.total / 2**20:.2f} MiB vs measured peak {mem.peak / 2**20:.2f} MiB ({est})")


@pytest.mark.parametrize("family, flavor, batch, seq, overrides", CASES, ids=IDS)
def test_flops_match_counted(family, flavor, batch, seq, overrides):
    cfg = models.get_config(family, flavor, **overrides)
    torch.manual_seed(0)
    model = models.Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with models.flops.counting_mode() as counter:
        _loss(model, tokens).backward()
    counted = counter.get_total_flops() / (batch * seq)
    planned = flops_per_token(cfg, seq, convention="counted")
    assert abs(planned - counted) / counted < 0.05, f"planned {planned:.4g} vs counted {counted:.4g} FLOP/token"
    assert flops_per_token(cfg, seq) <= planned  # the MFU convention halves causal attention


@pytest.mark.parametrize("family, flavor", [("dense", "1b"), ("moe", "olmoe"), ("hybrid", "moe-hybrid"),
                                            ("hybrid", "debug-moe")])
def test_meta_param_counts_match_registry(family, flavor):
    """Counting the meta-device model and the registry's analytic counts agree exactly."""
    cfg = models.get_config(family, flavor)
    stats = model_stats(cfg)
    assert (stats.total_params, stats.active_params) == models.param_counts(cfg)
