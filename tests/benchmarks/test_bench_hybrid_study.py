"""bench_hybrid_vs_attention.py --study: the stacks are the study's own models (shapes read back from
results.json exactly), and the agreement table compares the two measurements row by row."""

import json

import pytest

from benchmarks.models import bench_hybrid_vs_attention as bench
from raytron.models import get_config
from raytron.typed import to_dict


def results_file(tmp_path, families):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"families": families}))
    return str(path)


def test_study_models_and_sweep_read_back(tmp_path):
    cfgs = {fam: get_config("hybrid", "debug", pattern=unit * 2, dim=96 + i * 32)
            for i, (fam, unit) in enumerate([("full_attention", "*-"), ("gdn_hybrid", "G-G-G-*-"),
                                             ("mamba2_hybrid", "M-M-M-*-")])}
    families = {fam: {"model": to_dict(cfg), "sweep": [{"seq": 2048, "batch": 32, "tokens_per_s": 1000.0 * (i + 1)},
                                                        {"seq": 65536, "error": "out of memory"}]}
                for i, (fam, cfg) in enumerate(cfgs.items())}
    configs = bench.stack_configs(results_file(tmp_path, families))
    assert list(configs) == list(bench.STACKS)
    for stack, fam in bench.STUDY_FAMILIES.items():
        assert configs[stack][0] == cfgs[fam]
    # each timed context's study row (its batch is what the bench times at that context); untimed rows are not compared
    assert configs["hybrid-gdn"][1] == {2048: {"seq": 2048, "batch": 32, "tokens_per_s": 2000.0}}
    del families["gdn_hybrid"]
    with pytest.raises(SystemExit, match="gdn_hybrid"):
        bench.stack_configs(results_file(tmp_path, families))


def test_agreement_table():
    rows = [dict(stack="attention", seq=8192, tokens_per_s=1100.0, study_tokens_per_s=1000.0, ratio=1.1),
            dict(stack="hybrid-gdn", seq=8192, tokens_per_s=700.0, study_tokens_per_s=1000.0, ratio=0.7),
            dict(stack="hybrid-mamba2", seq=8192, error="out of memory")]
    table = bench.agreement_markdown(rows)
    assert "| attention | full_attention | 8192 | 1,100 | 1,000 | 1.100 | yes |" in table
    assert "| hybrid-gdn | gdn_hybrid | 8192 | 700 | 1,000 | 0.700 | no |" in table
    assert "hybrid-mamba2" not in table
