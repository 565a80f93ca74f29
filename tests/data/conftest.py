"""Fixtures for data pipeline tests: a small corpus with known text, and a loopback S3 server."""

from __future__ import annotations

import pytest

from datapipe_helpers import make_text_corpus


@pytest.fixture
def text_corpus(tmp_path):
    root = tmp_path / "corpus"
    return str(root), make_text_corpus(root)


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
