"""Fast security checks (no Ray started): bind refusals, token lookup, secrets kept out of jobs."""

from __future__ import annotations

import pytest

from raytron.launcher.cluster import ClusterSecurityError, check_bind, find_token, is_loopback
from raytron.launcher.jobs import check_no_secrets, check_remote_paths, secret_values
from raytron.config.spec import spec_from_dict
from raytron.config.strict_yaml import ConfigError

from tests.launcher.cluster_helpers import cli_env, raytron


def test_loopback_detection():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "head.example.com"]))


def test_non_loopback_bind_needs_token_mode_and_a_token(tmp_path):
    check_bind("127.0.0.1", {})  # loopback: always allowed
    with pytest.raises(ClusterSecurityError, match="RAY_AUTH_MODE is not set"):
        check_bind("0.0.0.0", {})
    with pytest.raises(ClusterSecurityError, match="RAY_AUTH_MODE is disabled"):
        check_bind("10.1.2.3", {"RAY_AUTH_MODE": "disabled"})
    missing = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent")}
    with pytest.raises(ClusterSecurityError, match="no token was found"):
        check_bind("0.0.0.0", missing)
    (tmp_path / "tok").write_text("s3cr3t-token-value\n")
    ok = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}
    check_bind("0.0.0.0", ok)
    assert find_token(ok) == "s3cr3t-token-value"
    assert find_token({"RAY_AUTH_TOKEN": "from-env", **ok}) == "from-env", "env token first, as Ray does"


def test_cluster_start_refuses_public_dashboard_without_token(tmp_path):
    """Acceptance 4: the CLI refuses, says why, and starts nothing."""
    env = cli_env(tmp_path, HOME=str(tmp_path))  # no RAY_AUTH_* and no ~/.ray/auth_token
    args = ["cluster", "start", "--dashboard-host", "0.0.0.0", "--temp-dir", str(tmp_path / "ray")]
    proc = raytron(args, env, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to bind the Ray dashboard and Jobs API to 0.0.0.0" in proc.stderr
    assert "RAY_AUTH_MODE" in proc.stderr and "CVE-2023-48022" in proc.stderr
    assert not (tmp_path / "ray").exists(), "nothing was started"
    env["RAY_AUTH_MODE"] = "token"  # token mode asked for, but no token anywhere
    proc = raytron(args, env, tmp_path, timeout=120)
    assert proc.returncode == 2 and "no token was found" in proc.stderr, proc.stderr


def _spec(**ckpt):
    return spec_from_dict({"name": "sec", "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 2,
                                                    "global_batch_size": 4, "lr": 3e-4},
                           "data": {"sources": [{"uri": "builtin://python-stdlib"}]},
                           "checkpoint": {"uri": "/abs/runs", **ckpt}})


def test_secret_values_never_travel_in_a_job():
    env = {"AWS_SECRET_ACCESS_KEY": "canary-0123456789", "HOME": "/root", "AWS_REGION": "us-east-1"}
    assert secret_values(env) == {"AWS_SECRET_ACCESS_KEY": "canary-0123456789"}
    check_no_secrets({"job config": "checkpoint: /abs/runs"}, env)
    with pytest.raises(ConfigError, match=r"job config: contains the value of \$AWS_SECRET_ACCESS_KEY"):
        check_no_secrets({"job config": "uri: s3://bucket/canary-0123456789/x"}, env)


def test_remote_paths_must_not_be_relative():
    check_remote_paths(_spec())
    with pytest.raises(ConfigError, match="checkpoint.uri: got the relative path './runs'"):
        check_remote_paths(_spec(uri="./runs"))
