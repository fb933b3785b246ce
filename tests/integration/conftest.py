"""Fixtures shared by the integration tests (the `stack` fixture lives in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_local(stack):
    """A 2-CPU local Ray for Ray Train tests, started after the stack so its workers inherit the S3/MLflow env.
    Modules with other needs (prepare's pool sizing, the 2-node cluster) define their own `ray_local`."""
    import ray

    from pipelines.ray_env import start_local_ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()
