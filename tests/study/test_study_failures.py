"""How a study treats what its directory holds (runs replaced by recorded outcomes, no Ray): a failed
run or an error raised before training is recorded and the next family trains; a preempted run stops the
study; past --time-limit the families left are reported as not run; the report lists the failed ones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from raytron.launcher import driver, study
from raytron.launcher.outcome import JobOutcome
from raytron.launcher.study_config import load_study
from raytron.launcher.study_report import render_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def plans(tmp_path):
    """The CPU study's families with their runs under tmp_path (as run_study places them under --out)."""
    spec_study, _, plans = load_study(str(ROOT / "cluster_configs" / "study_cpu.yaml"))
    return spec_study, [dataclasses.replace(p, spec=dataclasses.replace(
        p.spec, checkpoint=dataclasses.replace(p.spec.checkpoint, uri=str(tmp_path)))) for p in plans]


def fake_runs(monkeypatch, outcomes: dict[str, object]) -> list[str]:
    """run_job replaced: each family's run gives outcomes[name] (a status, or an exception to raise)."""
    started = []

    def run_job(spec, resume=False, address=None):
        started.append(spec.name)
        result = outcomes.get(spec.name, "completed")
        if isinstance(result, BaseException):
            raise result
        return JobOutcome(result, spec.run_uri, 2, {}, error=None if result == "completed" else "rank 0 died")

    monkeypatch.setattr(driver, "run_job", run_job)
    return started


def test_failed_family_recorded_and_the_next_ones_train(plans, tmp_path, monkeypatch, capsys):
    _, plans = plans
    started = fake_runs(monkeypatch, {"block_sparse": "failed", "mamba2": ValueError("no such kernel")})
    record = {"wall_s": {}}
    failed, stopped = study.train_families(plans, str(tmp_path), record, None, None)
    assert not stopped and started == [p.name for p in plans], "every family was started"
    assert failed == {"block_sparse": "failed: rank 0 died", "mamba2": "ValueError: no such kernel"}
    assert set(record["wall_s"]) == {p.name for p in plans}
    assert json.loads((tmp_path / study.RECORD).read_text())["wall_s"] == record["wall_s"]
    err = capsys.readouterr().err
    assert "block_sparse failed: rank 0 died" in err and "mamba2 ValueError: no such kernel" in err


def test_preempted_family_stops_the_study(plans, tmp_path, monkeypatch):
    _, plans = plans
    started = fake_runs(monkeypatch, {"gated_deltanet": "preempted"})
    failed, stopped = study.train_families(plans, str(tmp_path), {"wall_s": {}}, None, None)
    assert stopped and started == [p.name for p in plans][:4] and list(failed) == ["gated_deltanet"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the driver is not a family's failure
        fake_runs(monkeypatch, {"full_attention": KeyboardInterrupt()})
        study.train_families(plans, str(tmp_path), {"wall_s": {}}, None, None)


def test_time_limit_leaves_families_not_run(plans, tmp_path, monkeypatch):
    _, plans = plans
    started = fake_runs(monkeypatch, {})
    clock = iter(range(0, 1000, 10))  # each family takes 10 s of the fake clock; limit: 25 s
    monkeypatch.setattr(study.time, "monotonic", lambda: float(next(clock)))
    failed, stopped = study.train_families(plans, str(tmp_path), {"wall_s": {}}, None, None, deadline=25.0)
    assert not stopped and started == ["full_attention"], started
    assert list(failed) == [p.name for p in plans][1:]
    assert all(e.startswith("not run: the study's --time-limit") for e in failed.values())


def test_report_lists_failed_families(plans):
    spec_study, _ = plans
    results = {"command": "raytron study x.yaml", "base": {"engine": "deepspeed", "train": {
        "steps": 4, "global_batch_size": 4, "seq_len": 64}, "data": {"tokenizer": "byte"}, "resources": {"workers": 1}},
        "machine": {"device": "cpu", "host": "h", "cpus": 2, "torch": "2"}, "validation": {"tokens": 1, "bytes": 1},
        "families": {}, "failed": {"moe": {"error": "failed: rank 0 | died\nat step 3", "wall_s": 12.0}},
        "claims": {"c": ("not measurable here", "needs full_attention")}}
    report = render_report(results, spec_study)
    assert "## Failed families" in report and "| moe | 12 s | failed: rank 0 \\| died at step 3 |" in report


def test_completed_family_without_checkpoints_is_not_retrained(plans, tmp_path, monkeypatch):
    """A study directory carried without its checkpoints (another machine, or disk freed): a family whose
    outcome says it completed at train.steps is kept; one that stopped earlier resumes."""
    _, plans = plans
    done, stopped_early = plans[0].spec, plans[1].spec
    for spec, last in ((done, done.train.steps), (stopped_early, done.train.steps - 1)):
        Path(spec.run_dir.config).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.run_dir.config).write_text("name: x\n")
        Path(spec.run_dir.outcome).write_text(json.dumps({"status": "completed" if spec is done else "failed",
                                                          "last_checkpoint": last}))
    resumed = {}
    started = fake_runs(monkeypatch, {})
    original = driver.run_job
    monkeypatch.setattr(driver, "run_job", lambda spec, resume=False, address=None: (
        resumed.__setitem__(spec.name, resume), original(spec, resume, address))[1])
    failed, _ = study.train_families(plans[:2], str(tmp_path), {"wall_s": {}}, None, None)
    assert started == [plans[1].name] and resumed == {plans[1].name: True} and not failed


def test_sweep_remeasured_only_when_its_settings_change(plans, monkeypatch):
    from raytron.launcher import study_measure

    spec_study, plans = plans
    calls = []
    monkeypatch.setattr(study_measure, "sweep_family", lambda cfg, seqs, sweep, *a: calls.append(sweep) or [
        {"seq": s, "batch": sweep.batch(s, max(seqs)), "seconds": 1.0, "tokens_per_s": float(s)} for s in seqs])
    Path(plans[0].spec.run_dir.study_sweep).parent.mkdir(parents=True, exist_ok=True)
    Path(plans[0].spec.run_dir.study_sweep).write_text(json.dumps([{"seq": 256}]))  # an older cache's format
    rows = study._sweep(plans[0], spec_study, "unused")
    assert len(calls) == 1 and study._sweep(plans[0], spec_study, "unused") == rows and len(calls) == 1
    longest = max(spec_study.contexts)
    assert [r["batch"] for r in rows] == [longest // r["seq"] for r in rows]
    other = dataclasses.replace(spec_study, sweep=dataclasses.replace(spec_study.sweep, tokens=4 * longest))
    assert [r["batch"] for r in study._sweep(plans[0], other, "unused")] == [4 * longest // r["seq"] for r in rows]
    assert len(calls) == 2


def test_fingerprint_covers_training_not_timing(plans):
    from raytron.launcher.study_config import study_fingerprint

    spec_study, plans = plans
    _, base, _ = load_study(str(ROOT / "cluster_configs" / "study_cpu.yaml"))
    fp = study_fingerprint(spec_study, base, plans)
    timing = dataclasses.replace(spec_study, sweep=dataclasses.replace(spec_study.sweep, tokens=7, repeats=5),
                                 claims=dataclasses.replace(spec_study.claims, comparable_ppl=0.5))
    assert study_fingerprint(timing, base, plans) == fp
    assert study_fingerprint(dataclasses.replace(spec_study, layers=spec_study.layers + 1), base, plans) != fp
