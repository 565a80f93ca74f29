"""Ray clusters that raytron starts: closed to strangers unless told otherwise.

Ray's dashboard serves the Jobs API, which runs any entrypoint it is sent (ShadowRay, CVE-2023-48022).
A head that raytron starts therefore binds the dashboard and Jobs API to loopback (127.0.0.1) by
default, and refuses a non-loopback bind unless Ray token authentication is on (`RAY_AUTH_MODE=token`,
Ray >= 2.52) and a token can be found. Reach a loopback-bound head from a laptop through an SSH tunnel
(`ssh -L 8265:127.0.0.1:8265 head`).

`raytron cluster start` runs `ray start --block` as a child process group and records its pid under
the cluster's temp dir; `raytron cluster stop` ends exactly that process (Ray's `--block` mode then
stops every Ray process it started), never every Ray process on the machine as `ray stop` would.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
PID_FILE = "raytron-node.json"


class ClusterSecurityError(ValueError):
    """A cluster start refused because it would expose an unauthenticated code-execution port."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a host name other than localhost: it resolves to whatever the network says
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return (mapped or ip).is_loopback


def find_token(env: dict[str, str] | None = None) -> str | None:
    """The Ray auth token as Ray finds it: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    path = Path(env[TOKEN_PATH_ENV]) if env.get(TOKEN_PATH_ENV) else DEFAULT_TOKEN_PATH
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def token_auth_on(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(AUTH_MODE_ENV, "").strip().lower() == "token"


def check_bind(host: str, env: dict[str, str] | None = None) -> None:
    """Refuse a dashboard/Jobs API bind that strangers could reach without a token."""
    env = os.environ if env is None else env
    if is_loopback(host):
        return
    why = (f"refusing to bind the Ray dashboard and Jobs API to {host}: that API runs any code it is sent "
           "(ShadowRay, CVE-2023-48022), so a non-loopback bind needs Ray token authentication")
    if not token_auth_on(env):
        raise ClusterSecurityError(
            f"{why}, and {AUTH_MODE_ENV} is {env.get(AUTH_MODE_ENV) or 'not set'}. Set {AUTH_MODE_ENV}=token "
            f"and provide a token ({TOKEN_PATH_ENV}=FILE, or `ray get-auth-token --generate` for "
            f"{DEFAULT_TOKEN_PATH}), or keep the default --dashboard-host 127.0.0.1 and use an SSH tunnel")
    if find_token(env) is None:
        raise ClusterSecurityError(
            f"{why}; {AUTH_MODE_ENV}=token is set but no token was found in ${TOKEN_ENV}, ${TOKEN_PATH_ENV} "
            f"or {DEFAULT_TOKEN_PATH} (create one with `ray get-auth-token --generate`)")


def _default_token_auth(env: dict[str, str]) -> None:
    """Token auth on unless the caller chose a mode: without a token Ray's GCS and raylet accept any
    driver that reaches them (on a networked node they listen on every interface: ray_loopback.py)."""
    if env.get(AUTH_MODE_ENV):
        return
    env[AUTH_MODE_ENV] = "token"
    if find_token(env) is None:
        DEFAULT_TOKEN_PATH.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(DEFAULT_TOKEN_PATH, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        print(f"[raytron] generated a Ray auth token in {DEFAULT_TOKEN_PATH} (clients read it from there, or "
              f"from ${TOKEN_PATH_ENV} / ${TOKEN_ENV})", file=sys.stderr)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class NodeOptions:
    """How to start one Ray node (head or worker) with `ray start --block`."""

    head: bool = True
    address: str | None = None
    """GCS address `HOST:PORT` of the head, for a worker node."""
    node_ip: str = "127.0.0.1"
    """Address this node advertises; Ray would otherwise advertise the machine's network address."""
    dashboard_host: str = "127.0.0.1"
    """Bind of the dashboard and Jobs API (head only)."""
    port: int | None = None
    """GCS port (head only); free port when None."""
    dashboard_port: int | None = None
    """Dashboard / Jobs API port (head only); free port when None."""
    num_cpus: int | None = None
    num_gpus: int | None = None
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    temp_dir: str | None = None
    """Ray's temp/session directory; a fresh short one when None (unix socket paths must stay short)."""
    object_store_memory: int | None = 200 * 1024 * 1024


@dataclasses.dataclass
class StartedNode:
    process: subprocess.Popen
    temp_dir: str
    gcs_address: str | None
    dashboard_url: str | None
    log_path: str
    options: NodeOptions | None = None

    def wait_up(self, wait_s: float = 90.0) -> "StartedNode":
        """Return once the node is up (head: dashboard answering); stop it and raise if it fails."""
        try:
            _wait_up(self, self.options, wait_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.process.pid, timeout)
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def stop_nodes(nodes: list[StartedNode], timeout: float = 30.0) -> None:
    """Stop several nodes at once (each `ray start --block` shuts its processes down in parallel)."""
    for node in nodes:
        try:
            os.kill(node.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for node in nodes:
        node.stop(timeout)


def ray_start_module(node_ip: str) -> str:
    """The module `raytron cluster start` runs `ray start` through for a node advertising `node_ip`: a
    loopback node goes through launcher/ray_loopback.py, which keeps every Ray service on loopback."""
    return f"{__package__}.ray_loopback" if is_loopback(node_ip) else "ray.scripts.scripts"


def ray_start_command(opts: NodeOptions, ports: dict[str, int]) -> list[str]:
    cmd = [sys.executable, "-m", ray_start_module(opts.node_ip), "start", "--block", "--disable-usage-stats",
           f"--node-ip-address={opts.node_ip}", f"--temp-dir={opts.temp_dir}",
           # Every listening port chosen here, so several nodes (and other clusters) share one machine.
           f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
           f"--dashboard-agent-listen-port={ports['agent_listen']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
           f"--runtime-env-agent-port={ports['runtime_env']}",
           f"--min-worker-port={ports['worker_min']}", f"--max-worker-port={ports['worker_min'] + 199}"]
    if opts.head:
        cmd += ["--head", f"--port={opts.port}", "--include-dashboard=true",
                f"--dashboard-host={opts.dashboard_host}", f"--dashboard-port={opts.dashboard_port}",
                f"--ray-client-server-port={ports['client']}"]
    else:
        cmd += [f"--address={opts.address}"]
    if opts.num_cpus is not None:
        cmd.append(f"--num-cpus={opts.num_cpus}")
    if opts.num_gpus is not None:
        cmd.append(f"--num-gpus={opts.num_gpus}")
    if opts.resources:
        cmd.append(f"--resources={json.dumps(opts.resources)}")
    if opts.labels:
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in opts.labels.items()))
    if opts.object_store_memory:
        cmd.append(f"--object-store-memory={opts.object_store_memory}")
    return cmd


def _ephemeral_low() -> int:
    """Lowest port the OS hands out for port 0 (free_port); worker ranges stay below it."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_port_base(taken: set[int]) -> int:
    """A base for a 200-port worker range that is free right now (best effort), below the OS's
    ephemeral range and clear of the ports already chosen for this node's other components (Ray
    refuses to start when a component port falls inside the worker range)."""
    top = max(11100, _ephemeral_low() - 200)  # from 11000: clear of Ray's default client port 10001
    for _ in range(100):
        base = 11000 + (int.from_bytes(os.urandom(2), "little") % ((top - 11000) // 100)) * 100
        if any(base <= p < base + 200 for p in taken):
            continue
        try:
            for p in (base, base + 199):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free 200-port range for Ray workers below the ephemeral port range")


def start_node(opts: NodeOptions, env: dict[str, str] | None = None, wait_s: float = 90.0,
               wait: bool = True) -> StartedNode:
    """Start one Ray node as a child process; returns once it is up (head: dashboard answering), or
    at once with `wait=False` (then call `wait_up()`)."""
    env = dict(os.environ if env is None else env)
    if opts.head:
        check_bind(opts.dashboard_host, env)
    check_bind(opts.node_ip, env)  # a node reachable from other machines: its gRPC ports need the token too
    _default_token_auth(env)
    if opts.head:
        opts.port = opts.port or free_port()
        opts.dashboard_port = opts.dashboard_port or free_port()
    elif not opts.address:
        raise ValueError("a worker node needs the head's address (--address HOST:PORT)")
    opts.temp_dir = opts.temp_dir or tempfile.mkdtemp(prefix="rt", dir="/tmp")
    os.makedirs(opts.temp_dir, exist_ok=True)
    ports = {k: free_port() for k in ("node_manager", "object_manager", "agent_listen", "agent_grpc", "metrics",
                                      "runtime_env", "client")}
    ports["worker_min"] = _worker_port_base(set(ports.values()) | {opts.port or 0, opts.dashboard_port or 0})
    log_path = os.path.join(opts.temp_dir, "raytron-node-head.log" if opts.head else
                            f"raytron-node-{ports['node_manager']}.log")
    gcs = f"{opts.node_ip}:{opts.port}" if opts.head else opts.address
    # Ray's own actors (e.g. Ray Train's placement-group cleaner) find "their" cluster through the state
    # API; with several Ray instances on one machine they need to be told which one it is.
    env["RAY_ADDRESS"] = gcs
    url = f"http://{_url_host(opts.dashboard_host, opts.node_ip)}:{opts.dashboard_port}" if opts.head else None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(ray_start_command(opts, ports), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    node = StartedNode(proc, opts.temp_dir, gcs, url, log_path, opts)
    Path(opts.temp_dir, PID_FILE if opts.head else f"raytron-node-{proc.pid}.json").write_text(json.dumps(
        {"pid": proc.pid, "gcs_address": gcs, "dashboard_url": url, "head": opts.head}))
    return node.wait_up(wait_s) if wait else node


def _url_host(bind: str, node_ip: str) -> str:
    return node_ip if bind in ("0.0.0.0", "::") else bind


def _wait_up(node: StartedNode, opts: NodeOptions, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {node.process.returncode}; see {node.log_path}:\n"
                               + Path(node.log_path).read_text()[-3000:])
        if "Ray runtime started" in Path(node.log_path).read_text(errors="replace"):
            if not opts.head or _dashboard_up(opts.dashboard_host, opts.dashboard_port):
                return
        time.sleep(0.5)
    raise TimeoutError(f"Ray node not up after {wait_s:.0f}s; see {node.log_path}")


def _dashboard_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=1):
            return True
    except OSError:
        return False


def stop_process(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the `ray start --block` process `pid` (it stops the Ray processes it started), then
    SIGKILL its process group if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:  # not our child (started by another raytron process): poll for it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # the group was created for this node alone (start_new_session)
    except ProcessLookupError:
        pass


# ---- command line ---------------------------------------------------------------------------------------


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("cluster", help="start or stop a Ray node bound safely (loopback by default)",
                              description=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="cluster_command", required=True)
    s = sub.add_parser("start", help="start a head (default) or, with --address, a worker node")
    s.add_argument("--address", default=None, help="GCS address HOST:PORT of the head: start a worker node")
    s.add_argument("--node-ip-address", default="127.0.0.1",
                   help="address this node advertises (default 127.0.0.1: a one-machine cluster)")
    s.add_argument("--dashboard-host", default="127.0.0.1",
                   help="bind of the dashboard and Jobs API (default 127.0.0.1); anything else needs "
                        "RAY_AUTH_MODE=token and a token")
    s.add_argument("--port", type=int, default=6379, help="GCS port of a head (default 6379)")
    s.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / Jobs API port (default 8265)")
    s.add_argument("--num-cpus", type=int, default=None)
    s.add_argument("--num-gpus", type=int, default=None)
    s.add_argument("--resources", default="{}", help='custom resources as JSON, e.g. \'{"fake_gpu": 2}\'')
    s.add_argument("--temp-dir", default=None, help="Ray temp dir (default: a fresh /tmp/rtXXXX)")
    s.set_defaults(func=_run_start)
    t = sub.add_parser("stop", help="stop a node that `raytron cluster start` started")
    t.add_argument("--temp-dir", required=True, help="the temp dir the node was started with")
    t.set_defaults(func=_run_stop)


def _run_start(args: argparse.Namespace) -> int:
    try:
        resources = json.loads(args.resources)
        opts = NodeOptions(head=args.address is None, address=args.address, node_ip=args.node_ip_address,
                           dashboard_host=args.dashboard_host, port=args.port, dashboard_port=args.dashboard_port,
                           num_cpus=args.num_cpus, num_gpus=args.num_gpus, resources=resources,
                           temp_dir=args.temp_dir)
        node = start_node(opts)
    except (ClusterSecurityError, ValueError) as exc:
        print(f"raytron: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"raytron: error: {exc}", file=sys.stderr)
        return 1
    print(f"[raytron] Ray {'head' if opts.head else 'worker'} node started (pid {node.process.pid}, "
          f"temp dir {node.temp_dir})")
    if opts.head:
        print(f"[raytron]   workers join:  raytron cluster start --address {node.gcs_address}")
        print(f"[raytron]   submit jobs:   raytron submit CONFIG --address {node.dashboard_url}")
        if is_loopback(opts.node_ip):  # Ray's own clients would look for it at the machine's network address
            print(f"[raytron]   Ray's CLI:     RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray status "
                  f"--address {node.gcs_address}")
        off = os.environ.get(AUTH_MODE_ENV, "token").lower() != "token"
        print(f"[raytron]   token auth:    {'OFF (RAY_AUTH_MODE=disabled): keep it on loopback' if off else 'on'}")
    print(f"[raytron]   stop:          raytron cluster stop --temp-dir {node.temp_dir}")
    return 0


def _run_stop(args: argparse.Namespace) -> int:
    records = sorted(Path(args.temp_dir).glob("raytron-node*.json"))
    if not records:
        print(f"raytron: error: no node started by raytron under {args.temp_dir}", file=sys.stderr)
        return 2
    for rec in records:  # worker nodes first, the head last
        info = json.loads(rec.read_text())
        if rec.name != PID_FILE:
            stop_process(int(info["pid"]))
    for rec in records:
        if rec.name == PID_FILE:
            stop_process(int(json.loads(rec.read_text())["pid"]))
    print(f"[raytron] stopped {len(records)} node(s) under {args.temp_dir}")
    return 0


__all__ = ["ClusterSecurityError", "NodeOptions", "StartedNode", "stop_nodes", "check_bind", "find_token",
           "is_loopback",
           "start_node", "stop_process", "token_auth_on", "add_subparser"]
