"""Every debug flavor: causality, document masking (a packed row == its documents run alone),
registry contract, parameter and FLOP counts vs the built model and torch's FLOP counter."""

import pytest
import torch

from raytron.models import build, get_config, list_flavors
from raytron.models.flops import counting_mode, flops_per_token, param_counts

DEBUG = [(f, v) for f, v in list_flavors() if v.startswith("debug")]
# capacity dropping makes a token's output depend on later tokens' routing: not causal by design
DROPLESS = [(f, v) for f, v in DEBUG if get_config(f, v).capacity_factor == 0]


def _model(family, flavor, **overrides):
    torch.manual_seed(0)
    return build(family, flavor, **overrides).double().eval()


@pytest.mark.parametrize("family,flavor", DROPLESS)
def test_causal(family, flavor):
    model = _model(family, flavor)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    changed = tokens.clone()
    changed[:, 23:] = torch.randint(0, model.cfg.vocab_size, (2, 17))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :23], b[:, :23], atol=1e-12, rtol=0)
    assert (a[:, 23:] - b[:, 23:]).abs().max() > 1e-6


@pytest.mark.parametrize("family,flavor", DROPLESS)
def test_packed_documents_equal_documents_alone(family, flavor):
    model = _model(family, flavor)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40))
    doc_ids = torch.tensor([[0] * 11 + [1] * 21 + [2] * 8])
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        for start, end in [(0, 11), (11, 32), (32, 40)]:
            alone = model(tokens[:, start:end])
            # RoPE is relative, but its tables are float32: absolute offsets differ in the 8th digit
            torch.testing.assert_close(packed[:, start:end], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,flavor", list_flavors())
def test_param_counts_match_model(family, flavor):
    cfg = get_config(family, flavor)
    total, active = param_counts(cfg)
    assert active <= total
    if flavor.startswith("debug"):
        model = build(family, flavor)
        assert total == sum(p.numel() for p in model.parameters())
        if cfg.num_experts:
            inactive = sum(3 * cfg.dim * cfg.moe_ffn_dim * (cfg.num_experts - cfg.top_k) for _ in model.moe_layers())
            assert active == total - inactive


@pytest.mark.parametrize("family,flavor", DEBUG)
def test_flops_per_token_match_flop_counter(family, flavor):
    """Counted forward + backward of the real model (matmuls, SDPA with all S x S scores, grouped
    GEMMs, triangular solves) vs flops_per_token(convention="counted"), within 5%."""
    torch.manual_seed(0)
    model = build(family, flavor)
    batch, seq = 2, 64
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq))
    with counting_mode() as counter:
        model(tokens).sum().backward()
    counted = counter.get_total_flops() / (batch * seq)
    predicted = flops_per_token(model.cfg, seq, convention="counted")["total"]
    assert abs(predicted / counted - 1) < 0.05, (predicted, counted)


def test_megatron_convention_halves_causal_scores_only():
    cfg = get_config("dense", "debug")
    counted, mfu = flops_per_token(cfg, 4096, "counted"), flops_per_token(cfg, 4096)
    scores = 3 * 4 * cfg.num_heads * cfg.attn_head_dim * 4096 * cfg.num_layers
    assert counted["*"] - mfu["*"] == pytest.approx(scores / 2)
    assert counted["-"] == mfu["-"] and counted["total"] - mfu["total"] == pytest.approx(scores / 2)
    hybrid = get_config("hybrid", "debug")
    assert flops_per_token(hybrid, 4096)["W"] < flops_per_token(hybrid, 4096)["*"]  # window 16 << 2048


def test_hybrid_flavors_shapes():
    one_b = get_config("hybrid", "1b")
    pattern = one_b.layer_pattern().replace("-", "")
    assert pattern.count("G") == 3 * pattern.count("*")
    assert 0.8e9 < param_counts(one_b)[0] < 1.2e9
    big = get_config("hybrid", "moe-hybrid")
    stages = big.stage_patterns()
    assert len(stages) == 2 and len(stages[0]) == len(stages[1])
    assert big.num_experts % 8 == 0 and big.num_heads % 2 == 0 and big.num_kv_heads % 2 == 0
    assert get_config("moe", "olmoe").num_experts == 64 and get_config("moe", "olmoe").top_k == 8
    deepseek = get_config("moe", "deepseek-small")
    assert deepseek.shared_experts > 0 and deepseek.router == "sigmoid"
