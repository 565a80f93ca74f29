"""The job's typed outcome and the loop that earns it: `supervise` runs Ray Train under two budgets.

Outcome (Levanter's habit): `completed`, `preempted` (stopped by preemptions past their budget;
`submit --resume` continues) or `failed` (failure budget spent, or a NaN/spike under the `stop`
policy), with the attempt, rank, node, exception, step and checkpoint resumed from of the failure
that ended it. Written to `<run>/outcome.json` and summarised in the CLI's exit message.

Budgets, kept apart:
- failures (`fault.max_failures`): Ray Train's FailureConfig restarts the worker group after a crash,
  an exception, a hang (watchdog exit) or a lost node, inside one `trainer.fit()`.
- preemptions (`fault.max_preemptions`): a SIGTERMed worker group commits and ends *successfully*
  (launcher/preemption.py), so Ray Train spends nothing; `supervise` sees the `preempted` records and
  relaunches `trainer.fit()` itself, passing on what is left of both budgets. Ray-native node drains
  (PreemptionError) go to FailureConfig.max_preemption_failures with the same remaining budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from .. import storage
from ..run_dir import RunDir
from .attempts import next_attempt, read_attempts

# Substrings of errors that a rank gets because *another* rank died or stalled (collateral damage).
_COLLATERAL = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo",
               "nccl", "peer", "abort")
_STATUS_ORDER = {"completed": 0, "preempted": 1, "stopped": 2, "failed": 3}


@dataclass
class FailureInfo:
    attempt: int
    rank: int | None
    node: str | None
    hostname: str | None
    pid: int | None
    exception: str
    message: str
    step: int | None
    resumed_from: int | None

    def describe(self) -> str:
        where = f"rank {self.rank}" if self.rank is not None else "rank unknown"
        host = f" on node {self.node[:12] if self.node else '?'} ({self.hostname}, pid {self.pid})" if self.pid else ""
        return (f"attempt {self.attempt}, {where}{host}, step {self.step}, resumed from "
                f"{self.resumed_from if self.resumed_from else 'scratch'}: {self.exception}: {self.message}")


@dataclass
class JobOutcome:
    status: str  # "completed" | "preempted" | "failed"
    run_uri: str
    last_checkpoint: int | None
    metrics: dict
    error: str | None = None
    failure: FailureInfo | None = None
    failures_used: int = 0
    max_failures: int = 0
    preemptions_used: int = 0
    max_preemptions: int = 0
    attempts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["time"] = time.time()
        return d

    def write(self) -> None:
        storage.write_bytes_atomic(RunDir(self.run_uri).outcome,
                                   json.dumps(self.to_dict(), indent=1, default=str).encode())

    def budget_line(self) -> str:
        cap = lambda n: "unlimited" if n == -1 else str(n)  # noqa: E731
        return (f"failures {self.failures_used}/{cap(self.max_failures)}, "
                f"preemptions {self.preemptions_used}/{cap(self.max_preemptions)}, "
                f"worker groups {len(self.attempts)}")


def _is_collateral(rec: dict) -> bool:
    if rec.get("status") == "hung":
        return bool(rec.get("in_collective"))
    text = f"{rec.get('exception', '')} {rec.get('message', '')}".lower()
    return any(s in text for s in _COLLATERAL)


def classify(ranks: dict[int, dict]) -> str:
    statuses = {r.get("status") for r in ranks.values()}
    if "stopped" in statuses:
        return "stopped"
    if "preempted" in statuses and statuses <= {"preempted", "completed", "running"} and \
            all(r.get("status") != "running" for r in ranks.values()):
        return "preempted"
    if ranks and statuses == {"completed"}:
        return "completed"
    return "failed"


def culprit(attempt: int, ranks: dict[int, dict], ray_errors: dict[int, BaseException] | None = None) -> FailureInfo:
    """The rank to blame for a failed attempt: a stall outside collectives, then a rank's own
    exception, then a rank that died without a word (killed, lost node), then collateral errors."""
    ray_errors = ray_errors or {}

    def score(item) -> tuple:
        rank, rec = item
        status = rec.get("status")
        if status == "hung" and not rec.get("in_collective"):
            s = 0
        elif status in ("failed", "stopped") and not _is_collateral(rec):
            s = 1
        elif rank in ray_errors and "ActorDied" in type(ray_errors[rank]).__name__ + str(ray_errors[rank])[:200]:
            s = 2
        elif status == "running":
            s = 3
        else:
            s = 4
        return (s, rank)

    steps = [r.get("step") for r in ranks.values() if r.get("step") is not None]
    if not ranks:
        err = next(iter(ray_errors.items()), (None, None))
        return FailureInfo(attempt, err[0], None, None, None, type(err[1]).__name__ if err[1] else "Unknown",
                           str(err[1])[:500] if err[1] else "no worker record", None, None)
    rank, rec = min(ranks.items(), key=score)
    if rec.get("status") == "running":
        exc = ray_errors.get(rank)
        exception = type(exc).__name__ if exc is not None else "WorkerDied"
        message = (str(exc).strip().splitlines()[0][:500] if exc is not None
                   else "the process died without a stop record (killed, OOM or node lost)")
        step = max(steps) if steps else None
    else:
        exception, message = rec.get("exception", "?"), (rec.get("message") or "").strip()[:1000]
        step = rec.get("step")
    return FailureInfo(attempt, rank, rec.get("node_id"), rec.get("hostname"), rec.get("pid"), exception,
                       message, step, rec.get("resumed_from"))


def _remaining(budget: int, used: int) -> int:
    return -1 if budget == -1 else max(0, budget - used)


def _worker_failures(exc: BaseException) -> dict[int, BaseException]:
    failures = getattr(exc, "worker_failures", None)
    return dict(failures) if isinstance(failures, dict) else {}


def supervise(spec, make_trainer, store, interrupt=None) -> JobOutcome:
    """Run `make_trainer(max_failures, max_preemptions).fit()` until the job completes, fails, or
    preemptions exceed their budget; write and return the typed outcome. `interrupt` (a
    preemption.DriverInterrupt) set: the driver itself was told to stop, so a preempted worker group
    ends the job as `preempted` instead of being relaunched."""
    fault = spec.fault
    first = next_attempt(spec.run_uri)
    failures = preemptions = 0
    while True:
        since = next_attempt(spec.run_uri)
        trainer = make_trainer(_remaining(fault.max_failures, failures),
                               _remaining(fault.max_preemptions, preemptions))
        error: BaseException | None = None
        result = None
        try:
            result = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - every training failure becomes a typed outcome
            error = exc
        fit_attempts = read_attempts(spec.run_uri, since)
        kinds = {a: classify(r) for a, r in fit_attempts.items()}
        failures += sum(1 for k in kinds.values() if k == "failed")
        last = max(fit_attempts) if fit_attempts else None
        last_kind = kinds.get(last) if last is not None else None
        if error is None and last_kind == "preempted":
            preemptions += 1
            if interrupt is not None and interrupt.received:
                break
            if fault.max_preemptions == -1 or preemptions <= fault.max_preemptions:
                print(f"[raytron] preemption {preemptions} (budget {fault.max_preemptions}): relaunching the "
                      "worker group from the committed checkpoint", flush=True)
                continue
        break
    all_attempts = read_attempts(spec.run_uri, first)
    steps = store.committed_steps()
    summary = [{"attempt": a, "status": classify(r), "resumed_from": next(
        (x.get("resumed_from") for x in r.values()), None),
        "ranks": {k: {f: v.get(f) for f in ("status", "step", "node_id", "hostname", "pid", "exception")}
                  for k, v in r.items()}} for a, r in all_attempts.items()]
    outcome = JobOutcome("completed", spec.run_uri, steps[-1] if steps else None,
                         dict(result.metrics or {}) if result is not None else {},
                         failures_used=failures, max_failures=fault.max_failures,
                         preemptions_used=preemptions, max_preemptions=fault.max_preemptions,
                         attempts=summary)
    if error is not None or last_kind in ("failed", "stopped"):
        failed = [a for a, k in kinds.items() if k in ("failed", "stopped")]
        attempt = failed[-1] if failed else (last if last is not None else since)
        info = culprit(attempt, fit_attempts.get(attempt, {}), _worker_failures(error) if error else None)
        outcome.status, outcome.failure = "failed", info
        why = ("stopped: " if last_kind == "stopped" and error is None
               else f"failure budget spent ({outcome.budget_line()}); last failure: ")
        outcome.error = why + info.describe()
        if error is not None and not fit_attempts:
            outcome.error = f"{type(error).__name__}: {error}"
    elif last_kind == "preempted":
        outcome.status = "preempted"
        resume = (f"`raytron submit CONFIG --name {spec.name} --resume` (CONFIG: yours, or the run's own "
                  f"{spec.run_dir.config}) continues from step {outcome.last_checkpoint}")
        if interrupt is not None and interrupt.received:
            outcome.error = f"stopped by {interrupt.received} to the driver, checkpoint committed; {resume}"
        else:
            outcome.error = f"preempted {preemptions} times, past fault.max_preemptions={fault.max_preemptions}; {resume}"
    outcome.write()
    print(f"[raytron] outcome {outcome.status}: {outcome.budget_line()} ({spec.run_dir.outcome})", flush=True)
    return outcome
