"""Shared fixtures. The `stack` fixture is the real local stack (SeaweedFS S3 + MLflow server) on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One real local stack for the whole session; its env vars are exported for boto3, MLflow and Ray workers."""
    from rigface.stack import LocalStack

    state = tmp_path_factory.mktemp("stack")
    s = LocalStack(state, bucket="rigface-test")
    info = s.up(timeout=300)  # a loaded CI box (or 8 jobs on 2 cores) starts MLflow in minutes, not seconds
    env = s.env(info)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield s
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s.down()


@pytest.fixture
def s3_prefix(stack, request):
    """A fresh s3:// prefix per test in the stack's bucket."""
    import re
    import uuid

    name = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:60]
    return f"s3://{stack.bucket}/tests/{name}-{uuid.uuid4().hex[:8]}"
