"""Ray kept on this machine, checked by its sockets: a loopback `raytron cluster start` head and an embedded
`raytron submit` run (next to that head, which it must not join) listen on loopback only; the embedded
Ray refuses to run without token auth; a remote submit to a cluster whose Python lacks a dependency, or to
an address where nothing listens, is refused in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from raytron.launcher.cluster import is_loopback
from raytron.launcher.cluster import ray_start_module
from raytron.launcher.ray_loopback import check_token_auth, embedded_auth, loopback_address
from raytron.typed import ConfigError

from tests.launcher.cluster_helpers import REPO, cli_env, listening_sockets, raytron

CONFIG = str(REPO / "cluster_configs" / "local_debug.yaml")
FAST = ["--set", "train.steps=2", "--set", "train.seq_len=32", "--set", "train.global_batch_size=4",
        "--set", "train.micro_batch_size=2", "--set", "data.max_documents=40", "--set", "train.eval_every=0",
        "--set", "checkpoint.every=2"]
# The head's Python lacks deepspeed: a path entry whose sitecustomize makes every import of it fail.
NO_DEEPSPEED = '''import sys
class _NoDeepSpeed:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepspeed":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoDeepSpeed())
'''


def test_loopback_rules():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "::ffff:10.0.0.1", "192.0.2.2"]))
    assert loopback_address("127.0.0.1:6379") and loopback_address("ray://localhost:10001")
    assert not loopback_address("10.0.0.5:6379") and not loopback_address("ray://head:10001")
    assert ray_start_module("127.0.0.1") == "raytron.launcher.ray_loopback"
    assert ray_start_module("10.0.0.5") == "ray.scripts.scripts", "Ray's own CLI for a networked node"


def test_embedded_ray_keeps_token_auth():
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE: is 'disabled'.*unset RAY_AUTH_MODE"):
        check_token_auth({"RAY_AUTH_MODE": "disabled"})
    env = {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token", "HOME": "/nonexistent"}
    embedded_auth(env)
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 64, "a token of the run's own"
    env = {"RAY_AUTH_MODE": "TOKEN", "RAY_AUTH_TOKEN": "mine-0123456789"}
    embedded_auth(env)
    assert env["RAY_AUTH_TOKEN"] == "mine-0123456789", "a token the environment gives is kept"


def test_submit_refuses_disabled_auth_and_unreachable_addresses(tmp_path):
    """Exit 2 within seconds, the cause named, nothing written."""
    runs = tmp_path / "runs"
    env = cli_env(tmp_path, RAY_AUTH_MODE="disabled")
    proc = raytron(["submit", CONFIG, "--set", f"checkpoint.uri={runs}"], env, tmp_path, timeout=120)
    assert proc.returncode == 2 and "RAY_AUTH_MODE: is 'disabled'" in proc.stderr, proc.stderr
    env = cli_env(tmp_path)
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        t0 = time.monotonic()
        proc = raytron(["submit", CONFIG, "--address", address, "--set", f"checkpoint.uri={runs}"], env, tmp_path,
                       timeout=120)
        assert proc.returncode == 2 and f"--address {address}: nothing answers there" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60
    assert not runs.exists()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A loopback head started the way `raytron cluster start` starts one; its Python lacks deepspeed."""
    from raytron.launcher.cluster import NodeOptions, start_node, stop_nodes

    tmp = tmp_path_factory.mktemp("head")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(NO_DEEPSPEED)
    (tmp / "token").write_text(os.urandom(32).hex())
    env = cli_env(tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"))
    env["PYTHONPATH"] = str(tmp / "site")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # jobs run `python`: this one
    node = start_node(NodeOptions(head=True, num_cpus=2), env=env)
    try:
        yield node, tmp
    finally:
        stop_nodes([node])
        shutil.rmtree(node.temp_dir, ignore_errors=True)


def _check_loopback(sockets: set) -> None:
    public = sorted(s for s in sockets if not is_loopback(s[1]))
    assert not public, f"listening beyond loopback: {public}"
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, f"Ray's own servers not among the listeners: {sorted(sockets)}"


@pytest.mark.slow
def test_cluster_start_head_listens_on_loopback_only(head):
    node, _ = head
    _check_loopback(listening_sockets(node.process.pid))


@pytest.mark.slow
def test_embedded_submit_listens_on_loopback_only_beside_a_cluster(head, tmp_path):
    """A `ray start` head runs on this machine; the embedded run starts its own Ray regardless (its own
    gcs_server and raylet, all on loopback), and the head sees no driver of it."""
    from ray.job_submission import JobSubmissionClient

    node, head_tmp = head
    env = cli_env(tmp_path)
    args = [sys.executable, "-m", "raytron.launcher.cli", "submit", CONFIG, "--name", "loop",
            "--set", f"checkpoint.uri={tmp_path / 'runs'}", *FAST]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sockets, deadline = set(), time.monotonic() + 420
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            sockets |= listening_sockets(proc.pid)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-4000:]
    _check_loopback(sockets)
    token = (head_tmp / "token").read_text()
    jobs = JobSubmissionClient(node.dashboard_url, headers={"Authorization": f"Bearer {token}"}).list_jobs()
    assert not jobs, f"the embedded run reached the other cluster: {jobs}"


@pytest.mark.slow
def test_remote_submit_names_a_missing_dependency_in_seconds(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    node, head_tmp = head
    env = cli_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head_tmp / "token"))
    t0 = time.monotonic()
    proc = raytron(["submit", CONFIG, "--address", node.dashboard_url, "--set", f"checkpoint.uri={tmp_path}/runs"],
                   env, tmp_path, timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "lacks raytron's dependencies: deepspeed (pip: deepspeed)" in proc.stderr, proc.stderr
    assert "torch" not in proc.stderr.split("dependencies:")[1].split("[")[0], "only what is missing is named"
    assert took < 120, f"refused after {took:.0f}s"
    token = (head_tmp / "token").read_text()
    client = JobSubmissionClient(node.dashboard_url, headers={"Authorization": f"Bearer {token}"})
    assert not [j for j in client.list_jobs() if (j.metadata or {}).get("raytron_run")], "no training job was submitted"
    # Driving the cluster from here (its GCS address): the workers' Python is checked the same way.
    proc = raytron(["submit", CONFIG, "--address", node.gcs_address, "--set", f"checkpoint.uri={tmp_path}/runs2",
                    *FAST], env, tmp_path, timeout=300)
    assert proc.returncode == 2 and "deepspeed (pip: deepspeed)" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "runs2" / "local-debug").exists(), "the refused run left nothing"
