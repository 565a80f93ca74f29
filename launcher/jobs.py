"""Remote submission: `raytron submit CONFIG --address http://HOST:8265` as a Ray Job.

The job's driver is the local path's driver: its entrypoint is `python -m raytron.launcher.cli submit
job.yaml`, which inside the job finds `RAY_ADDRESS` (set by Ray's job manager) and connects to the
cluster instead of starting an embedded Ray. What travels with the job (runtime environment):

- `py_modules`: this client's `raytron` package, so the cluster runs the code that validated the job
  (the cluster's image provides the dependencies: torch, deepspeed, ray);
- `working_dir`: one file, `job.yaml`, the resolved config (file + `--set` + `--name`), nothing else.

Before anything is submitted the client validates the config and the layout, refuses paths that
would resolve inside the job's temporary directory, asks the cluster's state API for its nodes and
refuses a layout they cannot place, refuses a second live job for the same run, and refuses a cluster
whose Python lacks one of raytron's dependencies (launcher/deps.py). Secrets never
travel in the job: not in the config, the entrypoint, the metadata or the runtime environment (the
cluster's nodes take credentials from their own environment, instance role or a mounted file).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from ..config.strict_yaml import ConfigError

RUN_KEY = "raytron_run"
"""Job metadata key naming the run (how `status/logs/stop NAME` find a run's jobs)."""
URI_KEY = "raytron_run_uri"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY$)", re.I)
CODE_DIRS = ("launcher", "parallelism", "models", "data_pipeline", "ops")
JOB_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONUNBUFFERED": "1"}
"""Environment of a job's driver (not secrets): worker prints not re-routed by Ray Train, unbuffered output."""


def is_jobs_address(address: str | None) -> bool:
    """http(s):// addresses go to the Jobs API; anything else (ray://, HOST:PORT) is a Ray address
    the driver connects to from this process."""
    return bool(address) and address.startswith(("http://", "https://"))


_RAY_ADDRESS = re.compile(r"^(auto|ray://\S+|\[?[\w.:-]+\]?:\d+)$")


def check_address(address: str | None) -> None:
    """Refuse, before any data is prepared, an --address that is neither a dashboard URL (http[s]://) nor a
    Ray address (HOST:PORT, ray://HOST:PORT or auto)."""
    if address and not is_jobs_address(address) and not _RAY_ADDRESS.match(address):
        raise ConfigError("--address", f"got {address!r}; use the dashboard's http://HOST:8265 (a Ray Job) or a "
                                       "Ray address HOST:PORT / ray://HOST:10001 (drive the cluster from here)")


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A Ray address (HOST:PORT, ray://HOST:PORT) must accept a connection now: ray.init() would retry
    an address where nothing listens for minutes, after the data was prepared."""
    if not address or address == "auto" or is_jobs_address(address):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        host, port = address.split("://", 1)[-1].rstrip("/"), "10001"  # ray://HOST: Ray Client's default port
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"--address {address}: nothing answers there ({exc.strerror or exc}); start the "
                              "cluster, or give the head's GCS address HOST:6379 (ray://HOST:10001 for Ray "
                              "Client, http://HOST:8265 for a Ray Job)") from None


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer <token>` when a Ray auth token is found ($RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): the header Ray's dashboard checks in token mode."""
    from .cluster import find_token

    token = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def jobs_client(address: str):
    """A Jobs API client; a refused token or an unreachable dashboard becomes PermissionError /
    ConnectionError (the CLI's exit 2: refused before anything started)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address.rstrip("/"), headers=auth_headers())
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PermissionError(f"the cluster at {address} refused this client ({first}); give it the cluster's "
                              "token: RAY_AUTH_TOKEN_PATH=FILE (or RAY_AUTH_TOKEN, or ~/.ray/auth_token)") from None


def secret_values(env: dict[str, str] | None = None) -> dict[str, str]:
    """Values of environment variables whose names mark them as secrets (>= 8 characters)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if SECRET_NAME.search(k) and len(v.strip()) >= 8}


def check_no_secrets(texts: dict[str, str], env: dict[str, str] | None = None) -> None:
    """Refuse to send or write any text that contains the value of a secret environment variable."""
    for name, value in secret_values(env).items():
        for where, text in texts.items():
            if value in text:
                raise ConfigError(where, f"contains the value of ${name}; secrets stay in the environment "
                                         "(or a file path), never in a job config, entrypoint or metadata")


def _is_relative_local(uri: str) -> bool:
    return "://" not in uri and not os.path.isabs(uri)


def check_remote_paths(spec) -> None:
    """Paths the cluster resolves: a relative one would land in the job's temporary working dir."""
    fields = {"checkpoint.uri": spec.checkpoint.uri, "data.cache_uri": spec.data.cache_uri or ""}
    fields.update({f"data.sources[{i}].uri": s.uri for i, s in enumerate(spec.data.sources)})
    for path, uri in fields.items():
        if uri and _is_relative_local(uri):
            raise ConfigError(path, f"got the relative path {uri!r}; on a cluster it would resolve inside the job's "
                                    "temporary working directory: use an absolute path on storage every node "
                                    "shares, or object storage (s3://, gs://)")


def cluster_nodes_over_http(address: str):
    """Alive nodes from the dashboard's state API (no ray.init on the client)."""
    import requests

    from .placement import nodes_from_state_api

    try:
        r = requests.get(f"{address.rstrip('/')}/api/v0/nodes", params={"limit": 10000, "detail": "1"},
                         headers=auth_headers(), timeout=30)
    except requests.RequestException as exc:
        raise ConnectionError(f"cannot reach the Ray dashboard at {address}: {exc}") from None
    if r.status_code in (401, 403):
        raise PermissionError(f"the cluster at {address} refused this client ({r.status_code}): set "
                              "RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token")
    r.raise_for_status()
    return nodes_from_state_api(r.json()["data"]["result"]["result"])


def stage_job(spec, resume: bool, root: Path) -> tuple[dict, str]:
    """Write what travels with the job under `root`; returns (runtime_env, entrypoint)."""
    import raytron

    from ..config.spec import spec_to_yaml

    work, code = root / "job", root / "code" / "raytron"
    work.mkdir(parents=True)
    (work / "job.yaml").write_text(spec_to_yaml(spec))
    code.mkdir(parents=True)
    shutil.copy2(Path(raytron.__file__), code / "__init__.py")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in CODE_DIRS:
        module = __import__(f"raytron.{name}", fromlist=["__path__"])
        shutil.copytree(Path(module.__path__[0]), code / name, ignore=ignore)
    runtime_env = {
        "working_dir": str(work),
        "py_modules": [str(code)],
        "env_vars": dict(JOB_ENV),
    }
    entrypoint = "python -m raytron.launcher.cli submit job.yaml" + (" --resume" if resume else "")
    return runtime_env, entrypoint


def find_jobs(client, run: str) -> list:
    """Jobs of run `run` (metadata), oldest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(RUN_KEY) == run]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def submission_id(name: str) -> str:
    return f"raytron-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def submit_remote(spec, address: str, resume: bool = False, detach: bool = False, out=None) -> int:
    """Submit `spec` as a Ray Job at `address`; follow its logs to the end unless `detach`.
    Returns the CLI exit code (0 succeeded, 1 failed or stopped, 2 refused)."""
    from .deps import check_cluster_deps, job_probe
    from .placement import plan_placement, worker_resources
    from .validate import validate_job

    from ..config.spec import spec_to_yaml

    out = out or sys.stdout
    layout = validate_job(spec)
    check_remote_paths(spec)
    check_no_secrets({"job config": spec_to_yaml(spec)})
    client = jobs_client(address)
    live = [j for j in find_jobs(client, spec.name) if str(j.status) not in TERMINAL]
    if live:
        raise ConfigError("name", f"run {spec.name!r} already has a live job {live[-1].submission_id} "
                                  f"({live[-1].status}); `raytron stop {spec.name} --address {address}` first")
    plan = plan_placement(layout, cluster_nodes_over_http(address), worker_resources(spec))
    print(f"[raytron] {layout.describe()}\n[raytron] {plan.describe()}", file=out, flush=True)
    check_cluster_deps(address, job_probe(client, JOB_ENV))  # the cluster's Python has raytron's dependencies
    sid = submission_id(spec.name)
    metadata = {RUN_KEY: spec.name, URI_KEY: spec.run_uri}
    with tempfile.TemporaryDirectory(prefix="raytron-job-") as tmp:
        runtime_env, entrypoint = stage_job(spec, resume, Path(tmp))
        check_no_secrets({"job config": (Path(runtime_env["working_dir"]) / "job.yaml").read_text(),
                          "entrypoint": entrypoint, "metadata": repr(metadata),
                          "runtime_env": repr(runtime_env["env_vars"])})
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, submission_id=sid)
    print(f"[raytron] submitted job {sid} (run {spec.name}) to {address}", file=out)
    print(f"[raytron]   status: raytron status {spec.name} --address {address}\n"
          f"[raytron]   logs:   raytron logs {spec.name} -f --address {address}\n"
          f"[raytron]   stop:   raytron stop {spec.name} --address {address}", file=out, flush=True)
    if detach:
        return 0
    return follow(client, sid, out)


def follow(client, sid: str, out=None) -> int:
    """Stream the job's logs until it ends; exit code from its final state."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\n[raytron] detached from {sid}; the job keeps running", file=out)
        return 130
    info = wait_terminal(client, sid, timeout=60)
    return report_end(info, out)


def wait_terminal(client, sid: str, timeout: float):
    deadline = time.monotonic() + timeout
    info = client.get_job_info(sid)
    while str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        info = client.get_job_info(sid)
    return info


def report_end(info, out=None) -> int:
    out = out or sys.stdout
    status = str(info.status)
    print(f"[raytron] job {info.submission_id} {status}" + (f": {info.message}" if info.message and
                                                             status != "SUCCEEDED" else ""), file=out)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if code in (1, 2, 3) else 1  # the driver's own exit code: failed / refused / preempted


__all__ = ["is_jobs_address", "submit_remote", "jobs_client", "find_jobs", "follow", "check_no_secrets",
           "secret_values", "check_remote_paths", "auth_headers", "RUN_KEY", "URI_KEY", "TERMINAL"]
