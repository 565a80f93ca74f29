"""The long-context workloads of bench_throughput.py (dense/1b, hybrid/1b, hybrid/1b-mamba at 4K-64K), their
debug-sized forms trained one step on the megatron engine on CPU against the reference model, and the summary
of scripts/gpu_hybrid.sh's output (tests/gpu/summarize_results.py --hybrid) on a hand-made folder."""

import json

import pytest

from benchmarks.megatron import bench_throughput as bt
from raytron import models
from raytron.config.spec import TrainSpec
from raytron.parallelism.layout import ParallelLayout
from tests.gpu import summarize_results as sr

LONG = [w for w in bt.WORKLOADS if w in bt.SEQ_LEN]


def test_every_model_runs_at_every_length_with_the_same_tokens_per_step():
    assert sorted(LONG) == sorted(f"{m}-{t}" for m in bt.LONG_MODELS for t in bt.LONG_SEQS)
    for w in LONG:
        seq, per_rank = bt.workload_seq(w)
        mbs = bt.micro_batch("raytron", w, 1)
        rec = bt.base_record("raytron", w, bt.WORKLOADS[w][:3], 1, {"dp": 1}, mbs, seq, per_rank)
        assert rec["global_batch"] * rec["seq_len"] == bt.LONG_STEP_TOKENS, w
        assert mbs * seq == max(bt.LONG_MICRO_TOKENS, seq), w
        layout = ParallelLayout(world_size=1, micro_batch_size=mbs, global_batch_size=rec["global_batch"])
        assert layout.grad_accum == rec["grad_accum"]
        spec = bt.make_spec(*bt.WORKLOADS[w][:3], rec["global_batch"], mbs, seq=seq)
        assert TrainSpec(**vars(spec.train)).seq_len == seq
        assert bt.planned_runs(["raytron", "mcore_local"], [w], 1) == [(w, "raytron")]
    assert bt.workload_seq("dense-1b") == (bt.SEQ, bt.SEQS_PER_RANK)  # the 4K workloads keep their batch


def test_mfu_counts_the_linear_sequence_layers_at_the_workloads_length():
    """FLOPs/token of a hybrid record: its GDN / Mamba2 layers' chunked matmuls (models/flops.py) at its own
    sequence length; attention's share grows with length, the linear layers' does not."""
    for model, kind in (("hybrid-1b", "G"), ("hybrid-1b-mamba", "M")):
        family, flavor = bt.LONG_MODELS[model]
        cfg = models.get_config(family, flavor)
        by_seq = {t: models.flops_per_token(cfg, s) for t, s in bt.LONG_SEQS.items()}
        rec = bt.base_record("raytron", f"{model}-32k", (family, flavor, {}), 1, {"dp": 1}, 1, 32768, 2)
        assert rec["flops_per_token"] == by_seq["32k"]["total"]
        assert by_seq["4k"][kind] == pytest.approx(by_seq["64k"][kind]) and by_seq["4k"][kind] > 0
        # by hand: 4 attention layers x fwd+bwd 3 x (QK^T + PV) 4 x heads 16 x head_dim 128 x (32768 - 2048) keys
        assert by_seq["64k"]["*"] - by_seq["4k"]["*"] == 4 * 3 * 4 * 16 * 128 * (32768 - 2048)


def _estimate_gib(workload: str, recompute: str) -> float:
    from raytron.parallelism.estimate import model_stats
    from raytron.parallelism.memory import estimate_memory

    family, flavor, overrides, _ = bt.WORKLOADS[workload]
    cfg = models.get_config(family, flavor, **overrides)
    seq, per_rank = bt.workload_seq(workload)
    layout = ParallelLayout(world_size=1, micro_batch_size=bt.micro_batch("raytron", workload, 1),
                            global_batch_size=per_rank)
    return estimate_memory(cfg, model_stats(cfg), layout, seq_len=seq, use_gpu=True, engine="megatron",
                           recompute=recompute).worst.total / 2**30


def test_recompute_only_where_the_memory_estimate_needs_it_on_an_h200():
    """RECOMPUTE: the 64K hybrids recompute their scans (selective), nothing else does; the memory estimate
    (plan's, an upper end for the linear layers) puts each workload in its mode under an H200's 140 GiB and
    the recomputing ones over it without."""
    assert {w for w in LONG if bt.RECOMPUTE.get(w, "none") != "none"} == {"hybrid-1b-64k", "hybrid-1b-mamba-64k"}
    assert set(bt.RECOMPUTE.values()) == {"selective"}
    h200 = 143771 / 1024
    for w in LONG:
        assert _estimate_gib(w, bt.RECOMPUTE.get(w, "none")) < h200, w
    for w in bt.RECOMPUTE:
        assert _estimate_gib(w, "none") > h200, w


@pytest.mark.slow
def test_debug_forms_train_one_engine_step_like_the_reference(tmp_path):
    """Each long-context model at debug size (its flavor's layer pattern, one period, on the `debug` flavor's
    widths): one megatron-engine step on CPU (megatron-core's schedule over gloo) has the reference model's loss
    and gradients. The recompute mode they run with at 64K is checked by test_megatron_step's recompute cases."""
    from tests.checkpoint.ckpt_helpers import spawn_ranks
    from tests.parallelism import megatron_cpu_schedule

    cases = []
    for family, flavor in bt.LONG_MODELS.values():
        pattern = models.get_config(family, flavor).layer_pattern()
        cases.append((family, {"pattern": pattern[:8]} if family == "hybrid" else {}, {}))
    out = tmp_path / "steps.json"
    spawn_ranks(megatron_cpu_schedule.step_matches_reference, 1, cases, str(out), timeout=300)
    for (family, overrides, _), got in zip(cases, json.loads(out.read_text())):
        assert got["loss"][0] == pytest.approx(got["loss"][1], rel=1e-5), (family, overrides)
        assert got["worst_grad_error"] < 1e-4 and not got["bad_grads"], (family, overrides)


def _folder(tmp_path, layer_tokens: dict, whole_tokens: dict):
    (tmp_path / "layers").mkdir()
    rows = [dict(stack=s, seq=q, tokens_per_s=t) for (s, q), t in layer_tokens.items()]
    rows.append(dict(stack="hybrid-gdn", seq=65536, error="out of memory"))
    (tmp_path / "layers" / "hybrid_vs_attention_NVIDIA_H200.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "whole.jsonl").write_text("".join(json.dumps(dict(workload=w, seq_len=q, tokens_per_s_per_gpu=t,
                                                                  traceback="x")) + "\n"
                                                  for (w, q), t in whole_tokens.items()))
    (tmp_path / "gpus.csv").write_text("name, memory.total [MiB], driver_version\nNVIDIA H200, 143771 MiB, 580\n")
    (tmp_path / "timeline.json").write_text(json.dumps([dict(job="submit-64k", start_s=300, end_s=420, rc=0)]))
    (tmp_path / "submit_metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens_per_sec": 30000.0 + s, "memory/max_allocated_gib": m,
                    "memory/max_reserved_gib": m + 4}) + "\n" for s, m in ((1, 80.5), (2, 91.25), (3, 90.0))))
    (tmp_path / "submit_committed.txt").write_text("./hybrid-1b-64k-1gpu/ckpt/step-000000005/COMMITTED\n")
    (tmp_path / "junit_ops.xml").write_text('<testsuites><testsuite tests="40" failures="1" errors="0" skipped="2"/>'
                                            '</testsuites>')


def test_hybrid_summary_states_ratios_against_targets_and_the_submits_peak(tmp_path, capsys):
    _folder(tmp_path, {("attention", 4096): 100.0, ("hybrid-gdn", 4096): 94.0, ("hybrid-mamba2", 4096): 96.0,
                       ("attention", 65536): 10.0, ("hybrid-mamba2", 65536): 20.0},
            {("dense-1b-4k", 4096): 50.0, ("hybrid-1b-4k", 4096): 48.0, ("dense-1b-32k", 32768): 20.0,
             ("hybrid-1b-mamba-32k", 32768): 30.0, ("hybrid-1b-16k", 16384): 40.0})
    second = tmp_path / "second"  # a second call's whole-model records (PARTS=whole WHOLE_SEQS=16k)
    second.mkdir()
    (second / "whole.jsonl").write_text(json.dumps(dict(workload="dense-1b-16k", seq_len=16384,
                                                        tokens_per_s_per_gpu=32.0)) + "\n")
    path = sr.write_hybrid([tmp_path, second], "bash scripts/gpu_hybrid.sh")
    got = json.loads(path.read_text())
    assert path.name == "hybrid_NVIDIA_H200.json" and got["device"].startswith("NVIDIA H200")
    layers = {(r["model"], r["seq"]): r for r in got["layers"]["ratios"]}
    assert set(layers) == {("hybrid-gdn", 4096), ("hybrid-mamba2", 4096), ("hybrid-mamba2", 65536)}
    assert (layers["hybrid-gdn", 4096]["ratio"], layers["hybrid-gdn", 4096]["met"]) == (0.94, False)
    assert (layers["hybrid-mamba2", 65536]["ratio"], layers["hybrid-mamba2", 65536]["target"]) == (2.0, 1.9)
    whole = {(r["model"], r["seq"]): r for r in got["whole_model"]["ratios"]}
    assert set(whole) == {("hybrid-1b", 4096), ("hybrid-1b-mamba", 32768), ("hybrid-1b", 16384)}
    assert (whole["hybrid-1b", 16384]["ratio"], "target" in whole["hybrid-1b", 16384]) == (1.25, False)
    assert whole["hybrid-1b", 4096]["met"] is True and whole["hybrid-1b-mamba", 32768]["ratio"] == 1.5
    assert all("traceback" not in r for r in got["whole_model"]["records"])
    submit = got["submit_64k"]
    assert (submit["rc"], submit["steps_logged"], submit["peak_allocated_gib"], submit["peak_reserved_gib"]) == (
        0, 3, 91.25, 95.25)
    assert len(submit["committed_checkpoints"]) == 1
    assert got["pytest_ops"] == {"tests": 40, "failures": 1, "errors": 0, "skipped": 2}
    assert "0.94x (target 0.95: NOT met)" in capsys.readouterr().out

