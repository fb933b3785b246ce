"""Credentials inside URLs never leave the process: logs, MLflow params, Ray runtime_env."""

from __future__ import annotations

import logging

from rigface.redact import RedactingFilter, has_url_credentials, redact


def test_redact_every_url_form():
    assert redact("https://user:pw@host:5000/x") == "https://***@host:5000/x"
    assert redact("s3://AKIAKEY:s3cr/t+x@bucket/prefix") == "s3://***@bucket/prefix"  # AWS secrets hold '/'
    assert redact("https://TOKEN@host/x") == "https://***@host/x"
    assert redact("postgresql://u:p@ss@db/mlflow") == "postgresql://***@db/mlflow"  # '@' inside the password
    assert redact("see http://a:b@h1/ and https://c:d@h2") == "see http://***@h1/ and https://***@h2"
    assert redact("s3://bucket/key@v1") == "s3://bucket/key@v1"  # '@' after the first '/' is a path
    assert redact("http://host/x") == "http://host/x" and redact(3) == "3"
    assert has_url_credentials("https://u:p@h") and not has_url_credentials("https://h/u@x")


def test_log_records_and_params_are_redacted(caplog):
    from pipelines.train_tracking import safe_params

    params = safe_params({"train.data": "s3://KEY:SECRET@bucket/shards", "storage.password": "x", "train.lr": 1e-4})
    assert params == {"train.data": "s3://***@bucket/shards", "train.lr": "0.0001"}

    logger = logging.getLogger("rigface.test.redact")
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    records = []
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("tracking at %s", "https://user:hunter2@mlflow:5000")
    finally:
        logger.removeHandler(handler)
    assert records and "hunter2" not in records[0].getMessage() and "https://***@mlflow:5000" in records[0].getMessage()


def test_runtime_env_drops_urls_with_credentials(monkeypatch):
    from pipelines.ray_env import forwarded_env

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:pw@mlflow.example:443")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = forwarded_env()
    assert "MLFLOW_TRACKING_URI" not in env and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert not any("pw@" in v for v in env.values())
