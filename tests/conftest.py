"""Shared fixtures: one embedded Ray per test session, bounded to this machine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray Train's controller polls its workers every 2 s by default: every run then waits up to 2 s after
# its workers finished before the group is shut down (~4 s per run on CI). Polling faster changes only
# how soon the controller sees a result or a failure; the driver passes the setting on to the
# controller and workers (ray.train ENV_VARS_TO_PROPAGATE), subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def ray_local():
    """An in-process Ray with enough logical CPUs for a few 2-4 worker jobs; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port); endpoint reaches s3fs via AWS_ENDPOINT_URL,
    the same way a user points raytron at MinIO. Bounded: it stops at the end of the session."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        mp.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        mp.delenv(k, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield f"http://{host}:{port}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        mp.undo()
        server.stop()
