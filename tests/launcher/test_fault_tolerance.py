"""Fault tolerance end to end through the CLI on the session's embedded Ray.

Each test injects one fault through the `fault.inject` test hook or kills a worker by PID, checks
what the job did about it (restart, commit, rollback, typed outcome, exit message), and checks that
no process of the failed attempt is left. Every test is bounded by `time_limit`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from raytron.launcher.attempts import read_attempts

from tests.launcher.ft_helpers import (KillOnMarker, assert_gone, inject, losses, processes_of, submit, submit_args, time_limit,
                        wait_for)

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("ft")
    cache = tmp_path_factory.mktemp("ft_cache")
    return root, cache


@pytest.fixture(scope="module")
def straight(env):
    """An uninterrupted run: the reference for bitwise comparisons."""
    root, cache = env
    with time_limit(240):
        assert submit(root, "straight", STEPS, cache) == 0
    return losses(root / "straight")


def outcome(run) -> dict:
    return json.loads((run / "outcome.json").read_text())


def test_sigkill_one_worker_restarts_once_and_matches_uninterrupted_bitwise(env, straight):
    root, cache = env
    run = root / "sigkill"
    killer = KillOnMarker(run, signal.SIGKILL)
    killer.start()
    with time_limit(300):
        code = submit(root, "sigkill", STEPS, cache, *inject("pause", step=3, rank=1),
                      "--set", "fault.max_failures=1")
    killer.join(5)
    assert killer.error is None and killer.marker is not None, killer.error
    assert code == 0
    out = outcome(run)
    assert out["status"] == "completed" and out["failures_used"] == 1 and out["preemptions_used"] == 0
    attempts = read_attempts(str(run))
    assert sorted(attempts) == [0, 1], "exactly one restart"
    assert {r["resumed_from"] for r in attempts[1].values()} == {2}, "resumed from the last committed step"
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in got] == [straight[s] for s in got], "bit for bit equal to the uninterrupted run"
    assert_gone(killer.attempt_pids)


def test_sigterm_preemption_commits_within_grace_and_spares_failure_budget(env, straight):
    root, cache = env
    run = root / "preempt"
    grace = 60
    killer = KillOnMarker(run, signal.SIGTERM)
    killer.start()
    with time_limit(300):
        code = submit(root, "preempt", STEPS, cache, *inject("pause", step=3, rank=1),
                      "--set", "fault.max_failures=0", "--set", f"fault.preemption_grace_s={grace}")
    killer.join(5)
    assert killer.error is None and killer.marker is not None, killer.error
    assert code == 0, "max_failures=0: a preemption charged to the failure budget would have failed the job"
    out = outcome(run)
    assert out["status"] == "completed" and out["failures_used"] == 0 and out["preemptions_used"] == 1
    attempts = read_attempts(str(run))
    assert [a["status"] for a in out["attempts"]] == ["preempted", "completed"]
    assert {r["status"] for r in attempts[0].values()} == {"preempted"}
    assert {r["step"] for r in attempts[0].values()} == {3}, "all ranks stopped at the same step boundary"
    committed_at = max(r["committed"] for r in attempts[0].values())
    assert committed_at - killer.sent_at < grace, "checkpoint committed within the grace period"
    assert (run / "checkpoints" / "step-000000003" / "COMMITTED").exists(), "the preemption's own commit"
    assert {r["resumed_from"] for r in attempts[1].values()} == {3}
    got = losses(run)
    assert [got[s] for s in sorted(got)] == [straight[s] for s in range(1, STEPS + 1)]
    assert_gone(killer.attempt_pids)


def test_exception_on_one_rank_names_the_rank_and_exhausts_budget(env, capsys):
    root, cache = env
    run = root / "exc"
    with time_limit(240):
        code = submit(root, "exc", 2, cache, *inject("exception", step=1, rank=1, attempt=-1),
                      "--set", "fault.max_failures=1")
    err = capsys.readouterr().err
    assert code == 1
    assert "rank 1" in err and "InjectedFault" in err, err
    out = outcome(run)
    assert out["status"] == "failed" and out["failures_used"] == 2 and out["max_failures"] == 1
    assert out["failure"]["rank"] == 1 and out["failure"]["exception"] == "InjectedFault"
    assert out["failure"]["step"] == 1 and out["failure"]["node"]
    attempts = read_attempts(str(run))
    assert sorted(attempts) == [0, 1], "budget of 1 failure: the job ends after the 2nd failure"
    pids = {r["pid"] for a in attempts.values() for r in a.values()}
    assert_gone(pids | processes_of(run, 1))


def test_rank_that_stops_calling_collectives_is_detected_and_group_restarts(env):
    root, cache = env
    run = root / "hang"
    timeout = 20  # well above a step's time on a loaded 2-core CI machine, well below the 60 s bound
    with time_limit(300):
        code = submit(root, "hang", 3, cache, *inject("hang", step=2, rank=1),
                      "--set", "fault.max_failures=1", "--set", f"fault.step_timeout_s={timeout}",
                      "--set", "fault.collective_timeout_s=300")
    assert code == 0
    attempts = read_attempts(str(run))
    assert sorted(attempts) == [0, 1]
    hung = attempts[0][1]
    assert hung["status"] == "hung" and not hung["in_collective"], hung
    marker = json.loads((run / "worker_groups" / "0000" / "hang-rank-00001.json").read_text())
    assert hung["updated"] - marker["time"] < 60, "stall detected within 60 s"
    assert outcome(run)["failures_used"] == 1
    assert_gone({r["pid"] for r in attempts[0].values()})


def test_nan_on_one_rank_caught_before_update_then_rollback_and_skip(env):
    root, cache = env
    run = root / "nan"
    with time_limit(300):
        code = submit(root, "nan", 4, cache, *inject("nan", step=3, rank=1),
                      "--set", "fault.nan_policy=rollback")
    assert code == 0
    skipped = [json.loads(x) for x in (run / "skipped_samples.jsonl").read_text().splitlines()]
    assert len(skipped) == 1
    s = skipped[0]
    assert s["step"] == 3 and s["ranks"] == [1] and s["rolled_back_to"] == 2
    assert (s["start_sample"], s["end_sample"]) == (16, 24), "the offending step's global batch"
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    rec = read_attempts(str(run))[0][1]
    kinds = [e["kind"] for e in rec["events"]]
    assert kinds[:2] == ["non_finite", "rollback"]
    manifest = json.loads((run / "checkpoints" / "step-000000004" / "manifest.json").read_text())
    assert manifest["data_cursor"]["samples_consumed"] == 5 * 8, "cursor advanced past the skipped batch"


def test_driver_crash_then_resume_by_name_continues_and_leaves_nothing(env, straight):
    """The driver (with its embedded Ray) is SIGKILLed mid-step; every process it started goes with
    it, and `submit --name SAME --resume` continues from the last committed step, bit for bit."""
    root, cache = env
    run = root / "crash"
    args = submit_args(root, "crash", STEPS, cache, *inject("pause", step=3, rank=1, seconds=600))
    log = open(root / "crash-driver.log", "w")
    with time_limit(420):
        driver = subprocess.Popen([sys.executable, "-m", "raytron.launcher.cli", *args], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
        try:
            wait_for("worker_groups/0000/pause-rank-*.json", run, 300)
            workers = processes_of(run, 0)
            tree = {c.pid for c in psutil.Process(driver.pid).children(recursive=True)} | workers
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(30)
            assert_gone(workers, timeout=60)  # the attempt's workers die with the driver's raylet
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(30)
        # Ray's dashboard/runtime-env agents may outlive their raylet: the resume reaps them by PID
        assert submit(root, "crash", STEPS, cache, "--resume") == 0
    assert_gone(tree, timeout=10)
    attempts = read_attempts(str(run))
    assert {r["resumed_from"] for r in attempts[1].values()} == {2}
    got = losses(run)
    assert [got[s] for s in sorted(got)] == [straight[s] for s in range(1, STEPS + 1)]


def test_ctrl_c_to_the_driver_preempts_the_run_and_resume_continues_bitwise(env, straight):
    """SIGINT to `raytron submit` mid-step: the driver forwards SIGTERM to its workers, they commit a
    checkpoint within the grace period, the driver writes outcome.json, says how to resume and exits 3;
    `--resume` then continues the loss curve bit for bit."""
    import time

    root, cache = env
    run, grace = root / "ctrlc", 60
    args = submit_args(root, "ctrlc", STEPS, cache, *inject("pause", step=3, rank=1, seconds=600),
                       "--set", f"fault.preemption_grace_s={grace}")
    log_path = root / "ctrlc-driver.log"
    with time_limit(480), open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "raytron.launcher.cli", *args], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
        try:
            wait_for("worker_groups/0000/pause-rank-*.json", run, 300)
            workers = processes_of(run, 0)
            sent = time.time()
            driver.send_signal(signal.SIGINT)
            code = driver.wait(grace + 120)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(30)
        text = log_path.read_text()
        assert code == 3, text[-4000:]
        assert "stopped by SIGINT to the driver" in text and "--name ctrlc --resume" in text, text[-4000:]
        out = outcome(run)
        assert out["status"] == "preempted" and [a["status"] for a in out["attempts"]] == ["preempted"]
        attempts = read_attempts(str(run))
        assert {r["step"] for r in attempts[0].values()} == {3}, "all ranks stopped at the same step boundary"
        assert max(r["committed"] for r in attempts[0].values()) - sent < grace
        assert (run / "checkpoints" / "step-000000003" / "COMMITTED").exists()
        assert sorted(losses(run)) == [1, 2, 3], "metrics written up to the preempted step"
        assert_gone(workers, timeout=60)
        assert submit(root, "ctrlc", STEPS, cache, "--resume") == 0
    assert {r["resumed_from"] for r in read_attempts(str(run))[1].values()} == {3}
    got = losses(run)
    assert [got[s] for s in sorted(got)] == [straight[s] for s in range(1, STEPS + 1)]


def test_node_loss_on_simulated_two_node_cluster(env):
    """ray.cluster_utils.Cluster (own process): the node running the job is removed mid-step; Ray
    Train restarts the group on the node that remains and the job completes."""
    root, cache = env
    with time_limit(480):
        proc = subprocess.run([sys.executable, str(HERE / "node_loss_job.py"), str(root), str(cache)],
                              capture_output=True, text=True, timeout=450, env={**os.environ, "RAY_ADDRESS": ""})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("NODE_LOSS_REPORT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[0].split(" ", 1)[1])
    assert "error" not in report and report["code"] == 0, report
    removed = report["removed"]
    assert report["attempt_nodes"]["0"] == [removed]
    assert removed not in report["attempt_nodes"]["1"], "restarted on the node that remains"
    assert_gone(set(report["pids"]))
    assert json.loads((root / "nodeloss" / "outcome.json").read_text())["failures_used"] == 1
