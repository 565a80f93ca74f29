"""Fixtures for data pipeline tests: a small corpus with known text."""

from __future__ import annotations

import pytest

from tests.data.datapipe_helpers import make_text_corpus


@pytest.fixture
def text_corpus(tmp_path):
    root = tmp_path / "corpus"
    return str(root), make_text_corpus(root)


# s3_server (a moto S3 server on loopback) lives in tests/conftest.py: checkpoint tests share it.
