"""Watching runs: `raytron runs`, `status`, `logs`, `stop`, against a cluster or a run directory.

A run is a directory `<root>/<name>/` (root = the job's checkpoint.uri) holding config.yaml,
attempts.jsonl, metrics.jsonl and checkpoints/; on a cluster each submission of the run is a Ray Job
whose metadata names the run (`raytron_run`). With `--address` the job's state comes from the
cluster; the step, loss and last committed checkpoint come from the run directory whenever this
machine can read it (shared filesystem or object storage), else from the job alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

from .. import storage
from ..run_dir import RunDir
from .jobs import RUN_KEY, TERMINAL, URI_KEY, find_jobs, follow, is_jobs_address, jobs_client, report_end, wait_terminal


@dataclass
class RunSummary:
    name: str
    run_uri: str
    state: str
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    last_checkpoint: int | None = None
    job: str | None = None
    updated: float | None = None


def read_run(run_uri: str) -> RunSummary | None:
    """Summary of one run directory (None when it is not a run)."""
    from ..parallelism.checkpoint import CheckpointStore

    run = RunDir(run_uri)
    if not storage.exists(run.config):
        return None
    summary = RunSummary(run.name, run_uri, "unknown")
    try:
        import yaml

        summary.steps = yaml.safe_load(storage.read_bytes(run.config))["train"]["steps"]
    except Exception:  # noqa: BLE001 - a damaged record still lists
        pass
    if storage.exists(run.metrics):
        lines = storage.read_bytes(run.metrics).decode().splitlines()
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            summary.step, summary.loss = rec.get("step"), rec.get("loss")
            break
        try:
            summary.updated = storage.modified(run.metrics)
        except Exception:  # noqa: BLE001 - not every filesystem knows mtimes
            pass
    try:
        steps = CheckpointStore(run.checkpoints).committed_steps()
        summary.last_checkpoint = steps[-1] if steps else None
    except Exception:  # noqa: BLE001
        pass
    done = summary.steps is not None and summary.step is not None and summary.step >= summary.steps
    summary.state = _outcome_state(run) or ("completed" if done else "incomplete")
    return summary


def _outcome_state(run: RunDir) -> str | None:
    """The typed outcome of the run's last submit (outcome.json: completed / preempted / failed), if it
    is not older than the newest attempt (a resume in progress has no outcome yet)."""
    try:
        if not storage.exists(run.outcome):
            return None
        if storage.modified(run.outcome) < storage.modified(run.attempts_log):
            return "incomplete"
        return str(json.loads(storage.read_bytes(run.outcome))["status"])
    except Exception:  # noqa: BLE001 - no mtimes on this filesystem, or a damaged record
        return None


def local_runs(root: str) -> list[RunSummary]:
    out = []
    for name in storage.list_names(root):
        if name.startswith("_"):
            continue  # _data_cache and other non-run folders
        summary = read_run(RunDir.under(root, name).uri)
        if summary:
            out.append(summary)
    return out


def _job_state(job) -> str:
    return str(job.status).lower()


def remote_runs(address: str) -> list[RunSummary]:
    client = jobs_client(address)
    latest: dict[str, object] = {}
    for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        name = (job.metadata or {}).get(RUN_KEY)
        if name:
            latest[name] = job
    out = []
    for name, job in sorted(latest.items()):
        uri = job.metadata.get(URI_KEY, "")
        summary = _readable(uri) or RunSummary(name, uri, "")
        summary.state, summary.job = _job_state(job), job.submission_id
        out.append(summary)
    return out


def _readable(uri: str) -> RunSummary | None:
    try:
        return read_run(uri) if uri else None
    except Exception:  # noqa: BLE001 - the cluster's storage may not be reachable from here
        return None


def format_table(runs: list[RunSummary]) -> str:
    rows = [("NAME", "STATE", "STEP", "LAST CKPT", "LOSS", "JOB")]
    for r in runs:
        step = "-" if r.step is None else f"{r.step}/{r.steps}" if r.steps else str(r.step)
        rows.append((r.name, r.state, step, "-" if r.last_checkpoint is None else str(r.last_checkpoint),
                     "-" if r.loss is None else f"{r.loss:.4f}", r.job or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# ---- commands ------------------------------------------------------------------------------------------


def _local_run_uri(root: str, name: str) -> str:
    """<root>/<name> for a valid run name (never a path that leaves the root, such as '..')."""
    from ..config.spec import run_name_problem

    problem = run_name_problem(name)
    if problem is not None:
        raise ValueError(f"{name!r} is not a run name: {problem}")
    return RunDir.under(root, name).uri


def _local_run(root: str, name: str) -> RunSummary:
    """The run NAME under ROOT; a ValueError (exit 2, `_refusals_exit_2`) when there is none."""
    summary = read_run(_local_run_uri(root, name))
    if summary is None:
        raise ValueError(f"no run named {name!r} under {root}")
    return summary


def _job_for(client, ref: str, address: str):
    """The job a NAME|JOB argument means: a submission id, else the newest job of run NAME; a ValueError
    (exit 2, `_refusals_exit_2`) when neither is on the cluster at `address`."""
    jobs = find_jobs(client, ref)
    if jobs:
        return jobs[-1]
    try:
        job = client.get_job_info(ref)
    except Exception:  # noqa: BLE001 - unknown id
        job = None
    if job is None:
        raise ValueError(f"no job or run named {ref!r} on {address}")
    return job


def run_runs(args: argparse.Namespace) -> int:
    runs = remote_runs(args.address) if args.address else local_runs(args.root)
    if not runs:
        print(f"no runs {'on ' + args.address if args.address else 'under ' + args.root}")
        return 0
    print(format_table(runs))
    return 0


def run_status(args: argparse.Namespace) -> int:
    if not args.ref:
        return run_runs(args)
    if args.address:
        client = jobs_client(args.address)
        job = _job_for(client, args.ref, args.address)
        name = (job.metadata or {}).get(RUN_KEY, args.ref)
        summary = _readable((job.metadata or {}).get(URI_KEY, ""))
        print(f"run:        {name}\njob:        {job.submission_id}\nstate:      {job.status}")
        if job.message:
            print(f"message:    {job.message}")
        if job.start_time:
            print(f"started:    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.start_time / 1000))}")
        if job.end_time:
            print(f"ended:      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.end_time / 1000))}")
        print(f"entrypoint: {job.entrypoint}")
    else:
        summary = _local_run(args.root, args.ref)
        print(f"run:        {summary.name}\nstate:      {summary.state}")
    if summary:
        print(f"run dir:    {summary.run_uri}\nstep:       {summary.step}/{summary.steps}\n"
              f"loss:       {summary.loss}\nlast ckpt:  {summary.last_checkpoint}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    if not args.address:
        summary = _local_run(args.root, args.name)
        # A local run's console went to the terminal that ran it; its record is metrics.jsonl.
        metrics = RunDir(summary.run_uri).metrics
        if storage.exists(metrics):
            sys.stdout.write(storage.read_bytes(metrics).decode())
        return 0
    client = jobs_client(args.address)
    job = _job_for(client, args.name, args.address)
    if args.follow:
        return follow(client, job.submission_id)
    sys.stdout.write(client.get_job_logs(job.submission_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    if not args.address:
        print("raytron: error: stop needs --address (a run on an embedded Ray stops with Ctrl-C)", file=sys.stderr)
        return 2
    client = jobs_client(args.address)
    job = _job_for(client, args.name, args.address)
    if str(job.status) in TERMINAL:
        print(f"[raytron] job {job.submission_id} already {job.status}")
        return 0
    client.stop_job(job.submission_id)
    info = wait_terminal(client, job.submission_id, timeout=args.timeout)
    report_end(info)
    summary = _readable((job.metadata or {}).get(URI_KEY, ""))
    if summary is not None:
        print(f"[raytron] last committed checkpoint: step {summary.last_checkpoint}; continue with "
              f"`raytron submit CONFIG --name {summary.name} --resume --address {args.address}`")
    return 0 if str(info.status) in TERMINAL else 1


def _refusals_exit_2(func):
    """A malformed address or run name, an unreachable cluster or a refused token: say why, exit 2, no
    traceback."""
    def run(args: argparse.Namespace) -> int:
        if args.address and not is_jobs_address(args.address):
            print(f"raytron: error: --address {args.address!r}: give the Ray dashboard's address, "
                  "http://HOST:8265", file=sys.stderr)
            return 2
        try:
            return func(args)
        except (PermissionError, ConnectionError, ValueError) as exc:
            print(f"raytron: error: {exc}", file=sys.stderr)
            return 2
    return run


def add_subparsers(subparsers) -> None:
    def common(p, ref: bool = True):
        p.add_argument("--address", default=None, help="Ray dashboard address http://HOST:8265 (default: local)")
        p.add_argument("--root", default="./runs", help="local run root = the jobs' checkpoint.uri (default ./runs)")

    p = subparsers.add_parser("runs", help="list runs: state, step, last checkpoint, loss")
    common(p)
    p.set_defaults(func=_refusals_exit_2(run_runs))
    p = subparsers.add_parser("status", help="state of a run (by name) or a job (by id); all runs without one")
    p.add_argument("ref", nargs="?", default=None, metavar="NAME|JOB")
    common(p)
    p.set_defaults(func=_refusals_exit_2(run_status))
    p = subparsers.add_parser("logs", help="a run's job logs (cluster) or its metrics record (local)")
    p.add_argument("name", metavar="NAME|JOB")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    common(p)
    p.set_defaults(func=_refusals_exit_2(run_logs))
    p = subparsers.add_parser("stop", help="stop a run's job on the cluster (its committed checkpoints stay)")
    p.add_argument("name", metavar="NAME|JOB")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the job to end")
    common(p)
    p.set_defaults(func=_refusals_exit_2(run_stop))


__all__ = ["RunSummary", "read_run", "local_runs", "remote_runs", "format_table", "add_subparsers"]
