"""The report's judgement of the survey's claims, on hand-made results with known answers."""

from __future__ import annotations

import math

from raytron.launcher.study_config import ClaimsSpec, StudySpec
from raytron.launcher.study_report import (CONFIRMED, NOT_CONFIRMED, NOT_MEASURABLE, claim_linear, claim_sparse,
                                           claim_throughput)

STUDY = StudySpec(base="b.yaml", families=("full_attention",), target_active_params=1, layers=2,
                  contexts=(1024, 4096), claims=ClaimsSpec(min_train_tokens=1000))


def fam(val_loss: float, tps: float, seconds: tuple[float, float], tokens: int = 10_000) -> dict:
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "tokens_per_s": tps, "train_tokens": tokens,
            "sweep": [{"seq": s, "seconds": t, "tokens_per_s": s / t, "peak_mem_bytes": 1} for s, t in
                      zip((1024, 4096), seconds)]}


def results(**families) -> dict:
    return {"families": families, "machine": {"device": "cpu"}, "base": {"train": {"seq_len": 64}}}


def test_linear_claim():
    base = fam(3.0, 100, (1.0, 16.0))  # attention: time/token x4 from 1K to 4K
    good = results(full_attention=base, gated_deltanet=fam(3.005, 100, (1.0, 4.2)))
    assert claim_linear(good, STUDY)[0] == CONFIRMED
    worse = results(full_attention=base, gated_deltanet=fam(3.05, 100, (1.0, 4.2)))  # +5% perplexity
    assert claim_linear(worse, STUDY)[0] == NOT_CONFIRMED
    quadratic = results(full_attention=base, mamba2=fam(3.0, 100, (1.0, 12.0)))
    assert claim_linear(quadratic, STUDY)[0] == NOT_CONFIRMED
    small = results(full_attention=fam(3.0, 100, (1.0, 16.0), tokens=10), mamba2=fam(3.0, 100, (1.0, 4.0), tokens=10))
    status, detail = claim_linear(small, STUDY)
    assert status == NOT_MEASURABLE and "below claims.min_train_tokens" in detail
    assert claim_linear(results(full_attention=base), STUDY)[0] == NOT_MEASURABLE


def test_sparse_claim():
    base = fam(3.0, 100, (1.0, 16.0))
    fast = results(full_attention=base, sliding_window=fam(3.1, 100, (1.0, 6.0)))  # 16/6 = 2.67x at 4K
    status, detail = claim_sparse(fast, STUDY)
    assert status == CONFIRMED and "2.67x" in detail
    slow = results(full_attention=base, block_sparse=fam(3.1, 100, (1.0, 12.0)))
    assert claim_sparse(slow, STUDY)[0] == NOT_CONFIRMED


def test_throughput_claim():
    base = fam(3.0, 100, (1.0, 16.0))
    ok = results(full_attention=base, moe=fam(3.02, 180, (1, 4)), gdn_hybrid=fam(2.99, 150, (1, 4)))
    status, detail = claim_throughput(ok, STUDY)
    assert status == CONFIRMED and "forward+backward at 4096 tokens: moe 4.00x, gdn_hybrid 4.00x" in detail
    one_slow = results(full_attention=base, moe=fam(3.02, 180, (1, 4)), gdn_hybrid=fam(2.99, 120, (1, 4)))
    assert claim_throughput(one_slow, STUDY)[0] == NOT_CONFIRMED
    worse = results(full_attention=base, moe=fam(3.3, 300, (1, 4)))  # fast but perplexity +35%
    assert claim_throughput(worse, STUDY)[0] == NOT_CONFIRMED
    tiny = {k: dict(v, train_tokens=10) for k, v in ok["families"].items()}
    assert claim_throughput(results(**tiny), STUDY)[0] == NOT_MEASURABLE
    slow_tiny = {k: dict(v, train_tokens=10, tokens_per_s=90) for k, v in ok["families"].items()}
    assert claim_throughput(results(**slow_tiny), STUDY)[0] == NOT_CONFIRMED, "too slow whatever the perplexity"


def test_time_per_token_counts_every_sequence_of_a_pass():
    """The sweep times the same tokens per pass at every context: 4 x 1K in the time of 1 x 4K is linear cost."""
    from raytron.launcher.study_report import _scaling

    same_work = {"sweep": [{"seq": 1024, "batch": 4, "seconds": 1.0, "tokens_per_s": 4096.0},
                           {"seq": 4096, "batch": 1, "seconds": 1.0, "tokens_per_s": 4096.0}]}
    assert _scaling(same_work) == 1.0
