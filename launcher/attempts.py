"""Per-worker-group records: what each rank of each attempt did, written by the ranks themselves.

Every start of a worker group (the first, each Ray Train restart, each relaunch after a preemption,
each `submit --resume`) is one *attempt*, numbered within the run. Each rank writes
`<run>/worker_groups/<attempt:04d>/rank-<rank:05d>.json` when it starts (node, host, PID, the step it
resumed from) and again when it stops (status, step, exception). A rank that is SIGKILLed or loses
its node writes no stop record; the driver reads these files to build the job's typed outcome
(launcher/outcome.py) and tests read the PIDs to prove no process of a failed attempt is left.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback

from .. import storage
from ..run_dir import RunDir

RANK_STATUSES = ("running", "completed", "preempted", "stopped", "failed", "hung")


def next_attempt(run_uri: str) -> int:
    """The index of a new worker group: one past the highest recorded (call on one rank only)."""
    indices = [int(name) for name in storage.list_names(RunDir(run_uri).worker_groups) if name.isdigit()]
    return max(indices, default=-1) + 1


class RankRecord:
    """This rank's record in this attempt; `update` rewrites the whole (small) JSON file."""

    def __init__(self, run_uri: str, attempt: int, rank: int, world: int, node_id: str | None = None):
        self.uri = RunDir(run_uri).rank_record(attempt, rank)
        self.data: dict = {"attempt": attempt, "rank": rank, "world": world, "node_id": node_id,
                           "hostname": socket.gethostname(), "pid": os.getpid(),
                           "pid_create_time": _create_time(), "started": time.time(),
                           "status": "running", "step": None, "resumed_from": None, "events": []}

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.data["updated"] = time.time()
        storage.makedirs(self.uri.rsplit("/", 1)[0])
        storage.write_bytes_atomic(self.uri, json.dumps(self.data, default=str).encode())

    def event(self, kind: str, **fields) -> None:
        """Append a notable event (rollback, spike, preemption request) and persist the record."""
        self.data["events"].append({"time": time.time(), "kind": kind, **fields})
        self.update()

    def failed(self, exc: BaseException, step: int | None, status: str = "failed") -> None:
        self.update(status=status, step=step, exception=type(exc).__name__, message=str(exc)[:2000],
                    traceback="".join(traceback.format_exception(exc))[-6000:])


def _create_time() -> float | None:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - optional detail
        return None


def read_attempts(run_uri: str, since: int = 0) -> dict[int, dict[int, dict]]:
    """{attempt: {rank: record}} for attempts >= since (missing or torn files are skipped)."""
    run = RunDir(run_uri)
    out: dict[int, dict[int, dict]] = {}
    for name in storage.list_names(run.worker_groups):
        if not name.isdigit() or int(name) < since:
            continue
        ranks: dict[int, dict] = {}
        for base in storage.list_names(run.attempt_dir(int(name))):
            if not (base.startswith("rank-") and base.endswith(".json")):
                continue
            try:
                rec = json.loads(storage.read_bytes(storage.join(run.attempt_dir(int(name)), base)))
            except (OSError, ValueError):
                continue
            ranks[int(rec["rank"])] = rec
        out[int(name)] = ranks
    return dict(sorted(out.items()))


def marker_uri(run_uri: str, attempt: int, name: str) -> str:
    """A small file tests wait for (e.g. the `pause` fault's PID marker)."""
    return storage.join(RunDir(run_uri).attempt_dir(attempt), name)
