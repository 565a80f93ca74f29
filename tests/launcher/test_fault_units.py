"""Fault-tolerance pieces without Ray: fault config, outcome classification and blame, skipped data
windows, spike detection, the step watchdog and the SIGTERM handler (the last two in a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raytron.data_pipeline import DataCursor
from raytron.launcher.health import LossSpikeError, NumericsGuard, SkipLog
from raytron.launcher.outcome import classify, culprit
from raytron.config.spec import ConfigError, FaultSpec, load_spec

from tests.launcher.ft_helpers import CONFIG


def test_fault_fields_are_validated():
    with pytest.raises(ConfigError, match="fault.nan_policy"):
        load_spec(CONFIG, ["fault.nan_policy=ignore"])
    with pytest.raises(ConfigError, match="fault.spike_factor"):
        load_spec(CONFIG, ["fault.spike_factor=0.5"])
    with pytest.raises(ConfigError, match="fault.inject"):
        load_spec(CONFIG, ["fault.inject.kind=meteor", "fault.inject.step=1"])
    spec = load_spec(CONFIG, ["fault.inject.kind=hang", "fault.inject.step=2", "fault.max_preemptions=-1"])
    assert spec.fault.inject.kind == "hang" and spec.fault.max_preemptions == -1
    assert load_spec(CONFIG).fault.inject is None, "the test hook is off unless set"


def _rec(rank, status, **kw):
    return {"rank": rank, "status": status, "node_id": f"n{rank}", "hostname": "h", "pid": 100 + rank,
            "resumed_from": 2, "step": kw.pop("step", 3), **kw}


def test_classify_attempts():
    assert classify({0: _rec(0, "completed"), 1: _rec(1, "completed")}) == "completed"
    assert classify({0: _rec(0, "preempted"), 1: _rec(1, "preempted")}) == "preempted"
    assert classify({0: _rec(0, "stopped"), 1: _rec(1, "stopped")}) == "stopped"
    assert classify({0: _rec(0, "running"), 1: _rec(1, "failed")}) == "failed"
    assert classify({0: _rec(0, "completed"), 1: _rec(1, "running")}) == "failed", "a rank died silently"


def test_culprit_prefers_the_cause_over_collateral_damage():
    gloo = dict(exception="RuntimeError", message="[gloo] Connection closed by peer")
    # rank 1 raised; rank 0 only saw its peer go away
    info = culprit(4, {0: _rec(0, "failed", **gloo), 1: _rec(1, "failed", exception="ValueError", message="x")})
    assert (info.attempt, info.rank, info.exception, info.node, info.resumed_from) == (4, 1, "ValueError", "n1", 2)
    # rank 1 was SIGKILLed (no stop record); rank 0 got a collective error
    info = culprit(0, {0: _rec(0, "failed", **gloo), 1: _rec(1, "running", step=2)})
    assert info.rank == 1 and info.exception == "WorkerDied" and info.step == 3
    # a stall outside collectives beats a rank that merely waited in one
    info = culprit(0, {0: _rec(0, "hung", in_collective=True, exception="StepTimeout", message="waiting"),
                       1: _rec(1, "hung", in_collective=False, exception="StepTimeout", message="stalled")})
    assert info.rank == 1 and "rank 1" in info.describe()


def test_skip_log_persists_and_advances_cursor(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    log = SkipLog(run)
    log.add({"step": 3, "start_sample": 16, "end_sample": 24}, write=True)
    again = SkipLog(run)  # what a restarted worker group reads
    assert again.apply(DataCursor(16)) == DataCursor(24)
    assert again.apply(DataCursor(8)) == DataCursor(8)
    lines = (tmp_path / "run" / "skipped_samples.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 3


def test_spike_detector():
    fault = FaultSpec(spike_factor=2.0, spike_warmup_steps=3, spike_policy="rollback")
    guard = NumericsGuard(fault, rank=0, world=1)
    for step, loss in enumerate([5.0, 4.9, 4.8, 4.7], start=1):
        guard.after_step(step, loss, 1.0)
    with pytest.raises(LossSpikeError, match="step 5"):
        guard.after_step(5, 20.0, 1.0)
    warn = NumericsGuard(FaultSpec(spike_factor=2.0, spike_warmup_steps=3, spike_policy="warn"), 0, 1)
    for step, loss in enumerate([5.0, 4.9, 4.8, 4.7, 20.0], start=1):
        warn.after_step(step, loss, 1.0)  # warns, never raises


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_watchdog_exits_a_stalled_process_and_records_where(tmp_path):
    t0 = time.monotonic()
    proc = _python(f"""
        import time
        from raytron.launcher.attempts import RankRecord
        from raytron.launcher.health import StepWatchdog
        rec = RankRecord({str(tmp_path)!r}, 0, 1, 2)
        with StepWatchdog(1.0, 1, rec) as wd:
            wd.beat(7)
            time.sleep(30)   # a rank that stopped calling collectives
        """)
    assert proc.returncode == 70, proc.stderr
    assert time.monotonic() - t0 < 20
    rec = json.loads((tmp_path / "worker_groups" / "0000" / "rank-00001.json").read_text())
    assert rec["status"] == "hung" and rec["step"] == 7 and rec["in_collective"] is False
    assert 'line 8, in <module>' in rec["traceback"], "the stalled line (time.sleep) is named"


def test_sigterm_sets_the_flag_then_grace_expires():
    proc = _python("""
        import os, signal, sys, time
        from raytron.launcher.preemption import PreemptionSignal, install_sigterm_handler
        assert install_sigterm_handler(1.0)
        with PreemptionSignal(1.0) as p:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("flag", p.local, flush=True)
            time.sleep(30)   # the loop never reaches a step boundary: the grace deadline exits
        """)
    assert "flag True" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 143
    # outside training, SIGTERM keeps its usual meaning (exit at once)
    proc = _python("""
        import os, signal, time
        from raytron.launcher.preemption import install_sigterm_handler
        install_sigterm_handler(30.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        """)
    assert proc.returncode == 128 + signal.SIGTERM


def test_resume_reaps_what_a_dead_driver_left_and_refuses_a_live_one(tmp_path):
    import psutil

    from raytron.launcher.leftovers import reap_dead_driver

    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    helper = subprocess.Popen([sys.executable, "-c", "import time  # stands in for a ray agent\ntime.sleep(60)"])
    try:
        me = psutil.Process(helper.pid)
        rec = {"pid": gone.pid, "create_time": 1.0, "hostname": __import__("socket").gethostname(),
               "embedded": True, "processes": [{"pid": helper.pid, "create_time": me.create_time()}]}
        (run / "driver.json").write_text(json.dumps(rec))
        assert reap_dead_driver(str(run), grace_s=5) == [helper.pid]
        assert helper.wait(10) is not None
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            rec.update(pid=live.pid, create_time=psutil.Process(live.pid).create_time(), processes=[])
            (run / "driver.json").write_text(json.dumps(rec))
            with pytest.raises(ConfigError, match="still driven by pid"):
                reap_dead_driver(str(run))
        finally:
            live.kill()
            live.wait()
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


def _fake_trainers(spec, statuses_per_fit, error=None):
    """make_trainer stand-in: each fit() writes one attempt whose ranks end with the given statuses."""
    from types import SimpleNamespace

    from raytron.launcher.attempts import RankRecord, next_attempt

    calls = []
    fits = iter(statuses_per_fit)

    class FakeTrainer:
        def __init__(self, max_failures, max_preemptions):
            calls.append((max_failures, max_preemptions))

        def fit(self):
            attempt = next_attempt(spec.run_uri)
            statuses = next(fits)
            for rank, status in enumerate(statuses):
                RankRecord(spec.run_uri, attempt, rank, len(statuses), node_id=f"node{rank}").update(
                    status=status, step=3, exception="InjectedFault" if status == "failed" else None,
                    message="boom" if status == "failed" else None)
            if "failed" in statuses and error is not None:
                raise error
            return SimpleNamespace(metrics={"loss": 1.0})

    return FakeTrainer, calls


def test_supervise_relaunches_preemptions_then_reports_preempted(tmp_path):
    from types import SimpleNamespace

    from raytron.launcher.outcome import supervise

    spec = load_spec(CONFIG, [f"checkpoint.uri={tmp_path}", "fault.max_preemptions=1", "fault.max_failures=2"])
    (tmp_path / spec.name).mkdir()
    make, calls = _fake_trainers(spec, [["preempted", "preempted"], ["preempted", "preempted"]])
    out = supervise(spec, make, SimpleNamespace(committed_steps=lambda: [3]))
    assert out.status == "preempted" and out.preemptions_used == 2 and out.failures_used == 0
    assert calls == [(2, 1), (2, 0)], "each relaunch gets what is left of both budgets"
    assert "--resume" in out.error
    saved = json.loads((tmp_path / spec.name / "outcome.json").read_text())
    assert saved["status"] == "preempted" and len(saved["attempts"]) == 2


def test_supervise_reports_failure_with_rank_after_a_preemption(tmp_path):
    from types import SimpleNamespace

    from raytron.launcher.outcome import supervise

    spec = load_spec(CONFIG, [f"checkpoint.uri={tmp_path}", "fault.max_failures=0"])
    (tmp_path / spec.name).mkdir()
    make, calls = _fake_trainers(spec, [["preempted", "preempted"], ["running", "failed"]],
                                 error=RuntimeError("Training failed due to worker errors"))
    out = supervise(spec, make, SimpleNamespace(committed_steps=lambda: [2]))
    assert out.status == "failed" and out.preemptions_used == 1 and out.failures_used == 1
    assert (out.failure.attempt, out.failure.rank, out.failure.node) == (1, 1, "node1")
    assert "rank 1" in out.error and "InjectedFault" in out.error


def test_driver_interrupt_forwards_sigterm_and_supervise_stops_without_relaunch(tmp_path):
    """Ctrl-C to the driver: SIGTERM goes to this host's running ranks of the newest worker group, and
    the preempted group ends the job (exit 3 material) instead of being relaunched; a second Ctrl-C
    aborts at once."""
    import signal
    import time
    from types import SimpleNamespace

    from raytron.launcher.attempts import RankRecord
    from raytron.launcher.outcome import supervise
    from raytron.launcher.preemption import DriverInterrupt

    spec = load_spec(CONFIG, [f"checkpoint.uri={tmp_path}", "fault.max_preemptions=5"])
    (tmp_path / spec.name).mkdir()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the test runner was started in the background
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        RankRecord(spec.run_uri, 0, 0, 2).update(pid=sleeper.pid)
        RankRecord(spec.run_uri, 0, 1, 2).update(pid=sleeper.pid, hostname="elsewhere")
        with DriverInterrupt(spec.run_uri, grace_s=30) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once on the main thread
            assert interrupt.received == "SIGINT"
            assert sleeper.wait(10) == -signal.SIGTERM, "the local rank got SIGTERM"
            deadline = time.monotonic() + 10  # the forwarding thread notes the remote rank after signalling
            while not interrupt.not_signalled and time.monotonic() < deadline:
                time.sleep(0.05)
            assert interrupt.not_signalled == ["rank 1 runs on host elsewhere, not this one"]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
            make, calls = _fake_trainers(spec, [["preempted", "preempted"]])
            out = supervise(spec, make, SimpleNamespace(committed_steps=lambda: [3]), interrupt)
        assert signal.getsignal(signal.SIGINT) is before, "handlers restored"
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert len(calls) == 1 and out.status == "preempted" and out.preemptions_used == 1
    assert "stopped by SIGINT to the driver" in out.error and f"--name {spec.name} --resume" in out.error


def test_embedded_ray_never_joins_another_instance_on_the_host(tmp_path, monkeypatch):
    """No --address and no RAY_ADDRESS: the driver asks Ray for a fresh local instance, so a `ray start`
    cluster (or a stale /tmp/ray/ray_current_cluster) on the machine changes nothing."""
    import ray
    from ray._private import ray_constants, services

    from raytron.launcher import driver
    from raytron.launcher.ray_console import WarningCollapser

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # restored afterwards
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(driver, "install_console", lambda console: True)
    driver._init_ray(load_spec(CONFIG, [f"checkpoint.uri={tmp_path}"]), None, WarningCollapser())
    [kwargs] = calls
    assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["_node_ip_address"] == "127.0.0.1"
    assert os.environ["RAY_AUTH_MODE"] == "token" and ray_constants.ENABLE_RAY_CLUSTER is False
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: "127.0.0.1:6379")  # stale file
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: ["127.0.0.1:6379"])
    assert services.canonicalize_bootstrap_address(None) is not None, "a bare ray.init() would join it"
    assert services.canonicalize_bootstrap_address(kwargs.get("address")) is None, "a fresh instance is started"
