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


def _naive_route(probs: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited top-k written token by token: rank the groups by the sum of their top
    (k // topk_group) biased scores, keep the best topk_group groups, take the top k experts inside them."""
    out = []
    for row in probs + bias:
        groups = row.view(n_group, -1)
        rank = groups.topk(k // topk_group, dim=-1).values.sum(-1)
        allowed = set(rank.topk(topk_group).indices.tolist())
        candidates = [(float(row[e]), e) for e in range(row.numel()) if e // groups.shape[1] in allowed]
        out.append([e for _, e in sorted(candidates, reverse=True)[:k]])
    return torch.tensor(out)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_group_limited_routing(router):
    from raytron.models.moe import route

    cfg = ModelConfig(dim=16, num_experts=8, top_k=4, moe_ffn_dim=8, pattern="E", router=router, n_group=4,
                      topk_group=2, routed_scaling_factor=2.5)
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(64, 8, generator=g), 0.1 * torch.randn(8, generator=g)
    ids, weights, _ = route(logits, cfg, bias)
    scores = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
    assert torch.equal(ids, _naive_route(scores, bias, 4, 4, 2))
    assert {len(set((row // 2).tolist())) for row in ids} <= {1, 2}  # at most topk_group groups per token
    unlimited, _, _ = route(logits, cfg.replace(n_group=1, topk_group=1), bias)
    assert not torch.equal(ids, unlimited), "the group limit must change some token's experts here"
    expected = scores.gather(-1, ids)
    assert torch.allclose(weights, 2.5 * expected / expected.sum(-1, keepdim=True))  # unbiased, normalised, scaled


def test_router_z_loss_is_mean_squared_logsumexp():
    moe, x = _skewed_moe(router="sigmoid")
    moe(x)
    logits = moe.router.logits(x)
    assert torch.allclose(moe.last_z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    moe.last_z_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_bias_update_counts_every_training_forward_of_the_step():
    """update_bias uses the load summed over every training forward since the last update (all the
    micro-batches of a step), and eval-mode forwards do not count."""
    from raytron.models.moe import bias_step

    moe, x = _skewed_moe(router="sigmoid", bias_update_rate=0.01)
    with torch.no_grad():
        moe(x[:100])
        first = moe.last_load.clone()
        moe(x[100:])
        total = first + moe.last_load
        moe.eval()
        moe(x)  # not counted
        moe.train()
        moe.update_bias()
    assert torch.equal(moe.router.expert_bias, bias_step(torch.zeros(8), total, 0.01))
    assert moe.step_load is None


@pytest.mark.parametrize("changes", [dict(n_group=3), dict(n_group=4, topk_group=5), dict(n_group=4, topk_group=3),
                                     dict(n_group=8, topk_group=1), dict(bias_update_rate=-1.0)])
def test_routing_fields_are_checked(changes):
    with pytest.raises(ValueError):
        ModelConfig(dim=16, num_experts=8, top_k=2, moe_ffn_dim=8, pattern="E", **changes)
