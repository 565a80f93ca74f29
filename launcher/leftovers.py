"""What a crashed driver leaves behind, and cleaning it up when the run is resumed.

A SIGKILLed driver takes its embedded Ray's GCS and raylet (and so the workers) with it, but not
every helper: Ray's dashboard and runtime-env agents outlive their raylet for a while. So the driver
writes `<run>/driver.json` (its PID and, for an embedded Ray, every process it started, each with its
creation time) and `submit --resume` reaps what is still alive of a dead driver on the same host,
by PID, checking the creation time so a recycled PID is never touched. A driver of the same run that
is still alive on this host makes `--resume` refuse (two drivers would race on one run directory).
On a cluster (`--address`) the driver's job owns its actors; Ray removes them when the job's driver
dies, so only the record is kept.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency; without it nothing is recorded or reaped
    psutil = None

from .. import storage
from ..config.strict_yaml import ConfigError
from ..run_dir import RunDir
from .attempts import read_attempts


def live_process(pid: int, create_time: float | None) -> psutil.Process | None:
    """The process `pid` if it is alive and is the one recorded (same creation time)."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.Error:
        return None


def record_driver(run_uri: str, embedded: bool) -> None:
    """Call after Ray is up: this driver and (embedded Ray) the processes it started."""
    if psutil is None:
        return
    me = psutil.Process()
    procs = []
    if embedded:
        for child in me.children(recursive=True):
            try:
                procs.append({"pid": child.pid, "create_time": child.create_time(), "name": child.name()})
            except psutil.Error:
                continue
    rec = {"pid": me.pid, "create_time": me.create_time(), "hostname": socket.gethostname(),
           "embedded": embedded, "time": time.time(), "processes": procs}
    storage.write_bytes_atomic(RunDir(run_uri).driver_record, json.dumps(rec).encode())


def reap_dead_driver(run_uri: str, grace_s: float = 5.0) -> list[int]:
    """Before a resume: refuse if the run's previous driver still runs here; else kill (by PID) what is
    left of it and of its workers. Returns the PIDs that were signalled."""
    path = RunDir(run_uri).driver_record
    if psutil is None or not storage.exists(path):
        return []
    rec = json.loads(storage.read_bytes(path))
    if rec.get("hostname") != socket.gethostname() or rec.get("pid") == os.getpid():
        return []
    if live_process(rec["pid"], rec.get("create_time")) is not None:
        raise ConfigError("name", f"run at {run_uri} is still driven by pid {rec['pid']} on this host; stop it "
                                  "before resuming")
    candidates = [(p["pid"], p.get("create_time")) for p in rec.get("processes", [])]
    for ranks in read_attempts(run_uri).values():  # workers of the dead driver's attempts
        for r in ranks.values():
            if r.get("hostname") == socket.gethostname() and r.get("status") == "running":
                candidates.append((r["pid"], r.get("pid_create_time")))
    # A PID recorded with its creation time names that very process. Worker records carry no creation
    # time when written by older code: only reap those that are Ray processes, never an unrelated
    # process that reused the PID. (Matching a recorded process by its command line instead raced with
    # a process that had not yet exec'd its command: CI saw it.)
    found = [(live_process(pid, ct), ct) for pid, ct in candidates]
    alive = [p for p, ct in found if p is not None and (ct is not None or _is_ray_process(p))]
    for p in alive:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=grace_s)
    if alive:
        print(f"[raytron] cleaned up {len(alive)} leftover process(es) of the crashed driver "
              f"(pid {rec['pid']}): {sorted(p.pid for p in alive)}", flush=True)
    return [p.pid for p in alive]


def _is_ray_process(proc: psutil.Process) -> bool:
    try:
        text = " ".join([proc.name(), *proc.cmdline()[:3]])
    except psutil.Error:
        return False
    return "ray" in text.lower()
