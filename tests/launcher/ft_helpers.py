"""Helpers for the fault-tolerance tests: submit through the CLI, kill by PID, check for leftovers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from raytron.launcher.attempts import read_attempts
from raytron.launcher.cli import main

CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")
FAST = ["--set", "train.seq_len=64", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=2",
        "--set", "data.max_documents=120", "--set", "train.eval_every=0", "--set", "train.warmup_steps=2",
        "--set", "checkpoint.every=2"]


def submit_args(root: Path, name: str, steps: int, cache: Path, *extra: str) -> list[str]:
    return ["submit", CONFIG, "--name", name, "--set", f"checkpoint.uri={root}", "--set", f"train.steps={steps}",
            "--set", f"data.cache_uri={cache}", *FAST, *extra]


def submit(root: Path, name: str, steps: int, cache: Path, *extra: str) -> int:
    return main(submit_args(root, name, steps, cache, *extra))


def inject(kind: str, step: int, rank: int = 1, attempt: int = 0, **more) -> list[str]:
    args = ["--set", f"fault.inject.kind={kind}", "--set", f"fault.inject.step={step}",
            "--set", f"fault.inject.rank={rank}", "--set", f"fault.inject.attempt={attempt}"]
    for k, v in more.items():
        args += ["--set", f"fault.inject.{k}={v}"]
    return args


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def wait_for(path_glob: str, base: Path, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = sorted(base.glob(path_glob))
        if hits:
            return hits[0]
        time.sleep(0.2)
    raise TimeoutError(f"{base}/{path_glob} did not appear within {timeout}s")


class KillOnMarker(threading.Thread):
    """Waits for a `pause` fault's marker, then sends `sig` to the PID it names (and remembers every
    process of that attempt: the rank PIDs and their children, for the leak check)."""

    def __init__(self, run: Path, sig: int, timeout: float = 240, attempt: int = 0):
        super().__init__(daemon=True)
        self.run_dir, self.sig, self.timeout, self.attempt = run, sig, timeout, attempt
        self.marker: dict | None = None
        self.sent_at: float | None = None
        self.attempt_pids: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:  # noqa: D401 - threading API
        try:
            path = wait_for(f"worker_groups/{self.attempt:04d}/pause-rank-*.json", self.run_dir, self.timeout)
            time.sleep(0.2)
            self.marker = json.loads(path.read_text())
            self.attempt_pids = processes_of(self.run_dir, self.attempt)
            self.sent_at = time.time()
            os.kill(self.marker["pid"], self.sig)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def processes_of(run: Path, attempt: int) -> set[int]:
    """PIDs of the ranks of `attempt` and all their descendants that are alive now."""
    pids: set[int] = set()
    for rec in read_attempts(str(run)).get(attempt, {}).values():
        try:
            proc = psutil.Process(rec["pid"])
            pids.add(proc.pid)
            pids.update(c.pid for c in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return pids


def assert_gone(pids: set[int], timeout: float = 30) -> None:
    """Every PID has exited (zombies awaiting their parent's reap count as exited)."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        if alive:
            time.sleep(0.25)
    assert not alive, f"processes of the failed attempt still alive: {[_describe(p) for p in alive]}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(pid: int) -> str:
    try:
        p = psutil.Process(pid)
        return f"{pid} {p.name()} {' '.join(p.cmdline())[:120]}"
    except psutil.NoSuchProcess:
        return str(pid)


class time_limit:
    """Bound a test in time from the main thread (SIGALRM); raises a BaseException so that no
    `except Exception` on the way (the driver turns those into outcomes) swallows it."""

    class Expired(BaseException):
        pass

    def __init__(self, seconds: float):
        self.seconds = seconds

    def _fire(self, signum, frame):
        raise time_limit.Expired(f"test exceeded its {self.seconds}s limit")

    def __enter__(self):
        self._old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)
