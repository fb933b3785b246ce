from pipelines.ray_env import forwarded_env
from rigface.config import load_config


def test_forwarded_env_carries_settings_but_never_secrets(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("RIGFACE_TRAIN_FAULT", "rank=1")
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["RIGFACE_TRAIN_FAULT"] == "rank=1"
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"} & set(env)
    assert "s3cr3t" not in env.values()


def test_forwarded_env_is_empty_on_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://x")
    assert forwarded_env() == {}


def test_storage_config_exports_endpoints_without_overriding_the_user():
    cfg = load_config(overrides=["storage.endpoint_url=http://store:8333", "storage.mlflow_tracking_uri=http://ml:5000"],
                      environ={})
    env: dict[str, str] = {"MLFLOW_TRACKING_URI": "http://users-own"}
    cfg.storage.export_env(env)
    assert env["AWS_ENDPOINT_URL"] == "http://store:8333" == env["MLFLOW_S3_ENDPOINT_URL"]
    assert env["MLFLOW_TRACKING_URI"] == "http://users-own"
    assert env["RIGFACE_S3_RETRY_SECONDS"] == "120.0"
