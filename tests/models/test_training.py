"""Every debug flavor learns a tiny structured token stream on CPU in 50 steps."""

import pytest
import torch
import torch.nn.functional as F

from raytron.models import build, list_flavors

DEBUG = [(f, v) for f, v in list_flavors() if v.startswith("debug")]


def periodic_tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Each row repeats a random motif of 3-6 tokens from 0..31: predictable after its first period."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        period = int(torch.randint(3, 7, (1,), generator=g))
        motif = torch.randint(0, 32, (period,), generator=g)
        rows.append(motif.repeat(seq // period + 1)[:seq])
    return torch.stack(rows)


@pytest.mark.parametrize("family,flavor", DEBUG)
def test_debug_flavor_trains(family, flavor):
    torch.manual_seed(0)
    model = build(family, flavor)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(50):
        tokens = periodic_tokens(8, 33, seed=step % 4)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        aux = model.aux_losses()
        total = loss + 0.01 * sum(aux) if aux else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        for moe in model.moe_layers():
            moe.update_bias()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses
