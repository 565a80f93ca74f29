"""MoE routers on a skewed toy input: the aux loss and the aux-loss-free bias both even out expert
load; capacity keeps exactly `capacity` assignments per expert in GShard's order."""

import math

import pytest
import torch

from raytron.models import ModelConfig, MoE
from raytron.models.moe import apply_capacity


def _skewed_moe(**cfg) -> tuple[MoE, torch.Tensor]:
    """8 experts whose router strongly prefers experts 0 and 1 for every token."""
    torch.manual_seed(0)
    moe = MoE(ModelConfig(dim=16, num_experts=8, top_k=2, moe_ffn_dim=8, pattern="E", **cfg))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.1)
        common = torch.randn(16)
        moe.router.weight[:2] += 2 * common / common.norm()
    x = torch.randn(256, 16) * 0.5 + common / common.norm()  # [tokens, dim], sharing one direction
    return moe, x


def _imbalance(load: torch.Tensor) -> float:
    """Coefficient of variation of per-expert assignment counts (0 = perfectly even)."""
    load = load.float()
    return float(load.std() / load.mean())


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_loss_evens_out_load(router):
    moe, x = _skewed_moe(router=router)
    opt = torch.optim.SGD([moe.router.weight], lr=1.0)
    moe(x)
    before = _imbalance(moe.last_load)
    for _ in range(60):
        moe(x)
        opt.zero_grad()
        moe.last_aux_loss.backward()
        opt.step()
    moe(x)
    assert _imbalance(moe.last_load) < 0.5 * before, (before, _imbalance(moe.last_load))


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_bias_update_evens_out_load(router):
    moe, x = _skewed_moe(router=router, bias_update_rate=0.002)  # sign steps: small vs 1/8 probs
    with torch.no_grad():
        moe(x)
        before = _imbalance(moe.last_load)
        for _ in range(150):
            moe(x)
            moe.update_bias()
        moe(x)
    assert _imbalance(moe.last_load) < 0.25 * before, (before, _imbalance(moe.last_load))
    assert moe.router.expert_bias[:2].max() < 0 < moe.router.expert_bias[2:].max()


def test_apply_capacity_order():
    # 5 tokens, top-2, 3 experts, capacity 2: first choices fill buffers before second choices
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1]])
    keep = apply_capacity(ids, num_experts=3, capacity=2)
    expected = torch.tensor([[True, True], [True, True], [False, False], [True, False], [True, False]])
    # expert 0: first choices of tokens 0, 1 fill it -> token 2's and token 3's second choice dropped;
    # expert 1: token 3 (first choice), token 0 (second) fill it -> tokens 2 and 4 dropped
    assert torch.equal(keep, expected)


def test_moe_capacity_drop_counts():
    moe, x = _skewed_moe(capacity_factor=1.0)
    with torch.no_grad():
        out = moe(x)
        ids, _, _ = moe.router(x)
    capacity = math.ceil(1.0 * x.shape[0] * 2 / 8)
    assigned = torch.bincount(ids.reshape(-1), minlength=8)
    assert moe.last_dropped == int((assigned - capacity).clamp_min(0).sum()) > 0
    assert torch.equal(moe.last_load, assigned.clamp_max(capacity))
    moe.cfg = moe.cfg.replace(capacity_factor=0.0)  # dropless: nothing dropped, output changes
    with torch.no_grad():
        dropless = moe(x)
    assert moe.last_dropped == 0 and not torch.allclose(out, dropless)
