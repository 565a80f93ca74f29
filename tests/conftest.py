"""Shared fixtures: one embedded Ray per test session, bounded to this machine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def ray_local():
    """An in-process Ray with enough logical CPUs for a few 2-4 worker jobs; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()
